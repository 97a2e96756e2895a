"""The three-way Model 2 run: patient-level train/val/test over several sources, calibration and
operating thresholds on validation, a derived Model 1 card, and checkpoint/resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from models.analyzer import Analyzer
from models.api import StudyAnalysis, StudyInput
from models.classifiers import DerivedModel1
from models.config import ModelsConfig

from .test_analyzer import tiny_lung_card, tiny_view_card


def _data(tmp: Path) -> tuple[Path, Path]:
    """A folder source (normal / cardiomegaly) and an NIH-style source, 40 patients each."""
    rng = np.random.default_rng(0)
    rows, nih = ["file,label,patient"], ["file,image_index,patient_id,view,finding_labels"]
    for i in range(80):
        sick = i % 2 == 1
        img = (rng.random((48, 40)) * 60 + (150 if sick else 40)).astype(np.uint8)
        p = tmp / "img" / f"x{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), img)
        if i < 40:
            rows.append(f"img/x{i}.png,{'Cardiomegaly' if sick else 'No Finding'},f{i}")
        else:
            nih.append(f"img/x{i}.png,x{i}.png,{i},PA,{'Effusion' if sick else 'No Finding'}")
    (tmp / "l.csv").write_text("\n".join(rows) + "\n")
    (tmp / "nih.csv").write_text("\n".join(nih) + "\n")
    return tmp / "l.csv", tmp / "nih.csv"


def _args(tmp: Path, *extra: str) -> argparse.Namespace:
    from models.training import cli

    folder, nih = _data(tmp)
    p = argparse.ArgumentParser()
    cli.train_classifier_arguments(p)
    w = tmp / "w"
    return p.parse_args(
        [
            "--model",
            "model2",
            "--folder",
            f"{folder}:{tmp}",
            "--nih",
            str(nih),
            "--tiny",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--no-progress",
            "--test-fraction",
            "0.25",
            "--val-fraction",
            "0.3",
            "--out",
            str(w / "model2.json"),
            "--model1-out",
            str(w / "model1.json"),
            "--checkpoint",
            str(tmp / "ckpt.pt"),
            "--cache",
            str(tmp / "cache.npz"),
            *extra,
        ]
    )


def test_three_way_run_writes_calibrated_cards_and_resumes(tmp_path: Path) -> None:
    from models.training import train_model2

    # stop after the first of two epochs (as if the run were killed), then resume
    assert train_model2.run(_args(tmp_path, "--epochs", "2", "--max-minutes", "1e-9")) == 0
    first = json.loads((tmp_path / "w" / "model2.json").read_text())
    assert len(first["metrics"]["train_loss_per_epoch"]) == 1
    assert (tmp_path / "cache.npz").exists()
    assert train_model2.run(_args(tmp_path, "--epochs", "2")) == 0
    card2 = json.loads((tmp_path / "w" / "model2.json").read_text())
    losses = card2["metrics"]["train_loss_per_epoch"]
    assert len(losses) == 2 and losses[0] == first["metrics"]["train_loss_per_epoch"][0]
    m = card2["metrics"]
    assert set(m["studies"]) == {"train", "val", "test", "chexpert_test"}
    assert "model1" in m["test"] and "present_on_no_finding" in m["test"]
    per_source = m["test"]["per_source"]
    assert len(per_source) == 2 and "nih" in per_source
    split = json.loads((tmp_path / "w" / "model2.split.json").read_text())
    keys = {k: set(split[f"{k}_keys"]) for k in ("train", "val", "test")}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    card1 = json.loads((tmp_path / "w" / "model1.json").read_text())
    assert card1["labels"] == ["Abnormal"] and card1["sha256"] == card2["sha256"]
    assert card1["hyperparameters"]["derived_from"]["card"] == "model2.json"
    t_nf = card2["thresholds"]["No Finding"]
    assert abs(card1["thresholds"]["Abnormal"] - (1 - t_nf)) < 1e-6
    # the pair serves: Model 1 is derived from Model 2 and agrees with its No Finding
    w = tmp_path / "w"
    tiny_lung_card(w / "lung_mask.json")
    tiny_view_card(w / "view_classifier.json")
    an = Analyzer.from_config(ModelsConfig(weights_dir=w), device="cpu")
    assert isinstance(an.model1, DerivedModel1)
    img = cv2.imread(str(tmp_path / "img" / "x1.png"), cv2.IMREAD_GRAYSCALE) / 255.0
    out = an.analyse([StudyInput("s", img.astype(np.float32))])[0]
    assert isinstance(out, StudyAnalysis)
    nf = next(f for f in out.model2 if f.label == "No Finding")
    assert out.model1.present != nf.present
