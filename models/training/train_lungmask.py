"""Train the Pix2Pix lung-mask generator: ``cxr-worker train lungmask --data DIR [--data DIR2]``.

Several sites (``--data`` repeated, e.g. JSRT and OpenIST) are split **per site** and by case
(each JSRT/OpenIST case is one patient's film): ``split_ids(site IDs, val_fraction, seed)`` holds
out the test cases of each site (reported, never used for choosing anything); the rest is split
again with ``--tune-fraction`` into training and a tuning set whose mean per-site Dice picks the
best epoch. ``--init-from CARD`` fine-tunes from an earlier generator; a checkpoint (generator,
discriminator, optimisers, epoch, history) is written after every epoch and ``--resume`` continues
a stopped run from it.

Loss (generator) = conditional GAN loss + ``lambda_l1`` * L1 (Isola et al.; L1 in Pix2Pix's [-1, 1]
range) + ``lambda_seg`` * (BCE + soft Dice). The segmentation term is our addition: with a few
hundred training images it makes the generator converge in minutes on a CPU; set
``--lambda-seg 0`` for the paper's loss. The split is recomputed from the card's seed and
validation fraction by :func:`models.training.datasets.masks.split_ids`; the best generator by
validation Dice is kept and written (float16 safetensors + model card) each time it improves, so an
interrupted run still leaves usable weights.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.common import autocast, seed_everything, select_device, set_threads
from models.pix2pix import PatchDiscriminator, UNetGenerator, init_weights, to_gan_range
from models.registry import ModelCard, Normalisation, load_weights, read_card, save_model, to_float
from models.training.datasets.masks import (
    Augment,
    LungMaskDataset,
    MaskPair,
    find_pairs,
    split_ids,
)
from models.training.eval_lungmask import evaluate_card, mean_ci, p05_ci
from models.training.metrics import batch_dice
from models.training.runs import new_card

log = logging.getLogger(__name__)

MODEL_NAME = "lung_mask"
ARCHITECTURE = "pix2pix-unet256-generator"


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def train_step(
    gen: UNetGenerator,
    disc: PatchDiscriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device,
    lambda_l1: float,
    lambda_seg: float,
) -> dict[str, float]:
    """One Pix2Pix update (discriminator, then generator); returns the batch's losses."""
    y_gan = to_gan_range(y)
    with autocast(device):
        logits = gen(x)
    logits = logits.float()
    fake = to_gan_range(torch.sigmoid(logits))
    # discriminator: real pairs -> 1, generated pairs -> 0
    opt_d.zero_grad(set_to_none=True)
    with autocast(device):
        d_real = disc(x, y_gan).float()
        d_fake = disc(x, fake.detach()).float()
    loss_d = 0.5 * (
        F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
        + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    )
    torch.autograd.backward(loss_d)
    opt_d.step()
    # generator: fool the discriminator and stay close to the mask
    opt_g.zero_grad(set_to_none=True)
    with autocast(device):
        d_fake = disc(x, fake).float()
    g_gan = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
    l1 = F.l1_loss(fake, y_gan)
    seg = F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)
    loss_g = g_gan + lambda_l1 * l1 + lambda_seg * seg
    torch.autograd.backward(loss_g)
    opt_g.step()
    return {
        "d": loss_d.item(),
        "g_gan": g_gan.item(),
        "l1": l1.item(),
        "seg": seg.item(),
        "g": loss_g.item(),
    }


