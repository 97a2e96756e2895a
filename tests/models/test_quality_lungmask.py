"""Quality gate: the committed lung-mask weights on the JSRT validation split they were not
trained on.

Needs ``../shared/data/jsrt`` (skipped with a reason elsewhere). The held-out IDs are recomputed
from the seed and validation fraction recorded in the model card, exactly as training split them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.config import BUNDLED_WEIGHTS
from models.registry import read_card
from models.training.datasets.masks import find_pairs
from models.training.eval_lungmask import evaluate_card, validation_ids

CARD = BUNDLED_WEIGHTS / "lung_mask.json"

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def test_committed_lung_mask_reaches_dice_on_jsrt_validation(shared_data: Path) -> None:
    jsrt = shared_data / "jsrt"
    if not jsrt.is_dir():
        pytest.skip(f"{jsrt} not present: lung-mask quality test skipped")
    card = read_card(CARD)
    ids = validation_ids(CARD, [p.id for p in find_pairs(jsrt)])
    recorded = re.search(r"(\d+) validation IDs", card.split)
    assert recorded and int(recorded.group(1)) == len(ids), (
        "split recomputed differently from training"
    )
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    report = evaluate_card(CARD, jsrt, device=torch.device("cpu"), ids=ids)
    assert report["n"] == len(ids) >= 25
    assert report["dice_mean"] >= 0.93, report
    # the figures in the card are what this evaluation measures (same code, same split)
    assert report["dice_mean"] == pytest.approx(card.metrics["dice_mean"], abs=0.005)
    assert report["quality_ok_fraction"] >= 0.9
