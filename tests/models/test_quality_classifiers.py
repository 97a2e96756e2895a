"""Quality gate: the committed Model 1 / Model 2 on CheXpert's radiologist-labelled test studies,
scored through the serving path; the figures recorded in the card must reproduce.

Runs wherever ../shared/data exists (CI has it); skipped with a visible reason elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.classifiers import derived_from
from models.config import BUNDLED_WEIGHTS
from models.registry import read_card
from models.training.datasets.chexpert import read_chexpert
from models.training.evaluate import evaluate_classifier

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

CARD2 = BUNDLED_WEIGHTS / "model2.json"
CARD1 = BUNDLED_WEIGHTS / "model1.json"


def test_committed_classifiers_reproduce_their_chexpert_test_figures(shared_data: Path) -> None:
    for card in (CARD1, CARD2):
        if not card.exists():
            pytest.fail(f"{card} is missing: the classifiers' default weights must be committed")
    assert derived_from(read_card(CARD1)) == CARD2.name  # one network, one decision
    torch.set_num_threads(1)
    recs = read_chexpert(shared_data / "chexpert_sample", "test")
    rep = evaluate_classifier(CARD2, recs)
    recorded = json.loads(CARD2.read_text())["metrics"].get("served_chexpert_test")
    if recorded is None:
        pytest.fail(
            "model2.json records no served_chexpert_test figures (cxr-worker evaluate "
            "classifier --card-metrics chexpert_test)"
        )
    assert rep["model1"]["auroc"] == pytest.approx(recorded["model1"]["auroc"], abs=1e-3)
    for lab, v in recorded["per_label"].items():
        if v["auroc"] is not None:
            assert rep["per_label"][lab]["auroc"] == pytest.approx(v["auroc"], abs=1e-3), lab
    # what the card reports about normal films is what the service does with them
    assert rep["present_on_no_finding"] == recorded["present_on_no_finding"]
