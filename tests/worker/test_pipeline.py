"""worker.pipeline with the real queue (SQLite and PostgreSQL), real DICOM files and tiny randomly
initialised models: outcomes per study, patient safety, reports, delivery and retry."""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from db.migrate import upgrade
from db.queue import Queue
from dicom_node.sink import StoredInstance
from dicom_node.sr import read_findings
from models.analyzer import Analyzer
from models.labels import OBSERVATIONS
from tests.conftest import DATA, free_port
from tests.dicom_node.test_sr import validate
from tests.models.test_analyzer import tiny_lung_card, tiny_view_card
from tests.models.test_classifiers import tiny_card
from worker.config import parse_config
from worker.loop import WorkerLoop
from worker.pipeline import Pipeline

OBS = list(OBSERVATIONS)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("weights")
    tiny_lung_card(d / "lung_mask.json")
    tiny_card(d / "model1.json", ["Abnormal"], thresholds={"Abnormal": 0.5}, name="model1")
    tiny_card(d / "model2.json", OBS, thresholds={o: 0.5 for o in OBS}, name="model2", seed=1)
    tiny_view_card(d / "view_classifier.json")
    return d


def _fresh(ds: Dataset, *, study: str | None = None, patient: str | None = None) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if patient is not None:
        ds.PatientID = patient
    return ds


class Env:
    def __init__(
        self, tmp: Path, url: str, weights: Path, destinations: list[dict] | None = None
    ) -> None:
        upgrade(url)
        self.storage = tmp / "storage"
        self.cfg = parse_config(
            {
                "dicom": {"storage_dir": str(self.storage), "min_free_disk_mb": 10},
                "queue": {
                    "database_url": url,
                    "lease_seconds": 60,
                    "heartbeat_seconds": 5,
                    "max_attempts": 2,
                },
                "destinations": destinations or [],
                "results_dir": str(tmp / "results"),
                "worker": {"device": "cpu", "batch_size": 8, "name": "test-worker"},
                "models": {"weights_dir": str(weights)},
            },
            environ={},
        )
        self.queue = Queue.from_url(url, lease_seconds=60, max_attempts=2)
        self.pipeline = Pipeline(
            self.cfg, self.queue, Analyzer.from_config(self.cfg.models, device="cpu")
        )
        self.loop = WorkerLoop(
            self.queue,
            self.pipeline,
            worker_id="test-worker",
            batch_size=8,
            poll_interval=0.1,
            heartbeat_interval=5,
        )

    def add(self, ds: Dataset, *, eligible: bool = True, raw: bytes | None = None) -> None:
        rel = f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
        (self.storage / ds.StudyInstanceUID).mkdir(parents=True, exist_ok=True)
        if raw is None:
            ds.save_as(self.storage / rel, enforce_file_format=True)
        else:
            (self.storage / rel).write_bytes(raw)
        self.queue.record_instance(
            StoredInstance.from_dataset(
                ds,
                rel_path=rel,
                size_bytes=(self.storage / rel).stat().st_size,
                calling_ae="TEST",
                eligible=eligible,
                ineligible_reason=None if eligible else "test",
            )
        )

    def ready_and_run(self) -> None:
        time.sleep(0.01)
        self.queue.sweep_completion(quiet_seconds=0.001, max_wait_seconds=0.001)
        while self.loop.run_once():
            pass


@pytest.fixture
def sc() -> Dataset:
    return pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")


