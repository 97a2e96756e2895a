"""Quality gate: the committed view classifier on the real CheXpert sample (frontal and lateral).

Runs wherever ../shared/data exists (CI has it); skipped with a visible reason elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.config import BUNDLED_WEIGHTS
from models.training.datasets.chexpert import chexpert_view_images
from models.training.evaluate import evaluate_view

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

CARD = BUNDLED_WEIGHTS / "view_classifier.json"


def test_committed_view_classifier_on_chexpert_sample(shared_data: Path) -> None:
    if not CARD.exists():
        pytest.fail(f"{CARD} is missing: the view classifier's default weights must be committed")
    torch.set_num_threads(1)
    root = shared_data / "chexpert_sample"
    imgs = chexpert_view_images(root, "train") + chexpert_view_images(root, "test")
    items = [(im.path, int(im.lateral)) for im in imgs]
    assert len(items) == 142 and sum(lab for _, lab in items) >= 35
    rep = evaluate_view(CARD, items)
    assert rep["accuracy"] >= 0.97, rep
