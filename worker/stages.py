"""The overlapped pipeline: while the models run batch N, batch N+1 is read and decoded and
batch N-1 is finished (report, key image, files, result row), so the models wait for no one.

Usage (what ``cxr-worker serve`` does with ``worker.overlap: true``; a bench does the same)::

    from worker.loop import WorkerLoop
    from worker.stages import StagedPipeline

    staged = StagedPipeline.from_config(cfg, queue)  # loads the models, starts the pools
    loop = WorkerLoop(queue, staged, worker_id=cfg.worker.name, batch_size=cfg.worker.batch_size,
                      poll_interval=cfg.worker.poll_interval_seconds,
                      heartbeat_interval=cfg.queue.heartbeat_seconds)
    while loop.run_once():   # or loop.run() in a thread, loop.stop() to end it
        pass
    loop.drain()             # every study taken in now has its outcome in the queue
    staged.stats.per_study() # {stage: (wall ms, CPU ms)} per study, queue.complete included
    staged.close()           # drains, then stops the pools and the heartbeat

``StagedPipeline(Pipeline(cfg, queue, analyzer))`` wraps an already loaded analyzer (a bench
that shares one between runs). The serial :class:`worker.pipeline.Pipeline` stays the reference:
the same functions do every step, only their order in time differs.

Stages and where they run:

``prepare``  :func:`worker.pipeline.read_study` (headers, identity, view from headers, pixel
             decode) in a pool of ``worker.prepare_workers`` threads or processes
             (``worker.prepare_in``). Processes pickle the decoded float32 image back (about
             14 MB for a 2k image); on this project's 2-core bench machine threads are faster
             (``bench/pipeline.py`` measures both), so threads are the default.
``models``   one thread in this process, batch after batch, in claim order (also the view
             classifier for images whose headers do not say, and the pairing after it).
``finish``   :meth:`worker.pipeline.Pipeline.finish` in ``worker.finish_workers`` threads:
             report from its template, key image, the files, then ``queue.complete``, once each.
``deliver``  one thread sends what is due after each batch is finished.

Backpressure: at most ``worker.max_inflight_batches`` batches are in flight (taken in, not yet
finished); the worker loop claims the next batch only when there is room, so memory stays
bounded by that many batches' images and maps.

Reliability (as the serial pipeline): every study taken in gets exactly one outcome through
the queue (complete, ignore or fail; a lost lease is logged and left to the lease sweep), one
study's failure never touches another's, error text names classes and UIDs only, the heartbeat
covers every study from the moment it is taken in until its outcome is recorded (also while it
waits for a later stage), and :meth:`StagedPipeline.drain` (the loop calls it when stopped)
waits for every batch in flight.

Timings: each study's ``timings_ms`` holds ``<stage>_wall_ms``/``<stage>_cpu_ms`` for prepare,
models (its share of the batch; CPU of the calling thread only: torch's own worker threads are
not counted here), report, key_image and writes, plus ``wait_models_ms`` (decoded, waiting for the
models) and ``wait_finish_ms`` (analysed, waiting for a finishing thread). ``queue.complete``
writes that row, so its own time goes to :attr:`StagedPipeline.stats` only.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queue_mod
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from db.queue import ClaimedStudy, Queue
from models.api import StudyAnalysis

from .config import AppConfig
from .loop import Heartbeat
from .pipeline import Pipeline, StudyError, ViewsPending, read_study
from .results import PreparedStudy
from .timing import StageStats

log = logging.getLogger(__name__)


def _init_prepare_process() -> None:
    """A prepare pool process: pydicom must not log attribute values (patient data) there
    either (``Service.start`` sets the same in the main process)."""
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


@dataclass(eq=False)
class _Batch:
    seq: int
    studies: list[ClaimedStudy]
    claimed_at: float
    futures: list[Future[PreparedStudy | ViewsPending]] = field(default_factory=list)
    prepared_at: dict[int, float] = field(default_factory=dict)
    handed: set[int] = field(default_factory=set)  # given to a finishing thread
    finished: set[int] = field(default_factory=set)


class StagedPipeline:
    """The overlapped :class:`~worker.loop.OverlappedProcessor`; see the module docstring."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        prepare_workers: int | None = None,
        finish_workers: int | None = None,
        max_inflight_batches: int | None = None,
        prepare_in: str | None = None,
        heartbeat_interval: float | None = None,
    ) -> None:
        wcfg = pipeline.cfg.worker
        auto_prepare, auto_finish = wcfg.workers()
        self.pipeline = pipeline
        self.queue: Queue = pipeline.queue
        self.prepare_workers = prepare_workers or auto_prepare
        self.finish_workers = finish_workers or auto_finish
        self.max_inflight_batches = max_inflight_batches or wcfg.max_inflight_batches
        self.prepare_in = prepare_in or wcfg.prepare_in
        if self.prepare_in not in ("thread", "process"):
            raise ValueError(f"prepare_in must be 'thread' or 'process', not {self.prepare_in!r}")
        if self.max_inflight_batches < 1:
            raise ValueError("max_inflight_batches must be at least 1")
        self.storage_dir = Path(pipeline.cfg.dicom.storage_dir)
        self._prepare_pool = self._new_prepare_pool()
        self._finish_pool = ThreadPoolExecutor(self.finish_workers, thread_name_prefix="finish")
        self._deliver_pool = ThreadPoolExecutor(1, thread_name_prefix="deliver")
        self._delivery: Future[None] | None = None
        self._delivery_pending = False
        self._cond = threading.Condition()
        self._inflight: list[_Batch] = []
        self._seq = 0
        #: the most batches in flight at once, and studies finished (for tests and benches)
        self.peak_inflight_batches = 0
        self.finished_studies = 0
        self._to_models: queue_mod.Queue[_Batch | None] = queue_mod.Queue()
        self.leases = Heartbeat(
            self.queue,
            pipeline.worker_id,
            heartbeat_interval or pipeline.cfg.queue.heartbeat_seconds,
        )
        self.leases.start()
        self._closed = False
        self._model_thread = threading.Thread(target=self._model_loop, name="models", daemon=True)
        self._model_thread.start()
        log.info(
            "overlapped pipeline: %d prepare %s(s), %d finishing thread(s), "
            "at most %d batch(es) in flight",
            self.prepare_workers,
            self.prepare_in,
            self.finish_workers,
            self.max_inflight_batches,
        )

    @classmethod
    def from_config(cls, cfg: AppConfig, queue: Queue) -> StagedPipeline:
        """Load the models (see :meth:`Pipeline.from_config`) and start the stages."""
        return cls(Pipeline.from_config(cfg, queue))

    @property
    def stats(self) -> StageStats:
        return self.pipeline.stats

    def _new_prepare_pool(self) -> Executor:
        if self.prepare_in == "process":
            # spawn, not fork: this process runs torch's threads, which a fork would copy
            # half-held locks of
            return ProcessPoolExecutor(
                self.prepare_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_prepare_process,
            )
        return ThreadPoolExecutor(self.prepare_workers, thread_name_prefix="prepare")

    # --- taking batches in ----------------------------------------------------------------------

    @property
    def inflight_batches(self) -> int:
        with self._cond:
            return len(self._inflight)

    def wait_for_room(self, timeout: float) -> bool:
        """True when a batch can be taken in now, waiting up to ``timeout`` seconds for one."""
        with self._cond:
            return self._cond.wait_for(
                lambda: len(self._inflight) < self.max_inflight_batches, timeout
            )

    def process(self, studies: Sequence[ClaimedStudy]) -> None:
        """Take a claimed batch in (waiting for room first) and return: its studies' leases are
        kept from now on, each is read and decoded in the pool, then analysed and finished."""
        if not studies:
            return
        if self._closed:
            raise RuntimeError("the overlapped pipeline is closed")
        self.leases.add(s.id for s in studies)
        with self._cond:
            self._cond.wait_for(lambda: len(self._inflight) < self.max_inflight_batches)
            self._seq += 1
            batch = _Batch(self._seq, list(studies), time.perf_counter())
            self._inflight.append(batch)
            self.peak_inflight_batches = max(self.peak_inflight_batches, len(self._inflight))
        for s in batch.studies:
            fut = self._submit_prepare(s)
            fut.add_done_callback(partial(_stamp, batch.prepared_at, s.id))
            batch.futures.append(fut)
        self._to_models.put(batch)

    def _submit_prepare(self, study: ClaimedStudy) -> Future[PreparedStudy | ViewsPending]:
        try:
            return self._prepare_pool.submit(read_study, study, self.storage_dir)
        except BrokenProcessPool:
            # a pool process died (killed for memory, a decoder crash): its studies fail and
            # retry; later ones get a fresh pool
            log.error("the prepare pool broke; starting a new one")
            self._prepare_pool = self._new_prepare_pool()
            return self._prepare_pool.submit(read_study, study, self.storage_dir)

    # --- the models' thread ---------------------------------------------------------------------

    def _model_loop(self) -> None:
        while True:
            batch = self._to_models.get()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except BaseException:
                log.exception("model stage failed on a batch; its unfinished studies will retry")
                for s in batch.studies:
                    if s.id not in batch.finished and s.id not in batch.handed:
                        self.pipeline._guarded(s, _raise_transient)
                        self._finished(batch, s)

    def _run_batch(self, batch: _Batch) -> None:
        prepared: list[PreparedStudy] = []
        analyzer = self.pipeline.analyzer
        for study, fut in zip(batch.studies, batch.futures, strict=True):

            def take(fut: Future[PreparedStudy | ViewsPending] = fut) -> None:
                got = fut.result()
                if isinstance(got, ViewsPending):
                    got = got.resolve(analyzer.classify_views)
                prepared.append(got)

            before = len(prepared)
            self.pipeline._guarded(study, take)
            if len(prepared) == before:  # rejected or failed: its outcome is recorded
                self._finished(batch, study)
        if not prepared:
            return
        started = time.perf_counter()
        for p in prepared:
            ready = batch.prepared_at.get(p.claimed.id, started)
            p.timings_ms["wait_models_ms"] = round(max(0.0, started - ready) * 1000.0, 1)
        outputs = self.pipeline.run_models(prepared)
        analysed = time.perf_counter()
        for p, out in zip(prepared, outputs, strict=True):
            batch.handed.add(p.claimed.id)
            try:
                self._finish_pool.submit(self._finish_one, batch, p, out, analysed)
            except RuntimeError:  # the pool is shut down (closing): finish here
                self._finish_one(batch, p, out, analysed)

    # --- finishing ------------------------------------------------------------------------------

    def _finish_one(
        self,
        batch: _Batch,
        p: PreparedStudy,
        out: StudyAnalysis | BaseException,
        analysed: float,
    ) -> None:
        try:
            p.timings_ms["wait_finish_ms"] = round((time.perf_counter() - analysed) * 1000.0, 1)
            self.pipeline._guarded(
                p.claimed, lambda: self.pipeline.finish(p, out, started=batch.claimed_at)
            )
        finally:
            self._finished(batch, p.claimed)

    def _finished(self, batch: _Batch, study: ClaimedStudy) -> None:
        """The study's outcome is recorded (or its lease is lost): stop keeping its lease; the
        batch leaves the pipeline with its last study."""
        self.leases.discard([study.id])
        with self._cond:
            if study.id in batch.finished:  # never expected: say so rather than count twice
                log.error("study %s was finished twice in batch %d", study.id, batch.seq)
                return
            batch.finished.add(study.id)
            self.finished_studies += 1
            done = len(batch.finished) == len(batch.studies)
            if done:
                self._inflight.remove(batch)
                self._cond.notify_all()
        if done:
            self._schedule_delivery()

    def _schedule_delivery(self) -> None:
        with self._cond:
            if self._delivery_pending:  # one not yet started will see this batch's rows too
                return
            self._delivery_pending = True
        try:
            self._delivery = self._deliver_pool.submit(self._deliver)
        except RuntimeError:  # closing: the scheduler's delivery job sends what is due
            with self._cond:
                self._delivery_pending = False

    def _deliver(self) -> None:
        with self._cond:
            self._delivery_pending = False
        try:
            self.pipeline.deliver_due()
        except Exception:
            log.exception("sending due deliveries failed; the scheduler will retry them")

    # --- stopping -------------------------------------------------------------------------------

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every batch taken in is finished and the deliveries they made due were
        tried; False when ``timeout`` seconds passed first."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._inflight, timeout):
                return False
            delivery = self._delivery
        if delivery is not None:
            delivery.result(timeout)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Drain, then stop the pools, the models' thread and the heartbeat."""
        if self._closed:
            return
        drained = self.drain(timeout)
        if not drained:
            log.warning("stopping with batches still in flight; their leases will expire")
        self._closed = True
        self._to_models.put(None)
        self._model_thread.join(timeout=5)
        self._prepare_pool.shutdown(wait=drained, cancel_futures=not drained)
        self._finish_pool.shutdown(wait=drained)
        self._deliver_pool.shutdown(wait=drained)
        self.leases.stop()


def _stamp(
    when: dict[int, float], study_id: int, _fut: Future[PreparedStudy | ViewsPending]
) -> None:
    when[study_id] = time.perf_counter()


def _raise_transient() -> None:
    raise StudyError("the model stage failed on this study's batch", retryable=True)
