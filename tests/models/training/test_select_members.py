"""The ensemble selection rule (models.training.select_members) on synthetic logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.labels import OBSERVATIONS
from models.training.select_members import subset_scores


def _two_sites(rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """200 studies per site; site 'chexpert' mostly abnormal, 'nih' mostly normal."""
    raw, sources = [], []
    for site, prevalence in (("chexpert", 0.8), ("nih", 0.2)):
        raw.append((rng.random((200, len(OBSERVATIONS))) < prevalence).astype(np.float64))
        sources += [site] * 200
    return np.concatenate(raw), sources


def test_the_within_source_rule_sees_through_a_network_that_learnt_the_site() -> None:
    rng = np.random.default_rng(0)
    raw, sources = _two_sites(rng)
    site = np.where(np.asarray(sources) == "chexpert", 1.0, -1.0)[:, None]
    site_net = np.repeat(site, len(OBSERVATIONS), axis=1) + 0.5 * rng.standard_normal(raw.shape)
    reader = (raw - 0.5) + 0.9 * rng.standard_normal(raw.shape)  # weak but real signal
    rows = subset_scores(["site", "reader"], [site_net, reader], raw, sources)
    by = {tuple(r["members"]): r for r in rows}
    # pooled, the site network looks better than the reader; within each site it is noise,
    # so it also drags the pair down
    assert by[("site",)]["pooled"]["score"] > by[("reader",)]["pooled"]["score"]
    assert abs(by[("site",)]["within_source_score"] - 0.5) < 0.08
    assert rows[0]["members"] == ["reader"]
    assert len(rows) == 3 and ["site", "reader"] in [r["members"] for r in rows]
    scores = [r["within_source_score"] for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_an_ensemble_is_the_mean_of_its_members_logits() -> None:
    rng = np.random.default_rng(1)
    raw, sources = _two_sites(rng)
    a = (raw - 0.5) + rng.standard_normal(raw.shape)
    b = (raw - 0.5) + rng.standard_normal(raw.shape)
    both = subset_scores(["a", "b"], [a, b], raw, sources)
    mean = subset_scores(["mean"], [(a + b) / 2], raw, sources)[0]
    pair = next(r for r in both if r["members"] == ["a", "b"])
    assert pair["within_source_score"] == mean["within_source_score"]
    assert pair["pooled"] == mean["pooled"]


def test_finish_records_the_ranking_that_scored_its_members(tmp_path: Path) -> None:
    from models.registry import Member, ModelCard
    from models.training.finish import read_selection

    a, b, c = ("a" * 64, "b" * 64, "c" * 64)
    rows = [
        {"members": ["A", "C"], "sha256": [a, c], "within_source_score": 0.82},
        {"members": ["A", "B"], "sha256": [a, b], "within_source_score": 0.81},
    ]
    report = tmp_path / "select.json"
    report.write_text(json.dumps({"rule": "r", "ranking": rows}))
    card = ModelCard(
        name="model2",
        version="t",
        architecture="x",
        weights_file="x",
        sha256=a,
        input_size=8,
        labels=["x"],
    )
    members = [
        (Path(f"{s[0]}.safetensors"), card, Member(weights_file="x", sha256=s)) for s in (b, a)
    ]
    got = read_selection(report, members)
    assert [r.get("shipped", False) for r in got["ranking"]] == [False, True]
    with pytest.raises(SystemExit, match="did not score these members"):
        read_selection(report, members[:1])
