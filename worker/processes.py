"""Several worker processes on one machine (``worker.processes`` > 1).

Each study costs some 200 ms of Python on the CPU around the models (decode, the models' own
pre- and post-processing, report, key image, writes). In one process those share one
interpreter lock, so one ``serve`` process keeps about one core busy however many it has. With
``worker.processes: N`` the ``serve`` process (the parent) keeps the SCP, the scheduler and the
health endpoint and starts N children (``multiprocessing`` spawn context: nothing of the
parent's threads, locks or CUDA state is copied). Each child is a whole worker of its own: its
own queue connection, its own models (on the same device), a
:class:`~worker.pipeline.Pipeline` or :class:`~worker.stages.StagedPipeline` and a
:class:`~worker.loop.WorkerLoop`, with its own name in leases (``<worker.name>/w<i>:<pid>``).

Why this is safe: the queue was built for many workers on many machines. A claim is one write
transaction that moves each study ``ready -> processing`` by compare-and-set; on PostgreSQL the
candidates are selected ``FOR UPDATE SKIP LOCKED``, on SQLite the transaction is ``BEGIN
IMMEDIATE`` (one writer at a time, the others wait up to the busy timeout, 15 s, in WAL mode),
so two processes never hold one study. A child that dies leaves its studies ``processing``
until their leases expire; the lease sweep (the parent's scheduler) puts them back to ready and
another child (or the restarted one) analyses them.

The parent (:class:`WorkerProcesses`), in one supervisor thread:

- restarts a child that exits while the service is not stopping, after a back-off that doubles
  from 1 s to 60 s and starts again from 1 s once a child ran a minute; each exit is logged with
  the child's index, PID and exit code or signal only (nothing a study contains);
- forwards each child's per-study timings to the parent's observer (the service's
  :class:`~worker.metrics.Metrics`): a child sends ``(analysis_seconds, end_to_end_seconds)``
  over its own pipe for every stored result, the parent feeds its histograms. A pipe per child
  (not one shared ``multiprocessing.Queue``): a child killed in the middle of a write cannot
  leave a lock held that the others would wait on. What a killed child had not yet sent is
  lost from the histograms (its results are in the database, and the gauges read there,
  ``cxr_studies`` by state, count them);
- stops them by PID on shutdown: a stop message on each child's control pipe (the child's loop
  stops claiming and drains its batches in flight), a wait with a timeout, then SIGTERM (a child
  already stopping exits at once), a last wait, then SIGKILL. Only the supervisor thread
  reaps (``waitpid``); the other threads read a slot's process as running until it has
  reaped it (a child reaped by two threads at once looks alive to the one that loses).

A child stops by itself when the parent dies (its control pipe reads end-of-file). SIGINT is
ignored in the children (a Ctrl-C reaches the whole process group; the parent stops them in
order); a first SIGTERM stops a child gracefully, a second ends it at once.

Torch threads: each child uses ``max(1, cores // N)`` intra-op threads, and where
``worker.prepare_workers``/``finish_workers`` are not set, its pools are sized from that share
of the cores rather than from all of them, so N children do not oversubscribe the machine.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

from .config import AppConfig, cpu_count

if TYPE_CHECKING:
    from .pipeline import StudyObserver

log = logging.getLogger(__name__)

#: restart back-off: first delay, cap, and how long a child must run to start again from the first
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0


def child_name(base: str, index: int, pid: int) -> str:
    """A child's name in leases and events: unique per process, and says whose child it is."""
    return f"{base}/w{index}:{pid}"[:255]


