"""Quality gate: the committed lung-mask weights on each site's held-out cases they were not
trained on (JSRT and OpenIST), and the mask quality checks' false-flag rate there.

Needs ``../shared/data/jsrt`` and ``../shared/data/openist_normals`` (skipped with a visible reason
when absent). The held-out IDs are recomputed from the seed and fractions recorded in the model
card, exactly as training split them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.config import BUNDLED_WEIGHTS
from models.registry import read_card
from models.training.datasets.masks import find_pairs
from models.training.eval_lungmask import evaluate_card
from models.training.train_lungmask import site_split

CARD = BUNDLED_WEIGHTS / "lung_mask.json"

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

#: site folder -> the Dice the held-out mean must reach (the issue's targets on independent sets
#: are 0.97 JSRT and 0.96 OpenIST; these floors catch a broken model or pipeline)
SITES = {"jsrt": 0.95, "openist_normals": 0.94}


@pytest.mark.parametrize("site", sorted(SITES))
def test_committed_lung_mask_on_held_out_cases(shared_data: Path, site: str) -> None:
    data = shared_data / site
    if not data.is_dir():
        pytest.skip(f"{data} not present: lung-mask quality test for {site} skipped")
    card = read_card(CARD)
    hp = card.hyperparameters
    assert site in hp["sites"]
    split = site_split(
        [p.id for p in find_pairs(data)],
        float(hp["val_fraction"]),
        float(hp["tune_fraction"]),
        int(hp["seed"]),
    )
    recorded = re.search(
        rf"{site}: (\d+) train / (\d+) tuning \(best epoch\) / (\d+) held-out", card.split
    )
    assert recorded, card.split
    assert [int(g) for g in recorded.groups()] == [
        len(split["train"]),
        len(split["tune"]),
        len(split["test"]),
    ], "split recomputed differently from training"
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    report = evaluate_card(CARD, data, device=torch.device("cpu"), ids=split["test"])
    assert report["n"] == len(split["test"]) >= 25
    assert report["dice_mean"] >= SITES[site], report
    # the figures in the card are what this evaluation measures (same code, same split)
    assert report["dice_mean"] == pytest.approx(card.metrics[site]["dice_mean"], abs=0.005)
    # the quality checks (calibrated on the training masks) pass the held-out cases: measured
    # 0/30 JSRT and 2/34 OpenIST (films whose apex lies 1-2 px from the top edge)
    flagged = [r for r in report["per_image"] if not r["quality_ok"]]
    assert len(flagged) <= 0.07 * report["n"], [r["reason"] for r in flagged]
    assert report["quality_ok_fraction"] == card.metrics[site]["quality_ok_fraction"]
