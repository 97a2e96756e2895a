"""``cxr-worker serve``: the SCP, the scheduler and the worker loop, in one process or split by role."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Literal

from db import migrate
from db.queue import Queue

from .config import AppConfig, safe_url

log = logging.getLogger(__name__)

Role = Literal["all", "scp", "worker"]


class DatabaseNotReady(RuntimeError):
    pass


def open_queue(cfg: AppConfig, *, upgrade_empty: bool) -> Queue:
    """Open the queue; an empty database is migrated when ``upgrade_empty``, an out-of-date one is refused."""
    url = cfg.queue.database_url
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if migrate.is_empty(url):
        if not upgrade_empty:
            raise DatabaseNotReady(
                f"database {safe_url(url)} has no schema: run 'cxr-worker db upgrade'"
            )
        log.info("empty database: creating the schema")
        migrate.upgrade(url)
    elif migrate.current_revision(url) != migrate.head_revision():
        raise DatabaseNotReady(
            f"database {safe_url(url)} is at revision {migrate.current_revision(url)}, not the latest: "
            f"run 'cxr-worker db upgrade' (back up first)"
        )
    return Queue.from_url(
        url, lease_seconds=cfg.queue.lease_seconds, max_attempts=cfg.queue.max_attempts
    )


class Service:
    def __init__(self, cfg: AppConfig, role: Role = "all") -> None:
        self.cfg = cfg
        self.role = role
        self._stop = threading.Event()
        self.queue: Queue | None = None
        self.scp = None
        self.scheduler = None
        self.loop = None
        self._loop_thread: threading.Thread | None = None

    def start(self) -> None:
        cfg = self.cfg
        self.queue = open_queue(cfg, upgrade_empty=True)
        deliver_due = None
        if self.role in ("all", "worker"):
            from .loop import WorkerLoop
            from .pipeline import Pipeline

            pipeline = Pipeline.from_config(cfg, self.queue)
            deliver_due = pipeline.deliver_due
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

        self.scheduler = build_scheduler(cfg, self.queue, role=self.role, deliver_due=deliver_due)
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