def test_each_study_gets_its_own_outcome(
    tmp_path: Path, database_url: str, weights: Path, sc: Dataset
) -> None:
    env = Env(tmp_path, database_url, weights)
    good = _fresh(sc)
    good_lat = _fresh(sc, study=good.StudyInstanceUID)
    good_lat.ViewPosition = "LL"
    lateral_only = _fresh(sc)
    lateral_only.ViewPosition = "LATERAL"
    mixed = _fresh(sc, patient="PATIENT-A")
    mixed_other = _fresh(sc, study=mixed.StudyInstanceUID, patient="PATIENT-B")
    broken = _fresh(sc)
    no_view = _fresh(sc)  # nothing in the headers names the view: the view classifier decides
    for kw in ("ViewPosition", "PatientOrientation", "SeriesDescription", "StudyDescription"):
        if kw in no_view:
            delattr(no_view, kw)
    for ds in (good, good_lat, lateral_only, mixed, mixed_other, no_view):
        env.add(ds)
    # a file whose JPEG stream is cut short: headers read, pixels do not decode
    buf = Path(tmp_path / "broken.dcm")
    broken.save_as(buf, enforce_file_format=True)
    data = buf.read_bytes()
    env.add(broken, raw=data[: len(data) - 60000])

    env.ready_and_run()
    q = env.queue
    d = q.study(good.StudyInstanceUID)
    assert d.state == "done", d.state_reason
    payload = d.results[-1].payload
    assert payload["used_lateral"] is True
    assert payload["frontal_sop_instance_uid"] == good.SOPInstanceUID
    assert payload["lateral_sop_instance_uid"] == good_lat.SOPInstanceUID
    assert [f["label"] for f in payload["model2"]] == OBS
    assert {m["name"] for m in payload["models"]} >= {"model1", "model2", "lung_mask"}
    sr_path = Path(payload["report_path"])
    sr = pydicom.dcmread(sr_path)
    assert sr.PatientID == good.PatientID and sr.StudyInstanceUID == good.StudyInstanceUID
    assert len(read_findings(sr)) == 15
    validate(sr_path)
    assert Path(payload["key_image_png"]).exists()

    d = q.study(lateral_only.StudyInstanceUID)
    assert d.state == "ignored" and "no frontal" in d.state_reason
    d = q.study(mixed.StudyInstanceUID)
    assert d.state == "ignored" and "different patients" in d.state_reason and not d.results
    d = q.study(broken.StudyInstanceUID)
    assert d.state == "failed" and broken.SOPInstanceUID in d.state_reason
    d = q.study(no_view.StudyInstanceUID)
    assert d.state in ("done", "ignored")
    assert "view_classifier" in (
        str(d.results[-1].payload["view_sources"]) if d.results else d.state_reason
    )


def test_delivery_retries_with_backoff_then_delivers(
    tmp_path: Path, database_url: str, weights: Path, sc: Dataset, storescp
) -> None:
    closed = free_port()
    env = Env(
        tmp_path,
        database_url,
        weights,
        destinations=[
            {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": closed},
            {"name": "pacs", "ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port},
        ],
    )
    study = _fresh(sc)
    env.add(study)
    env.ready_and_run()
    d = env.queue.study(study.StudyInstanceUID)
    assert d.state == "done"
    by_dest = {x.destination: x for x in d.deliveries}
    assert by_dest["pacs"].state == "delivered"
    assert by_dest["down"].state == "retry"
    assert by_dest["down"].next_attempt_at > datetime.now(UTC)
    assert (
        "refused" in (by_dest["down"].last_status or "").lower()
        or "association" in (by_dest["down"].last_status or "").lower()
    )
    received = storescp.received()
    assert [r.SOPInstanceUID for r in received if r.Modality == "SR"] == [
        d.results[-1].report_sop_instance_uid
    ]
    # nothing is due yet: a second pass sends nothing
    assert env.pipeline.deliver_due() == 0


def test_late_image_gives_a_new_report_naming_the_old(
    tmp_path: Path, database_url: str, weights: Path, sc: Dataset
) -> None:
    """Even a late image that does not change the chosen pair (a second, lower-ranked frontal)
    produces a new report, which lists the one it replaces."""
    env = Env(tmp_path, database_url, weights)
    first = _fresh(sc)
    env.add(first)
    env.ready_and_run()
    d = env.queue.study(first.StudyInstanceUID)
    assert d.state == "done"
    old_uid = d.results[-1].report_sop_instance_uid

    late = _fresh(sc, study=first.StudyInstanceUID)
    late.ImageType = [
        "DERIVED",
        "SECONDARY",
    ]  # ranked below the first frontal: the pair is unchanged
    env.add(late)
    env.ready_and_run()
    d = env.queue.study(first.StudyInstanceUID)
    assert d.state == "done" and len(d.results) == 2
    assert d.results[-1].payload["frontal_sop_instance_uid"] == first.SOPInstanceUID
    new_uid = d.results[-1].report_sop_instance_uid
    assert new_uid != old_uid
    sr = pydicom.dcmread(d.results[-1].payload["report_path"])
    pred = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == old_uid
