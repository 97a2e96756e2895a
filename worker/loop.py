"""The worker loop: claim a batch of ready studies, keep their leases alive, hand them to a
processor."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from db.errors import QueueUnavailable
from db.queue import ClaimedStudy, Queue

log = logging.getLogger(__name__)


class BatchProcessor(Protocol):
    """Processes claimed studies. It must finish each study through the queue (complete, fail,
    ignore or release); a study it leaves untouched goes back to the queue when its lease
    expires."""

    def process(self, studies: Sequence[ClaimedStudy]) -> None: ...


@runtime_checkable
class OverlappedProcessor(BatchProcessor, Protocol):
    """A processor that works on several batches at once (:class:`worker.stages.StagedPipeline`).

    ``process`` returns once the batch is taken in, and the processor keeps each study's lease
    alive itself until the study's outcome is recorded; the loop claims the next batch only when
    ``wait_for_room`` says there is room, and ``drain`` waits for every batch in flight."""

    def wait_for_room(self, timeout: float) -> bool: ...

    def drain(self) -> None: ...


class Heartbeat:
    """Extends the leases of the studies in hand every ``interval`` seconds, in a thread.

    The set of studies may change while it runs (:meth:`add`, :meth:`discard`): the overlapped
    pipeline adds a batch when it takes it in and removes each study when its outcome is
    recorded, so a study stays covered while it waits for a later stage."""

    def __init__(self, queue: Queue, worker_id: str, interval: float) -> None:
        self._queue, self._worker_id, self._interval = queue, worker_id, interval
        self._ids: dict[int, None] = {}  # an ordered set
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        return self

    def start(self, ids: Iterable[int] = ()) -> None:
        with self._lock:
            self._ids = dict.fromkeys(ids)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def add(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.update(dict.fromkeys(ids))

    def discard(self, ids: Iterable[int]) -> None:
        with self._lock:
            for i in ids:
                self._ids.pop(i, None)

    @property
    def ids(self) -> list[int]:
        """The studies whose leases it keeps now."""
        with self._lock:
            return list(self._ids)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            ids = self.ids
            if not ids:
                continue
            try:
                held = self._queue.heartbeat(self._worker_id, ids)
                lost = set(ids) - set(held)
                if lost:
                    log.warning("lease lost for study id(s) %s", sorted(lost))
            except QueueUnavailable as exc:
                log.warning("heartbeat failed: database unavailable (%s)", exc)
            except Exception:
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerLoop:
    def __init__(
        self,
        queue: Queue,
        processor: BatchProcessor,
        *,
        worker_id: str,
        batch_size: int,
        poll_interval: float,
        heartbeat_interval: float,
    ) -> None:
        self.queue = queue
        self.processor = processor
        self.worker_id = worker_id
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.stopping = threading.Event()

    def run_once(self) -> int:
        """Claim and process one batch; return how many studies were claimed.

        With an :class:`OverlappedProcessor` this returns once the batch is taken in (its work
        goes on; :meth:`drain` waits for it), and claims only when the processor has room."""
        processor = self.processor
        staged = processor if isinstance(processor, OverlappedProcessor) else None
        if staged is not None:
            while not staged.wait_for_room(self.poll_interval):
                if self.stopping.is_set():
                    return 0
        studies = self.queue.claim(self.worker_id, limit=self.batch_size)
        if not studies:
            return 0
        log.info("claimed %d study(ies): %s", len(studies), [s.id for s in studies])
        if staged is not None:
            staged.process(studies)  # it keeps the leases from here on
            return len(studies)
        hb = Heartbeat(self.queue, self.worker_id, self.heartbeat_interval)
        hb.start([s.id for s in studies])
        try:
            self.processor.process(studies)
        finally:
            hb.stop()
        return len(studies)

    def run(self) -> None:
        log.info("worker loop %s started (batch size %d)", self.worker_id, self.batch_size)
        while not self.stopping.is_set():
            try:
                n = self.run_once()
            except QueueUnavailable as exc:
                log.warning(
                    "database unavailable, retrying in %.0f s (%s)", self.poll_interval * 5, exc
                )
                self.stopping.wait(self.poll_interval * 5)
                continue
            except Exception:
                log.exception("worker loop iteration failed; continuing")
                n = 0
            if n == 0:
                self.stopping.wait(self.poll_interval)
        self.drain()
        log.info("worker loop %s stopped", self.worker_id)

    def drain(self) -> None:
        """Wait until every study taken in is finished (an overlapped processor's batches in
        flight); nothing to wait for with a serial one."""
        if isinstance(self.processor, OverlappedProcessor):
            try:
                self.processor.drain()
            except Exception:
                log.exception("draining the batches in flight failed")

    def stop(self) -> None:
        self.stopping.set()
