"""``cxr-worker serve``: the SCP, the scheduler and the worker loop, in one process or split by
role."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Literal

from db.engine import safe_url
from db.queue import Queue

from .config import AppConfig

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from dicom_node.scp import StorageSCP

    from .loop import WorkerLoop

log = logging.getLogger(__name__)

Role = Literal["all", "scp", "worker"]


class Service:
    """One ``serve`` process. Role ``all``: SCP, scheduler and worker loop together; ``scp`` or
    ``worker`` run one side each, to scale out (the scheduler runs in both, jobs per role)."""

    def __init__(self, cfg: AppConfig, role: Role = "all") -> None:
        self.cfg = cfg
        self.role = role
        self._stop = threading.Event()
        self.queue: Queue | None = None
        self.scp: StorageSCP | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.loop: WorkerLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def start(self) -> None:
        cfg = self.cfg
        # serve creates the schema in an empty database itself; an out-of-date one is refused
        self.queue = Queue.from_config(
            cfg.queue,
            upgrade_empty=True,
            delivery_max_attempts=cfg.scheduler.delivery_max_attempts,
        )
        if self.role in ("all", "worker"):
            from .loop import WorkerLoop
            from .pipeline import Pipeline

            pipeline = Pipeline.from_config(cfg, self.queue)
            self.loop = WorkerLoop(
                self.queue,
                pipeline,
                worker_id=cfg.worker.name,
                batch_size=cfg.worker.batch_size,
                poll_interval=cfg.worker.poll_interval_seconds,
                heartbeat_interval=cfg.queue.heartbeat_seconds,
            )
        if self.role in ("all", "scp"):
            from dicom_node.scp import StorageSCP

            from .ingest import QueueSink

            cfg.dicom.storage_dir.mkdir(parents=True, exist_ok=True)
            self.scp = StorageSCP(cfg.dicom, QueueSink(self.queue))
            self.scp.start()
            log.info(
                "SCP %s listening on %s:%d", cfg.dicom.ae_title, cfg.dicom.bind_host, cfg.dicom.port
            )
        from .scheduler import build_scheduler

        self.scheduler = build_scheduler(cfg, self.queue, role=self.role)
        self.scheduler.start()
        if self.loop is not None:
            self._loop_thread = threading.Thread(
                target=self.loop.run, name="worker-loop", daemon=True
            )
            self._loop_thread.start()
        log.info(
            "service started (role %s, database %s)", self.role, safe_url(cfg.queue.database_url)
        )

    def stop(self) -> None:
        log.info("stopping")
        if self.scp is not None:
            self.scp.stop()  # stop accepting first: nothing half-received is acknowledged
        if self.loop is not None:
            self.loop.stop()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=self.cfg.worker.study_timeout_seconds)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        self._stop.set()

    def serve_forever(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d received", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
