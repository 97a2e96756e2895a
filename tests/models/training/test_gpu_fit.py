"""The pack -> GPU fit path on the CPU with tiny networks: the pack round trip, the fit script's
metrics against the training code's, and weights that load into the serving classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.classifiers import MultiViewClassifier
from models.labels import OBSERVATIONS
from models.registry import to_float
from models.training import gpu_fit
from models.training.calibration import model1_from
from models.training.datasets.chexpert import apply_policy
from models.training.metrics import _auc_rows
from models.training.pack import (
    Collected,
    Study,
    blob,
    concat,
    decode,
    encode_all,
    fit_quality,
    read_pack,
    write_pack,
)
from models.view_classifier import ViewCNN

TINY = gpu_fit.ARCHS["tiny"]


def _radiograph(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth synthetic 'chest film': two dark lungs in a brighter body, with noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.7 - 0.4 * np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img -= 0.4 * np.exp(-(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img += rng.normal(0, 0.03, img.shape)
    out: np.ndarray = (img.clip(0, 1) * 255).astype(np.uint8)
    return out


def _tiny_pack(path: Path, size: int = 48, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    col = Collected()
    splits = ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n // 8)
    splits += ["chexpert_test"] * (n - len(splits))
    for i, split in enumerate(splits):
        col.images.append(_radiograph(rng, size))
        col.cropped.append(True)
        lat = -1
        if i % 3 == 0:
            col.images.append(_radiograph(rng, size).T.copy())
            col.cropped.append(False)
            lat = len(col.images) - 1
        raw = rng.choice([1.0, 0.0, -1.0, np.nan], size=len(OBSERVATIONS)).astype(np.float32)
        raw[0] = 1.0 if i % 2 else 0.0  # No Finding labelled on every study
        raw[2] = 0.0 if i % 2 else 1.0
        col.studies.append(
            Study(
                f"src:p{i}/s1",
                f"src:p{i}",
                "src",
                split,
                raw,
                len(col.images) - 1 - (lat >= 0),
                lat,
            )
        )
    enc = encode_all(col.images, 90)
    write_pack(path, col, enc, {"size": size})


def test_pack_round_trip_keeps_labels_and_hashes_only(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    _tiny_pack(path)
    pk = read_pack(path)
    assert pk["meta"] == {"size": 48}
    assert len(pk["frontal"]) == 40 and pk["raw"].shape == (40, 14)
    # keys are hashes, never the study or patient text
    assert all(len(str(k)) == 16 and "src" not in str(k) for k in pk["key_hash"])
    img = decode(blob(pk["images"], pk["offsets"], int(pk["frontal"][0])))
    assert img.shape == (48, 48) and img.dtype == np.uint8
    # NaN (blank) survives; laterals point at lateral images
    assert np.isnan(pk["raw"]).any()
    lat = pk["lateral"][pk["lateral"] >= 0]
    assert len(lat) and not pk["cropped"][lat].any()


def test_jpeg_quality_search_takes_the_best_quality_that_fits() -> None:
    rng = np.random.default_rng(1)
    imgs = [_radiograph(rng, 96) for _ in range(6)]
    big = encode_all(imgs, 95)
    enc = fit_quality(imgs, int(big.nbytes * 0.6), [95, 85, 70, 50])
    assert enc.nbytes <= big.nbytes * 0.6 and enc.quality < 95
    assert 0 < big.mae < enc.mae < 8.0  # lower quality, larger error; a few grey levels
    data, off = concat(enc.blobs)
    assert off[-1] == len(data) == enc.nbytes


def test_fusion_twin_equals_the_serving_network() -> None:
    torch.manual_seed(0)
    twin = gpu_fit.FusionNet(14, **TINY).eval()
    served = MultiViewClassifier(14, **TINY).eval()
    served.load_state_dict(twin.state_dict())  # same names and shapes, strict
    with torch.no_grad():
        twin.lateral_view.normal_()
        twin.lateral_missing.normal_()
        served.load_state_dict(twin.state_dict())
        f = torch.randn(5, 1, 40, 40)
        lat = torch.randn(5, 1, 40, 40)
        present = torch.tensor([True, False, True, False, False])
        want = served(f, lat, present)
        rows = torch.tensor([0, 2])
        padded = torch.cat([lat[rows], lat[rows][:1].expand(6, -1, -1, -1)])
        got = twin(f, padded, rows)
        no_lat = twin(f, torch.zeros(0, 1, 40, 40), torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_lat, served(f), atol=1e-5, rtol=1e-5)


def test_view_twin_equals_the_serving_network() -> None:
    twin = gpu_fit.ViewNet().eval()
    served = ViewCNN().eval()
    served.load_state_dict(twin.state_dict())
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), served(x))


def test_metrics_agree_with_the_training_code() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) + y * 0.3, 1)  # many ties
    assert gpu_fit.auroc(y, p) == pytest.approx(float(_auc_rows(y[None], p[None])[0]))
    raw = rng.choice([1.0, 0.0, -1.0, np.nan], size=(300, 14)).astype(np.float32)
    for policy in ("u-ignore", "u-zeros", "u-ones"):
        t, m = gpu_fit.policy_targets(raw, policy)
        want = [apply_policy(r, policy) for r in raw]
        np.testing.assert_array_equal(t, np.stack([w[0] for w in want]))
        np.testing.assert_array_equal(m, np.stack([w[1] for w in want]))
    y1, _ = model1_from(list(OBSERVATIONS), raw, np.zeros_like(raw))
    got = gpu_fit.model1_target(raw)
    y1[y1 == -1] = np.nan  # uncertain-only studies are not scored
    np.testing.assert_array_equal(np.isnan(got), np.isnan(y1))
    np.testing.assert_array_equal(got[~np.isnan(got)], y1[~np.isnan(y1)])


def test_quick_fit_writes_weights_the_serving_classes_load(tmp_path: Path) -> None:
    pack = tmp_path / "p.npz"
    _tiny_pack(pack)
    out = tmp_path / "out"
    rc = gpu_fit.main(
        [
            "--pack",
            str(pack),
            "--out",
            str(out),
            "--quick",
            "--candidates",
            "tiny:32,tiny:48",
            "--threads",
            "1",
            "--view-epochs",
            "0",
            "--budget-s",
            "120",
            "--reserve-s",
            "1",
        ]
    )
    assert rc == 0
    log = json.loads((out / "fit_log.json").read_text())
    assert log["selection"]["winner"] in ("tiny:32", "tiny:48")
    assert {r["input_size"] for r in log["runs"]} == {32, 48}
    assert all(r["validation"]["model1_auroc"] is not None for r in log["runs"])
    from safetensors.torch import load_file

    net = MultiViewClassifier(14, **TINY)
    net.load_state_dict(to_float(load_file(str(out / "model2_s0.safetensors"))))
    z = np.load(out / "logits.npz")
    runs = [str(r) for r in z["runs"]]
    assert f"{log['selection']['winner']}/s0" in runs
    assert z[f"{runs[0]}/val"].shape == (10, 14)
    assert len(z["val_key_hash"]) == 10 and len(z["test_key_hash"]) == 5


def test_a_fit_with_another_seed_names_its_weights_by_that_seed(tmp_path: Path) -> None:
    pack = tmp_path / "p.npz"
    _tiny_pack(pack)
    out = tmp_path / "out"
    argv = ["--pack", str(pack), "--out", str(out), "--quick", "--candidates", "tiny:32"]
    argv += ["--threads", "1", "--view-epochs", "0", "--long-factor", "1", "--seed", "3"]
    assert gpu_fit.main([*argv, "--budget-s", "120", "--reserve-s", "1"]) == 0
    log = json.loads((out / "fit_log.json").read_text())
    assert [(r["seed"], r["weights"]) for r in log["runs"]] == [(3, "model2_s3")]
    assert (out / "model2_s3.safetensors").exists()
    assert not (out / "model2_s0.safetensors").exists()
    from models.training.finish import pick_weights

    assert pick_weights(log, "auto")["seed"] == 3


def test_stricter_operating_points_call_fewer_findings_on_normals() -> None:
    from models.training.finish import normals_tradeoff

    rng = np.random.default_rng(3)
    raw = rng.choice([1.0, 0.0, np.nan], size=(400, 14), p=[0.2, 0.6, 0.2]).astype(np.float32)
    raw[:, 0] = (rng.random(400) < 0.3).astype(np.float32)
    raw[raw[:, 0] == 1, 1:13] = 0.0  # normals have no pathology
    probs = np.clip(0.3 * np.nan_to_num(raw) + rng.random(raw.shape) * 0.7, 0, 1)
    out = normals_tradeoff(list(OBSERVATIONS), raw, probs, (0.9, 0.95, 0.98))
    present = [out[k]["present_on_no_finding"] for k in ("0.90", "0.95", "0.98")]
    sens = [out[k]["mean_pathology_sensitivity"] for k in ("0.90", "0.95", "0.98")]
    assert present[0] > present[1] > present[2]
    assert sens[0] >= sens[1] >= sens[2]


def test_finish_refuses_a_pack_of_another_split(tmp_path: Path) -> None:
    from models.training.datasets.chexpert import StudyRecord
    from models.training.finish import check_pack

    pack = tmp_path / "p.npz"
    _tiny_pack(pack)
    pk = read_pack(pack)

    def rec(i: int) -> StudyRecord:
        return StudyRecord(f"src:p{i}/s1", f"src:p{i}", "src", Path("x"), None, np.zeros(14))

    splits = {"train": range(0, 20), "val": range(20, 30), "test": range(30, 35)}
    parts = {k: [rec(i) for i in v] for k, v in splits.items()}
    parts["chexpert_test"] = [rec(i) for i in range(35, 40)]
    check_pack(pk, parts)  # the split the pack was built from
    parts["val"], parts["test"] = parts["val"][:-1], parts["test"] + parts["val"][-1:]
    with pytest.raises(SystemExit, match="val split"):
        check_pack(pk, parts)


def test_source_balance_evens_each_sources_prior() -> None:
    # source 0: 2 positives / 8 negatives of label 0; source 1: 9 / 1; source 2: all positive
    source = np.repeat([0, 1, 2], 10)
    target = np.zeros((30, 2), dtype=np.float32)
    target[[0, 1], 0] = 1
    target[10:19, 0] = 1
    target[20:, 0] = 1
    mask = np.ones_like(target)
    mask[5, 0] = 0  # an unlabelled entry
    rows = np.arange(30)
    w = gpu_fit.source_balance(target, mask, source, rows)
    assert w[5, 0] == 0
    for src in (0, 1):  # positives and negatives of a two-class cell weigh the same in total
        r = np.flatnonzero((source == src) & (mask[:, 0] > 0))
        pos, neg = r[target[r, 0] > 0], r[target[r, 0] == 0]
        assert w[pos, 0].sum() == pytest.approx(w[neg, 0].sum(), rel=1e-5)
    # one class only: equal weights, unchanged relative to an unweighted study
    assert np.allclose(w[20:, 0], w[20, 0]) and np.allclose(w[:, 1], w[0, 1])
    assert w[20, 0] == pytest.approx(w[0, 1])
    # the weights average 1 over the labelled entries; rows outside training get none
    assert w[mask > 0].mean() == pytest.approx(1.0)
    w2 = gpu_fit.source_balance(target, mask, source, rows[:20])
    assert not w2[20:].any()
    # a rare class is clipped rather than weighted without bound
    t = np.zeros((101, 1), dtype=np.float32)
    t[0] = 1
    w3 = gpu_fit.source_balance(t, np.ones_like(t), np.zeros(101, int), np.arange(101))
    assert w3[0, 0] / w3[1, 0] == pytest.approx(5.0 / (101 / 200), rel=1e-5)


def test_the_fitter_balances_with_its_own_clip(tmp_path: Path) -> None:
    pack = tmp_path / "p.npz"
    _tiny_pack(pack)
    cpu = torch.device("cpu")
    data = gpu_fit.load_data(pack, [48], cpu, "u-ignore", 1)
    opts = {"batch_size": 8, "lr": 1e-3, "weight_decay": 0.0, "lateral_dropout": 0.0, "gamma": 0.0}
    tight = gpu_fit.Fitter(data, cpu, **opts, balance_sources=True, balance_clip=1.01)
    default = gpu_fit.Fitter(data, cpu, **opts, balance_sources=True)
    plain = gpu_fit.Fitter(data, cpu, **opts)
    want = gpu_fit.source_balance(
        data.target.numpy(), data.mask.numpy(), data.source, data.rows("train"), clip=1.01
    )
    assert tight.weights is not None and default.weights is not None and plain.weights is None
    assert np.array_equal(tight.weights.numpy(), want)
    assert not np.array_equal(default.weights.numpy(), want)


def test_a_fit_records_where_it_ran() -> None:
    from models.training.finish import trained_on

    assert gpu_fit.cpu_machine().endswith(f"{os.cpu_count()} cores")
    assert trained_on({"device": "cpu (cpu)", "machine": "Xeon, 2 cores"}) == (
        "cpu (cpu): Xeon, 2 cores"
    )
    # a fit log from before the machine was recorded keeps its device
    assert trained_on({"device": "cuda (NVIDIA H200)"}) == "cuda (NVIDIA H200)"
