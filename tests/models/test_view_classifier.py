"""View classifier: card-driven loading and prediction, and a tiny training run on synthetic
views."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.registry import ModelLoadError
from models.view_classifier import ViewClassifier

from .test_analyzer import tiny_view_card


def test_predictions_follow_card_labels_and_threshold(tmp_path: Path) -> None:
    tiny_view_card(tmp_path / "v.json")
    vc = ViewClassifier.from_card(tmp_path / "v.json")
    rng = np.random.default_rng(0)
    imgs = [rng.random((50, 40), dtype=np.float32) for _ in range(3)]
    p = vc.probabilities(imgs)
    preds = vc.predict(imgs)
    for pi, pred in zip(p, preds, strict=True):
        assert pred.view == ("lateral" if pi >= 0.5 else "frontal")
        assert pred.probability == pytest.approx(max(pi, 1 - pi))
    card = json.loads((tmp_path / "v.json").read_text())
    card["thresholds"] = {"lateral": 0.0}  # everything is lateral now
    card["labels"] = ["frontal", "lateral"]
    (tmp_path / "v.json").write_text(json.dumps(card))
    assert all(
        x.view == "lateral" for x in ViewClassifier.from_card(tmp_path / "v.json").predict(imgs)
    )
    with pytest.raises(ValueError, match="2-D"):
        vc.predict([np.zeros((4, 4, 3), np.float32)])
    card["labels"] = ["frontal"]
    (tmp_path / "v.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="2 labels"):
        ViewClassifier.from_card(tmp_path / "v.json")


def _synthetic_view(rng: np.random.Generator, lateral: bool, size: int = 64) -> np.ndarray:
    """Frontal: two dark lung fields side by side; lateral: one dark field and a bright spine
    edge."""
    img = np.full((size, size), 200, np.uint8)
    if lateral:
        cv2.ellipse(img, (size // 2, size // 2), (size // 4, size // 3), 0, 0, 360, 60, -1)
        cv2.rectangle(img, (size - 14, 4), (size - 6, size - 4), 255, -1)
    else:
        for cx in (size // 3, 2 * size // 3):
            cv2.ellipse(img, (cx, size // 2), (size // 8, size // 3), 0, 0, 360, 50, -1)
    noise = rng.normal(0, 10, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def test_train_view_cli_learns_synthetic_views(tmp_path: Path) -> None:
    from models.training import cli, train_view

    rng = np.random.default_rng(0)
    rows = ["file,label,view,patient"]
    for i in range(40):
        lat = i % 3 == 0
        name = f"img/{i}.png"
        (tmp_path / "img").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / name), _synthetic_view(rng, lat))
        rows.append(f"{name},No Finding,{'lateral' if lat else 'PA'},p{i}")
    (tmp_path / "v.csv").write_text("\n".join(rows) + "\n")
    p = argparse.ArgumentParser()
    cli.train_view_arguments(p)
    out = tmp_path / "w" / "view.json"
    args = p.parse_args(
        [
            "--folder",
            f"{tmp_path / 'v.csv'}:{tmp_path}",
            "--epochs",
            "15",
            "--image-size",
            "32",
            "--width",
            "4",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert train_view.run(args) == 0
    card = json.loads(out.read_text())
    assert card["labels"] == ["frontal", "lateral"] and card["input_size"] == 32
    assert card["metrics"]["held_out"]["images"] == 10
    losses = card["metrics"]["train_loss_per_epoch"]
    assert losses[-1] < 0.5 * losses[0]
    assert card["metrics"]["held_out"]["accuracy"] >= 0.8
