"""Glue between the storage SCP (:mod:`dicom_node`) and the study queue (:mod:`db`).

:mod:`dicom_node` does not know the database: it records instances through the
:class:`~dicom_node.sink.InstanceSink` protocol. :class:`QueueSink` implements it on the real
:class:`~db.queue.Queue` and turns :class:`~db.errors.QueueUnavailable` into
:class:`~dicom_node.sink.SinkUnavailable`, which the SCP answers with 0xA700 (PACS retries later).
"""

from __future__ import annotations

from datetime import datetime

from db.errors import QueueUnavailable
from db.queue import Queue
from dicom_node.sink import SinkUnavailable


class QueueSink:
    """An :class:`~dicom_node.sink.InstanceSink` backed by the study queue."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

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
        try:
            return self.queue.record_instance(
                study_uid=study_uid,
                series_uid=series_uid,
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                modality=modality,
                body_part=body_part,
                view_position=view_position,
                eligible=eligible,
                ineligible_reason=ineligible_reason,
                rel_path=rel_path,
                size_bytes=size_bytes,
                calling_ae=calling_ae,
                now=now,
            )
        except QueueUnavailable as exc:
            raise SinkUnavailable(str(exc)) from exc

    def instance_exists(self, sop_instance_uid: str) -> bool:
        try:
            return self.queue.instance_exists(sop_instance_uid)
        except QueueUnavailable as exc:
            raise SinkUnavailable(str(exc)) from exc
