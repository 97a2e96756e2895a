"""Quality gate: the committed view classifier, through the served path (decode + ViewClassifier),
on images it was not trained on: the held-out patients of CheXpert-v1.0-small and the COVID-19
collection (with their laterals) and the 16 CheXpert test images.

Runs wherever ../shared/data exists (CI has it); skipped with a visible reason elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.config import BUNDLED_WEIGHTS
from models.registry import read_card
from models.training.datasets.chexpert import chexpert_view_images
from models.training.evaluate import evaluate_view
from models.training.train_view import covid_view_images

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

CARD = BUNDLED_WEIGHTS / "view_classifier.json"


def test_committed_view_classifier_on_held_out_laterals_and_chexpert_test(
    shared_data: Path,
) -> None:
    if not CARD.exists():
        pytest.fail(f"{CARD} is missing: the view classifier's default weights must be committed")
    needed = [
        shared_data / "chexpert_small",
        shared_data / "covid_chestxray",
        shared_data / "chexpert_sample",
    ]
    for d in needed:
        if not d.is_dir():
            pytest.skip(f"{d} not present: view classifier quality test skipped")
    torch.set_num_threads(1)
    held = set(json.loads(CARD.with_suffix(".split.json").read_text())["held_out_patients"])
    imgs = chexpert_view_images(shared_data / "chexpert_small", "train")
    imgs += covid_view_images(shared_data / "covid_chestxray" / "metadata.csv")
    imgs = [im for im in imgs if im.patient in held]
    imgs += chexpert_view_images(shared_data / "chexpert_sample", "test")
    items = [(im.path, int(im.lateral)) for im in imgs]
    assert sum(lab for _, lab in items) >= 40  # laterals: ~31 CheXpert, ~12 COVID, 6 test
    rep = evaluate_view(CARD, items)
    assert rep["accuracy"] >= 0.98, rep
    # the card records what this served-path evaluation measures
    served = read_card(CARD).metrics["served_path_held_out_laterals_plus_test"]
    assert rep["images"] == served["images"] and rep["errors"] == served["errors"]
