"""Pix2Pix networks, LungMasker inference, mask datasets and a tiny training run (synthetic
data)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.common import autocast, seed_everything, select_device
from models.lung_mask import LungMasker
from models.pix2pix import PatchDiscriminator, UNetGenerator, init_weights, to_gan_range
from models.registry import ModelCard, ModelLoadError, read_card, save_model
from models.training.cli import train_lungmask_arguments
from models.training.datasets.masks import (
    Augment,
    LungMaskDataset,
    MaskDatasetError,
    find_openist_pairs,
    find_pairs,
    read_gray,
    read_mask,
    split_ids,
)
from models.training.eval_lungmask import evaluate_card
from models.training.metrics import dice_iou
from models.training.train_lungmask import run, site_split, train_step

CPU = torch.device("cpu")


# ---------------------------------------------------------------- networks


def test_generator_shapes_for_256_input() -> None:
    gen = UNetGenerator(ngf=4, depth=8).eval()
    with torch.inference_mode():
        out = gen(torch.randn(2, 1, 256, 256))
    assert out.shape == (2, 1, 256, 256)
    # widths ngf * (1, 2, 4, 8, 8, 8, 8, 8): the innermost encoder layer has 8 * ngf channels
    assert gen.downs[-1].block[-1].out_channels == 32  # type: ignore[index,union-attr]


def test_generator_depth_and_size_checks() -> None:
    gen = UNetGenerator(ngf=4, depth=5)
    assert gen(torch.randn(1, 1, 64, 96)).shape == (1, 1, 64, 96)
    with pytest.raises(ValueError, match="divisible by 32"):
        gen(torch.randn(1, 1, 48, 64))
    with pytest.raises(ValueError, match="depth"):
        UNetGenerator(depth=1)


def test_generator_width_scales_parameters() -> None:
    n = lambda g: sum(p.numel() for p in g.parameters())  # noqa: E731
    small, big = n(UNetGenerator(ngf=8)), n(UNetGenerator(ngf=16))
    assert 3.5 < big / small < 4.5  # convolutions scale with the square of the width


def test_generator_is_deterministic_in_eval_mode() -> None:
    gen = UNetGenerator(ngf=4, depth=6, dropout=0.5)
    x = torch.randn(2, 1, 64, 64)
    gen.train()
    assert not torch.equal(gen(x), gen(x))  # dropout is the paper's noise in training
    gen.eval()
    with torch.inference_mode():
        assert torch.equal(gen(x), gen(x))


def test_patch_discriminator_is_conditional_70x70() -> None:
    disc = PatchDiscriminator(ndf=8)
    img, mask = torch.randn(3, 1, 256, 256), torch.rand(3, 1, 256, 256)
    out = disc(img, to_gan_range(mask))
    assert out.shape == (3, 1, 30, 30)  # 70x70 receptive fields over a 256 input
    assert disc.model[0].in_channels == 2  # type: ignore[union-attr]
    # a patch's score depends only on a bounded neighbourhood: change a far corner, centre is same
    img2 = img.clone()
    img2[:, :, :40, :40] += 5
    assert torch.allclose(disc.eval()(img, mask)[:, :, 20:, 20:], disc(img2, mask)[:, :, 20:, 20:])


def test_to_gan_range() -> None:
    assert torch.equal(to_gan_range(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))


def test_common_helpers() -> None:
    assert select_device("cpu") == CPU
    assert select_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device("cuda")
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    with autocast(CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# ---------------------------------------------------------------- synthetic data


def synthetic_pair(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A bright 'chest' with two dark ellipse 'lungs' (randomly placed) and their mask."""
    mask = np.zeros((size, size), np.uint8)
    cy = int(size * rng.uniform(0.45, 0.55))
    for cx in (rng.uniform(0.28, 0.36), rng.uniform(0.64, 0.72)):
        axes = (int(size * rng.uniform(0.10, 0.14)), int(size * rng.uniform(0.24, 0.30)))
        cv2.ellipse(mask, (int(size * cx), cy), axes, 0, 0, 360, 1, -1)
    img = np.where(mask > 0, 0.25, 0.75).astype(np.float32)
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    return np.clip(img, 0, 1), mask


def write_kaggle_layout(root: Path, n: int, size: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "CXR_png").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img, mask = synthetic_pair(rng, size)
        cv2.imwrite(str(root / "CXR_png" / f"CASE{i:03d}.png"), (img * 255).astype(np.uint8))
        cv2.imwrite(str(root / "masks" / f"CASE{i:03d}_mask.png"), mask * 255)


