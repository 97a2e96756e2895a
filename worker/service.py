"""``cxr-worker serve``: the SCP, the scheduler and the worker loop, in one process or split by
role, with the monitoring endpoint (:mod:`worker.health`) beside them."""

from __future__ import annotations

import logging
import signal
import threading
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Literal

from db.engine import safe_url
from db.queue import Queue

from .config import AppConfig, device_info
from .health import Check, CheckFn, HealthServer, database_check, storage_check
from .metrics import Metrics
from .processes import cuda_present

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from dicom_node.scp import StorageSCP

    from .loop import BatchProcessor, WorkerLoop
    from .processes import WorkerProcesses
    from .stages import StagedPipeline

log = logging.getLogger(__name__)

Role = Literal["all", "scp", "worker"]


class Service:
    """One ``serve`` process. Role ``all``: SCP, scheduler and worker loop together; ``scp`` or
    ``worker`` run one side each, to scale out (the scheduler runs in both, jobs per role).

    The worker side runs in this process (``worker.processes: 1``) or in N worker processes
    that this one starts, watches and stops (:mod:`worker.processes`); the SCP, the scheduler
    and the health endpoint always stay here."""

    def __init__(self, cfg: AppConfig, role: Role = "all") -> None:
        self.cfg = cfg
        self.role = role
        self._stop = threading.Event()
        self.queue: Queue | None = None
        self.scp: StorageSCP | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.loop: WorkerLoop | None = None
        self.processor: BatchProcessor | None = None
        self.staged: StagedPipeline | None = None  # the processor, when worker.overlap is on
        self._loop_thread: threading.Thread | None = None
        #: the worker processes, when worker.processes is more than 1 (no loop here then)
        self.workers: WorkerProcesses | None = None
        disks = {"storage": cfg.dicom.storage_dir}
        if cfg.results_dir is not None:
            disks["results"] = cfg.results_dir
        self.metrics = Metrics(disk_paths=disks)
        self.health: HealthServer | None = None

    def start(self) -> None:
        cfg = self.cfg
        from pydicom import config as pydicom_config  # noqa: PLC0415

        # pydicom's reading validation logs offending values (patient data): never in this
        # process; the SCP and the pipeline check what they need and log attribute names only
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        if cfg.health.enabled:
            # first, so /healthz answers (and /readyz says what is missing) while models load
            self.health = HealthServer(
                cfg.health.host, cfg.health.port, metrics=self.metrics, checks={}
            )
            self.health.start()
        try:
            self._start_parts()
        except BaseException:
            self.stop()
            raise
        log.info(
            "service started (role %s, worker %s, %s, database %s)",
            self.role,
            cfg.worker.name,
            f"{self.workers.count} worker processes" if self.workers else "worker loop in process",
            safe_url(cfg.queue.database_url),
        )

    def _start_parts(self) -> None:
        cfg = self.cfg
        # serve creates the schema in an empty database itself; an out-of-date one is refused
        self.queue = queue = Queue.from_config(
            cfg.queue,
            upgrade_empty=True,
            delivery_max_attempts=cfg.scheduler.delivery_max_attempts,
        )
        self.metrics.attach_queue(queue)
        self._check("database", partial(database_check, queue.ping))
        if self.role in ("all", "worker"):
            self._check("models", lambda: Check(False, "loading the models"))
            auto = cfg.worker.processes == "auto"  # torch is imported here only then
            count = cfg.worker.process_count(cuda=auto and cuda_present(cfg))
            if count > 1:
                self._start_processes(count)
            else:
                self._start_loop(queue)
            self._check("models", self._models_check)
        if self.role in ("all", "scp"):
            from dicom_node.scp import StorageSCP

            from .ingest import QueueSink

            cfg.dicom.storage_dir.mkdir(parents=True, exist_ok=True)
            self._check(
                "storage",
                partial(storage_check, cfg.dicom.storage_dir, cfg.dicom.min_free_disk_mb),
            )
            self.scp = StorageSCP(
                cfg.dicom, QueueSink(queue), device=device_info(cfg), events=self.metrics
            )
            self.scp.start()
            self._check("scp", self._scp_check)
        from .scheduler import build_scheduler

        self.scheduler = build_scheduler(cfg, queue, role=self.role)
        self.scheduler.start()
        if self.loop is not None:
            self._loop_thread = threading.Thread(
                target=self.loop.run, name="worker-loop", daemon=True
            )
            self._loop_thread.start()

    def _start_loop(self, queue: Queue) -> None:
        """The worker loop in this process (``worker.processes: 1``), around the overlapped
        pipeline when ``worker.overlap`` is on."""
        cfg = self.cfg
        from .loop import WorkerLoop
        from .pipeline import Pipeline

        pipeline = Pipeline.from_config(cfg, queue)
        pipeline.observer = self.metrics
        self.processor = pipeline
        if cfg.worker.overlap:
            from .stages import StagedPipeline

            self.staged = self.processor = StagedPipeline(pipeline)
        self.loop = WorkerLoop(
            queue,
            self.processor,
            worker_id=cfg.worker.name,
            batch_size=cfg.worker.batch_size,
            poll_interval=cfg.worker.poll_interval_seconds,
            heartbeat_interval=cfg.queue.heartbeat_seconds,
        )

    def _start_processes(self, count: int) -> None:
        """``count`` worker processes (:mod:`worker.processes`); returns once each has loaded
        its models."""
        from .processes import WorkerProcesses

        self.workers = WorkerProcesses(self.cfg, count, observer=self.metrics)
        self.workers.start()

    def _check(self, name: str, fn: CheckFn) -> None:
        if self.health is not None:
            self.health.checks[name] = fn

    def _models_check(self) -> Check:
        if self.workers is not None:
            ready, wanted = self.workers.running()
            detail = f"{ready} of {wanted} worker processes running with their models loaded"
            return Check(ready == wanted, detail)
        if self.loop is None:
            return Check(False, "no worker loop")
        thread = self._loop_thread
        if thread is None or not thread.is_alive():
            return Check(False, "models loaded; the worker loop is not running")
        return Check(True, f"models loaded; worker loop {self.loop.worker_id} running")

    def _scp_check(self) -> Check:
        cfg = self.cfg.dicom
        where = f"{cfg.ae_title} on {cfg.bind_host}:{cfg.port}"
        if self.scp is not None and self.scp.is_listening():
            return Check(True, f"SCP {where} listening")
        return Check(False, f"SCP {where} is not listening")

    def stop(self) -> None:
        log.info("stopping")
        if self.scp is not None:
            self.scp.stop()  # stop accepting first: nothing half-received is acknowledged
        if self.workers is not None:
            # each child stops claiming and drains its batches in flight; then by PID
            self.workers.stop(timeout=self.cfg.worker.study_timeout_seconds)
        if self.loop is not None:
            self.loop.stop()
        if self._loop_thread is not None:
            # the loop drains the overlapped pipeline's batches in flight before it ends
            self._loop_thread.join(timeout=self.cfg.worker.study_timeout_seconds)
        if self.staged is not None:
            self.staged.close(timeout=5.0)
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.health is not None:
            self.health.stop()
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
