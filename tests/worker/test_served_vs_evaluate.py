"""Evaluation scores what the service serves: the probabilities ``cxr-worker evaluate classifier``
writes for a study equal the Analyzer's for the same decoded image (within 1e-3), and the
command reads a folder laid out as the official CheXpert-v1.0-small release with valid.csv.

Uses the committed cards in models/weights and real DICOM files from tests/data; nothing from
../shared."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from dicom_node.pixels import load_image as decode_dicom
from models.analyzer import Analyzer
from models.api import StudyAnalysis, StudyInput
from models.config import BUNDLED_WEIGHTS, ModelsConfig
from models.labels import OBSERVATIONS
from tests.conftest import DATA
from worker.cli import main as cxr_worker

FILES = ["RG1_UNCR.dcm", "siim_cr_pa_secondary_capture.dcm"]


def _chexpert_small(root: Path, images: list[np.ndarray]) -> Path:
    """CheXpert-v1.0-small/valid.csv + valid/patientNNNNN/study1/view1_frontal.png (16-bit)."""
    base = root / "CheXpert-v1.0-small"
    head = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(OBSERVATIONS) + "\n"
    rows = []
    for i, img in enumerate(images):
        rel = f"CheXpert-v1.0-small/valid/patient{64541 + i}/study1/view1_frontal.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), np.round(img * 65535).astype(np.uint16))
        labels = ["1" if (o == "No Finding") == (i == 0) else "0" for o in OBSERVATIONS]
        rows.append(f"{rel},Male,60,Frontal,PA," + ",".join(labels) + "\n")
    (base / "valid.csv").write_text(head + "".join(rows))
    return root


@pytest.mark.skipif(
    not (BUNDLED_WEIGHTS / "model2.json").exists(), reason="no committed Model 2 card"
)
def test_evaluate_probabilities_equal_the_service(tmp_path: Path) -> None:
    # decoded exactly as the worker pipeline decodes instances (dicom_node.pixels)
    images = [decode_dicom(DATA / f).pixels for f in FILES]
    folder = _chexpert_small(tmp_path / "chexpert", images)
    out = tmp_path / "probs.csv"
    report = tmp_path / "report.json"
    status = cxr_worker(
        [
            "evaluate",
            "classifier",
            "--card",
            str(BUNDLED_WEIGHTS / "model2.json"),
            "--chexpert-test",
            str(folder),
            "--probabilities",
            str(out),
            "--out",
            str(report),
            "--threads",
            "1",
        ]
    )
    assert status == 0 and report.exists()
    rows = list(csv.DictReader(out.open()))
    assert [r["key"] for r in rows] == [
        "chexpert-test:patient64541/study1",
        "chexpert-test:patient64542/study1",
    ]
    an = Analyzer.from_config(ModelsConfig(weights_dir=BUNDLED_WEIGHTS), device="cpu")
    served = an.analyse([StudyInput(f"s{i}", img) for i, img in enumerate(images)])
    for row, res in zip(rows, served, strict=True):
        assert isinstance(res, StudyAnalysis)
        assert float(row["Abnormal"]) == pytest.approx(res.model1.probability, abs=1e-3)
        for f in res.model2:
            assert float(row[f.label]) == pytest.approx(f.probability, abs=1e-3), f.label
        nf = next(f for f in res.model2 if f.label == "No Finding")
        assert res.model1.present != nf.present  # one decision