@torch.inference_mode()
def validate(
    gen: UNetGenerator,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> float:
    gen.eval()
    dices: list[float] = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = gen(x)
        dices += batch_dice((logits.float() > 0).float(), y)
    gen.train()
    return float(np.mean(dices)) if dices else float("nan")


def site_split(
    ids: list[str], val_fraction: float, tune_fraction: float, seed: int
) -> dict[str, list[str]]:
    """One site's ``train`` / ``tune`` / ``test`` IDs. ``test`` is ``split_ids(ids, val_fraction,
    seed)``'s held-out part, the same cases as the single-site card's validation split (and what
    ``cxr-worker evaluate lungmask`` recomputes from the card)."""
    rest, test = split_ids(ids, val_fraction, seed)
    if tune_fraction > 0:
        train, tune = split_ids(rest, tune_fraction, seed + 1)
    else:
        train, tune = rest, []
    return {"train": train, "tune": tune, "test": test}


def make_card(
    args: argparse.Namespace,
    *,
    splits: dict[str, dict[str, list[str]]],
    metrics: dict[str, Any],
    data_desc: str,
) -> ModelCard:
    split_text = "; ".join(
        f"{site}: {len(s['train'])} train / {len(s['tune'])} tuning (best epoch) / "
        f"{len(s['test'])} held-out test"
        for site, s in splits.items()
    )
    return new_card(
        args,
        name=MODEL_NAME,
        architecture=ARCHITECTURE,
        input_size=args.input_size,
        normalisation=Normalisation(mean=0.5, std=0.5),
        labels=["lung"],
        thresholds={"lung": 0.5},
        hyperparameters={
            "ngf": args.ngf,
            "ndf": args.ndf,
            "depth": _depth(args.input_size),
            "dropout": args.dropout,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lambda_l1": args.lambda_l1,
            "lambda_seg": args.lambda_seg,
            "seed": args.seed,
            "val_fraction": args.val_fraction,
            "tune_fraction": args.tune_fraction,
            "init_from": str(args.init_from) if args.init_from else None,
            "sites": list(splits),
            "optimizer": "Adam(beta1=0.5, beta2=0.999)",
            "loss": "cGAN (BCE, PatchGAN 70x70) + lambda_l1 * L1 + lambda_seg * (BCE + soft Dice)",
            "resize": "anisotropic resize of the whole image to input_size x input_size",
            "output": "logits; sigmoid = lung probability",
        },
        training_data=data_desc,
        split=(
            "per site, by case (one film per patient): test = models.training.datasets.masks."
            f"split_ids(site IDs, val_fraction={args.val_fraction}, seed={args.seed})[1]; "
            f"tuning = split_ids(rest, {args.tune_fraction}, seed={args.seed + 1})[1]. "
            + split_text
        ),
        metrics=metrics,
        notes="Output: lung probability map; post-processing and crop in models/crop.py. "
        "NOT FOR DIAGNOSTIC USE.",
    )


def _depth(size: int) -> int:
    depth = 0
    while size % 2 == 0 and size > 1 and depth < 8:
        size //= 2
        depth += 1
    return depth


def _checkpoint_path(args: argparse.Namespace) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    return Path("var/train") / (Path(args.out).stem + ".ckpt")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    seed_everything(args.seed)
    device = select_device(args.device)
    data_dirs: list[Path] = list(args.data)
    sites: dict[str, list[MaskPair]] = {}
    for d in data_dirs:
        name = d.resolve().name
        if name in sites:
            raise ValueError(f"two --data folders are both named {name}: rename one")
        sites[name] = find_pairs(d)
    splits = {
        site: site_split([p.id for p in pairs], args.val_fraction, args.tune_fraction, args.seed)
        for site, pairs in sites.items()
    }
    by_id = {(site, p.id): p for site, pairs in sites.items() for p in pairs}
    for site, s in splits.items():
        log.info(
            "site %s: %d train, %d tuning, %d held-out test cases",
            site,
            len(s["train"]),
            len(s["tune"]),
            len(s["test"]),
        )
    train_pairs = [by_id[(site, i)] for site, s in splits.items() for i in s["train"]]
    train_ds = LungMaskDataset(train_pairs, args.input_size, augment=Augment(), seed=args.seed)
    tune_dls = {
        site: DataLoader(
            LungMaskDataset([by_id[(site, i)] for i in s["tune"]], args.input_size),
            batch_size=args.batch_size,
            shuffle=False,
            num_workers=0,
        )
        for site, s in splits.items()
        if s["tune"]
    }
    gen_t = torch.Generator().manual_seed(args.seed)
    train_dl = DataLoader(
        train_ds,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=len(train_ds) > args.batch_size,
        generator=gen_t,
        num_workers=0,
    )

    depth = _depth(args.input_size)
    gen = UNetGenerator(ngf=args.ngf, depth=depth, dropout=args.dropout).to(device)
    disc = PatchDiscriminator(ndf=args.ndf).to(device)
    init_weights(gen)
    init_weights(disc)
    if args.init_from:
        _, state = load_weights(Path(args.init_from))
        gen.load_state_dict(to_float(state))
        log.info("generator initialised from %s", args.init_from)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.999))

    # Pix2Pix schedule: constant for the first half, then linear decay to zero. With a time
    # budget, progress is the larger of the epoch and time fractions, so the decay completes
    # whether the epochs or the minutes run out first.
    def lr_factor(epoch_done: int, minutes: float) -> float:
        progress = epoch_done / max(1, args.epochs)
        if args.max_minutes:
            progress = max(progress, minutes / args.max_minutes)
        return 1.0 if progress < 0.5 else max(0.02, 2.0 * (1.0 - progress))

    data_desc = "; ".join(f"{len(p)} image/mask pairs from {s}/" for s, p in sites.items())
    if args.data_description:
        data_desc += f": {args.data_description}"
    # the best generator is staged beside the checkpoint and copied to --out at the end, so a
    # card being trained never replaces the served one half-way
    ckpt = _checkpoint_path(args)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    stage = ckpt.with_name(ckpt.stem + ".best.json")
    best, best_epoch, step, start_epoch = -1.0, -1, 0, 0
    history: list[dict[str, float]] = []
    minutes_before = 0.0
    if args.resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        gen.load_state_dict(saved["gen"])
        disc.load_state_dict(saved["disc"])
        opt_g.load_state_dict(saved["opt_g"])
        opt_d.load_state_dict(saved["opt_d"])
        start_epoch, best, best_epoch = saved["epoch"], saved["best"], saved["best_epoch"]
        history, minutes_before, step = saved["history"], saved["minutes"], saved["step"]
        gen_t.manual_seed(args.seed + start_epoch)
        train_ds.rng = np.random.default_rng(args.seed + start_epoch)
        log.info("resumed from %s after epoch %d (best %.4f)", ckpt, start_epoch, best)
    t0 = time.monotonic() - minutes_before * 60
    stop = False
    for epoch in range(start_epoch, args.epochs):
        sums = {"d": 0.0, "g_gan": 0.0, "l1": 0.0, "seg": 0.0}
        n = 0
        bar = tqdm(
            train_dl,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            leave=False,
            file=sys.stderr,
            mininterval=5.0,
            disable=None,
        )
        for x, y in bar:
            losses = train_step(
                gen,
                disc,
                opt_g,
                opt_d,
                x.to(device),
                y.to(device),
                device=device,
                lambda_l1=args.lambda_l1,
                lambda_seg=args.lambda_seg,
            )
            for k in sums:
                sums[k] += losses[k]
            n += 1
            step += 1
            bar.set_postfix(l1=f"{losses['l1']:.4f}", seg=f"{losses['seg']:.3f}")
            if args.max_steps and step >= args.max_steps:
                stop = True
                break
        factor = lr_factor(epoch + 1, (time.monotonic() - t0) / 60)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = args.lr * factor
        site_dice = {site: validate(gen, dl, device) for site, dl in tune_dls.items()}
        tune_dice = float(np.mean(list(site_dice.values()))) if site_dice else float("nan")
        rec = {k: v / max(1, n) for k, v in sums.items()} | {
            "epoch": epoch + 1,
            "tune_dice": tune_dice,
        }
        rec |= {f"tune_dice_{site}": d for site, d in site_dice.items()}
        history.append(rec)
        elapsed = (time.monotonic() - t0) / 60
        log.info(
            "epoch %d: D %.3f G_gan %.3f L1 %.4f seg %.3f | tuning Dice %s mean %.4f | "
            "%.1f min | next lr %.2e",
            epoch + 1,
            rec["d"],
            rec["g_gan"],
            rec["l1"],
            rec["seg"],
            " ".join(f"{s} {d:.4f}" for s, d in site_dice.items()),
            tune_dice,
            elapsed,
            args.lr * factor,
        )
        if tune_dice > best or not tune_dls:
            best, best_epoch = tune_dice, epoch + 1
            metrics = {
                "tune_dice_network_res": round(best, 4),
                "best_epoch": best_epoch,
                "train_minutes": round(elapsed, 1),
                "device": str(device),
            }
            card = make_card(args, splits=splits, metrics=metrics, data_desc=data_desc)
            card = card.model_copy(update={"weights_file": stage.with_suffix(".safetensors").name})
            save_model(card, gen.state_dict(), stage, half=True)
        torch.save(
            {
                "gen": gen.state_dict(),
                "disc": disc.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "epoch": epoch + 1,
                "best": best,
                "best_epoch": best_epoch,
                "history": history,
                "minutes": elapsed,
                "step": step,
            },
            ckpt,
        )
        if stop or (args.max_minutes and elapsed >= args.max_minutes):
            log.info(
                "stopping after epoch %d (%s)", epoch + 1, "max steps" if stop else "time budget"
            )
            break
    log.info("best tuning Dice %.4f at epoch %d; staged card %s", best, best_epoch, stage)
    staged = read_card(stage)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stage.with_suffix(".safetensors"), args.out.with_suffix(".safetensors"))
    final = staged.model_copy(update={"weights_file": args.out.with_suffix(".safetensors").name})
    args.out.write_text(final.model_dump_json(indent=2) + "\n", encoding="utf-8")
    if not args.no_eval:
        # measured at the original resolution with the production post-processing, per site
        metrics = dict(final.metrics) | {
            "train_minutes_total": round((time.monotonic() - t0) / 60, 1)
        }
        for site, d in zip(sites, data_dirs, strict=True):
            report = evaluate_card(args.out, d, device=device, ids=splits[site]["test"])
            dice = [r["dice"] for r in report["per_image"]]
            metrics[site] = {
                k: report[k]
                for k in (
                    "n",
                    "dice_mean",
                    "dice_p05",
                    "iou_mean",
                    "iou_p05",
                    "quality_ok_fraction",
                )
            } | {
                "dice_mean_ci95": mean_ci(dice, seed=args.seed),
                "dice_p05_ci95": p05_ci(dice, seed=args.seed),
            }
        final = final.model_copy(update={"metrics": metrics})
        args.out.write_text(final.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return 0
