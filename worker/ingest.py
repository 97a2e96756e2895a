"""Glue between the storage SCP (:mod:`dicom_node`) and the study queue (:mod:`db`).

:mod:`dicom_node` does not know the database: it records instances through the
:class:`~dicom_node.sink.InstanceSink` protocol. :class:`QueueSink` implements it on the real
:class:`~db.queue.Queue` and turns :class:`~db.errors.QueueUnavailable` into
:class:`~dicom_node.sink.SinkUnavailable`, which the SCP answers with 0xA700 (PACS retries later).
"""

from __future__ import annotations

from db.errors import QueueUnavailable
from db.queue import Queue
from dicom_node.sink import SinkUnavailable, StoredInstance


class QueueSink:
    """An :class:`~dicom_node.sink.InstanceSink` backed by the study queue."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def record_instance(self, inst: StoredInstance) -> bool:
        try:
            return self.queue.record_instance(inst)
        except QueueUnavailable as exc:
            raise SinkUnavailable(str(exc)) from exc

    def instance_exists(self, sop_instance_uid: str) -> bool:
        try:
            return self.queue.instance_exists(sop_instance_uid)
        except QueueUnavailable as exc:
            raise SinkUnavailable(str(exc)) from exc

    def stored_rel_path(self, sop_instance_uid: str) -> str | None:
        try:
            return self.queue.stored_rel_path(sop_instance_uid)
        except QueueUnavailable as exc:
            raise SinkUnavailable(str(exc)) from exc

    def record_conflict(self, sop_instance_uid: str, detail: str) -> bool:
        try:
            return self.queue.record_conflict(sop_instance_uid, detail)
        except QueueUnavailable as exc:
            raise SinkUnavailable(str(exc)) from exc
