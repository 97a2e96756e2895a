"""Train Model 1 (No Finding vs abnormal) or Model 2 (14 CheXpert observations).

    python -m models.train_classifier --model model1 --chexpert DATA/chexpert_sample \
        --folder DATA/jsrt/labels.csv:DATA/jsrt:CXR_png/{id}.png --out models/weights/model1.json

Sources can be mixed (``--chexpert``, ``--mimic`` and ``--folder`` are repeatable). Studies are
split by patient (``--val-fraction`` of each source's patients held out, chosen from ``--seed``);
the held-out studies give the card's metrics and the decision thresholds (Youden's J; on the
training studies where the held-out split lacks a class; else 0.5). The held-out keys are written next to the card
(``<card>.split.json``) so ``models.evaluate`` can re-measure on exactly the same studies.
Runs are reproducible for a given seed, data and device.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.classifiers import ARCHITECTURE, DENSENET121, MultiViewClassifier, resize_square
from models.common import autocast, seed_everything, select_device, set_threads
from models.datasets.chexpert import (
    COMPETITION,
    OBSERVATIONS,
    POLICIES,
    StudyRecord,
    apply_policy,
    load_image,
    model1_raw,
    patient_split,
    read_chexpert,
    read_mimic,
)
from models.datasets.folder import parse_spec, read_folder
from models.registry import ModelCard, Normalisation, save_model

log = logging.getLogger(__name__)

MODEL1_LABELS = ["Abnormal"]


# ----------------------------------------------------------------------------------------------
# data


class ImageCache:
    """Images decoded once and kept resized as uint8 (a few hundred KB per image at 224 px).

    ``cropper`` (e.g. the lung masker) crops frontal images before resizing, as the Analyzer
    does at inference; laterals are never cropped."""

    def __init__(
        self, size: int, cropper: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        self.size = size
        self.cropper = cropper
        self._cache: dict[tuple[Path, bool], np.ndarray] = {}

    def get(self, path: Path, frontal: bool = False) -> np.ndarray:
        key = (path, frontal and self.cropper is not None)
        arr = self._cache.get(key)
        if arr is None:
            img = load_image(path)
            if key[1]:
                img = self.cropper(img)  # type: ignore[misc]
            arr = (resize_square(img, self.size) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
            self._cache[key] = arr
        return arr

    def tensor(self, path: Path, norm: Normalisation, frontal: bool = False) -> torch.Tensor:
        t = torch.from_numpy(self.get(path, frontal)).float().div_(255.0)[None]
        return (t - norm.mean) / norm.std


def lung_cropper(
    card_path: Path, margin: float, device: torch.device
) -> Callable[[np.ndarray], np.ndarray]:
    """Crop a frontal image to its lungs with the lung-mask model (full image when the mask fails
    its quality checks), exactly as :class:`models.analyzer.Analyzer` does."""
    from models.lung_mask import LungMasker

    masker = LungMasker.from_card(card_path, device)

    def crop(img: np.ndarray) -> np.ndarray:
        c = masker.predict([img], margin=margin)[0].crop
        return img[c.y0 : c.y1, c.x0 : c.x1]

    return crop


def record_raw(rec: StudyRecord, model: str) -> np.ndarray:
    return model1_raw(rec.raw) if model == "model1" else rec.raw


def labelled(records: Sequence[StudyRecord], model: str) -> list[StudyRecord]:
    """Records with at least one non-blank label for this model."""
    return [r for r in records if not np.all(np.isnan(record_raw(r, model)))]


class StudyDataset(Dataset):
    """(frontal, lateral, lateral_present, target, mask) per study, from a shared image cache."""

    def __init__(
        self,
        records: Sequence[StudyRecord],
        model: str,
        policy: str,
        cache: ImageCache,
        norm: Normalisation,
        seed: int,
    ) -> None:
        self.records = list(records)
        self.model = model
        self.policy = policy
        self.cache = cache
        self.norm = norm
        self.rng = np.random.default_rng(
            seed
        )  # label smoothing draws (num_workers=0: reproducible)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(
        self, i: int
    ) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor, torch.Tensor]:
        r = self.records[i]
        target, mask = apply_policy(record_raw(r, self.model), self.policy, self.rng)
        frontal = self.cache.tensor(r.frontal, self.norm, frontal=True)
        if r.lateral is not None:
            lateral, present = self.cache.tensor(r.lateral, self.norm), True
        else:
            lateral, present = torch.zeros_like(frontal), False
        return frontal, lateral, present, torch.from_numpy(target), torch.from_numpy(mask)


def collate(batch: list[Any]) -> tuple[torch.Tensor, ...]:
    f, lat, p, t, m = zip(*batch, strict=True)
    return (
        torch.stack(f),
        torch.stack(lat),
        torch.tensor(p, dtype=torch.bool),
        torch.stack(t),
        torch.stack(m),
    )


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.06,
    contrast: float = 0.15,
) -> torch.Tensor:
    """Random affine (rotation, zoom, shift) and contrast/brightness jitter, per image."""
    b = x.shape[0]
    u = lambda: torch.rand(b, generator=gen) * 2 - 1  # noqa: E731
    ang = u() * math.radians(rotate_deg)
    s = 1 + u() * scale
    tx, ty = u() * translate * 2, u() * translate * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(x - bg, grid, padding_mode="zeros", align_corners=False) + bg
    c = (1 + u() * contrast).view(b, 1, 1, 1).to(x.device, x.dtype)
    br = (u() * contrast).view(b, 1, 1, 1).to(x.device, x.dtype)
    return out * c + br


def gather_records(args: argparse.Namespace) -> list[StudyRecord]:
    records: list[StudyRecord] = []
    for d in args.chexpert or []:
        records += read_chexpert(Path(d), "train")
    for d in args.mimic or []:
        records += read_mimic(Path(d))
    for spec in args.folder or []:
        csv_path, image_dir, template = parse_spec(spec)
        records += read_folder(csv_path, image_dir, template)
    if not records:
        raise SystemExit("no training data: give --chexpert, --mimic or --folder")
    return records


# ----------------------------------------------------------------------------------------------
# training and prediction


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def predict(
    model: MultiViewClassifier,
    ds: StudyDataset,
    device: torch.device,
    batch_size: int,
    use_lateral: bool = True,
) -> np.ndarray:
    model.eval()
    out = []
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for f, lat, p, _, _ in loader:
        with autocast(device):
            logits = model(
                f.to(device),
                lat.to(device) if use_lateral else None,
                p.to(device) if use_lateral else None,
            )
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def train_loop(
    model: MultiViewClassifier,
    ds: StudyDataset,
    device: torch.device,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    lateral_dropout: float = 0.3,
    do_augment: bool = True,
    progress: bool = True,
) -> list[float]:
    """Train in place; returns the mean loss of each epoch."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=gen,
        drop_last=len(ds) > batch_size,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    losses = []
    for epoch in range(epochs):
        model.train()
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for f, lat, p, t, m in bar:
            if do_augment:
                f, lat = augment(f, gen), augment(lat, gen)
            if lateral_dropout > 0:
                p = p & (torch.rand(p.shape[0], generator=gen) >= lateral_dropout)
            f, lat, p, t, m = (x.to(device) for x in (f, lat, p, t, m))
            with autocast(device):
                logits = model(f, lat, p)
            loss = masked_bce(logits, t, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * f.shape[0]
            n += f.shape[0]
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        losses.append(total / max(n, 1))
        log.info("epoch %d/%d: mean loss %.4f", epoch + 1, epochs, losses[-1])
    return losses


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float | None:
    """Threshold maximising sensitivity + specificity - 1; None when y has one class only."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thr[best], 1e-4), 1 - 1e-4))


def held_out_metrics(
    labels: Sequence[str],
    raw: np.ndarray,
    probs: np.ndarray,
    seed: int,
    train_raw: np.ndarray | None = None,
    train_probs: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, float], dict[str, str]]:
    """AUROC with bootstrap CIs on held-out studies (positive = 1, negative = 0; uncertain and blank
    are left out of each label's evaluation) and decision thresholds: Youden's J on the held-out
    split; where it lacks a class, Youden's J on the training studies' predictions (optimistic);
    else 0.5. Returns (report, thresholds, where each threshold came from)."""
    from models.evaluate import auroc_report

    report = auroc_report(labels, raw, probs, seed=seed)
    thresholds: dict[str, float] = {}
    origin: dict[str, str] = {}
    for j, lab in enumerate(labels):
        t = None
        for name, r, p in (("held-out", raw, probs), ("train", train_raw, train_probs)):
            if r is None or p is None:
                continue
            keep = (r[:, j] == 0) | (r[:, j] == 1)
            t = youden_threshold(r[keep, j], p[keep, j]) if keep.any() else None
            if t is not None:
                origin[lab] = f"Youden J ({name})"
                break
        thresholds[lab] = 0.5 if t is None else round(t, 4)
        origin.setdefault(lab, "0.5 (no split has both classes)")
    return report, thresholds, origin


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["model1", "model2"], required=True)
    p.add_argument(
        "--chexpert",
        action="append",
        metavar="DIR",
        help="CheXpert folder (holds CheXpert-v1.0/train.csv); repeatable",
    )
    p.add_argument(
        "--mimic",
        action="append",
        metavar="DIR",
        help="MIMIC-CXR-JPG folder (metadata + chexpert CSVs, files/); repeatable",
    )
    p.add_argument(
        "--folder",
        action="append",
        metavar="CSV:DIR[:TEMPLATE]",
        help="plain folder + label CSV (see models/datasets/folder.py); repeatable",
    )
    p.add_argument("--uncertainty", choices=POLICIES, default="lsr-ones")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--lateral-dropout",
        type=float,
        default=0.3,
        help="probability of hiding a study's lateral in training, so frontal-only works",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True, help="model card path (weights go beside it)")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--notes", default="")
    p.add_argument(
        "--lung-mask",
        type=Path,
        metavar="CARD",
        help="crop frontals to the lungs with this lung-mask card, as at inference "
        "(default: full images; the card then says so and the Analyzer feeds full images)",
    )
    p.add_argument("--crop-margin", type=float, default=0.05)
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="CARD",
        help="initialise the backbone and lateral embeddings from another classifier card "
        "(e.g. Model 1 from Model 2: transfer from the 14 observations)",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny DenseNet (tests and smoke runs)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    set_threads(args.threads)
    seed_everything(args.seed)
    device = select_device(args.device)
    labels = MODEL1_LABELS if args.model == "model1" else list(OBSERVATIONS)
    # split all studies before dropping those without labels for this model, so Model 1 and
    # Model 2 trained with the same seed hold out the same patients of a shared source (Model 1
    # initialised from Model 2 must not be evaluated on Model 2's training patients)
    everything = gather_records(args)
    train_all, val_all = patient_split(everything, args.val_fraction, args.seed)
    train, val = labelled(train_all, args.model), labelled(val_all, args.model)
    records = train + val
    log.info(
        "%s: %d studies (%d train, %d held out), %d with a lateral",
        args.model,
        len(records),
        len(train),
        len(val),
        sum(r.lateral is not None for r in records),
    )
    arch = (
        {"growth_rate": 8, "block_config": [2, 2, 2, 2], "num_init_features": 16}
        if args.tiny
        else DENSENET121
    )
    norm = Normalisation(mean=0.5, std=0.25)
    cropper = lung_cropper(args.lung_mask, args.crop_margin, device) if args.lung_mask else None
    cache = ImageCache(args.image_size, cropper)
    input_crop = f"lungs (margin {args.crop_margin})" if args.lung_mask else "full image"
    model = MultiViewClassifier(len(labels), **arch).to(device)  # type: ignore[arg-type]
    if args.init_from:
        from models.classifiers import load_classifier

        src_card, src = load_classifier(args.init_from, device)
        if src_card.input_size != args.image_size:
            log.warning(
                "--init-from %s was trained at %d px, this run uses %d px",
                args.init_from,
                src_card.input_size,
                args.image_size,
            )
        keep = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
        missing, _ = model.load_state_dict(keep, strict=False)
        if [k for k in missing if not k.startswith("head.")]:
            raise SystemExit(
                f"--init-from {args.init_from}: backbone does not match ({missing[:3]}...)"
            )
        log.info(
            "backbone initialised from %s %s (sha256 %s)",
            src_card.name,
            src_card.version,
            src_card.sha256[:12],
        )
    ds_train = StudyDataset(train, args.model, args.uncertainty, cache, norm, args.seed)
    losses = train_loop(
        model,
        ds_train,
        device,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        lateral_dropout=args.lateral_dropout,
        do_augment=not args.no_augment,
        progress=not args.no_progress,
    )
    train_s = time.time() - t0

    metrics: dict[str, Any] = {
        "train_loss_per_epoch": [round(x, 4) for x in losses],
        "train_seconds": round(train_s, 1),
        "device": str(device),
    }
    thresholds = {lab: 0.5 for lab in labels}
    unvalidated: list[str] = []
    if val:
        ds_val = StudyDataset(val, args.model, "u-ignore", cache, norm, args.seed)
        probs = predict(model, ds_val, device, args.batch_size)
        raw = np.stack([record_raw(r, args.model) for r in val])
        tr_ds = StudyDataset(train, args.model, "u-ignore", cache, norm, args.seed)
        tr_probs = predict(model, tr_ds, device, args.batch_size)
        tr_raw = np.stack([record_raw(r, args.model) for r in train])
        report, thresholds, origin = held_out_metrics(
            labels, raw, probs, args.seed, tr_raw, tr_probs
        )
        metrics["threshold_origin"] = origin
        if args.model == "model2":  # no data could set these thresholds: reports flag them
            unvalidated = [lab for lab in labels if origin[lab].startswith("0.5")]
        metrics["held_out"] = report
        metrics["held_out"]["studies"] = len(val)
        vsrc = np.array([r.source for r in val])
        if len(set(vsrc)) > 1:  # a pooled AUROC can hide a per-site confound
            from models.evaluate import auroc_report

            metrics["held_out"]["per_source"] = {
                sname: {
                    lab: v
                    for lab, v in auroc_report(
                        labels, raw[vsrc == sname], probs[vsrc == sname], seed=args.seed
                    )["per_label"].items()
                    if v["auroc"] is not None
                }
                for sname in sorted(set(vsrc))
            }
    sources = sorted({r.source for r in records})
    card = ModelCard(
        name=args.model,
        version=args.version,
        architecture=ARCHITECTURE,
        weights_file=args.out.with_suffix(".safetensors").name,
        sha256="0" * 64,
        input_size=args.image_size,
        normalisation=norm,
        labels=labels,
        thresholds=thresholds,
        hyperparameters={
            **arch,
            "views": ["frontal", "lateral (optional)"],
            "fusion": "late concat, learned lateral-missing embedding",
            "input_crop": input_crop,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "AdamW + one-cycle",
            "uncertainty": args.uncertainty,
            "augment": not args.no_augment,
            "lateral_dropout": args.lateral_dropout,
            "seed": args.seed,
            "val_fraction": args.val_fraction,
            "init_from": (f"{args.init_from.name}" if args.init_from else "random"),
            "unvalidated_thresholds": unvalidated,
        },
        training_data=(
            f"{len(train)} studies from {', '.join(sources)} "
            f"({sum(r.lateral is not None for r in train)} with a lateral); arguments: "
            + " ".join(
                [
                    *(f"--chexpert {d}" for d in args.chexpert or []),
                    *(f"--mimic {d}" for d in args.mimic or []),
                    *(f"--folder {d}" for d in args.folder or []),
                ]
            )
        ),
        split=(
            f"patient-level, {args.val_fraction:.0%} of each source's patients held out with seed "
            f"{args.seed}: {len(train)} train / {len(val)} held-out studies; held-out keys in "
            f"{args.out.with_suffix('.split.json').name}"
        ),
        metrics=metrics,
        notes=(
            "Thresholds: Youden's J on the held-out split; where that split lacks a class, Youden's J "
            "on the training studies (optimistic); else 0.5 (see metrics.threshold_origin). "
            "AUROC itself does not depend on them. " + args.notes
        ).strip(),
    )
    card = save_model(card, model.state_dict(), args.out, half=True)
    args.out.with_suffix(".split.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "val_fraction": args.val_fraction,
                "sources": sources,
                "held_out_keys": [r.key for r in val],
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    log.info("wrote %s (sha256 %s) in %.0f s", args.out, card.sha256[:12], time.time() - t0)
    ho = metrics.get("held_out", {})
    if ho:
        summary = {k: v for k, v in ho.get("per_label", {}).items()}
        log.info("held-out AUROC: %s", json.dumps(summary))
        if "mean_competition_auroc" in ho:
            log.info("mean AUROC over %s: %s", ", ".join(COMPETITION), ho["mean_competition_auroc"])
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    p = argparse.ArgumentParser(
        prog="python -m models.train_classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
