"""worker.stages: the overlapped pipeline with the real SQLite queue, real DICOM files and tiny
randomly initialised models. Exactly one outcome per study, one broken study failed alone,
the in-flight bound, leases kept while a study waits for a later stage, a stop that drains."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from db.queue import Queue
from models.api import StudyAnalysis, StudyInput
from tests.conftest import DATA
from tests.worker import test_pipeline
from tests.worker.test_pipeline import Env, _fresh
from worker.loop import WorkerLoop
from worker.pipeline import StudyError
from worker.results import PreparedStudy
from worker.stages import StagedPipeline

weights = test_pipeline.weights  # the tiny models' fixture

STAGES = ("prepare", "models", "report", "key_image", "writes")


@pytest.fixture
def sc() -> Dataset:
    return pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'queue.sqlite3'}"


def _broken(env: Env, ds: Dataset, tmp_path: Path) -> None:
    """Headers read, pixels do not: the JPEG stream is cut short."""
    buf = tmp_path / "broken.dcm"
    ds.save_as(buf, enforce_file_format=True)
    data = buf.read_bytes()
    env.add(ds, raw=data[: len(data) - 60000])


def _staged(env: Env, **kw: object) -> tuple[StagedPipeline, WorkerLoop]:
    staged = StagedPipeline(env.pipeline, **kw)  # type: ignore[arg-type]
    loop = WorkerLoop(
        env.queue,
        staged,
        worker_id="test-worker",
        batch_size=3,
        poll_interval=0.02,
        heartbeat_interval=5,
    )
    return staged, loop


def _ready(queue: Queue) -> None:
    time.sleep(0.01)
    queue.sweep_completion(quiet_seconds=0.001, max_wait_seconds=0.001)


def _outcome_events(queue: Queue, study_uid: str) -> list[str]:
    d = queue.study(study_uid)
    assert d is not None
    return [e.to_state for e in d.events if e.to_state in ("done", "failed", "ignored", "ready")]


class SlowModels:
    """The real analyzer, each batch held for ``seconds`` (so batches pile up behind it), with
    the number of batches in flight seen at each call."""

    def __init__(self, staged_ref: list[StagedPipeline], seconds: float) -> None:
        self.staged_ref, self.seconds = staged_ref, seconds
        self.seen_inflight: list[int] = []

    def wrap(self, env: Env) -> None:
        real = env.pipeline.analyzer.analyse

        def analyse(studies: Sequence[StudyInput]) -> Sequence[StudyAnalysis | BaseException]:
            self.seen_inflight.append(self.staged_ref[0].inflight_batches)
            time.sleep(self.seconds)
            return real(studies)

        env.pipeline.analyzer.analyse = analyse  # type: ignore[method-assign]


def test_every_study_gets_one_outcome_and_a_broken_one_fails_alone(
    tmp_path: Path, weights: Path, sc: Dataset
) -> None:
    env = Env(tmp_path, _url(tmp_path), weights)
    studies = [_fresh(sc) for _ in range(9)]
    lateral_only = studies[4]
    lateral_only.ViewPosition = "LATERAL"
    for ds in studies[:6] + studies[7:]:
        env.add(ds)
    _broken(env, studies[6], tmp_path)  # in the middle of the third batch
    _ready(env.queue)
    ref: list[StagedPipeline] = []
    slow = SlowModels(ref, 0.3)
    slow.wrap(env)
    staged, loop = _staged(env, max_inflight_batches=2)
    ref.append(staged)
    try:
        claimed = 0
        while n := loop.run_once():
            claimed += n
        loop.drain()
        assert claimed == 9
        assert staged.finished_studies == 9
        assert staged.inflight_batches == 0 and staged.leases.ids == []
        # the bound held: the slow models let batches pile up to it, never past it
        assert staged.peak_inflight_batches == 2
        assert max(slow.seen_inflight) <= 2
    finally:
        staged.close()
    q = env.queue
    for ds in studies:
        d = q.study(ds.StudyInstanceUID)
        assert d is not None
        events = _outcome_events(q, ds.StudyInstanceUID)
        if ds is lateral_only:
            assert d.state == "ignored" and "no frontal" in d.state_reason
        elif ds is studies[6]:
            assert d.state == "failed" and ds.SOPInstanceUID in d.state_reason
            assert "Traceback" not in d.state_reason
        else:
            assert d.state == "done", d.state_reason
            assert len(d.results) == 1
            t = d.results[0].payload["timings_ms"]
            for stage in STAGES:
                assert t[f"{stage}_wall_ms"] >= 0 and t[f"{stage}_cpu_ms"] >= 0, stage
            assert t["wait_models_ms"] >= 0 and t["wait_finish_ms"] >= 0
            assert Path(d.results[0].payload["key_image_png"]).exists()
        # exactly one outcome: ready once (when complete), then one final state
        assert events[-1] == d.state and events.count(d.state) == 1, events
    stats = staged.stats.per_study()
    assert {"prepare", "models", "report", "key_image", "writes", "complete"} <= set(stats)


def test_leases_are_kept_while_a_study_waits_to_be_finished(
    tmp_path: Path, weights: Path, sc: Dataset
) -> None:
    env = Env(tmp_path, _url(tmp_path), weights)
    studies = [_fresh(sc) for _ in range(3)]
    for ds in studies:
        env.add(ds)
    _ready(env.queue)
    beats: list[tuple[float, list[int]]] = []
    real_heartbeat = env.queue.heartbeat

    def heartbeat(worker_id: str, ids: Sequence[int]) -> list[int]:
        beats.append((time.monotonic(), list(ids)))
        return real_heartbeat(worker_id, ids)

    env.queue.heartbeat = heartbeat  # type: ignore[method-assign]
    in_finish: dict[int, tuple[float, float]] = {}
    real_finish = env.pipeline.finish

    def finish(p: PreparedStudy, out: object, *, started: float | None = None) -> None:
        t0 = time.monotonic()
        time.sleep(0.4)  # a slow finishing step: only the heartbeat keeps the lease meanwhile
        real_finish(p, out, started=started)  # type: ignore[arg-type]
        in_finish[p.claimed.id] = (t0, time.monotonic())

    env.pipeline.finish = finish  # type: ignore[method-assign]
    staged, loop = _staged(env, heartbeat_interval=0.05, finish_workers=1)
    try:
        while loop.run_once():
            pass
        loop.drain()
        assert staged.leases.ids == []  # every finished study was let go
    finally:
        staged.close()
    assert len(in_finish) == 3
    for sid, (t0, t1) in in_finish.items():
        covered = [t for t, ids in beats if t0 <= t <= t1 and sid in ids]
        assert covered, f"study {sid}: no heartbeat while it was being finished"
    last = max(t1 for _, t1 in in_finish.values())
    assert not [ids for t, ids in beats if t > last + 0.01 and ids]  # nothing kept after


def test_stop_drains_the_batches_in_flight(tmp_path: Path, weights: Path, sc: Dataset) -> None:
    env = Env(tmp_path, _url(tmp_path), weights)
    studies = [_fresh(sc) for _ in range(12)]
    for ds in studies:
        env.add(ds)
    _ready(env.queue)
    ref: list[StagedPipeline] = []
    slow = SlowModels(ref, 0.3)
    slow.wrap(env)
    staged, loop = _staged(env, max_inflight_batches=2)
    ref.append(staged)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while staged.peak_inflight_batches < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert staged.peak_inflight_batches == 2
        loop.stop()
        thread.join(30)
        assert not thread.is_alive()
        assert staged.inflight_batches == 0  # run() drained before it returned
    finally:
        staged.close()
    states = [env.queue.study(ds.StudyInstanceUID).state for ds in studies]  # type: ignore[union-attr]
    assert "processing" not in states  # nothing taken in was left half done
    assert states.count("done") == staged.finished_studies >= 6
    assert states.count("ready") == 12 - staged.finished_studies  # the rest wait for a worker


def test_prepare_in_processes_sends_images_and_errors_back(
    tmp_path: Path, weights: Path, sc: Dataset
) -> None:
    env = Env(tmp_path, _url(tmp_path), weights)
    good, broken = _fresh(sc), _fresh(sc)
    env.add(good)
    _broken(env, broken, tmp_path)
    _ready(env.queue)
    staged, loop = _staged(env, prepare_in="process", prepare_workers=1)
    try:
        while loop.run_once():
            pass
        loop.drain()
    finally:
        staged.close()
    d = env.queue.study(good.StudyInstanceUID)
    assert d is not None and d.state == "done", d.state_reason
    d = env.queue.study(broken.StudyInstanceUID)
    # a StudyError (not retried) came back across the process boundary intact
    assert d is not None and d.state == "failed" and broken.SOPInstanceUID in d.state_reason


def test_study_error_keeps_retryable_through_pickle() -> None:
    for retryable in (True, False):
        err = pickle.loads(pickle.dumps(StudyError("instance 1.2.3 broke", retryable=retryable)))
        assert isinstance(err, StudyError)
        assert err.retryable is retryable and str(err) == "instance 1.2.3 broke"
