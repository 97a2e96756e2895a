"""What every training command shares: the optimisation settings it takes from its command line
and the card, weights and split file it writes."""

from __future__ import annotations

import argparse
import json
from typing import Any, TypedDict

import torch

from models.registry import ModelCard, save_model


class Schedule(TypedDict):
    """Keyword arguments of the training loops (:func:`.train_classifier.train_loop`,
    :func:`.train_view.train_view`)."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    progress: bool


def schedule(args: argparse.Namespace) -> Schedule:
    """``--epochs``, ``--batch-size``, ``--lr``, ``--seed`` and ``--no-progress`` as loop
    arguments."""
    return Schedule(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
    )


def new_card(args: argparse.Namespace, **fields: Any) -> ModelCard:
    """The card ``--out`` will hold at ``--version`` (weights beside it; the SHA-256 is filled in
    by :func:`save_run` / :func:`models.registry.save_model`)."""
    return ModelCard(
        version=args.version,
        weights_file=args.out.with_suffix(".safetensors").name,
        sha256="0" * 64,
        **fields,
    )


def save_run(
    card: ModelCard, state: dict[str, torch.Tensor], args: argparse.Namespace, split: dict[str, Any]
) -> ModelCard:
    """Write the weights (float16) and card to ``--out`` and ``<out>.split.json`` with the seed,
    validation fraction and ``split`` (what was held out), so evaluation can use the same split."""
    card = save_model(card, state, args.out, half=True)
    args.out.with_suffix(".split.json").write_text(
        json.dumps({"seed": args.seed, "val_fraction": args.val_fraction, **split}, indent=1)
        + "\n",
        encoding="utf-8",
    )
    return card
