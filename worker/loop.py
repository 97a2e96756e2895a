"""The worker loop: claim a batch of ready studies, keep their leases alive, hand them to a
processor."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from db.errors import QueueUnavailable
from db.queue import ClaimedStudy, Queue

log = logging.getLogger(__name__)


class BatchProcessor(Protocol):
    """Processes claimed studies. It must finish each study through the queue (complete, fail,
    ignore or release); a study it leaves untouched goes back to the queue when its lease
    expires."""

    def process(self, studies: Sequence[ClaimedStudy]) -> None: ...


class Heartbeat:
    """Extends the leases of the studies in hand every ``interval`` seconds, in a thread."""

    def __init__(self, queue: Queue, worker_id: str, interval: float) -> None:
        self._queue, self._worker_id, self._interval = queue, worker_id, interval
        self._ids: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        return self

    def start(self, ids: list[int]) -> None:
        self._ids = list(ids)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                held = self._queue.heartbeat(self._worker_id, self._ids)
                lost = set(self._ids) - set(held)
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
        """Claim and process one batch; return how many studies were claimed."""
        studies = self.queue.claim(self.worker_id, limit=self.batch_size)
        if not studies:
            return 0
        log.info("claimed %d study(ies): %s", len(studies), [s.id for s in studies])
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
        log.info("worker loop %s stopped", self.worker_id)

    def stop(self) -> None:
        self.stopping.set()
