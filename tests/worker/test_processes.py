"""worker.processes: ``serve`` with several worker processes on one database (a real SQLite file,
and the real PostgreSQL), real DICOM files and tiny randomly initialised models. Every study is
completed exactly once; a child killed with SIGKILL in the middle of its batches has its
studies taken back when their leases expire, and they finish; stopping leaves no child alive;
the per-study timings of the children reach the parent's metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from db.queue import Queue
from dicom_node.sink import StoredInstance
from tests.conftest import DATA, REPO, free_port
from tests.worker import test_pipeline
from tests.worker.test_pipeline import _fresh
from worker.config import AppConfig, WorkerSection, parse_config
from worker.processes import child_name, threads_per_child
from worker.service import Service

weights = test_pipeline.weights  # the tiny models' fixture


# --- the rules ------------------------------------------------------------------------------------


def test_process_count_auto_rule_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.config

    gib = 1024**3
    monkeypatch.setattr(worker.config, "memory_bytes", lambda: 128 * gib)
    monkeypatch.setattr(worker.config, "cpu_count", lambda: 12)
    auto = WorkerSection(processes="auto")
    assert auto.process_count(cuda=True) == 6  # half the cores
    assert auto.process_count(cuda=False) == 8  # one per core, at most 8
    monkeypatch.setattr(worker.config, "cpu_count", lambda: 64)
    assert auto.process_count(cuda=True) == 8 and auto.process_count(cuda=False) == 8
    # one per 2 GiB of memory: a 64-core box with 6 GiB gets 3, a 3 GiB one 1
    monkeypatch.setattr(worker.config, "memory_bytes", lambda: 6 * gib)
    assert auto.process_count(cuda=False) == 3
    monkeypatch.setattr(worker.config, "memory_bytes", lambda: 3 * gib)
    assert auto.process_count(cuda=False) == 1
    monkeypatch.setattr(worker.config, "memory_bytes", lambda: None)  # unreadable: cores rule
    assert auto.process_count(cuda=False) == 8
    monkeypatch.setattr(worker.config, "cpu_count", lambda: 1)
    assert auto.process_count(cuda=True) == 1 and auto.process_count(cuda=False) == 1
    assert WorkerSection().process_count(cuda=True) == 1  # the default: in the serve process
    assert WorkerSection(processes=3).process_count(cuda=False) == 3
    with pytest.raises(ValueError, match="from 1 to 64"):
        WorkerSection(processes=0)
    with pytest.raises(ValueError):
        WorkerSection(processes="many")


def test_threads_are_shared_out_and_names_are_unique_per_process() -> None:
    assert threads_per_child(2, cores=16) == 8
    assert threads_per_child(8, cores=16) == 2
    assert threads_per_child(4, cores=2) == 1  # never 0
    assert child_name("host:10", 1, 42) == "host:10/w1:42"
    assert child_name("host:10", 1, 42) != child_name("host:10", 1, 43)  # a restart differs


# --- real worker processes ------------------------------------------------------------------------


def _config(tmp: Path, url: str, weights: Path, **worker: object) -> AppConfig:
    return parse_config(
        {
            "dicom": {"storage_dir": str(tmp / "storage"), "min_free_disk_mb": 10},
            "queue": {
                "database_url": url,
                "lease_seconds": 4,
                "heartbeat_seconds": 1,
                "max_attempts": 3,
            },
            "destinations": [],
            "results_dir": str(tmp / "results"),
            "worker": {
                "device": "cpu",
                "batch_size": 2,
                "poll_interval_seconds": 0.1,
                "name": "test-svc",
                "processes": 2,
                **worker,
            },
            "scheduler": {"lease_sweep_interval_seconds": 0.5},
            "models": {"weights_dir": str(weights)},
            "health": {"enabled": False},
        },
        environ={},
    )


def _add(queue: Queue, storage: Path, ds: Dataset) -> None:
    rel = f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
    (storage / ds.StudyInstanceUID).mkdir(parents=True, exist_ok=True)
    ds.save_as(storage / rel, enforce_file_format=True)
    queue.record_instance(
        StoredInstance.from_dataset(
            ds, rel_path=rel, size_bytes=(storage / rel).stat().st_size, calling_ae="TEST"
        )
    )


def _ready(queue: Queue) -> None:
    time.sleep(0.01)
    queue.sweep_completion(quiet_seconds=0.001, max_wait_seconds=0.001)


def _wait(what: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _claimers(queue: Queue, uid: str) -> list[str]:
    d = queue.study(uid)
    assert d is not None
    return [e.actor for e in d.events if e.to_state == "processing"]


def _assert_done_once(queue: Queue, uid: str) -> None:
    d = queue.study(uid)
    assert d is not None
    assert d.state == "done", (d.state, d.state_reason)
    assert len(d.results) == 1, "completed more than once"
    assert [e.to_state for e in d.events].count("done") == 1


@pytest.fixture
def sc() -> Dataset:
    return pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")


@pytest.fixture
def service() -> Iterator[list[Service]]:
    """Services a test started; each is stopped at teardown (no child left behind)."""
    started: list[Service] = []
    yield started
    for svc in started:
        svc.stop()


@pytest.mark.slow
def test_two_processes_drain_the_queue_each_study_once(
    tmp_path: Path, database_url: str, weights: Path, sc: Dataset, service: list[Service]
) -> None:
    cfg = _config(tmp_path, database_url, weights)
    svc = Service(cfg, role="worker")
    service.append(svc)
    svc.start()  # returns once both children have loaded their models
    workers = svc.workers
    assert workers is not None and svc.loop is None  # no worker loop in the parent
    pids = workers.pids
    assert len(pids) == 2 and os.getpid() not in pids and all(_alive(p) for p in pids)
    queue = svc.queue
    assert queue is not None
    studies = [_fresh(sc) for _ in range(16)]
    for ds in studies:
        _add(queue, cfg.dicom.storage_dir, ds)
    _ready(queue)

    def all_done() -> bool:
        return all(
            (d := queue.study(ds.StudyInstanceUID)) is not None and d.state == "done"
            for ds in studies
        )

    _wait(all_done, 180, "the two worker processes did not finish every study")
    claimers: set[str] = set()
    for ds in studies:
        _assert_done_once(queue, ds.StudyInstanceUID)
        got = _claimers(queue, ds.StudyInstanceUID)
        assert len(got) == 1, got  # claimed once: no study went to both processes
        claimers.update(got)
    # both children took part, each under its own name
    assert claimers == set(workers.names().values()), (claimers, workers.names())
    svc.stop()
    assert not any(_alive(p) for p in workers.all_pids())
    # every stored result's timings reached the parent's metrics
    assert workers.studies_reported == len(studies)
    count = svc.metrics.registry.get_sample_value("cxr_analysis_seconds_count")
    assert count == len(studies)


@pytest.mark.slow
def test_a_child_killed_mid_batch_has_its_studies_finished_by_the_others(
    tmp_path: Path, weights: Path, rg1_ds: Dataset, service: list[Service]
) -> None:
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    # the 2k image: a batch takes long enough to be caught in the middle
    cfg = _config(tmp_path, url, weights, batch_size=3)
    svc = Service(cfg, role="worker")
    service.append(svc)
    svc.start()
    workers, queue = svc.workers, svc.queue
    assert workers is not None and queue is not None
    studies = [_fresh(rg1_ds) for _ in range(12)]
    for ds in studies:
        _add(queue, cfg.dicom.storage_dir, ds)
    _ready(queue)
    names = workers.names()
    held: dict[str, list[str]] = {}

    def one_holds_two() -> bool:
        held.clear()
        for ds in studies:
            d = queue.study(ds.StudyInstanceUID)
            owner = d.lease_owner if d is not None and d.state == "processing" else None
            if owner is not None and owner in names.values():
                held.setdefault(owner, []).append(ds.StudyInstanceUID)
        return any(len(v) >= 2 for v in held.values())

    _wait(one_holds_two, 120, "no child held two studies at once")
    victim_name = max(held, key=lambda k: len(held[k]))
    victim = next(pid for pid, name in names.items() if name == victim_name)
    os.kill(victim, signal.SIGKILL)

    def all_done() -> bool:
        return all(
            (d := queue.study(ds.StudyInstanceUID)) is not None and d.state == "done"
            for ds in studies
        )

    _wait(all_done, 240, "the killed child's studies did not come back and finish")
    taken_back = 0
    for ds in studies:
        _assert_done_once(queue, ds.StudyInstanceUID)
        d = queue.study(ds.StudyInstanceUID)
        assert d is not None
        if any(e.reason == f"lease expired (worker {victim_name})" for e in d.events):
            taken_back += 1
            assert d.results[0].payload is not None
            assert _claimers(queue, ds.StudyInstanceUID)[-1] != victim_name
    assert taken_back >= 1  # it was killed with studies in hand, and they came back
    # the supervisor restarted the killed child under a new PID and name
    _wait(lambda: workers.running() == (2, 2), 120, "the killed child was not restarted")
    assert victim not in workers.pids and workers.restarts >= 1
    assert not _alive(victim)
    svc.stop()
    assert not any(_alive(p) for p in workers.all_pids())


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


@pytest.mark.slow
def test_serve_stopped_by_sigterm_leaves_no_worker_process(tmp_path: Path, weights: Path) -> None:
    """The real ``cxr-worker serve`` with two worker processes, stopped as systemd or docker
    stop it (SIGTERM to the serve process): every child is gone, by PID."""
    import yaml

    cfg = {
        "dicom": {"port": free_port(), "bind_host": "127.0.0.1", "storage_dir": "storage"},
        "queue": {"database_url": "sqlite:///queue.sqlite3"},
        "results_dir": "results",
        "worker": {"device": "cpu", "processes": 2, "poll_interval_seconds": 0.2},
        "models": {"weights_dir": str(weights)},
        "health": {"host": "127.0.0.1", "port": free_port()},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--config", str(path)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    kids: list[int] = []
    try:
        _wait(
            lambda: b"service started" in log.read_bytes() or proc.poll() is not None,
            180,
            "serve did not start",
        )
        assert proc.poll() is None, log.read_text()
        kids = _children(proc.pid)
        # the two workers (multiprocessing may add its resource tracker beside them)
        workers = [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert len(workers) == 2, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        # serve stopped its workers by PID before it exited
        assert not any(_alive(k) for k in workers), log.read_text()
        # multiprocessing's resource tracker ends by itself when serve's end of its pipe
        # closes, a moment after serve exits
        _wait(lambda: not any(_alive(k) for k in kids), 10, "a child of serve is still running")
        text = log.read_text()
        assert "worker processes stopped" in text and "still running" not in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


def test_a_child_that_cannot_load_the_models_stops_serve_at_start(
    tmp_path: Path, service: list[Service]
) -> None:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'queue.sqlite3'}", empty)
    svc = Service(cfg, role="worker")
    service.append(svc)
    with pytest.raises(RuntimeError, match="ended while loading the models"):
        svc.start()
    assert svc.workers is not None
    assert svc.workers.all_pids() and not any(_alive(p) for p in svc.workers.all_pids())