def threads_per_child(count: int, cores: int | None = None) -> int:
    """Torch intra-op threads for each of ``count`` children: the cores shared out, at least 1."""
    return max(1, (cores or cpu_count()) // max(1, count))


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# --- in the child ---------------------------------------------------------------------------------


class _Forward:
    """The child's :class:`~worker.pipeline.StudyObserver`: each stored result's timings go to
    the parent over the child's pipe (finishing threads send one at a time)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def study_analysed(self, *, analysis_seconds: float, end_to_end_seconds: float | None) -> None:
        self.send(("study", float(analysis_seconds), end_to_end_seconds))

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the parent is gone: nothing to tell
                pass


def _child_main(
    cfg: AppConfig, index: int, count: int, control: Connection, events: Connection
) -> None:
    """A worker process: load the models, run the worker loop until told to stop (or the parent
    is gone), drain the batches in flight, exit."""
    from .logging_setup import configure

    configure(cfg.logging.level, cfg.logging.format)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # the second SIGTERM (the parent's terminate after its timeout)
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    pid = os.getpid()
    cfg.worker.name = child_name(cfg.worker.name, index, pid)
    cores = cpu_count()
    share = max(1, cores // count)
    if cfg.worker.prepare_workers is None:
        cfg.worker.prepare_workers = max(1, share - 1)
    if cfg.worker.finish_workers is None:
        cfg.worker.finish_workers = max(1, min(4, share // 4))

    def watch_parent() -> None:
        try:
            while not stop.is_set():
                if control.poll(0.5):
                    control.recv()  # "stop"
                    break
        except (EOFError, OSError):
            log.warning("worker process %d: the parent is gone; stopping", index)
        stop.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    forward = _Forward(events)
    _run_child(cfg, index, count, stop, forward)
    forward.send(("stopped", index, pid))
    events.close()


def _run_child(
    cfg: AppConfig, index: int, count: int, stop: threading.Event, forward: _Forward
) -> None:
    import torch
    from pydicom import config as pydicom_config

    from db.queue import Queue

    from .loop import BatchProcessor, WorkerLoop
    from .pipeline import Pipeline

    # as in Service.start: pydicom must not log attribute values (patient data)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    torch.set_num_threads(threads_per_child(count))
    queue = Queue.from_config(
        cfg.queue, delivery_max_attempts=cfg.scheduler.delivery_max_attempts
    )  # the parent created or checked the schema
    pipeline = Pipeline.from_config(cfg, queue)
    pipeline.observer = forward
    processor: BatchProcessor = pipeline
    staged = None
    if cfg.worker.overlap:
        from .stages import StagedPipeline

        staged = processor = StagedPipeline(pipeline)
    loop = WorkerLoop(
        queue,
        processor,
        worker_id=cfg.worker.name,
        batch_size=cfg.worker.batch_size,
        poll_interval=cfg.worker.poll_interval_seconds,
        heartbeat_interval=cfg.queue.heartbeat_seconds,
    )
    # the loop in a thread of its own, as serve runs it: torch's threads behave differently
    # when called from the main thread (see bench/pipeline.py)
    thread = threading.Thread(target=loop.run, name="worker-loop", daemon=True)
    thread.start()
    log.info(
        "worker process %d (pid %d) running as %s, %d torch thread(s)",
        index,
        os.getpid(),
        cfg.worker.name,
        torch.get_num_threads(),
    )
    forward.send(("ready", index, os.getpid()))
    try:
        while not stop.wait(0.5):
            if not thread.is_alive():  # never expected: exit so the parent restarts us
                log.error("worker process %d: the worker loop ended; exiting", index)
                raise SystemExit(1)
    finally:
        loop.stop()
        thread.join(timeout=cfg.worker.study_timeout_seconds)  # the loop drains what it holds
        if staged is not None:
            staged.close(timeout=5.0)
        queue.close()
        log.info("worker process %d (pid %d) stopped", index, os.getpid())


# --- in the parent --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    """One child position: the process now in it and its restart bookkeeping."""

    index: int
    proc: BaseProcess | None = None
    control: Connection | None = None  # parent -> child: "stop"
    events: Connection | None = None  # child -> parent: ready, study timings, stopped
    started_at: float = 0.0
    ready: bool = False
    failures: int = 0
    restart_at: float | None = None
    starts: int = 0
    exits: list[int | None] = field(default_factory=list)


class WorkerProcesses:
    """N worker processes and the supervisor thread that keeps them running; see the module
    docstring. ``start`` returns once every child has loaded its models (or raises when one
    exits first); ``stop`` ends them all."""

    def __init__(
        self,
        cfg: AppConfig,
        count: int,
        *,
        observer: StudyObserver | None = None,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.cfg = cfg
        self.count = count
        self.observer = observer
        self.backoff_first_s, self.backoff_max_s = backoff_first_s, backoff_max_s
        self.stable_after_s = stable_after_s
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(count)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready_cond = threading.Condition(self._lock)
        #: results stored by the children (counted from their messages), and restarts made
        self.studies_reported = 0
        self.restarts = 0
        self._all_pids: list[int] = []

    # --- what the service and tests read -------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """The PIDs of the children now running."""
        with self._lock:
            return [
                s.proc.pid for s in self._slots if s.proc is not None and s.proc.pid is not None
            ]

    def all_pids(self) -> list[int]:
        """Every PID a child ever had (to check that none is left after ``stop``)."""
        with self._lock:
            return list(self._all_pids)

    def names(self) -> dict[int, str]:
        """PID -> the child's name in leases, for the children now running."""
        with self._lock:
            return {
                s.proc.pid: child_name(self.cfg.worker.name, s.index, s.proc.pid)
                for s in self._slots
                if s.proc is not None and s.proc.pid is not None
            }

    def running(self) -> tuple[int, int]:
        """(children alive that have loaded their models, children wanted)."""
        with self._lock:
            ready = sum(1 for s in self._slots if s.ready and s.proc is not None)
        return ready, self.count

    # --- starting ---------------------------------------------------------------------------------

    def start(self, *, ready_timeout: float = 600.0) -> None:
        """Start every child and the supervisor; wait until each has loaded its models. A child
        that exits while starting stops them all and raises ``RuntimeError`` (as ``serve``
        stops at start when the models cannot be loaded in one process)."""
        with self._lock:
            for slot in self._slots:
                self._spawn(slot)
        self._thread = threading.Thread(target=self._supervise, name="worker-processes")
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        with self._ready_cond:
            while True:
                failed = [s for s in self._slots if s.exits]
                if failed:
                    break
                if all(s.ready for s in self._slots):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready_cond.wait(min(left, 0.5))
        self.stop(timeout=10.0)
        if failed:
            s = failed[0]
            raise RuntimeError(
                f"worker process {s.index} ended while loading the models "
                f"({_exit_text(s.exits[0])}); see its log lines above"
            )
        raise RuntimeError(f"the worker processes did not load their models in {ready_timeout} s")

    def _spawn(self, slot: _Slot) -> None:
        """Start a child in ``slot`` (the lock is held)."""
        control_r, control_w = self._ctx.Pipe(duplex=False)
        events_r, events_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_child_main,
            args=(self.cfg, slot.index, self.count, control_r, events_w),
            name=f"cxr-worker-{slot.index}",
            daemon=False,
        )
        proc.start()
        control_r.close()  # the child holds these ends now; ours would hide its exit
        events_w.close()
        slot.proc, slot.control, slot.events = proc, control_w, events_r
        slot.started_at, slot.ready, slot.restart_at = time.monotonic(), False, None
        slot.starts += 1
        assert proc.pid is not None
        self._all_pids.append(proc.pid)
        log.info("worker process %d started (pid %d)", slot.index, proc.pid)

    # --- the supervisor thread --------------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            with self._lock:
                readers = [s.events for s in self._slots if s.events is not None]
                sentinels = [s.proc.sentinel for s in self._slots if s.proc is not None]
            try:
                got = wait([*readers, *sentinels], timeout=0.5)
            except OSError:  # a pipe closed under us (stop): look again
                got = []
            for item in got:
                if isinstance(item, Connection):
                    self._read(item)
            self._reap()
            if self._stopping.is_set():
                with self._lock:
                    if all(s.proc is None for s in self._slots):
                        return
                continue
            self._restart_due()

    def _read(self, conn: Connection) -> None:
        slot = next((s for s in self._slots if s.events is conn), None)
        try:
            while conn.poll():
                self._message(slot, conn.recv())
        except (EOFError, OSError):  # the child closed its end (stopped or died)
            with self._lock:
                if slot is not None and slot.events is conn:
                    slot.events = None
            conn.close()

    def _message(self, slot: _Slot | None, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "study":
            self.studies_reported += 1
            if self.observer is not None:
                try:
                    self.observer.study_analysed(
                        analysis_seconds=message[1], end_to_end_seconds=message[2]
                    )
                except Exception:  # noqa: BLE001 - metrics must never stop the supervisor
                    log.warning("could not record a child's study timings", exc_info=True)
        elif kind == "ready" and slot is not None:
            with self._ready_cond:
                slot.ready = True
                self._ready_cond.notify_all()

    def _reap(self) -> None:
        """Note every child that has exited; schedule its restart unless stopping."""
        with self._lock:
            dead = [s for s in self._slots if s.proc is not None and not s.proc.is_alive()]
        for slot in dead:
            if slot.events is not None:  # what it sent before it went
                self._read(slot.events)
        now = time.monotonic()
        with self._ready_cond:
            for slot in dead:
                proc = slot.proc
                assert proc is not None
                proc.join(0)
                code = proc.exitcode
                for conn in (slot.control, slot.events):
                    if conn is not None:
                        conn.close()
                slot.proc = slot.control = slot.events = None
                slot.ready = False
                slot.exits.append(code)
                self._ready_cond.notify_all()
                if self._stopping.is_set():
                    continue
                ran = now - slot.started_at
                slot.failures = 0 if ran >= self.stable_after_s else slot.failures + 1
                delay = min(
                    self.backoff_max_s, self.backoff_first_s * 2 ** max(0, slot.failures - 1)
                )
                slot.restart_at = now + delay
                log.error(
                    "worker process %d (pid %d) ended (%s) after %.0f s; restarting it in %.0f s "
                    "(its studies go back to the queue when their leases expire)",
                    slot.index,
                    proc.pid,
                    _exit_text(code),
                    ran,
                    delay,
                )

    def _restart_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            for slot in self._slots:
                if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                    self.restarts += 1
                    self._spawn(slot)

    # --- stopping ---------------------------------------------------------------------------------

    def stop(self, timeout: float = 600.0) -> None:
        """Stop every child by PID: the stop message, a wait of up to ``timeout`` seconds in
        all (each drains its batches in flight), then SIGTERM, then SIGKILL.

        Only the supervisor thread reaps children (``waitpid``): two threads reaping the same
        child race, and the loser sees a child that has already exited as still running. So
        this method waits for the supervisor to report each child gone, and signals a child
        only while it is still in its slot (not reaped, so its PID cannot have been reused)."""
        self._stopping.set()
        with self._lock:
            controls = [s.control for s in self._slots if s.control is not None]
        for control in controls:
            try:
                control.send("stop")
            except (OSError, ValueError):
                pass
        gone = self._wait_gone(time.monotonic() + timeout)
        for name, signum in (("SIGTERM", signal.SIGTERM), ("SIGKILL", signal.SIGKILL)):
            if gone:
                break
            with self._lock:
                late = [s.proc.pid for s in self._slots if s.proc is not None]
                log.warning(
                    "%d worker process(es) still running after the stop (pids %s): %s",
                    len(late),
                    late,
                    name,
                )
                for pid in late:
                    if pid is not None:
                        try:
                            os.kill(pid, signum)
                        except ProcessLookupError:  # exited meanwhile (a zombie until reaped)
                            pass
            gone = self._wait_gone(time.monotonic() + 5.0)
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        with self._lock:  # the supervisor closed what it reaped; close anything left
            for slot in self._slots:
                for conn in (slot.control, slot.events):
                    if conn is not None:
                        conn.close()
                slot.control = slot.events = None
                if slot.proc is not None:
                    slot.proc.join(0)
                    slot.proc = None
        log.info("worker processes stopped")

    def _wait_gone(self, deadline: float) -> bool:
        """Wait until every slot is empty (each child reaped) or ``deadline``; True when empty.
        The supervisor reaps; without it (never started, or ended) this thread does."""
        while True:
            supervised = self._thread is not None and self._thread.is_alive()
            if not supervised:
                self._reap()
            with self._ready_cond:
                if all(s.proc is None for s in self._slots):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if supervised:
                    self._ready_cond.wait(min(left, 0.5))
            if not supervised:
                time.sleep(min(max(left, 0.0), 0.05))


def cuda_present(cfg: AppConfig) -> bool:
    """Whether the models will run on CUDA (``worker.device``), for the ``auto`` process count;
    imports torch only when ``device: auto`` leaves it open."""
    if cfg.worker.device != "auto":
        return cfg.worker.device == "cuda"
    import torch

    return bool(torch.cuda.is_available())
