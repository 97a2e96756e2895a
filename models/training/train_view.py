"""Train the frontal/lateral view classifier.

    cxr-worker train viewclassifier --chexpert DATA/chexpert_small \
        --covid DATA/covid_chestxray/metadata.csv --nih DATA/nih_frontal/labels.csv \
        --folder DATA/actualmed_partial/labels.csv:DATA/actualmed_partial \
        --chexpert-test DATA/chexpert_sample --out models/weights/view_classifier.json

Views come from CheXpert's ``Frontal/Lateral`` column, the COVID-19 collection's ``view`` column
(``L`` = lateral; PA/AP/AP Supine/AP Erect frontal; blank or ``?`` skipped), ``--folder`` CSVs'
``view`` column; NIH ChestX-ray14 and other frontal-only sets add frontal examples
(``--max-patients-per-source`` caps how many patients of a source without laterals are used, by
a hash of the patient key, to bound CPU time). Images are split by patient within each source
(``--val-fraction``); the held-out images give the card's accuracy with a Wilson 95% CI.
``--chexpert-test`` folders are never trained on and are reported separately. ``--init-from``
fine-tunes an earlier card; ``--checkpoint`` is written after every epoch and resumed from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.common import seed_everything, select_device, set_threads
from models.registry import Normalisation, load_weights, to_float
from models.training.datasets.chexpert import DatasetError, ViewImage, csv_rows, patient_split
from models.training.datasets.sources import as_items, read_view_images
from models.training.images import ImageCache, augment
from models.training.runs import new_card, save_run, schedule
from models.view_classifier import ARCHITECTURE, ViewCNN

log = logging.getLogger(__name__)


COVID_FRONTAL = ("PA", "AP", "AP SUPINE", "AP ERECT")


def covid_view_images(csv_path: Path) -> list[ViewImage]:
    """The COVID-19 image data collection's ``metadata.csv`` (``file``/``filename``, ``view``,
    ``patientid``): ``L`` lateral, PA/AP/AP Supine/AP Erect frontal, blank or ``?`` skipped."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / "metadata.csv"
    out = []
    for line, r in csv_rows(csv_path):
        view = (r.get("view") or "").strip().upper()
        if view in ("", "?"):
            continue
        if view != "L" and view not in COVID_FRONTAL:
            raise DatasetError(f"{csv_path}:{line}: unknown view {r.get('view')!r}")
        rel = (r.get("file") or r.get("filename") or "").strip()
        patient = (r.get("patientid") or "").strip()
        if not rel or not patient:
            raise DatasetError(f"{csv_path}:{line}: empty file or patientid")
        path = csv_path.parent / rel
        if not path.is_file():
            raise DatasetError(f"{csv_path}:{line}: image {path} not found")
        out.append(ViewImage(path, f"covid:{patient}", "covid", lateral=view == "L"))
    return out


