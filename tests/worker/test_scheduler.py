"""``worker.scheduler``: which jobs each role gets, at which interval, and what each job calls.

A fake queue records the calls; no database is needed."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

import worker.scheduler as scheduler_mod
from db.errors import QueueUnavailable
from worker.config import AppConfig, parse_config
from worker.scheduler import build_scheduler

INTERVALS = {
    "completion": 7.0,  # completion.sweep_interval_seconds
    "purge": 11.0,  # scheduler.purge_interval_seconds
    "leases": 13.0,  # scheduler.lease_sweep_interval_seconds
    "delivery": 17.0,  # scheduler.delivery_retry_interval_seconds
    "storage": 19.0,  # scheduler.storage_sweep_seconds
}


def make_cfg(storage: Path, *, intervals: dict[str, float] = INTERVALS) -> AppConfig:
    return parse_config(
        {
            "dicom": {"storage_dir": str(storage)},
            "completion": {
                "quiet_seconds": 3,
                "max_wait_seconds": 5,
                "lateral_grace_seconds": 4,
                "sweep_interval_seconds": intervals["completion"],
            },
            "scheduler": {
                "retention_days": 2,
                "purge_interval_seconds": intervals["purge"],
                "lease_sweep_interval_seconds": intervals["leases"],
                "delivery_retry_interval_seconds": intervals["delivery"],
                "storage_sweep_seconds": intervals["storage"],
            },
        },
        environ={},
    )


class FakeQueue:
    """Records what the jobs ask of the queue; ``fail`` makes every call raise it."""

    def __init__(self, purged: list[str] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.purged = purged or []
        self.fail: Exception | None = None
        self.called = threading.Event()

    def _call(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))
        self.called.set()
        if self.fail is not None:
            raise self.fail

    def sweep_completion(
        self, *, quiet_seconds: float, max_wait_seconds: float, lateral_grace_seconds: float
    ) -> int:
        self._call(
            "sweep_completion",
            quiet_seconds=quiet_seconds,
            max_wait_seconds=max_wait_seconds,
            lateral_grace_seconds=lateral_grace_seconds,
        )
        return 1

    def sweep_leases(self) -> int:
        self._call("sweep_leases")
        return 2

    def purge(self, older_than: datetime) -> list[str]:
        self._call("purge", older_than=older_than)
        return list(self.purged)

    def stored_rel_paths(self, sop_instance_uids: list[str]) -> dict[str, str]:
        self._call("stored_rel_paths", sop_instance_uids=list(sop_instance_uids))
        return {}

    def record_instance(self, inst: object) -> bool:
        self._call("record_instance", inst=inst)
        return True

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def delivered(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[AppConfig, object]]]:
    """Replaces ``worker.delivery.deliver_due`` as the scheduler sees it; records its arguments."""
    calls: list[tuple[AppConfig, object]] = []

    def fake_deliver_due(cfg: AppConfig, queue: object, *, limit: int = 200) -> int:
        calls.append((cfg, queue))
        return 0

    monkeypatch.setattr(scheduler_mod, "deliver_due", fake_deliver_due)
    yield calls


def _jobs(sched: BackgroundScheduler) -> dict[str, Any]:
    return {job.id: job for job in sched.get_jobs()}


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("all", {"completion", "purge", "leases", "delivery", "storage"}),
        ("scp", {"completion", "purge", "leases", "storage"}),
        ("worker", {"leases", "delivery"}),
    ],
)
def test_jobs_per_role_at_the_configured_intervals(
    tmp_path: Path, role: str, expected: set[str]
) -> None:
    sched = build_scheduler(make_cfg(tmp_path), FakeQueue(), role=role)
    jobs = _jobs(sched)
    assert set(jobs) == expected
    for job_id, job in jobs.items():
        assert job.trigger.interval == timedelta(seconds=INTERVALS[job_id]), job_id
    assert not sched.running  # the caller starts it


def test_each_job_calls_what_it_should(
    tmp_path: Path, delivered: list[tuple[AppConfig, object]]
) -> None:
    cfg = make_cfg(tmp_path)
    queue = FakeQueue()
    jobs = _jobs(build_scheduler(cfg, queue, role="all"))
    assert {job.name for job in jobs.values()} == {
        "completion_sweep",
        "retention_purge",
        "lease_sweep",
        "delivery_retry",
        "storage_sweep",
    }

    jobs["completion"].func()
    assert queue.calls == [
        (
            "sweep_completion",
            {"quiet_seconds": 3.0, "max_wait_seconds": 5.0, "lateral_grace_seconds": 4.0},
        )
    ]

    queue.calls.clear()
    jobs["leases"].func()
    assert queue.names() == ["sweep_leases"]

    queue.calls.clear()
    before = datetime.now(UTC)
    jobs["purge"].func()
    assert queue.names() == ["purge"]
    cutoff = queue.calls[0][1]["older_than"]
    assert before - timedelta(days=2) <= cutoff <= datetime.now(UTC) - timedelta(days=2)

    queue.calls.clear()
    jobs["delivery"].func()
    assert delivered == [(cfg, queue)]  # worker.delivery.deliver_due(cfg, queue)
    assert queue.calls == []  # sending and retry decisions are deliver_due's and the queue's

    # the storage sweep: a stale temp file goes, a young one stays; a stored file's row is asked
    # for by its study folder (the file is unreadable here: quarantined, nothing recorded)
    folder = tmp_path / "1.2.3"
    folder.mkdir()
    stale, young, orphan = (
        folder / ".1.2.3.4.dcm.ab.tmp",
        folder / ".1.2.3.5.dcm.cd.tmp",
        folder / "1.2.3.6.dcm",
    )
    for path in (stale, young, orphan):
        path.write_bytes(b"x")
    os.utime(stale, (0, 0))
    os.utime(orphan, (0, 0))
    jobs["storage"].func()
    assert not stale.exists() and young.exists()
    assert queue.calls == [("stored_rel_paths", {"sop_instance_uids": ["1.2.3.6"]})]
    assert not orphan.exists() and (tmp_path / "quarantine" / "1.2.3" / "1.2.3.6.dcm").is_file()


def test_retention_purge_deletes_only_folders_inside_storage(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    (storage / "1.2").mkdir(parents=True)
    (storage / "1.2" / "a.dcm").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    queue = FakeQueue(purged=["1.2", "../outside", "9.9"])  # 9.9: rows only, no folder
    n = scheduler_mod.retention_purge(make_cfg(storage), queue)
    assert n == 3
    assert not (storage / "1.2").exists()
    assert (tmp_path / "outside").is_dir()


@pytest.mark.parametrize(
    ("error", "level", "text"),
    [
        (QueueUnavailable("database is down"), logging.WARNING, "database unavailable"),
        (RuntimeError("bug"), logging.ERROR, "will run again at the next interval"),
    ],
)
def test_a_failing_job_logs_and_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, level: int, text: str
) -> None:
    queue = FakeQueue()
    queue.fail = error
    jobs = _jobs(build_scheduler(make_cfg(tmp_path), queue, role="scp"))
    with caplog.at_level(logging.WARNING, logger="worker.scheduler"):
        jobs["leases"].func()  # does not raise
        jobs["leases"].func()
    assert queue.names() == ["sweep_leases", "sweep_leases"]
    records = [r for r in caplog.records if r.name == "worker.scheduler"]
    assert len(records) == 2
    assert all(r.levelno == level and "lease_sweep" in r.getMessage() for r in records)
    assert text in records[0].getMessage()


def test_started_scheduler_runs_its_jobs(
    tmp_path: Path, delivered: list[tuple[AppConfig, object]]
) -> None:
    fast = {"completion": 0.05, "purge": 0.05, "leases": 0.05, "delivery": 0.05, "storage": 60}
    queue = FakeQueue()
    sched = build_scheduler(make_cfg(tmp_path, intervals=fast), queue, role="all")
    sched.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=2)  # normally done in ~0.1 s
        while datetime.now(UTC) < deadline:
            if {"sweep_completion", "sweep_leases", "purge"} <= set(queue.names()) and delivered:
                break
            queue.called.wait(0.02)
            queue.called.clear()
    finally:
        sched.shutdown(wait=True)
    assert {"sweep_completion", "sweep_leases", "purge"} <= set(queue.names())
    assert delivered
