"""Model 1 / Model 2 network, card round trip, datasets, uncertainty policies, training,
Grad-CAM."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.api import CropBox, ModelKind
from models.classifiers import ARCHITECTURE, Classifier, MultiViewClassifier, to_tensor
from models.gradcam import grad_cam, grad_cam_batch, to_original_frame
from models.labels import OBSERVATIONS
from models.registry import ModelCard, ModelLoadError, Normalisation, save_model
from models.training.datasets.chexpert import (
    apply_policy,
    complete_no_finding,
    model1_raw,
    patient_split,
    read_chexpert,
    read_mimic,
)
from models.training.datasets.folder import parse_findings, parse_spec, read_folder
from models.training.images import ImageCache
from models.training.metrics import auroc_report, bootstrap_auroc
from models.training.studies import StudyDataset
from models.training.train_classifier import train_loop

TINY = {"growth_rate": 4, "block_config": [1, 1, 1, 1], "num_init_features": 8}


def tiny_card(
    path: Path,
    labels: list[str],
    *,
    thresholds: dict[str, float] | None = None,
    size: int = 32,
    seed: int = 0,
    name: str | None = None,
) -> ModelCard:
    """Write a randomly initialised tiny classifier card + weights to ``path``."""
    torch.manual_seed(seed)
    net = MultiViewClassifier(len(labels), **TINY)  # type: ignore[arg-type]
    card = ModelCard(
        name=name or path.stem,
        version="test",
        architecture=ARCHITECTURE,
        weights_file=path.with_suffix(".safetensors").name,
        sha256="0" * 64,
        input_size=size,
        normalisation=Normalisation(mean=0.5, std=0.25),
        labels=labels,
        thresholds=thresholds or {},
        hyperparameters=dict(TINY),
    )
    return save_model(card, net.state_dict(), path, half=True)


# --- network -------------------------------------------------------------------------------------


def test_shapes_frontal_only_and_mixed_laterals() -> None:
    torch.manual_seed(0)
    net = MultiViewClassifier(14, **TINY).eval()  # type: ignore[arg-type]
    f = torch.randn(3, 1, 48, 48)
    lat = torch.randn(3, 1, 48, 48)
    assert net(f).shape == (3, 14)
    present = torch.tensor([True, False, True])
    mixed = net(f, lat, present)
    assert mixed.shape == (3, 14)
    # a study without a lateral gets the same output whatever sits in its (ignored) lateral slot
    alone = net(f)
    assert torch.allclose(mixed[1], alone[1], atol=1e-5)
    assert not torch.allclose(mixed[0], alone[0], atol=1e-5)
    none_present = net(f, lat, torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(none_present, alone, atol=1e-5)


def test_default_backbone_is_densenet121_sized() -> None:
    net = MultiViewClassifier(14)
    n = sum(p.numel() for p in net.features.parameters())
    assert 6.9e6 < n < 7.0e6  # DenseNet-121 features with a 1-channel stem
    assert net.features.conv0.in_channels == 1


def test_card_labels_thresholds_and_hash(tmp_path: Path) -> None:
    labels = ["Cardiomegaly", "Edema", "Pleural Effusion"]
    card = tiny_card(tmp_path / "m2.json", labels, thresholds={"Edema": 0.3}, size=40)
    clf = Classifier.from_card(tmp_path / "m2.json")
    assert clf.card.labels == labels
    assert clf.card.threshold("Edema") == 0.3 and clf.card.threshold("Cardiomegaly") == 0.5
    assert clf.card.input_size == 40 and clf.card.info(ModelKind.MODEL2).sha256 == card.sha256
    rng = np.random.default_rng(0)
    imgs = [rng.random((60, 50), dtype=np.float32), rng.random((100, 80), dtype=np.float32)]
    p = clf.predict(imgs, [None, rng.random((70, 70), dtype=np.float32)])
    assert p.shape == (2, 3) and np.all((p >= 0) & (p <= 1))
    assert to_tensor(imgs, clf.card).shape == (2, 1, 40, 40)
    # a changed weights file is refused with a message naming it
    w = tmp_path / "m2.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="m2.safetensors"):
        Classifier.from_card(tmp_path / "m2.json")


def test_card_with_other_architecture_is_refused(tmp_path: Path) -> None:
    tiny_card(tmp_path / "m.json", ["Abnormal"])
    d = json.loads((tmp_path / "m.json").read_text())
    d["architecture"] = "resnet50"
    (tmp_path / "m.json").write_text(json.dumps(d))
    with pytest.raises(ModelLoadError, match="architecture"):
        Classifier.from_card(tmp_path / "m.json")


# --- labels and policies -------------------------------------------------------------------------


def test_uncertainty_policies_and_blank_masking() -> None:
    raw = np.array([1, 0, -1, math.nan], dtype=np.float32)
    t, m = apply_policy(raw, "u-ignore")
    assert m.tolist() == [1, 1, 0, 0] and t[:2].tolist() == [1, 0]
    t, m = apply_policy(raw, "u-zeros")
    assert t.tolist()[:3] == [1, 0, 0] and m.tolist() == [1, 1, 1, 0]
    t, m = apply_policy(raw, "u-ones")
    assert t.tolist()[:3] == [1, 0, 1] and m.tolist() == [1, 1, 1, 0]
    rng = np.random.default_rng(0)
    many = np.full(500, -1, dtype=np.float32)
    t, m = apply_policy(many, "lsr-ones", rng)
    assert t.min() >= 0.55 and t.max() <= 0.85 and m.all() and t.std() > 0.05
    t, m = apply_policy(many, "lsr-zeros", rng)
    assert t.min() >= 0.0 and t.max() <= 0.30
    with pytest.raises(ValueError, match="u-maybe"):
        apply_policy(raw, "u-maybe")


def test_model1_target_from_observations() -> None:
    idx = {o: i for i, o in enumerate(OBSERVATIONS)}

    def raw(**kw: float) -> np.ndarray:
        r = np.full(14, math.nan, dtype=np.float32)
        for k, v in kw.items():
            r[idx[k.replace("_", " ")]] = v
        return r

    # the CheXpert labeller leaves No Finding blank when a pathology is positive or uncertain
    assert complete_no_finding(raw(Edema=1))[idx["No Finding"]] == 0
    assert complete_no_finding(raw(Edema=-1))[idx["No Finding"]] == -1
    assert math.isnan(complete_no_finding(raw(Support_Devices=1))[idx["No Finding"]])
    assert model1_raw(raw(No_Finding=1, Support_Devices=1))[0] == 0
    assert model1_raw(raw(Edema=1))[0] == 1
    assert model1_raw(raw(Edema=-1))[0] == -1
    assert math.isnan(model1_raw(raw(Support_Devices=1))[0])  # devices alone: unknown, masked
    assert math.isnan(model1_raw(raw(Pneumothorax=0))[0])


# --- datasets ------------------------------------------------------------------------------------


def _png(path: Path, value: int = 128, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size, size), value, np.uint8)
    cv2.circle(img, (size // 2, size // 2), size // 4, 255 - value, -1)
    cv2.imwrite(str(path), img)


def test_chexpert_reader_groups_views_and_keeps_blanks(tmp_path: Path) -> None:
    base = tmp_path / "CheXpert-v1.0"
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(OBSERVATIONS)
    rows = []
    for rel, view, labs in [
        (
            "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
            "Frontal",
            {"Edema": "1", "Cardiomegaly": "-1"},
        ),
        (
            "CheXpert-v1.0/train/patient00001/study1/view2_lateral.jpg",
            "Lateral",
            {"Edema": "1", "Cardiomegaly": "-1"},
        ),
        (
            "CheXpert-v1.0/train/patient00002/study1/view1_frontal.jpg",
            "Frontal",
            {"No Finding": "1"},
        ),
        ("CheXpert-v1.0/train/patient00003/study1/view1_lateral.jpg", "Lateral", {"Edema": "0"}),
    ]:
        _png(tmp_path / rel)
        rows.append(
            ",".join([rel, "F", "50", view, "AP"] + [labs.get(o, "") for o in OBSERVATIONS])
        )
    (base / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    recs = read_chexpert(tmp_path)
    assert [r.key for r in recs] == ["chexpert:patient00001/study1", "chexpert:patient00002/study1"]
    r0 = recs[0]
    assert (
        r0.frontal.name == "view1_frontal.jpg"
        and r0.lateral is not None
        and r0.lateral.name == "view2_lateral.jpg"
    )
    i = OBSERVATIONS.index
    assert (
        r0.raw[i("Edema")] == 1
        and r0.raw[i("Cardiomegaly")] == -1
        and np.isnan(r0.raw[i("Fracture")])
    )
    assert r0.raw[i("No Finding")] == 0  # completed from the positive Edema
    assert recs[1].lateral is None
    assert read_chexpert(base)[0].key == r0.key  # the CheXpert-v1.0 folder itself is accepted too
    # a dataset of these records: blank labels are masked, the lateral is present
    ds = StudyDataset(recs, "model2", "u-ignore", ImageCache(32), Normalisation(), 0)
    f, lat, present, target, mask = ds[0]
    assert f.shape == (1, 32, 32) and present and mask.sum() == 2 and target[i("Edema")] == 1


def test_mimic_reader_joins_metadata_and_labels(tmp_path: Path) -> None:
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\n"
        "aaa,10000032,50414267,PA\nbbb,10000032,50414267,LATERAL\nccc,10000033,50000001,AP\n"
        "ddd,10000099,59999999,PA\n"
    )
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        "subject_id,study_id," + ",".join(OBSERVATIONS) + "\n"
        "10000032,50414267," + ",".join("1.0" if o == "Edema" else "" for o in OBSERVATIONS) + "\n"
        "10000033,50000001,"
        + ",".join("-1.0" if o == "Atelectasis" else "" for o in OBSERVATIONS)
        + "\n"
    )
    recs = read_mimic(tmp_path)
    assert len(recs) == 2  # the study without labels is left out
    r = next(r for r in recs if r.patient == "mimic:p10000032")
    assert r.frontal == tmp_path / "files/p10/p10000032/s50414267/aaa.jpg"
    assert r.lateral is not None and r.lateral.name == "bbb.jpg"
    assert r.raw[OBSERVATIONS.index("Edema")] == 1


def test_folder_reader_template_and_label_mapping(tmp_path: Path) -> None:
    for n in ("A1", "A2", "B1"):
        _png(tmp_path / "img" / f"{n}.png")
    (tmp_path / "labels.csv").write_text(
        "id,finding,patient\nA1,nodule,p1\nA2,none,p1\nB1,COVID-19,p2\n"
    )
    recs = read_folder(*parse_spec(f"{tmp_path / 'labels.csv'}:{tmp_path}:img/{{id}}.png"))
    assert len(recs) == 3 and {r.patient.split(":")[-1] for r in recs} == {"p1", "p2"}
    by = {r.frontal.stem: r.raw for r in recs}
    i = OBSERVATIONS.index
    assert by["A1"][i("Lung Lesion")] == 1 and by["A1"][i("No Finding")] == 0
    assert by["A2"][i("No Finding")] == 1 and by["A2"][i("Edema")] == 0
    assert by["B1"][i("No Finding")] == 0 and np.isnan(by["B1"][i("Lung Opacity")])  # not invented
    assert np.isnan(parse_findings("Inconclusive")).all()
    with pytest.raises(ValueError, match="CSV:DIR"):
        parse_spec("only-a-csv")


def test_patient_split_keeps_patients_together() -> None:
    from models.training.datasets.chexpert import StudyRecord

    recs = [
        StudyRecord(f"s{i}", f"p{i // 3}", "src", Path(f"{i}.png"), None, np.zeros(14, np.float32))
        for i in range(60)
    ]
    train, val = patient_split(recs, 0.25, seed=1)
    assert len(train) + len(val) == 60 and val
    assert not {r.patient for r in train} & {r.patient for r in val}
    assert [r.key for r in patient_split(recs, 0.25, seed=1)[1]] == [r.key for r in val]


# --- training ------------------------------------------------------------------------------------


def test_tiny_training_run_loss_falls(tmp_path: Path) -> None:
    from models.training.datasets.chexpert import StudyRecord

    torch.manual_seed(0)
    recs = []
    for i in range(16):
        pos = i % 2 == 0
        p = tmp_path / f"{i}.png"
        img = np.full((32, 32), 40, np.uint8)
        if pos:
            cv2.rectangle(img, (6, 6), (26, 26), 230, -1)
        cv2.imwrite(str(p), img)
        raw = np.full(14, math.nan, np.float32)
        raw[0] = 0.0 if pos else 1.0  # No Finding
        recs.append(StudyRecord(f"k{i}", f"p{i}", "t", p, None, raw))
    ds = StudyDataset(
        recs, "model1", "u-ignore", ImageCache(32), Normalisation(mean=0.5, std=0.25), 0
    )
    net = MultiViewClassifier(1, **TINY)  # type: ignore[arg-type]
    losses = train_loop(
        net,
        ds,
        torch.device("cpu"),
        epochs=30,
        batch_size=8,
        lr=1e-2,
        seed=0,
        do_augment=False,
        progress=False,
    )
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_classifier_cli_writes_card_and_split(tmp_path: Path) -> None:
    from models.training import cli, train_classifier

    for i in range(12):
        _png(tmp_path / "img" / f"x{i}.png", value=60 if i % 2 else 180)
    (tmp_path / "l.csv").write_text(
        "file,label\n"
        + "".join(f"img/x{i}.png,{'Cardiomegaly' if i % 2 else 'No Finding'}\n" for i in range(12))
    )
    p = argparse.ArgumentParser()
    cli.train_classifier_arguments(p)
    out = tmp_path / "w" / "m1.json"
    args = p.parse_args(
        [
            "--model",
            "model1",
            "--folder",
            f"{tmp_path / 'l.csv'}:{tmp_path}",
            "--tiny",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
            "--val-fraction",
            "0.34",
        ]
    )
    assert train_classifier.run(args) == 0
    card = json.loads(out.read_text())
    assert card["labels"] == ["Abnormal"] and card["input_size"] == 32
    assert "Abnormal" in card["thresholds"] and card["metrics"]["held_out"]["studies"] > 0
    split = json.loads(out.with_suffix(".split.json").read_text())
    assert split["held_out_keys"]
    first = Classifier.from_card(out)  # the written pair loads (hash matches)
    # transfer: a second model initialised from the first keeps its backbone (0 epochs here)
    out2 = tmp_path / "w" / "m1b.json"
    args2 = p.parse_args(
        [
            "--model",
            "model2",
            "--folder",
            f"{tmp_path / 'l.csv'}:{tmp_path}",
            "--tiny",
            "--epochs",
            "0",
            "--image-size",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out2),
            "--no-progress",
            "--init-from",
            str(out),
        ]
    )
    assert train_classifier.run(args2) == 0
    second = Classifier.from_card(out2)
    assert second.card.hyperparameters["init_from"] == "m1.json" and len(second.card.labels) == 14
    w1, w2 = first.net.features.conv0.weight, second.net.features.conv0.weight
    assert torch.equal(w1, w2)


# --- Grad-CAM and evaluation ----------------------------------------------------------------------


def test_gradcam_shape_range_and_original_frame() -> None:
    torch.manual_seed(0)
    net = MultiViewClassifier(3, **TINY).eval()  # type: ignore[arg-type]
    x = torch.randn(1, 1, 64, 64)
    cams = grad_cam(net.feature_map, lambda fm: net.fuse(net.pool(fm), None, None), x, [0, 2])
    # uint8 at the network's input resolution, each map stretched to 0..255 (issue 11)
    assert cams.shape == (2, 64, 64) and cams.dtype == np.uint8
    assert all(int(c.min()) == 0 and int(c.max()) in (0, 255) for c in cams)  # or flat: all 0
    assert int(cams[0].max()) == 255
    assert grad_cam(net.feature_map, net.pool, x, []).shape == (0, 64, 64)
    box = CropBox(x0=10, y0=20, x1=60, y1=100)
    full = to_original_frame(cams[0], box, (120, 90))
    assert full.shape == (120, 90) and full.dtype == np.float32
    assert full[:20].max() == 0 and full[:, 60:].max() == 0
    assert full.max() <= 1 and full[20:100, 10:60].max() > 0.9


def test_bootstrap_auroc_matches_sklearn_and_brackets_it() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    p = rng.random(80) + 0.5 * y
    auc, lo, hi = bootstrap_auroc(y, p, n_boot=500, seed=0)
    assert auc == pytest.approx(roc_auc_score(y, p))
    assert lo < auc < hi
    assert math.isnan(bootstrap_auroc(np.ones(5), rng.random(5))[0])
    raw = np.stack([y, np.full(80, math.nan)], 1).astype(np.float32)
    rep = auroc_report(["Edema", "Fracture"], raw, np.stack([p, p], 1), n_boot=100)
    assert rep["per_label"]["Fracture"]["auroc"] is None and rep[
        "mean_competition_auroc"
    ] == pytest.approx(auc, abs=1e-4)


def test_gradcam_batch_gives_each_image_its_own_maps() -> None:
    """One forward pass for the batch and one backward pass per label (issue 11): each image's
    maps equal what :func:`grad_cam` gives it alone, images with a lateral and without mixed,
    an image with no labels gets none."""
    torch.manual_seed(0)
    net = MultiViewClassifier(3, **TINY).eval()  # type: ignore[arg-type]
    x = torch.randn(4, 1, 64, 64)
    lat = torch.randn(4, 1, 64, 64)
    present = torch.tensor([True, False, True, False])
    wanted = [[0, 2], [], [2, 1, 0], [1]]
    batch = grad_cam_batch(
        net.feature_map, lambda fm: net.fuse(net.pool(fm), lat, present), x, wanted
    )
    assert [b.shape for b in batch] == [(len(w), 64, 64) for w in wanted]
    spread = 0
    for i, js in enumerate(wanted):
        alone = grad_cam(
            net.feature_map,
            lambda fm, i=i: net.fuse(net.pool(fm), lat[i : i + 1], present[i : i + 1]),
            x[i : i + 1],
            js,
        )
        assert batch[i].dtype == np.uint8
        diff = np.abs(batch[i].astype(int) - alone.astype(int))
        assert diff.size == 0 or diff.max() <= 1  # float rounding of the batched convolutions
        spread += sum(len(np.unique(m)) >= 32 for m in alone)
    assert spread >= 4  # real maps, not flat ones that would match trivially
    with pytest.raises(ValueError, match="label lists"):
        grad_cam_batch(net.feature_map, net.pool, x, [[0]])
