"""Calibration, operating thresholds, mean Present on normals, and the Model 1 / Model 2
consistency rule (derived Model 1, models.analyzer.reconcile)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.analyzer import Analyzer, reconcile
from models.api import Finding, StudyAnalysis, StudyInput
from models.classifiers import Classifier, DerivedModel1, load_classifier
from models.config import ModelsConfig
from models.labels import OBSERVATIONS
from models.registry import ModelLoadError, read_card
from models.training.calibration import (
    apply_platt,
    ece,
    fit_platt,
    operating_thresholds,
    present_on_normals,
    specificity_threshold,
)

from .test_analyzer import tiny_lung_card, tiny_view_card
from .test_classifiers import tiny_card

OBS = list(OBSERVATIONS)


def test_platt_scaling_lowers_ece_of_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    z_true = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z_true))).astype(np.float32)
    logits = (3.0 * z_true + 1.0)[:, None]  # overconfident and biased
    raw = y[:, None]
    params = fit_platt(["L"], raw, logits)
    a, b = params["L"]
    assert a == pytest.approx(1 / 3, abs=0.05) and b == pytest.approx(-1 / 3, abs=0.1)
    before = ece(y, 1 / (1 + np.exp(-logits[:, 0])))
    after = ece(y, apply_platt(["L"], logits, params)[:, 0])
    assert before is not None and after is not None and after < before / 3


def test_specificity_threshold_and_unlabelled_outputs() -> None:
    y = np.array([0] * 100 + [1] * 10)
    p = np.concatenate([np.linspace(0, 0.99, 100), np.full(10, 0.995)])
    t = specificity_threshold(y, p, 0.9)
    assert t is not None and np.mean(p[y == 0] >= t) == pytest.approx(0.1, abs=0.011)
    raw = np.stack([y, np.full(110, np.nan)], 1).astype(np.float32)
    thr, missing = operating_thresholds(["A", "B"], raw, np.stack([p, p], 1), 0.9)
    assert missing == ["B"] and thr["B"] == 0.5 and thr["A"] == pytest.approx(t, abs=1e-5)


def test_present_on_normals_counts_pathologies_only() -> None:
    raw = np.full((3, 14), np.nan, np.float32)
    raw[:, OBS.index("No Finding")] = [1, 1, 0]
    probs = np.zeros((3, 14), np.float32)
    probs[0, OBS.index("Edema")] = 0.9
    probs[0, OBS.index("Support Devices")] = 0.9  # a device is not a finding on a normal film
    probs[1, OBS.index("No Finding")] = 0.9
    probs[2, :] = 1.0  # abnormal study: not counted
    rep = present_on_normals(OBS, raw, probs, {o: 0.5 for o in OBS})
    assert rep["studies"] == 2 and rep["mean_present"] == 0.5 and rep["max_present"] == 1
    assert rep["share_with_none"] == 0.5


def test_reconcile_never_lets_model1_and_no_finding_disagree() -> None:
    rng = np.random.default_rng(1)
    model2 = [Finding(o, 0.5, 0.5) for o in OBS]
    cases = [(float(p), float(t)) for p, t in rng.random((2000, 2))]
    cases += [(0.3, 0.3), (0.7, 0.7), (0.1 + 0.2, 0.3), (1.0, 1.0), (0.0, 0.0), (0.5, 1e-9)]
    for p, t in cases:
        m1, m2 = reconcile(Finding("Abnormal", p, t), model2)
        nf = next(f for f in m2 if f.label == "No Finding")
        assert nf.present != m1.present, (p, t)
        assert nf.probability == pytest.approx(1 - p, abs=1e-6)
        assert [f.label for f in m2] == OBS


@pytest.fixture
def derived(tmp_path: Path) -> ModelsConfig:
    """Tiny cards: Model 2 with Platt calibration and a Model 1 card derived from it."""
    tiny_lung_card(tmp_path / "lung_mask.json")
    thr = {o: 0.5 for o in OBS} | {"No Finding": 0.4}
    card2 = tiny_card(tmp_path / "model2.json", OBS, thresholds=thr, name="model2", seed=1)
    data = json.loads((tmp_path / "model2.json").read_text())
    data["hyperparameters"]["calibration"] = {"params": {"No Finding": [40.0, 0.1]}}
    (tmp_path / "model2.json").write_text(json.dumps(data))
    card1 = card2.model_copy(
        update={
            "name": "model1",
            "labels": ["Abnormal"],
            "thresholds": {"Abnormal": 0.6},
            "hyperparameters": {"derived_from": {"card": "model2.json", "rule": "1 - NF"}},
        }
    )
    (tmp_path / "model1.json").write_text(json.dumps(card1.model_dump()))
    tiny_view_card(tmp_path / "view_classifier.json")
    return ModelsConfig(weights_dir=tmp_path)


def test_derived_model1_is_one_minus_calibrated_no_finding(derived: ModelsConfig) -> None:
    rng = np.random.default_rng(2)
    studies = [StudyInput(f"s{i}", rng.random((70 + i, 64), dtype=np.float32)) for i in range(12)]
    first = Analyzer.from_config(derived, device="cpu").findings(studies)
    p1 = [r[0].probability for r in first if not isinstance(r, Exception)]
    # Model 1's threshold at the median probability: both decisions occur
    path = derived.weights_dir / "model1.json"
    data = json.loads(path.read_text())
    data["thresholds"] = {"Abnormal": float(np.median(p1))}
    path.write_text(json.dumps(data))
    an = Analyzer.from_config(derived, device="cpu")
    assert isinstance(an.model1, DerivedModel1) and an.model1.source is an.model2
    out = an.analyse(studies)
    seen = set()
    for r in out:
        assert isinstance(r, StudyAnalysis)
        nf = next(f for f in r.model2 if f.label == "No Finding")
        assert r.model1.probability == pytest.approx(1 - nf.probability, abs=1e-6)
        assert r.model1.present != nf.present
        seen.add(r.model1.present)
    assert seen == {True, False}
    # calibration is applied: the served probability is not the raw sigmoid
    m2 = an.model2
    assert isinstance(m2, Classifier)
    raw = Classifier(
        read_card(derived.weights_dir / "model2.json").model_copy(update={"hyperparameters": {}}),
        m2.net,
    )
    x = [studies[0].frontal]
    j = OBS.index("No Finding")
    assert abs(raw.predict(x, [None])[0, j] - m2.predict(x, [None])[0, j]) > 1e-3
    # evaluation's path gives the same findings as analyse
    f1, f2 = an.findings(studies[:2])[0]  # type: ignore[misc]
    assert isinstance(out[0], StudyAnalysis)
    assert f1.probability == pytest.approx(out[0].model1.probability, abs=1e-7)


def test_derived_card_must_match_model2_weights(derived: ModelsConfig) -> None:
    path = derived.weights_dir / "model1.json"
    data = json.loads(path.read_text())
    data["sha256"] = "1" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="derived from weights"):
        Analyzer.from_config(derived, device="cpu")
    # load_classifier follows the derivation to Model 2's network (bench, tools)
    card, net = load_classifier(derived.weights_dir / "model2.json")
    assert card.name == "model2"


def test_a_threshold_from_too_few_negatives_is_kept_but_unvalidated() -> None:
    """At 95% specificity fewer than 20 negatives cannot place the operating point: the label
    keeps the threshold they give and is listed as unvalidated (one more negative: validated)."""
    rng = np.random.default_rng(3)
    for negatives, validated in ((19, False), (20, True)):
        y = np.array([0] * negatives + [1] * 30, dtype=np.float32)
        p = np.concatenate([rng.uniform(0, 0.6, negatives), rng.uniform(0.4, 1, 30)])
        thr, missing = operating_thresholds(["A"], y[:, None], p[:, None], 0.95)
        t = specificity_threshold(y, p, 0.95)
        assert t is not None and thr["A"] == pytest.approx(t, abs=1e-5)
        assert (missing == []) is validated
