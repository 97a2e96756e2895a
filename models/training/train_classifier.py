"""Train Model 1 (No Finding vs abnormal) or Model 2 (14 CheXpert observations).

    cxr-worker train classifier --model model1 --chexpert DATA/chexpert_sample \
        --folder DATA/jsrt/labels.csv:DATA/jsrt:CXR_png/{id}.png --out models/weights/model1.json

Sources can be mixed (``--chexpert``, ``--mimic`` and ``--folder`` are repeatable). Studies are
split by patient (``--val-fraction`` of each source's patients held out, chosen from ``--seed``);
the held-out studies give the card's metrics and the decision thresholds (Youden's J; on the
training studies where the held-out split lacks a class; else 0.5). The held-out keys are written
next to the card (``<card>.split.json``) so ``cxr-worker evaluate classifier --held-out``
(:mod:`models.training.evaluate`) can re-measure on exactly the same studies.
Runs are reproducible for a given seed, data and device.
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
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.classifiers import ARCHITECTURE, DENSENET121, MultiViewClassifier, load_classifier
from models.common import autocast, seed_everything, select_device, set_threads
from models.labels import COMPETITION, MODEL1_LABELS, OBSERVATIONS
from models.registry import Normalisation
from models.training.datasets.chexpert import patient_split
from models.training.datasets.sources import studies_from_args
from models.training.images import ImageCache, augment, lung_cropper
from models.training.metrics import auroc_report, per_source_auroc, youden_threshold
from models.training.runs import new_card, save_run, schedule
from models.training.studies import StudyDataset, collate, labelled, predict, record_raw

log = logging.getLogger(__name__)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


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
    gamma: float = 0.0,
    checkpoint: Path | None = None,
    max_minutes: float = 0.0,
) -> list[float]:
    """Train in place; returns the mean loss of each epoch.

    With ``checkpoint``, the model, optimiser, schedule and random state are saved after every
    epoch and a run started again with the same file resumes after the last finished epoch.
    ``max_minutes`` > 0 stops after the first epoch that ends past that much training time (the
    schedule is not shortened: set ``epochs`` to what fits)."""
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
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        start, losses = int(ck["epoch"]), list(ck["losses"])
        log.info("resumed from %s after epoch %d", checkpoint, start)
    t_start = time.time()
    for epoch in range(start, epochs):
        t_epoch = time.time()
        model.train()
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for f, lat, p, t, m in bar:
            if do_augment:
                norm = ds.norm
                f = augment(f, gen, gamma=gamma, norm=norm)
                lat = augment(lat, gen, gamma=gamma, norm=norm)
            if lateral_dropout > 0:
                p = p & (torch.rand(p.shape[0], generator=gen) >= lateral_dropout)
            f, lat, p, t, m = (x.to(device) for x in (f, lat, p, t, m))
            with autocast(device):
                logits = model(f, lat, p)
            loss = masked_bce(logits, t, m)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
            total += float(loss.detach()) * f.shape[0]
            n += f.shape[0]
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        losses.append(total / max(n, 1))
        log.info(
            "epoch %d/%d: mean loss %.4f (%.0f s)",
            epoch + 1,
            epochs,
            losses[-1],
            time.time() - t_epoch,
        )
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "gen": gen.get_state(),
                    "epoch": epoch + 1,
                    "losses": losses,
                },
                tmp,
            )
            tmp.replace(checkpoint)
        if max_minutes > 0 and (time.time() - t_start) > max_minutes * 60:
            log.warning(
                "stopping after epoch %d: --max-minutes %.0f reached", epoch + 1, max_minutes
            )
            break
    return losses


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


def run(args: argparse.Namespace) -> int:
    """The two-way (train / held-out) run of one card: Model 1 on its own, or Model 2 without a
    test split (``--test-fraction 0``); ``cxr-worker train classifier`` reaches it through
    :func:`models.training.train_model2.run`."""
    t0 = time.time()
    set_threads(args.threads)
    seed_everything(args.seed)
    device = select_device(args.device)
    labels = list(MODEL1_LABELS) if args.model == "model1" else list(OBSERVATIONS)
    # split all studies before dropping those without labels for this model, so Model 1 and
    # Model 2 trained with the same seed hold out the same patients of a shared source (Model 1
    # initialised from Model 2 must not be evaluated on Model 2's training patients)
    everything = studies_from_args(args)
    if not everything:
        raise SystemExit("no training data: give --chexpert, --mimic or --folder")
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
    arch: dict[str, Any] = (
        {"growth_rate": 8, "block_config": [2, 2, 2, 2], "num_init_features": 16}
        if args.tiny
        else DENSENET121
    )
    norm = Normalisation(mean=0.5, std=0.25)
    cropper = lung_cropper(args.lung_mask, args.crop_margin, device) if args.lung_mask else None
    cache = ImageCache(args.image_size, cropper)
    input_crop = f"lungs (margin {args.crop_margin})" if args.lung_mask else "full image"
    model = MultiViewClassifier(len(labels), **arch).to(device)
    if args.init_from:
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
        **schedule(args),
        lateral_dropout=args.lateral_dropout,
        do_augment=not args.no_augment,
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
        per_source = per_source_auroc(labels, raw, probs, [r.source for r in val], seed=args.seed)
        if per_source is not None:
            metrics["held_out"]["per_source"] = per_source
    sources = sorted({r.source for r in records})
    card = new_card(
        args,
        name=args.model,
        architecture=ARCHITECTURE,
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
            "Thresholds: Youden's J on the held-out split; where that split lacks a class, "
            "Youden's J on the training studies (optimistic); else 0.5 "
            "(see metrics.threshold_origin). "
            "AUROC itself does not depend on them. " + args.notes
        ).strip(),
    )
    card = save_run(
        card,
        model.state_dict(),
        args,
        {"sources": sources, "held_out_keys": [r.key for r in val]},
    )
    log.info("wrote %s (sha256 %s) in %.0f s", args.out, card.sha256[:12], time.time() - t0)
    ho = metrics.get("held_out", {})
    if ho:
        summary = {k: v for k, v in ho.get("per_label", {}).items()}
        log.info("held-out AUROC: %s", json.dumps(summary))
        if "mean_competition_auroc" in ho:
            log.info("mean AUROC over %s: %s", ", ".join(COMPETITION), ho["mean_competition_auroc"])
    return 0
