"""Where the SCP records what it stored: a protocol, so :mod:`dicom_node` never imports :mod:`db`.

The application (``worker/ingest.py``) adapts the real queue to this protocol.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


class SinkUnavailable(RuntimeError):
    """The sink (the queue database) cannot record anything right now; nothing was recorded.

    The SCP answers 0xA700 (out of resources) so the sender retries later.
    """


class InstanceSink(Protocol):
    """Records received instances durably. Implementations must be safe to call from several
    association threads at once and raise :class:`SinkUnavailable` when their store is down."""

    def record_instance(
        self,
        *,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        transfer_syntax_uid: str,
        modality: str | None,
        body_part: str | None,
        view_position: str | None,
        eligible: bool,
        ineligible_reason: str | None,
        rel_path: str,
        size_bytes: int,
        calling_ae: str,
        now: datetime | None = None,
    ) -> bool:
        """Commit a row for the instance. ``True`` when new, ``False`` when that SOP Instance UID
        was already recorded (nothing changed). Returns only after the commit."""
        ...

    def instance_exists(self, sop_instance_uid: str) -> bool:
        """``True`` when a committed row exists for this SOP Instance UID."""
        ...
