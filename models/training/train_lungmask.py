"""Train the Pix2Pix lung-mask generator: ``cxr-worker train lungmask --data DIR``.

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
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.common import autocast, seed_everything, select_device, set_threads
from models.pix2pix import PatchDiscriminator, UNetGenerator, init_weights, to_gan_range
from models.registry import ModelCard, Normalisation, read_card, save_model
from models.training.datasets.masks import Augment, LungMaskDataset, find_pairs, split_ids
from models.training.eval_lungmask import evaluate_card
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


def make_card(
    args: argparse.Namespace,
    *,
    n_train: int,
    val_ids: list[str],
    metrics: dict[str, Any],
    data_desc: str,
) -> ModelCard:
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
            "optimizer": "Adam(beta1=0.5, beta2=0.999)",
            "loss": "cGAN (BCE, PatchGAN 70x70) + lambda_l1 * L1 + lambda_seg * (BCE + soft Dice)",
            "resize": "anisotropic resize of the whole image to input_size x input_size",
            "output": "logits; sigmoid = lung probability",
        },
        training_data=data_desc,
        split=(
            f"models.training.datasets.masks.split_ids(sorted IDs, "
            f"val_fraction={args.val_fraction}, seed={args.seed}): "
            f"{n_train} train / {len(val_ids)} validation IDs held out"
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


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    seed_everything(args.seed)
    device = select_device(args.device)
    pairs = find_pairs(args.data)
    train_ids, val_ids = split_ids([p.id for p in pairs], args.val_fraction, args.seed)
    by_id = {p.id: p for p in pairs}
    log.info(
        "lung-mask training on %s: %d train, %d validation images, device %s",
        args.data,
        len(train_ids),
        len(val_ids),
        device,
    )
    train_ds = LungMaskDataset(
        [by_id[i] for i in train_ids], args.input_size, augment=Augment(), seed=args.seed
    )
    val_ds = LungMaskDataset([by_id[i] for i in val_ids], args.input_size)
    gen_t = torch.Generator().manual_seed(args.seed)
    train_dl = DataLoader(
        train_ds,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=len(train_ds) > args.batch_size,
        generator=gen_t,
        num_workers=0,
    )
    val_dl = DataLoader(val_ds, batch_size=args.batch_size, shuffle=False, num_workers=0)

    depth = _depth(args.input_size)
    gen = UNetGenerator(ngf=args.ngf, depth=depth, dropout=args.dropout).to(device)
    disc = PatchDiscriminator(ndf=args.ndf).to(device)
    init_weights(gen)
    init_weights(disc)
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

    data_desc = f"{len(pairs)} image/mask pairs from {args.data.name}/"
    if args.data_description:
        data_desc += f": {args.data_description}"
    best, best_epoch, step = -1.0, -1, 0
    history: list[dict[str, float]] = []
    t0 = time.monotonic()
    stop = False
    for epoch in range(args.epochs):
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
        val_dice = validate(gen, val_dl, device)
        rec = {k: v / max(1, n) for k, v in sums.items()} | {
            "epoch": epoch + 1,
            "val_dice": val_dice,
        }
        history.append(rec)
        elapsed = (time.monotonic() - t0) / 60
        log.info(
            "epoch %d: D %.3f G_gan %.3f L1 %.4f seg %.3f | val Dice %.4f | %.1f min | "
            "next lr %.2e",
            epoch + 1,
            rec["d"],
            rec["g_gan"],
            rec["l1"],
            rec["seg"],
            val_dice,
            elapsed,
            args.lr * factor,
        )
        if val_dice > best:
            best, best_epoch = val_dice, epoch + 1
            metrics = {
                "val_dice_network_res": round(best, 4),
                "best_epoch": best_epoch,
                "train_minutes": round(elapsed, 1),
                "device": str(device),
            }
            card = make_card(
                args, n_train=len(train_ids), val_ids=val_ids, metrics=metrics, data_desc=data_desc
            )
            save_model(card, gen.state_dict(), args.out, half=True)
        if stop or (args.max_minutes and elapsed >= args.max_minutes):
            log.info(
                "stopping after epoch %d (%s)", epoch + 1, "max steps" if stop else "time budget"
            )
            break
    log.info("best validation Dice %.4f at epoch %d; card %s", best, best_epoch, args.out)
    if not args.no_eval:
        # measured at the original resolution with the production post-processing
        report = evaluate_card(args.out, args.data, device=device, ids=val_ids)
        card = read_card(args.out)
        metrics = dict(card.metrics) | {
            "train_minutes_total": round((time.monotonic() - t0) / 60, 1)
        }
        metrics |= {
            k: report[k]
            for k in ("n", "dice_mean", "dice_p05", "iou_mean", "iou_p05", "quality_ok_fraction")
            if k in report
        }
        card = card.model_copy(update={"metrics": metrics})
        args.out.write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return 0
