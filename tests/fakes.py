"""In-memory stand-ins for a package's neighbours, so unit tests need neither db nor worker."""

from __future__ import annotations

import threading

from dicom_node.sink import SinkUnavailable, StoredInstance


class MemorySink:
    """An :class:`~dicom_node.sink.InstanceSink` that keeps the records in memory.

    Like the real queue it records a SOP Instance UID once (a second record returns ``False``)
    and is safe to call from several association threads. ``unavailable = True`` makes every
    call raise :class:`~dicom_node.sink.SinkUnavailable`, as a queue whose database is down.
    """

    def __init__(self, *, unavailable: bool = False) -> None:
        self.unavailable = unavailable
        self.records: dict[str, StoredInstance] = {}
        self.conflicts: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.unavailable:
            raise SinkUnavailable("the in-memory sink is marked unavailable (test)")

    def record_instance(self, inst: StoredInstance) -> bool:
        with self._lock:
            self._check()
            if inst.sop_instance_uid in self.records:
                return False
            self.records[inst.sop_instance_uid] = inst
            return True

    def instance_exists(self, sop_instance_uid: str) -> bool:
        with self._lock:
            self._check()
            return sop_instance_uid in self.records

    def stored_rel_path(self, sop_instance_uid: str) -> str | None:
        with self._lock:
            self._check()
            rec = self.records.get(sop_instance_uid)
            return rec.rel_path if rec is not None else None

    def record_conflict(self, sop_instance_uid: str, detail: str) -> bool:
        with self._lock:
            self._check()
            self.conflicts.append((sop_instance_uid, detail))
            return sop_instance_uid in self.records

    def study(self, study_uid: str) -> list[StoredInstance]:
        """The records of one study, in the order they were recorded."""
        with self._lock:
            return [r for r in self.records.values() if r.study_uid == study_uid]