def nih_view_images(csv_path: Path) -> list[ViewImage]:
    """NIH ChestX-ray14 frontals: ``labels.csv`` with ``file`` and ``patient_id`` (or
    ``Data_Entry_2017.csv`` with ``Image Index`` and ``Patient ID``, images beside it or in
    ``images/``)."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / "labels.csv"
    out = []
    for line, r in csv_rows(csv_path):
        rel = (r.get("file") or "").strip()
        if not rel and r.get("Image Index"):
            name = r["Image Index"].strip()
            rel = name if (csv_path.parent / name).is_file() else f"images/{name}"
        patient = (r.get("patient_id") or r.get("Patient ID") or "").strip()
        if not rel or not patient:
            raise DatasetError(f"{csv_path}:{line}: empty file or patient id")
        path = csv_path.parent / rel
        if not path.is_file():
            raise DatasetError(f"{csv_path}:{line}: image {path} not found")
        out.append(ViewImage(path, f"nih:{patient}", "nih", lateral=False))
    return out


def cap_patients(images: list[ViewImage], max_patients: int, seed: int) -> list[ViewImage]:
    """At most ``max_patients`` patients of each source that has no lateral (0 = no cap), chosen
    by a hash of the seed and patient key; sources with laterals are kept whole."""
    if max_patients <= 0:
        return images
    keep: set[str] = set()
    for source in sorted({im.source for im in images}):
        ims = [im for im in images if im.source == source]
        pats = sorted({im.patient for im in ims})
        if any(im.lateral for im in ims) or len(pats) <= max_patients:
            keep.update(pats)
            continue
        ranked = sorted(pats, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())
        keep.update(ranked[:max_patients])
    return [im for im in images if im.patient in keep]


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_report(items: Sequence[tuple[Path, int]], pred: np.ndarray) -> dict[str, Any]:
    y = np.array([lab for _, lab in items], dtype=bool)
    ok = pred == y
    lo, hi = wilson(int(ok.sum()), len(ok))
    return {
        "images": len(items),
        "lateral": int(y.sum()),
        "errors": int((~ok).sum()),
        "laterals_called_frontal": int((y & ~pred).sum()),
        "frontals_called_lateral": int((~y & pred).sum()),
        "accuracy": round(float(ok.mean()), 4),
        "accuracy_ci95_wilson": [round(lo, 4), round(hi, 4)],
    }


def _tensors(
    items: Sequence[tuple[Path, int]], cache: ImageCache, norm: Normalisation
) -> tuple[torch.Tensor, torch.Tensor]:
    x = (
        torch.stack([cache.tensor(p, norm) for p, _ in items])
        if items
        else torch.zeros(0, 1, cache.size, cache.size)
    )
    y = torch.tensor([float(lab) for _, lab in items])
    return x, y


@torch.no_grad()
def _probs(net: ViewCNN, x: torch.Tensor, device: torch.device) -> np.ndarray:
    net.eval()
    return (
        torch.cat(
            [torch.sigmoid(net(x[i : i + 64].to(device))).cpu() for i in range(0, len(x), 64)]
        ).numpy()
        if len(x)
        else np.zeros(0)
    )


def gamma_jitter(
    x: torch.Tensor, norm: Normalisation, gen: torch.Generator, strength: float
) -> torch.Tensor:
    """Random gamma in [1/(1+s), 1+s] per image, applied in the [0, 1] pixel domain: exposure
    differs a lot between sites, and dark, low-contrast laterals are the classifier's hardest
    cases."""
    if strength <= 0:
        return x
    b = x.shape[0]
    g = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * float(np.log1p(strength))).view(
        b, 1, 1, 1
    )
    x01 = (x * norm.std + norm.mean).clamp(0, 1)
    return (x01**g - norm.mean) / norm.std


def train_view(
    net: ViewCNN,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    norm: Normalisation | None = None,
    gamma: float = 0.0,
    checkpoint: Path | None = None,
) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    pos = float(y.sum())
    pos_weight = torch.tensor([(len(y) - pos) / max(pos, 1.0)], device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, (len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])
        start, losses = int(saved["epoch"]), list(saved["losses"])
        log.info("resumed view classifier training from %s after epoch %d", checkpoint, start)
    for epoch in tqdm(range(start, epochs), desc="view classifier", disable=not progress):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            xb = x[idx]
            if norm is not None:
                xb = gamma_jitter(xb, norm, gen, gamma)
            xb = augment(xb, gen, rotate_deg=15, scale=0.15, translate=0.08, contrast=0.2)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(-1)
            logits = net(xb.to(device))
            loss = F.binary_cross_entropy_with_logits(
                logits, y[idx].to(device), pos_weight=pos_weight
            )
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
        log.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "net": net.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "gen": gen.get_state(),
                    "epoch": epoch + 1,
                    "losses": losses,
                },
                checkpoint,
            )
    return losses


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    set_threads(args.threads)
    seed_everything(args.seed)
    device = select_device(args.device)
    images = read_view_images(chexpert=args.chexpert or [], folder=args.folder or [])
    for c in args.covid or []:
        images += covid_view_images(Path(c))
    for c in args.nih or []:
        images += nih_view_images(Path(c))
    images = cap_patients(images, args.max_patients_per_source, args.seed)
    if not images:
        raise SystemExit("no training data: give --chexpert, --covid, --nih or --folder")
    test_images = read_view_images(chexpert_test=args.chexpert_test or [])
    train, val = patient_split(images, args.val_fraction, args.seed)
    tr_items, va_items, te_items = (as_items(x) for x in (train, val, test_images))
    norm = Normalisation(mean=0.5, std=0.25)
    cache = ImageCache(args.image_size)
    xtr, ytr = _tensors(tr_items, cache, norm)
    log.info(
        "view classifier: %d train images (%d lateral), %d held out, %d test",
        len(tr_items),
        int(ytr.sum()),
        len(va_items),
        len(te_items),
    )
    net = ViewCNN(width=args.width).to(device)
    if args.init_from:
        _, state = load_weights(Path(args.init_from))
        net.load_state_dict(to_float(state))
        log.info("view classifier initialised from %s", args.init_from)
    losses = train_view(
        net,
        xtr,
        ytr,
        device,
        **schedule(args),
        norm=norm,
        gamma=args.gamma,
        checkpoint=args.checkpoint,
    )
    metrics: dict[str, Any] = {
        "train_loss_per_epoch": [round(x, 4) for x in losses],
        "train_seconds": round(time.time() - t0, 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    preds: dict[str, np.ndarray] = {}
    for name, items in (("held_out", va_items), ("chexpert_test", te_items)):
        if items:
            x, _ = _tensors(items, cache, norm)
            preds[name] = _probs(net, x, device) >= 0.5
            metrics[name] = accuracy_report(items, preds[name])
    if "held_out" in preds:
        metrics["held_out_per_source"] = {
            src: accuracy_report(
                [it for it, im in zip(va_items, val, strict=True) if im.source == src],
                preds["held_out"][[im.source == src for im in val]],
            )
            for src in sorted({im.source for im in val})
        }
    if preds:
        both = np.concatenate(list(preds.values()))
        metrics["held_out_plus_chexpert_test"] = accuracy_report(
            [it for name in preds for it in (va_items if name == "held_out" else te_items)], both
        )
    card = new_card(
        args,
        name="view_classifier",
        architecture=ARCHITECTURE,
        input_size=args.image_size,
        normalisation=norm,
        labels=["frontal", "lateral"],
        thresholds={"lateral": 0.5},
        hyperparameters={
            "width": args.width,
            "blocks": 5,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "augment": f"gamma {args.gamma}, affine, contrast, horizontal flip",
            "init_from": str(args.init_from) if args.init_from else None,
            "max_patients_per_source": args.max_patients_per_source,
            "loss": "BCE with pos_weight = frontal/lateral ratio",
        },
        training_data=(
            f"{len(tr_items)} images ({int(ytr.sum())} lateral) from "
            + ", ".join(
                f"{src} ({sum(r.source == src for r in train)} images, "
                f"{sum(r.source == src and r.lateral for r in train)} lateral)"
                for src in sorted({r.source for r in train})
            )
        ),
        split=(
            f"patient-level, {args.val_fraction:.0%} of each source's patients held out with seed "
            f"{args.seed}; CheXpert test images never trained on"
        ),
        metrics=metrics,
        notes=args.notes,
    )
    card = save_run(
        card, net.state_dict(), args, {"held_out_patients": sorted({im.patient for im in val})}
    )
    log.info(
        "wrote %s: %s",
        args.out,
        json.dumps({k: v for k, v in metrics.items() if k != "train_loss_per_epoch"}),
    )
    return 0
