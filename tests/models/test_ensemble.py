"""Ensemble model cards (``members``): every member's SHA-256 is checked at load, the served
probabilities are the card's calibration of the mean of the members' raw logits, Grad-CAM is the
members' mean map, Model 1 stays derived from the ensemble's No Finding, and one-network cards
are read and written as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.classifiers import (
    Classifier,
    DerivedModel1,
    LogitMean,
    MultiViewClassifier,
    load_classifier,
    mean_cams,
    to_tensor,
)
from models.labels import MODEL1_LABELS, OBSERVATIONS
from models.registry import (
    Member,
    ModelLoadError,
    load_member_weights,
    load_weights,
    members_digest,
    read_card,
    save_ensemble,
)
from models.training.train_model2 import write_model1
from tests.models.test_classifiers import tiny_card

LABELS = list(OBSERVATIONS)
NF = LABELS.index("No Finding")


def _ensemble(tmp_path: Path, n: int = 2) -> Path:
    """``n`` tiny networks (different seeds) as one calibrated ensemble card ``ens.json``."""
    src = [tiny_card(tmp_path / f"src{i}.json", LABELS, seed=i) for i in range(n)]
    params = {lab: [0.5 + 0.1 * j, -0.2 + 0.05 * j] for j, lab in enumerate(LABELS[:6])}
    base = src[0].model_copy(
        update={
            "name": "model2",
            "thresholds": {"No Finding": 0.4},
            "hyperparameters": {
                **src[0].hyperparameters,
                "calibration": {"method": "Platt", "params": params},
            },
        }
    )
    members = [
        (
            tmp_path / f"src{i}.safetensors",
            Member(weights_file=f"ens.member{i}.safetensors", sha256="0" * 64, trained_on="cpu"),
        )
        for i in range(n)
    ]
    save_ensemble(base, members, tmp_path / "ens.json")
    return tmp_path / "ens.json"


def _images(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    frontals = [rng.random((60, 50), dtype=np.float32) for _ in range(3)]
    laterals: list[np.ndarray | None] = [None, rng.random((40, 40), dtype=np.float32), None]
    return frontals, laterals


def test_ensemble_card_verifies_every_member(tmp_path: Path) -> None:
    path = _ensemble(tmp_path)
    card, states = load_member_weights(path)
    assert len(card.members) == 2 and len(states) == 2
    assert card.weights_file == "ens.member0.safetensors"
    assert card.sha256 == members_digest(card.members)
    assert card.sha256 not in {m.sha256 for m in card.members}
    clf = Classifier.from_card(path)
    assert isinstance(clf.net, LogitMean) and len(clf.members) == 2
    # a one-network loader refuses the ensemble instead of loading one member
    with pytest.raises(ModelLoadError, match="ensemble of 2"):
        load_weights(path)
    # a tampered second member fails the load and is named
    w = tmp_path / "ens.member1.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with pytest.raises(ModelLoadError, match="ens.member1.safetensors"):
        Classifier.from_card(path)
    w.write_bytes(good)
    # a member swapped in the card (its hash edited to match) no longer matches the card's sha256
    data = json.loads(path.read_text())
    data["members"][1]["sha256"] = data["members"][0]["sha256"]
    data["members"][1]["weights_file"] = data["members"][0]["weights_file"]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="do not match its members"):
        Classifier.from_card(path)


def test_ensemble_probabilities_are_calibrated_mean_logits(tmp_path: Path) -> None:
    path = _ensemble(tmp_path)
    card = read_card(path)
    frontals, laterals = _images()
    p = Classifier.from_card(path).predict(frontals, laterals)
    # independently: each member's own network from its source card, logits averaged here,
    # Platt parameters read from the card's JSON
    logits = []
    for i in range(2):
        _, net = load_classifier(tmp_path / f"src{i}.json")
        assert isinstance(net, MultiViewClassifier)
        f = to_tensor(frontals, card)
        lat = to_tensor(
            [x if x is not None else np.zeros((8, 8), np.float32) for x in laterals], card
        )
        present = torch.tensor([x is not None for x in laterals])
        with torch.no_grad():
            logits.append(net(f, lat, present).numpy().astype(np.float64))
    z = np.mean(logits, axis=0)
    params = json.loads(path.read_text())["hyperparameters"]["calibration"]["params"]
    a = np.array([params.get(lab, [1.0, 0.0])[0] for lab in LABELS])
    b = np.array([params.get(lab, [1.0, 0.0])[1] for lab in LABELS])
    want = 1.0 / (1.0 + np.exp(-(a * z + b)))
    assert p.shape == want.shape
    np.testing.assert_allclose(p, want, atol=1e-5)
    # the mean is not just one member's output
    single = Classifier.from_card(tmp_path / "src0.json").predict(frontals, laterals)
    assert np.abs(single - p).max() > 1e-4


def test_ensemble_heatmaps_mean_of_members_and_model1_derived(tmp_path: Path) -> None:
    path = _ensemble(tmp_path)
    ens = Classifier.from_card(path)
    frontals, laterals = _images(1)
    labs = ["Cardiomegaly", "Edema"]
    maps = ens.heatmaps(frontals[0], laterals[1], labs)
    size = ens.card.input_size
    one = [
        Classifier.from_card(tmp_path / f"src{i}.json").heatmaps(frontals[0], laterals[1], labs)
        for i in range(2)
    ]
    for lab in labs:
        assert maps[lab].dtype == np.uint8 and maps[lab].shape == (size, size)
        want = mean_cams([np.stack([one[0][lab]]), np.stack([one[1][lab]])])[0]
        np.testing.assert_array_equal(maps[lab], want)
        assert maps[lab].max() in (0, 255)
    # Model 1 of an ensemble card: same members, sha256 the ensemble's, 1 - P(No Finding)
    write_model1(read_card(path), tmp_path / "m1.json", path, {})
    m1 = DerivedModel1.from_card(tmp_path / "m1.json", ens)
    assert m1.card.labels == list(MODEL1_LABELS) and m1.card.sha256 == ens.card.sha256
    p1 = m1.predict(frontals, laterals)
    p2 = ens.predict(frontals, laterals)
    np.testing.assert_allclose(p1[:, 0], 1.0 - p2[:, NF], atol=1e-7)
    # a Model 1 card of another ensemble (other members) is refused
    other = _ensemble(tmp_path / "other", n=3)
    with pytest.raises(ModelLoadError, match="derived from weights"):
        DerivedModel1(read_card(tmp_path / "m1.json"), Classifier.from_card(other))


def test_mean_cams_restretches_and_keeps_flat_maps_zero() -> None:
    a = np.array([[[0, 255], [0, 0]], [[7, 7], [7, 7]]], dtype=np.uint8)
    b = np.array([[[0, 0], [0, 255]], [[9, 9], [9, 9]]], dtype=np.uint8)
    out = mean_cams([a, b])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], [[0, 255], [0, 255]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))


def test_one_network_cards_are_unchanged(tmp_path: Path) -> None:
    card = tiny_card(tmp_path / "m2.json", LABELS)
    data = json.loads((tmp_path / "m2.json").read_text())
    assert "members" not in data  # written as before
    loaded, state = load_weights(tmp_path / "m2.json")
    assert loaded.sha256 == card.sha256 and loaded.members == []
    _, states = load_member_weights(tmp_path / "m2.json")
    assert states[0].keys() == state.keys()
    clf = Classifier.from_card(tmp_path / "m2.json")
    assert isinstance(clf.net, MultiViewClassifier) and clf.members == [clf.net]
    assert clf._forward is clf.net


def test_finish_reads_members_of_one_shape_only(tmp_path: Path) -> None:
    from models.training.finish import read_members, selection_figures

    a = tiny_card(tmp_path / "a.json", LABELS, seed=0)
    tiny_card(tmp_path / "b.json", LABELS, seed=1)
    out = tmp_path / "w" / "model2.json"
    found = read_members([tmp_path / "a.json", tmp_path / "b.json"], out)
    assert [m.weights_file for *_, m in found] == [
        "model2.member0.safetensors",
        "model2.member1.safetensors",
    ]
    assert found[0][2].sha256 == a.sha256 and found[0][0] == tmp_path / "a.safetensors"
    tiny_card(tmp_path / "c.json", LABELS, size=48)  # another input size
    with pytest.raises(SystemExit, match="same network shape"):
        read_members([tmp_path / "a.json", tmp_path / "c.json"], out)
    # the selection rule: mean of the 5-label mean and Model 1 (No Finding) AUROC
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 2, size=(60, len(LABELS))).astype(np.float32)
    logits = raw + rng.normal(0, 1.0, size=raw.shape)
    fig = selection_figures(LABELS, raw, logits)
    from sklearn.metrics import roc_auc_score

    from models.labels import COMPETITION

    c5 = np.mean(
        [roc_auc_score(raw[:, LABELS.index(c)], logits[:, LABELS.index(c)]) for c in COMPETITION]
    )
    m1 = roc_auc_score(raw[:, NF], logits[:, NF])
    assert fig["competition5_mean_auroc"] == pytest.approx(c5, abs=1e-4)
    assert fig["score"] == pytest.approx((c5 + m1) / 2, abs=1e-4)


def test_finish_keeps_an_ensembles_members_beside_a_new_one(tmp_path: Path) -> None:
    from models.training.finish import members_of, numbered, read_members

    ens = _ensemble(tmp_path)
    data = json.loads(ens.read_text())
    data["hyperparameters"]["ensemble"] = {
        "members": {
            "ens.member0.safetensors": {"from_card": "model2 2.0.0", "epochs": 9, "seed": 0},
            "ens.member1.safetensors": {"from_card": "model2 3.0.0", "epochs": 24, "seed": 1},
        }
    }
    data["metrics"] = {"members": {"ens.member1.safetensors": {"train_seconds": 30.4}}}
    ens.write_text(json.dumps(data))
    old = members_of(ens)
    assert [src.name for src, *_ in old] == ["ens.member0.safetensors", "ens.member1.safetensors"]
    assert [c.version for _, c, _ in old] == ["2.0.0", "3.0.0"]
    assert old[1][1].hyperparameters["epochs"] == 24 and old[1][1].hyperparameters["seed"] == 1
    assert old[1][1].metrics["train_seconds"] == 30.4 and not old[1][1].members
    assert [m.sha256 for *_, m in old] == [m["sha256"] for m in data["members"]]
    tiny_card(tmp_path / "new.json", LABELS, seed=7)
    out = tmp_path / "w" / "model2.json"
    both = numbered([*old, *read_members([tmp_path / "new.json"], out)], out)
    assert [m.weights_file for *_, m in both] == [f"model2.member{i}.safetensors" for i in range(3)]
    assert both[2][0] == tmp_path / "new.safetensors"
    # a one-network card is not an ensemble to keep the members of
    with pytest.raises(SystemExit, match="not an ensemble"):
        members_of(tmp_path / "new.json")
    # a member whose weights file no longer matches the ensemble card is refused
    w = tmp_path / "ens.member0.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with pytest.raises(ModelLoadError, match="ens.member0"):
        members_of(ens)


def test_ensemble_channels_last_gives_the_same_probabilities(tmp_path: Path) -> None:
    clf = Classifier.from_card(_ensemble(tmp_path))
    frontals, laterals = _images(2)
    before = clf.predict(frontals, laterals)

    def converted() -> list[bool]:  # a 3x3 convolution of each member (not trivially both)
        w = [m.features.denseblock1.denselayer1.conv2.weight for m in clf.members]
        return [x.is_contiguous(memory_format=torch.channels_last) for x in w]

    assert converted() == [False, False]
    clf.set_channels_last(True)  # models.inference.channels_last: every member converted
    assert converted() == [True, True]
    np.testing.assert_allclose(clf.predict(frontals, laterals), before, atol=1e-5)


def test_batched_heatmaps_of_an_ensemble_are_the_mean_of_its_members(tmp_path: Path) -> None:
    """``heatmaps_batch`` (the Analyzer's batched Grad-CAM) for several studies: each study gets
    maps for its own labels (none for a study without any), an ensemble's are the mean of its
    members' batched maps, and a one-study batch is what ``heatmaps`` returns. That a batch gives
    each image its own maps is checked on a network with real spatial maps in
    tests/models/test_classifiers.py (the tiny cards' maps are nearly flat)."""
    path = _ensemble(tmp_path)
    ens = Classifier.from_card(path)
    frontals, laterals = _images(4)
    wanted = [["Cardiomegaly", "Edema"], [], ["Edema", "Pleural Effusion", "No Finding"]]
    batch = ens.heatmaps_batch(frontals, laterals, wanted)
    assert [list(b) for b in batch] == wanted
    size = ens.card.input_size
    members = [
        Classifier.from_card(tmp_path / f"src{i}.json").heatmaps_batch(frontals, laterals, wanted)
        for i in range(2)
    ]
    for i, labs in enumerate(wanted):
        for lab in labs:
            assert batch[i][lab].dtype == np.uint8 and batch[i][lab].shape == (size, size)
            want = mean_cams([members[0][i][lab][None], members[1][i][lab][None]])[0]
            np.testing.assert_array_equal(batch[i][lab], want)
    one = ens.heatmaps(frontals[2], laterals[2], wanted[2])
    assert list(one) == wanted[2] and all(one[k].shape == (size, size) for k in one)
    with pytest.raises(ValueError, match="label lists"):
        ens.heatmaps_batch(frontals, laterals, wanted[:2])
