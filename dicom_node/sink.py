"""Where the SCP records what it stored: one record and a protocol, so :mod:`dicom_node` never
imports :mod:`db`.

The application (``worker/ingest.py``) adapts the real queue to :class:`InstanceSink`; the queue
reads :class:`StoredInstance` through a structural protocol of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pydicom.dataset import Dataset

from .views import view_from_headers


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One received instance as stored on disk: the single record from the SCP to the queue."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    eligible: bool
    ineligible_reason: str | None
    rel_path: str
    size_bytes: int
    calling_ae: str
    received_at: datetime | None = None  # None = now (the queue's clock)
    #: "frontal" | "lateral" as the header says (dicom_node.views); None when it says nothing
    view: str | None = None

    @classmethod
    def from_dataset(
        cls,
        ds: Dataset,
        *,
        rel_path: str,
        size_bytes: int,
        calling_ae: str,
        eligible: bool = True,
        ineligible_reason: str | None = None,
    ) -> StoredInstance:
        """The record of a DICOM file already in storage (tools, benchmarks, tests)."""

        def text(keyword: str) -> str | None:
            value = ds.get(keyword)
            return None if value is None else str(value)

        return cls(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=text("Modality"),
            body_part=text("BodyPartExamined"),
            view_position=text("ViewPosition"),
            eligible=eligible,
            ineligible_reason=ineligible_reason,
            rel_path=rel_path,
            size_bytes=size_bytes,
            calling_ae=calling_ae,
            view=view_from_headers(ds).view,
        )


class SinkUnavailable(RuntimeError):
    """The sink (the queue database) cannot record anything right now; nothing was recorded.

    The SCP answers 0xA700 (out of resources) so the sender retries later.
    """


class InstanceSink(Protocol):
    """Records received instances durably. Implementations must be safe to call from several
    association threads at once and raise :class:`SinkUnavailable` when their store is down."""

    def record_instance(self, inst: StoredInstance) -> bool:
        """Commit a row for ``inst``. ``True`` when new, ``False`` when that SOP Instance UID
        was already recorded (nothing changed). Returns only after the commit."""
        ...

    def instance_exists(self, sop_instance_uid: str) -> bool:
        """``True`` when a committed row exists for this SOP Instance UID."""
        ...

    def stored_rel_path(self, sop_instance_uid: str) -> str | None:
        """The committed row's file (relative to the storage folder), or None when none."""
        ...

    def record_conflict(self, sop_instance_uid: str, detail: str) -> bool:
        """Flag the study holding ``sop_instance_uid``: another object with that UID and other
        content arrived and was kept aside (``detail``: where, what differs; no patient data)."""
        ...