def write_openist_layout(root: Path, n: int, size: int = 64, seed: int = 1) -> None:
    """``labels.csv`` + ``<ID>.jpg`` + ``<ID>_mask.png`` in one folder, as in openist_normals."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    lines = ["id,finding,original_file"]
    for i in range(n):
        img, mask = synthetic_pair(rng, size)
        cv2.imwrite(str(root / f"OPENIST{i:04d}.jpg"), (img * 255).astype(np.uint8))
        cv2.imwrite(str(root / f"OPENIST{i:04d}_mask.png"), mask * 255)
        lines.append(f"OPENIST{i:04d},none,orig-{i}.jpg")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_card(tmp_path: Path, *, ngf: int = 4, size: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    gen = UNetGenerator(ngf=ngf, depth=6)
    card = ModelCard(
        name="lung_mask",
        version="test",
        architecture="pix2pix-unet",
        weights_file="lm.safetensors",
        sha256="0" * 64,
        input_size=size,
        labels=["lung"],
        thresholds={"lung": 0.5},
        hyperparameters={"ngf": ngf, "depth": 6, "dropout": 0.5, "seed": 0, "val_fraction": 0.25},
    )
    path = tmp_path / "lm.json"
    save_model(card, gen.state_dict(), path, half=True)
    return path


# ---------------------------------------------------------------- LungMasker


def test_masker_predicts_at_original_resolution(tmp_path: Path) -> None:
    masker = LungMasker.from_card(make_card(tmp_path), CPU, batch_size=2)
    rng = np.random.default_rng(0)
    images = [
        rng.random((100, 80), dtype=np.float32),
        rng.random((64, 64), dtype=np.float32),
        rng.random((33, 150), dtype=np.float32),
    ]
    results = masker.predict(images, margin=0.05)
    assert [r.mask.shape for r in results] == [(100, 80), (64, 64), (33, 150)]
    for r, img in zip(results, images, strict=True):
        assert r.mask.dtype == np.uint8 and set(np.unique(r.mask)) <= {0, 1}
        c = r.crop
        assert 0 <= c.x0 < c.x1 <= img.shape[1] and 0 <= c.y0 < c.y1 <= img.shape[0]
        if not r.quality.ok:  # an untrained network gives nonsense: full image + a reason
            assert (c.x0, c.y0, c.x1, c.y1) == (
                0,
                0,
                img.shape[1],
                img.shape[0],
            ) and r.quality.reason
    probs = masker.probability_maps(images)
    assert probs.shape == (3, 64, 64) and probs.dtype == np.float32
    assert 0.0 <= probs.min() and probs.max() <= 1.0
    # internal batching does not change the result
    single = np.concatenate([masker.probability_maps([im]) for im in images])
    np.testing.assert_allclose(probs, single, atol=1e-5)
    assert masker.predict([], margin=0.05) == []


def test_masker_rejects_non_2d_input(tmp_path: Path) -> None:
    masker = LungMasker.from_card(make_card(tmp_path), CPU)
    with pytest.raises(ValueError, match="input 0 must be a 2-D"):
        masker.predict([np.zeros((10, 10, 3), np.float32)], margin=0.05)
    with pytest.raises(TypeError, match="dtype uint8"):
        masker.predict([np.zeros((10, 10), np.uint8)], margin=0.05)


def test_masker_refuses_hash_mismatch(tmp_path: Path) -> None:
    card_path = make_card(tmp_path)
    weights = tmp_path / "lm.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="SHA-256"):
        LungMasker.from_card(card_path, CPU)


def test_masker_refuses_missing_weights_and_wrong_hyperparameters(tmp_path: Path) -> None:
    card_path = make_card(tmp_path)
    card = json.loads(card_path.read_text())
    card["hyperparameters"]["ngf"] = 8
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="do not fit"):
        LungMasker.from_card(card_path, CPU)
    (tmp_path / "lm.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="not found"):
        LungMasker.from_card(card_path, CPU)


# ---------------------------------------------------------------- datasets


def test_find_pairs_layouts(tmp_path: Path) -> None:
    write_kaggle_layout(tmp_path / "kaggle", 3)
    (tmp_path / "kaggle" / "CXR_png" / "NOMASK.png").write_bytes(
        (tmp_path / "kaggle" / "CXR_png" / "CASE000.png").read_bytes()
    )
    pairs = find_pairs(tmp_path / "kaggle")
    assert [p.id for p in pairs] == ["CASE000", "CASE001", "CASE002"]

    mont = tmp_path / "mont"
    for sub in ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask"):
        (mont / sub).mkdir(parents=True)
    img = np.full((20, 20), 128, np.uint8)
    left, right = np.zeros_like(img), np.zeros_like(img)
    left[5:15, 2:8], right[5:15, 12:18] = 255, 255
    cv2.imwrite(str(mont / "CXR_png" / "MCUCXR_0001_0.png"), img)
    cv2.imwrite(str(mont / "ManualMask/leftMask/MCUCXR_0001_0.png"), left)
    cv2.imwrite(str(mont / "ManualMask/rightMask/MCUCXR_0001_0.png"), right)
    (pair,) = find_pairs(mont)
    ds = LungMaskDataset([pair], 16)
    _, y = ds[0]
    assert y[0, 8, 3] == 1 and y[0, 8, 12] == 1 and y[0, 8, 8] == 0  # union of both lungs

    flat = tmp_path / "flat"
    flat.mkdir()
    cv2.imwrite(str(flat / "CHNCXR_0001_0.png"), img)
    cv2.imwrite(str(flat / "CHNCXR_0001_0_mask.png"), left)
    assert [p.id for p in find_pairs(flat)] == ["CHNCXR_0001_0"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskDatasetError, match="no image/mask pairs"):
        find_pairs(tmp_path / "empty")


def test_openist_layout_pairs_jpg_images_with_png_masks(tmp_path: Path) -> None:
    root = tmp_path / "openist_normals"
    write_openist_layout(root, 4)
    pairs = find_pairs(root)  # detected from labels.csv with an id column, no CXR_png/
    assert [p.id for p in pairs] == [f"OPENIST{i:04d}" for i in range(4)]
    assert pairs[0].image.suffix == ".jpg" and pairs[0].masks[0].name == "OPENIST0000_mask.png"
    img, mask = read_gray(pairs[1].image), read_mask(pairs[1])
    assert img.shape == mask.shape == (64, 64) and set(np.unique(mask)) == {0, 1}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: (r / "OPENIST0002_mask.png").unlink(), r"labels.csv:4: mask .*OPENIST0002_mask"),
        (lambda r: (r / "OPENIST0001.jpg").unlink(), r"labels.csv:3: image .*OPENIST0001"),
        (
            lambda r: r.joinpath("labels.csv").write_text(
                "id,finding,original_file\nOPENIST0000,none,a.jpg\n,none,b.jpg\n"
            ),
            r"labels.csv:3: empty or invalid id",
        ),
        (
            lambda r: r.joinpath("labels.csv").write_text(
                "id,finding,original_file\nOPENIST0000,none,a.jpg\nOPENIST0000,none,b.jpg\n"
            ),
            r"labels.csv:3: id OPENIST0000 repeats line 2",
        ),
        (
            lambda r: r.joinpath("labels.csv").write_text(
                "id,finding,original_file\nOPENIST0000,none\n"
            ),
            r"labels.csv:2: wrong number of fields",
        ),
        (
            lambda r: r.joinpath("labels.csv").write_text(
                "id,finding,original_file\n../x,none,a.jpg\n"
            ),
            r"labels.csv:2: empty or invalid id",
        ),
    ],
)
def test_openist_bad_row_or_missing_file_names_file_and_line(
    tmp_path: Path, edit: Callable[[Path], object], message: str
) -> None:
    root = tmp_path / "openist"
    write_openist_layout(root, 3)
    edit(root)
    with pytest.raises(MaskDatasetError, match=message):
        find_openist_pairs(root)


def test_split_ids_is_deterministic_and_disjoint() -> None:
    ids = [f"ID{i:03d}" for i in range(197)]
    train, val = split_ids(ids, 0.15, 7)
    assert len(val) == 30 and len(train) == 167 and not set(train) & set(val)
    assert split_ids(list(reversed(ids)), 0.15, 7) == (train, val)  # order of input is irrelevant
    assert split_ids(ids, 0.15, 8)[1] != val
    with pytest.raises(ValueError, match="val_fraction"):
        split_ids(ids, 1.0, 0)


def test_augmentation_moves_image_and_mask_together() -> None:
    rng = np.random.default_rng(1)
    img, mask = synthetic_pair(rng, 128)
    for _ in range(5):
        a_img, a_mask = Augment(rotate_deg=15, shift=0.1)(img, mask, rng)
        assert a_img.shape == img.shape and a_mask.dtype == np.uint8
        assert not np.array_equal(a_mask, mask)
        inside = a_img[cv2.erode(a_mask, np.ones((5, 5), np.uint8)) > 0].mean()
        outside_region = cv2.dilate(a_mask, np.ones((5, 5), np.uint8)) == 0
        outside_region[a_img == 0] = False  # ignore the black fill from rotation/shift
        assert inside < a_img[outside_region].mean() - 0.2  # dark lungs still under the mask


# ---------------------------------------------------------------- training


def test_tiny_training_run_loss_falls() -> None:
    seed_everything(0)
    rng = np.random.default_rng(0)
    pairs = [synthetic_pair(rng, 64) for _ in range(8)]
    x = torch.from_numpy(np.stack([(p[0] - 0.5) / 0.5 for p in pairs])[:, None])
    y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32)[:, None])
    gen, disc = UNetGenerator(ngf=4, depth=6, dropout=0.0), PatchDiscriminator(ndf=4)
    init_weights(gen)
    init_weights(disc)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    hist = [
        train_step(gen, disc, opt_g, opt_d, x, y, device=CPU, lambda_l1=100, lambda_seg=10)
        for _ in range(40)
    ]
    first = np.mean([h["l1"] for h in hist[:5]])
    last = np.mean([h["l1"] for h in hist[-5:]])
    assert last < 0.5 * first, (first, last)
    assert np.mean([h["seg"] for h in hist[-5:]]) < np.mean([h["seg"] for h in hist[:5]])


def test_training_cli_two_sites_writes_card_that_loads_and_resumes(tmp_path: Path) -> None:
    jsrt, openist = tmp_path / "jsrt", tmp_path / "openist"
    write_kaggle_layout(jsrt, 12)
    write_openist_layout(openist, 8)
    parser = argparse.ArgumentParser()
    train_lungmask_arguments(parser)
    out = tmp_path / "w" / "lung_mask.json"
    ckpt = tmp_path / "ck" / "lung_mask.ckpt"
    argv = [
        "--data",
        str(jsrt),
        "--data",
        str(openist),
        "--out",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--ngf",
        "4",
        "--ndf",
        "4",
        "--input-size",
        "64",
        "--val-fraction",
        "0.25",
        "--tune-fraction",
        "0.2",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    assert run(parser.parse_args(argv)) == 0
    card = read_card(out)
    assert card.input_size == 64 and card.labels == ["lung"] and card.thresholds == {"lung": 0.5}
    assert card.hyperparameters["ngf"] == 4 and card.hyperparameters["seed"] == 5
    assert card.hyperparameters["sites"] == ["jsrt", "openist"]
    assert "NOT FOR DIAGNOSTIC USE" in card.intended_use
    # per site, by case: 12 -> 3 test, 9 -> 2 tuning + 7 train; 8 -> 2 test, 6 -> 1 + 5
    assert "jsrt: 7 train / 2 tuning (best epoch) / 3 held-out test" in card.split
    assert "openist: 5 train / 1 tuning (best epoch) / 2 held-out test" in card.split
    for site, n in (("jsrt", 3), ("openist", 2)):
        m = card.metrics[site]
        assert m["n"] == n and 0.0 <= m["dice_mean"] <= 1.0
        lo, hi = m["dice_mean_ci95"]
        assert lo <= m["dice_mean"] <= hi
    split = site_split([f"CASE{i:03d}" for i in range(12)], 0.25, 0.2, 5)
    assert not set(split["test"]) & (set(split["train"]) | set(split["tune"]))
    n_params = sum(p.numel() for p in UNetGenerator(ngf=4, depth=6).state_dict().values())
    size = (out.parent / card.weights_file).stat().st_size
    assert 2 * n_params < size < 2 * n_params + 20_000  # float16 storage + safetensors header
    # the evaluation recomputes the same held-out IDs from the card
    report = evaluate_card(out, jsrt, device=CPU)
    assert [r["id"] for r in report["per_image"]] == split["test"]
    assert report["dice_mean"] == card.metrics["jsrt"]["dice_mean"]
    LungMasker.from_card(out, CPU)
    # a stopped run resumes from its checkpoint: epochs 1-2 are not trained again
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 2 and len(saved["history"]) == 2
    argv[argv.index("--epochs") + 1] = "3"
    assert run(parser.parse_args([*argv, "--resume", "--no-eval"])) == 0
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 3 and [h["epoch"] for h in saved["history"]] == [1, 2, 3]
    # fine-tuning starts from another card's generator
    tuned = tmp_path / "w2" / "lung_mask.json"
    args = parser.parse_args(
        [*argv, "--init-from", str(out), "--out", str(tuned), "--checkpoint", str(ckpt) + "2"]
    )
    assert run(args) == 0
    assert read_card(tuned).hyperparameters["init_from"] == str(out)


def test_dice_iou() -> None:
    a = np.zeros((10, 10), np.uint8)
    b = a.copy()
    a[:5], b[:, :5] = 1, 1
    assert dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(np.zeros_like(a), np.zeros_like(a)) == (1.0, 1.0)


def test_qc_feature_ranges_cover_the_calibration_masks() -> None:
    from models.training.eval_lungmask import qc_feature_ranges

    rng = np.random.default_rng(3)
    masks = [synthetic_pair(rng, 128)[1] for _ in range(5)]
    ranges = qc_feature_ranges(masks)
    lo, hi = ranges["lung_height"]
    assert 0.4 < lo <= hi < 0.7  # ellipses 0.48-0.60 of the height
    assert ranges["border_contact"] == [0.0, 0.0]
    assert ranges["cardiac_gap"][0] > 0
