"""Per-stage wall and CPU time, per study (into its result row) and summed per process.

Each stage's time is stored as ``<stage>_wall_ms`` and ``<stage>_cpu_ms`` in the study's
``timings_ms``. CPU time is the calling thread's (:func:`time.thread_time`), so a stage that runs
beside others (the overlapped pipeline, :mod:`worker.stages`) is not charged for their work; in a
pool process it is that process's worker thread. The models' CPU is the exception: torch spreads a
call over its own threads, so the serial path charges the whole process's CPU during the call
(nothing else runs then) and the overlapped path only the calling thread's (see
:mod:`worker.stages`)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass


def _r(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


class Lap:
    """A stopwatch for consecutive stages: ``lap.take(timings, "report")`` records the time since
    the last take (or the start) as that stage's wall and CPU ms and starts the next stage."""

    def __init__(self, cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self._cpu_clock = cpu_clock
        self._wall = time.perf_counter()
        self._cpu = cpu_clock()

    def take(self, timings: dict[str, float], stage: str, *, share: int = 1) -> tuple[float, float]:
        """Record the stage (divided by ``share`` studies, for a batch) and return its
        ``(wall_ms, cpu_ms)``."""
        wall, cpu = time.perf_counter(), self._cpu_clock()
        w, c = _r((wall - self._wall) / share), _r((cpu - self._cpu) / share)
        timings[f"{stage}_wall_ms"] = w
        timings[f"{stage}_cpu_ms"] = c
        self._wall, self._cpu = wall, cpu
        return w, c


@dataclass
class StageTotal:
    studies: int = 0
    wall_ms: float = 0.0
    cpu_ms: float = 0.0


class StageStats:
    """Per-stage sums over the studies a pipeline handled (thread-safe), for benches and logs.

    Holds what a result row cannot: the time of ``queue.complete`` itself, which writes that
    row."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, StageTotal] = defaultdict(StageTotal)

    def add_timings(self, timings: dict[str, float]) -> None:
        """Add every ``<stage>_wall_ms``/``<stage>_cpu_ms`` pair of one study."""
        with self._lock:
            for key, value in timings.items():
                if key.endswith("_wall_ms"):
                    stage = key[: -len("_wall_ms")]
                    t = self._totals[stage]
                    t.studies += 1
                    t.wall_ms += value
                    t.cpu_ms += timings.get(f"{stage}_cpu_ms", 0.0)

    def add(self, stage: str, wall_ms: float, cpu_ms: float) -> None:
        with self._lock:
            t = self._totals[stage]
            t.studies += 1
            t.wall_ms += wall_ms
            t.cpu_ms += cpu_ms

    def per_study(self) -> dict[str, tuple[float, float]]:
        """``stage -> (mean wall ms, mean CPU ms)`` per study."""
        with self._lock:
            return {
                k: (t.wall_ms / t.studies, t.cpu_ms / t.studies)
                for k, t in self._totals.items()
                if t.studies
            }

    def reset(self) -> None:
        with self._lock:
            self._totals.clear()
