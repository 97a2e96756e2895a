"""Evaluate a lung-mask model card: ``cxr-worker evaluate lungmask --card CARD --data DIR``.

Dice and IoU per image at the ground truth's (original) resolution, after the production
post-processing (:func:`models.crop.mask_and_crop`), on the card's validation split (recomputed
from the seed and validation fraction recorded in the card) or on every image with ``--all``.
Writes a JSON report and a PNG grid of mask overlays (worst cases first).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.api import CropBox
from models.common import select_device, set_threads
from models.crop import lung_geometry
from models.lung_mask import LungMasker
from models.registry import read_card
from models.training.datasets.masks import (
    find_pairs,
    read_gray,
    read_mask,
    resize_mask,
    split_ids,
)
from models.training.metrics import dice_iou

log = logging.getLogger(__name__)


def mean_ci(
    values: list[float], *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95% bootstrap CI (2.5/97.5 percentiles) of the mean of ``values``; None when empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)


def p05_ci(values: list[float], *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% bootstrap CI of the 5th percentile of ``values``; None when empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    rng = np.random.default_rng(seed)
    boots = np.percentile(v[rng.integers(0, v.size, size=(n_boot, v.size))], 5, axis=1)
    return round(float(np.percentile(boots, 2.5)), 4), round(float(np.percentile(boots, 97.5)), 4)


def validation_ids(card_path: Path, ids: list[str]) -> list[str]:
    """The card's held-out IDs, recomputed from its recorded seed and validation fraction."""
    hp = read_card(card_path).hyperparameters
    if "seed" not in hp or "val_fraction" not in hp:
        raise ValueError(f"{card_path} records no seed/val_fraction: evaluate with --all instead")
    return split_ids(ids, float(hp["val_fraction"]), int(hp["seed"]))[1]


def overlay(
    img: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray,
    crop: CropBox | None = None,
    size: int = 256,
) -> np.ndarray:
    """RGB tile: ground truth contour green, prediction contour red, crop box yellow."""
    g = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    tile: np.ndarray = cv2.cvtColor(
        cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB
    )
    if crop is not None:
        sy, sx = size / img.shape[0], size / img.shape[1]
        cv2.rectangle(
            tile,
            (int(crop.x0 * sx), int(crop.y0 * sy)),
            (int(crop.x1 * sx) - 1, int(crop.y1 * sy) - 1),
            (255, 255, 0),
            1,
        )
    for m, colour in ((truth, (0, 255, 0)), (pred, (255, 0, 0))):
        small = cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tile, contours, -1, colour, 1)
    return tile


def evaluate_card(
    card_path: Path,
    data: Path,
    *,
    device: torch.device,
    ids: list[str] | None = None,
    margin: float = 0.05,
    out_dir: Path | None = None,
    grid: int = 0,
) -> dict[str, Any]:
    """Evaluate ``card_path`` on ``ids`` (default: the card's validation split) of ``data``."""
    pairs = find_pairs(data)
    by_id = {p.id: p for p in pairs}
    if ids is None:
        ids = validation_ids(card_path, list(by_id))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} requested IDs are not in {data} (e.g. {missing[0]})")
    masker = LungMasker.from_card(card_path, device)
    rows: list[dict[str, Any]] = []
    tiles: list[tuple[float, np.ndarray]] = []
    t_infer = 0.0
    for i in ids:
        img, truth = read_gray(by_id[i].image), read_mask(by_id[i])
        t = time.perf_counter()
        res = masker.predict([img], margin=margin)[0]
        t_infer += time.perf_counter() - t
        d, j = dice_iou(res.mask, truth)
        rows.append(
            {
                "id": i,
                "dice": round(d, 4),
                "iou": round(j, 4),
                "quality_ok": res.quality.ok,
                "reason": res.quality.reason,
            }
        )
        if grid:
            tiles.append((d, overlay(img, res.mask, truth, res.crop)))
    dice = np.array([r["dice"] for r in rows])
    iou = np.array([r["iou"] for r in rows])
    report: dict[str, Any] = {
        "card": str(card_path),
        "data": str(data),
        "n": len(rows),
        "dice_mean": round(float(dice.mean()), 4),
        "dice_p05": round(float(np.percentile(dice, 5)), 4),
        "iou_mean": round(float(iou.mean()), 4),
        "iou_p05": round(float(np.percentile(iou, 5)), 4),
        "quality_ok_fraction": round(float(np.mean([r["quality_ok"] for r in rows])), 4),
        "seconds_per_image": round(t_infer / max(1, len(rows)), 4),
        "device": str(device),
        "per_image": rows,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if tiles:
            tiles.sort(key=lambda t: t[0])
            chosen = [t for _, t in tiles[:grid]]
            cols = min(4, len(chosen))
            rows_n = -(-len(chosen) // cols)
            blank = np.zeros_like(chosen[0])
            chosen += [blank] * (rows_n * cols - len(chosen))
            sheet = np.vstack([np.hstack(chosen[r * cols : (r + 1) * cols]) for r in range(rows_n)])
            cv2.imwrite(str(out_dir / "overlays.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return report


def qc_feature_ranges(masks: list[np.ndarray], size: int = 256) -> dict[str, list[float]]:
    """[min, max] of each geometric quality feature (:func:`models.crop.lung_geometry`) over
    ground-truth masks resized to the network's ``size``: what the limits in
    :class:`models.crop.QualityLimits` were calibrated on."""
    feats: dict[str, list[float]] = {}
    for m in masks:
        g = lung_geometry(resize_mask(m, size))
        if g is None:
            continue
        row = {
            "lung_height": min(g.height_a, g.height_b),
            "lung_height_max": max(g.height_a, g.height_b),
            "lung_width": min(g.width_a, g.width_b),
            "lung_width_max": max(g.width_a, g.width_b),
            "height_ratio": g.height_ratio,
            "width_ratio": g.width_ratio,
            "apex_offset": abs(g.edge_gaps["top"][0] - g.edge_gaps["top"][1]),
            "cardiac_gap": g.cardiac_gap,
            "midline_crossing": g.midline_crossing,
            "border_contact": max(g.border_contact.values()),
            "top_gap": min(g.edge_gaps["top"]),
        }
        for k, v in row.items():
            feats.setdefault(k, []).append(float(v))
    return {k: [round(min(v), 4), round(max(v), 4)] for k, v in feats.items()}


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.qc_calibration:
        pairs = find_pairs(args.data)
        test = set(validation_ids(args.card, [p.id for p in pairs]))
        masks = [read_mask(p) for p in pairs if p.id not in test]
        print(json.dumps({"masks": len(masks)} | qc_feature_ranges(masks), indent=2))
        return 0
    device = select_device(args.device)
    ids = [p.id for p in find_pairs(args.data)] if args.all else None
    report = evaluate_card(
        args.card,
        args.data,
        device=device,
        ids=ids,
        margin=args.margin,
        out_dir=args.out,
        grid=args.grid,
    )
    summary = {k: v for k, v in report.items() if k != "per_image"}
    log.info("lung mask evaluation: %s", summary)
    print(json.dumps(summary, indent=2))
    return 0
