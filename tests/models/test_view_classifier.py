"""View classifier: card-driven loading and prediction, and a tiny training run on synthetic
views."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

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


def test_covid_metadata_views_and_bad_rows(tmp_path: Path) -> None:
    from models.training.datasets.chexpert import DatasetError
    from models.training.train_view import covid_view_images

    (tmp_path / "images").mkdir()
    for i in range(5):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.jpg"), np.full((8, 8), 100, np.uint8))
    rows = [
        "filename,view,finding,patientid,file",
        "a.jpeg,PA,COVID-19,1,images/0.jpg",
        "b.jpeg,L,COVID-19,1,images/1.jpg",
        "c.jpeg,AP Supine,ARDS,2,images/2.jpg",
        "d.jpeg,?,todo,3,images/3.jpg",
        "e.jpeg,,todo,3,images/4.jpg",
    ]
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    ims = covid_view_images(tmp_path / "metadata.csv")
    assert [(im.path.name, im.lateral, im.patient) for im in ims] == [
        ("0.jpg", False, "covid:1"),
        ("1.jpg", True, "covid:1"),
        ("2.jpg", False, "covid:2"),
    ]
    (tmp_path / "metadata.csv").write_text(
        "\n".join([*rows[:2], "x.jpeg,Oblique,x,4,images/4.jpg"])
    )
    with pytest.raises(DatasetError, match=r"metadata.csv:3: unknown view 'Oblique'"):
        covid_view_images(tmp_path)
    (tmp_path / "metadata.csv").write_text("\n".join([rows[0], "x.jpeg,L,x,4,images/9.jpg"]))
    with pytest.raises(DatasetError, match=r"metadata.csv:2: image .*9.jpg not found"):
        covid_view_images(tmp_path / "metadata.csv")


def test_cap_patients_keeps_sources_with_laterals_and_is_deterministic() -> None:
    from models.training.datasets.chexpert import ViewImage
    from models.training.train_view import cap_patients

    ims = [ViewImage(Path(f"n{i}.png"), f"nih:{i}", "nih", False) for i in range(50)]
    ims += [ViewImage(Path(f"c{i}.png"), f"cx:{i // 2}", "cx", i % 2 == 1) for i in range(20)]
    capped = cap_patients(ims, 10, seed=0)
    assert len({im.patient for im in capped if im.source == "nih"}) == 10
    assert sum(im.source == "cx" for im in capped) == 20
    assert cap_patients(ims, 10, seed=0) == capped and cap_patients(ims, 10, seed=1) != capped
    assert cap_patients(ims, 0, seed=0) == ims


def test_wilson_interval() -> None:
    from models.training.train_view import wilson

    lo, hi = wilson(199, 200)
    assert lo == pytest.approx(0.9724, abs=1e-3) and hi == pytest.approx(0.9991, abs=1e-3)
    lo, hi = wilson(50, 50)
    assert hi == 1.0 and 0.92 < lo < 0.94


def test_train_view_checkpoint_resumes(tmp_path: Path) -> None:
    from models.training.train_view import train_view
    from models.view_classifier import ViewCNN

    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 32, 32), torch.tensor([0.0, 1.0] * 6)
    ck = tmp_path / "v.ckpt"
    net = ViewCNN(width=4, blocks=3)
    cpu = torch.device("cpu")

    def fit() -> list[float]:
        return train_view(
            net, x, y, cpu, epochs=2, batch_size=4, lr=1e-2, seed=0, progress=False, checkpoint=ck
        )

    first = fit()
    assert len(first) == 2 and torch.load(ck, weights_only=False)["epoch"] == 2
    more = fit()
    assert more == first  # nothing left to train: the checkpoint already holds both epochs
