"""Train the frontal/lateral view classifier.

    cxr-worker train viewclassifier --chexpert DATA/chexpert_sample \
        --folder DATA/actualmed_partial/labels.csv:DATA/actualmed_partial \
        --out models/weights/view_classifier.json

Views come from CheXpert's ``Frontal/Lateral`` column (and ``--folder`` CSVs' ``view`` column);
frontal-only sets add frontal examples. Images are split by patient (``--val-fraction``); the
held-out images give the card's accuracy. ``--chexpert-test`` folders are never trained on and
are reported separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.common import seed_everything, select_device, set_threads
from models.registry import Normalisation
from models.training.datasets.chexpert import patient_split
from models.training.datasets.sources import as_items, read_view_images
from models.training.images import ImageCache, augment
from models.training.runs import new_card, save_run, schedule
from models.view_classifier import ARCHITECTURE, ViewCNN

log = logging.getLogger(__name__)


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
) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    pos = float(y.sum())
    pos_weight = torch.tensor([(len(y) - pos) / max(pos, 1.0)], device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, (len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    losses = []
    for epoch in tqdm(range(epochs), desc="view classifier", disable=not progress):
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
    return losses


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    set_threads(args.threads)
    seed_everything(args.seed)
    device = select_device(args.device)
    images = read_view_images(chexpert=args.chexpert or [], folder=args.folder or [])
    if not images:
        raise SystemExit("no training data: give --chexpert or --folder")
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
    losses = train_view(net, xtr, ytr, device, **schedule(args), norm=norm, gamma=args.gamma)
    metrics: dict[str, Any] = {
        "train_loss_per_epoch": [round(x, 4) for x in losses],
        "train_seconds": round(time.time() - t0, 1),
        "device": str(device),
    }
    for name, items in (("held_out", va_items), ("chexpert_test", te_items)):
        if items:
            x, y = _tensors(items, cache, norm)
            pred = _probs(net, x, device) >= 0.5
            metrics[name] = {
                "images": len(items),
                "lateral": int(y.sum()),
                "accuracy": round(float(np.mean(pred == y.numpy().astype(bool))), 4),
            }
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
            "loss": "BCE with pos_weight = frontal/lateral ratio",
        },
        training_data=(
            f"{len(tr_items)} images ({int(ytr.sum())} lateral) from "
            f"{', '.join(sorted({r.source for r in train}))}"
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
