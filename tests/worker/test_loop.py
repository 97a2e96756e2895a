"""``worker.loop``: the heartbeat thread and one claim-process round, against a fake queue.

Real threads, short intervals: the waits below add up to well under a second."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from db.errors import QueueUnavailable
from db.records import ClaimedStudy
from worker.loop import Heartbeat, WorkerLoop

INTERVAL = 0.05


class FakeQueue:
    """Records heartbeats (with their time); ``held`` limits which leases it still grants."""

    def __init__(self, *, held: set[int] | None = None, fail_first: int = 0) -> None:
        self.beats: list[tuple[float, str, list[int]]] = []
        self.held = held
        self.fail_first = fail_first
        self.claimable: list[ClaimedStudy] = []
        self._lock = threading.Lock()
        self._beat = threading.Condition(self._lock)

    def heartbeat(self, worker_id: str, study_ids: Sequence[int]) -> list[int]:
        with self._beat:
            self.beats.append((time.monotonic(), worker_id, list(study_ids)))
            self._beat.notify_all()
            if len(self.beats) <= self.fail_first:
                raise QueueUnavailable("study queue database is unavailable: locked")
        return [i for i in study_ids if self.held is None or i in self.held]

    def wait_for_beats(self, n: int, timeout: float = 1.0) -> bool:
        with self._beat:
            return self._beat.wait_for(lambda: len(self.beats) >= n, timeout)

    def claim(self, worker_id: str, limit: int = 1) -> list[ClaimedStudy]:
        studies, self.claimable = self.claimable[:limit], self.claimable[limit:]
        return studies


def _study(i: int) -> ClaimedStudy:
    return ClaimedStudy(
        id=i,
        study_uid=f"1.2.{i}",
        attempts=1,
        previous_report_uid=None,
        lease_expires_at=datetime.now(UTC) + timedelta(minutes=5),
    )


def test_beats_at_its_interval_and_stops_cleanly() -> None:
    queue = FakeQueue()
    hb = Heartbeat(queue, "w1", INTERVAL)
    started = time.monotonic()
    hb.start([3, 4])
    thread = hb._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    assert queue.wait_for_beats(3)
    hb.stop()
    assert not thread.is_alive()
    n = len(queue.beats)
    assert all(worker == "w1" and ids == [3, 4] for _, worker, ids in queue.beats)
    times = [started] + [t for t, _, _ in queue.beats]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= INTERVAL * 0.8, gaps  # not before its interval ...
    time.sleep(INTERVAL * 2)
    assert len(queue.beats) == n  # ... and never after stop()


def test_stop_does_not_wait_for_the_interval() -> None:
    queue = FakeQueue()
    hb = Heartbeat(queue, "w1", 30.0)
    hb.start([1])
    t0 = time.monotonic()
    hb.stop()
    assert time.monotonic() - t0 < 0.5
    assert queue.beats == []  # the first beat is one interval after start
    hb.stop()  # a second stop is harmless


def test_context_manager_stops_the_thread() -> None:
    queue = FakeQueue()
    with Heartbeat(queue, "w1", INTERVAL) as hb:
        hb.start([1])
        thread = hb._thread
        assert queue.wait_for_beats(1)
    assert thread is not None and not thread.is_alive()


def test_reports_lost_leases(caplog: pytest.LogCaptureFixture) -> None:
    queue = FakeQueue(held={1, 3})
    hb = Heartbeat(queue, "w1", INTERVAL)
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        hb.start([1, 2, 3, 4])
        assert queue.wait_for_beats(1)
        hb.stop()
    lost = [r.getMessage() for r in caplog.records if r.name == "worker.loop"]
    assert lost and all(m == "lease lost for study id(s) [2, 4]" for m in lost)


def test_keeps_beating_when_the_database_is_briefly_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = FakeQueue(fail_first=1)
    hb = Heartbeat(queue, "w1", INTERVAL)
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        hb.start([1])
        assert queue.wait_for_beats(2)  # the thread survived the failed beat
        hb.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "worker.loop"]
    assert messages[0].startswith("heartbeat failed: database unavailable")


def test_run_once_heartbeats_while_processing_and_stops_after() -> None:
    queue = FakeQueue()
    queue.claimable = [_study(1), _study(2), _study(3)]

    class Processor:
        def __init__(self) -> None:
            self.seen: list[list[int]] = []

        def process(self, studies: Sequence[ClaimedStudy]) -> None:
            self.seen.append([s.id for s in studies])
            assert queue.wait_for_beats(2)  # leases are kept alive while the batch runs

    processor = Processor()
    loop = WorkerLoop(
        queue,
        processor,
        worker_id="w1",
        batch_size=2,
        poll_interval=INTERVAL,
        heartbeat_interval=INTERVAL,
    )
    assert loop.run_once() == 2
    assert processor.seen == [[1, 2]]
    assert {tuple(ids) for _, _, ids in queue.beats} == {(1, 2)}
    n = len(queue.beats)
    time.sleep(INTERVAL * 2)
    assert len(queue.beats) == n  # the heartbeat stopped with the batch
    assert loop.run_once() == 1
    assert loop.run_once() == 0  # nothing left to claim
