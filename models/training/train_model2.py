"""Train Model 2 (the 14 CheXpert observations) on every source with a patient-level
train / validation / test split, calibrate it and derive Model 1 from it.

    nice -n 10 python -m models.training train classifier --model model2 \\
        --chexpert DATA/chexpert_small --chexpert DATA/chexpert_sample \\
        --nih DATA/nih_frontal/labels.csv --covid DATA/covid_chestxray \\
        --folder DATA/openist_normals/labels.csv:DATA/openist_normals:{id}.jpg \\
        --lung-mask models/weights/lung_mask.json --chexpert-test DATA/chexpert_sample \\
        --test-fraction 0.15 --val-fraction 0.15 --cache var/cache/c224.npz \\
        --checkpoint var/ckpt/model2.pt --log-file var/train_model2.log \\
        --out models/weights/model2.json --model1-out models/weights/model1.json

Steps: patients of all sources are hashed into train / val / test
(:func:`models.training.datasets.sources.patient_split3`); every frontal is cropped to its lungs
by the same lung mask + crop the Analyzer uses and cached at the input size (``--cache``); the
network trains with checkpoints after each epoch (a stopped run resumes); Platt scaling per label
is fitted on the validation split, the operating thresholds are set there (pathologies at
``--specificity`` of validation negatives, No Finding at Youden's J), and the test split and
CheXpert test are only measured. Model 1's card is derived: P(Abnormal) = 1 - P(No Finding),
threshold 1 - t(No Finding), same weights file and SHA-256.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.classifiers import ARCHITECTURE, MultiViewClassifier
from models.common import seed_everything, select_device, set_threads
from models.labels import MODEL1_LABELS, OBSERVATIONS
from models.registry import ModelCard, Normalisation, card_json, save_model
from models.training.calibration import (
    apply_platt,
    fit_platt,
    operating_thresholds,
    per_source,
    report,
)
from models.training.datasets.chexpert import StudyRecord
from models.training.datasets.sources import patient_split3, read_studies, studies_from_args
from models.training.images import ImageCache, LungCropper
from models.training.metrics import youden_threshold
from models.training.studies import StudyDataset, labelled, predict_logits
from models.training.train_classifier import train_loop

log = logging.getLogger(__name__)

CONSISTENCY_RULE = (
    "Model 1 is derived from Model 2: P(Abnormal) = 1 - P(No Finding) (calibrated) of the same "
    "network, threshold(Abnormal) = 1 - threshold(No Finding); the Analyzer reports Model 2's "
    "No Finding as the complement of Model 1, Present exactly when Model 1 is not Abnormal "
    "(models.analyzer.reconcile), so the two can never contradict on a study."
)


def _arch(args: argparse.Namespace) -> dict[str, Any]:
    if args.tiny:
        return {"growth_rate": 8, "block_config": [2, 2, 2, 2], "num_init_features": 16}
    return {
        "growth_rate": args.growth_rate,
        "block_config": [int(x) for x in args.block_config.split(",")],
        "num_init_features": args.init_features,
    }


def _log_to_file(path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(h)
    logging.getLogger().setLevel(logging.INFO)


def fill_cache(cache: ImageCache, records: list[StudyRecord], path: Path | None) -> None:
    """Decode, crop and resize every image of ``records`` once (kept in ``path``)."""
    if path is not None:
        log.info("image cache %s: %d images loaded", path, cache.load(path))
    t0, before = time.time(), len(cache)
    for i, r in enumerate(records):
        cache.get(r.frontal, frontal=True)
        if r.lateral is not None:
            cache.get(r.lateral)
        if (i + 1) % 250 == 0:
            log.info("cached %d/%d studies (%.0f s)", i + 1, len(records), time.time() - t0)
    if path is not None and len(cache) > before:
        cache.save(path)
        log.info("image cache %s: %d images saved", path, len(cache))


def machine() -> str:
    """The CPU this ran on, and the GPU if any (the card records the training machine)."""
    from models.training.gpu_fit import cpu_machine

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_machine()} (shared with other jobs), {gpu}"


def _raw(records: list[StudyRecord]) -> np.ndarray:
    return np.stack([r.raw for r in records]) if records else np.zeros((0, len(OBSERVATIONS)))


def run(args: argparse.Namespace) -> int:
    """``train classifier``: the three-way calibrated Model 2 run when ``--model model2`` and
    ``--test-fraction`` > 0, else the two-way run of :mod:`.train_classifier`."""
    if args.model == "model2" and args.test_fraction > 0:
        return run_model2(args)
    from models.training import train_classifier

    return train_classifier.run(args)


def run_model2(args: argparse.Namespace) -> int:
    t0 = time.time()
    _log_to_file(args.log_file)
    set_threads(args.threads)
    seed_everything(args.seed)
    device = select_device(args.device)
    labels = list(OBSERVATIONS)
    everything = studies_from_args(args)
    if not everything:
        raise SystemExit("no training data: give --chexpert, --nih, --covid, --mimic or --folder")
    parts = patient_split3(everything, args.val_fraction, args.test_fraction, args.seed)
    train, val, test = (labelled(parts[k], "model2") for k in ("train", "val", "test"))
    if args.max_train_studies and len(train) > args.max_train_studies:
        pick = np.random.default_rng(args.seed).permutation(len(train))[: args.max_train_studies]
        train = [train[i] for i in sorted(pick)]
    ctest = read_studies(chexpert_test=args.chexpert_test or [])
    counts = {
        k: {s: sum(r.source == s for r in v) for s in sorted({r.source for r in v})}
        for k, v in (("train", train), ("val", val), ("test", test), ("chexpert_test", ctest))
    }
    log.info("studies per split and source: %s", json.dumps(counts))
    arch = _arch(args)
    norm = Normalisation(mean=0.5, std=0.25)
    cropper = (
        LungCropper(args.lung_mask, args.crop_margin, device, args.crop_boxes)
        if args.lung_mask
        else None
    )
    cache = ImageCache(args.image_size, cropper)
    fill_cache(cache, train + val + test + ctest, args.cache)
    if cropper is not None:
        cropper.flush()
    model = MultiViewClassifier(len(labels), **arch).to(device)
    ds_train = StudyDataset(train, "model2", args.uncertainty, cache, norm, args.seed)
    losses = train_loop(
        model,
        ds_train,
        device,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
        lateral_dropout=args.lateral_dropout,
        do_augment=not args.no_augment,
        gamma=args.gamma,
        checkpoint=args.checkpoint,
        max_minutes=args.max_minutes,
    )
    train_s = time.time() - t0

    def logits(recs: list[StudyRecord]) -> np.ndarray:
        ds = StudyDataset(recs, "model2", "u-ignore", cache, norm, args.seed)
        return predict_logits(model, ds, device, args.batch_size)

    lv, rv = logits(val), _raw(val)
    platt = {} if args.no_calibration else fit_platt(labels, rv, lv)
    pv = apply_platt(labels, lv, platt)
    thresholds, unvalidated = operating_thresholds(labels, rv, pv, args.specificity)
    nf = labels.index("No Finding")
    keep = (rv[:, nf] == 0) | (rv[:, nf] == 1)
    t_nf = youden_threshold(rv[keep, nf], pv[keep, nf]) if keep.any() else None
    if t_nf is not None:
        thresholds["No Finding"] = round(t_nf, 6)
    metrics: dict[str, Any] = {
        "train_loss_per_epoch": [round(x, 4) for x in losses],
        "train_seconds": round(train_s, 1),
        "device": f"{device} ({torch.get_num_threads()} threads)",
        "machine": machine(),
        "studies": counts,
        "validation": report(labels, rv, pv, thresholds, logits=lv, seed=args.seed),
    }
    for name, recs in (("test", test), ("chexpert_test", ctest)):
        if recs:
            lt, rt = logits(recs), _raw(recs)
            pt = apply_platt(labels, lt, platt)
            rep = report(labels, rt, pt, thresholds, logits=lt, seed=args.seed)
            rep["studies"] = len(recs)
            if name == "test":
                rep["per_source"] = per_source(
                    labels, rt, pt, thresholds, [r.source for r in recs], seed=args.seed
                )
            metrics[name] = rep
    metrics["note"] = (
        "figures measured on the training image cache (uint8 lung crops); the figures served "
        "through models.analyzer are under metrics.served_* (cxr-worker evaluate --card-metrics)"
    )
    card = ModelCard(
        name="model2",
        version=args.version,
        architecture=ARCHITECTURE,
        weights_file=args.out.with_suffix(".safetensors").name,
        sha256="0" * 64,
        input_size=args.image_size,
        normalisation=norm,
        labels=labels,
        thresholds=thresholds,
        hyperparameters=hyperparameters(args, arch, platt, unvalidated),
        training_data=f"{len(train)} training studies; arguments: {_sources(args)}",
        split=_split_text(args, counts),
        metrics=metrics,
        notes=(CONSISTENCY_RULE + " " + args.notes).strip(),
    )
    write_cards(args, card, model.state_dict(), parts)
    log.info("done in %.0f s", time.time() - t0)
    return 0


def _sources(args: argparse.Namespace) -> str:
    return " ".join(
        [
            *(f"--chexpert {d}" for d in args.chexpert or []),
            *(f"--nih {d}" for d in args.nih or []),
            *(f"--covid {d}" for d in args.covid or []),
            *(f"--mimic {d}" for d in args.mimic or []),
            *(f"--folder {d}" for d in args.folder or []),
        ]
    )


def _split_text(args: argparse.Namespace, counts: dict[str, Any]) -> str:
    return (
        f"patient-level over all sources together (SHA-256 of seed {args.seed} and the patient "
        f"key): {args.test_fraction:.0%} of patients test (reported), {args.val_fraction:.0%} "
        f"validation (calibration and thresholds), the rest training; studies per split and "
        f"source: {json.dumps(counts)}; keys in {args.out.with_suffix('.split.json').name}"
    )


def hyperparameters(
    args: argparse.Namespace,
    arch: dict[str, Any],
    platt: dict[str, tuple[float, float]],
    unvalidated: list[str],
) -> dict[str, Any]:
    return {
        **arch,
        "views": ["frontal", "lateral (optional)"],
        "fusion": "late concat, learned lateral-missing embedding",
        "input_crop": f"lungs (margin {args.crop_margin})" if args.lung_mask else "full image",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "AdamW + one-cycle",
        "uncertainty": args.uncertainty,
        "augment": (
            "none"
            if args.no_augment
            else f"rotation 10 deg, zoom 10%, shift 6%, contrast/brightness 15%, gamma "
            f"exp(U(-{args.gamma}, {args.gamma})); no flips"
        ),
        "lateral_dropout": args.lateral_dropout,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "calibration": {
            "method": "Platt scaling per label, sigmoid(a * logit + b), fitted on the validation "
            "split (labels without 5 positives and 5 negatives there stay uncalibrated)",
            "params": {k: list(v) for k, v in platt.items()},
        },
        "operating_point": (
            f"pathologies: threshold at {args.specificity:.0%} specificity on validation "
            f"negatives; No Finding (and Model 1): Youden's J on validation"
        ),
        "unvalidated_thresholds": unvalidated,
        "init_from": "random",
    }


def write_cards(
    args: argparse.Namespace,
    card: ModelCard,
    state: dict[str, torch.Tensor],
    parts: dict[str, list[StudyRecord]],
) -> None:
    """Model 2's card and weights, the derived Model 1 card and the split file."""
    card = save_model(card, state, args.out, half=True)
    if args.model1_out is not None:
        write_model1(card, args.model1_out, args.out, card.metrics)
    write_split(args, parts)


def write_split(args: argparse.Namespace, parts: dict[str, list[StudyRecord]]) -> None:
    """The split file beside ``args.out``: seed, fractions and the keys of every split."""
    args.out.with_suffix(".split.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "val_fraction": args.val_fraction,
                "test_fraction": args.test_fraction,
                **{f"{k}_keys": [r.key for r in v] for k, v in parts.items()},
                "held_out_keys": [r.key for r in parts["test"]],
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )


def write_model1(card2: ModelCard, path: Path, card2_path: Path, metrics: dict[str, Any]) -> None:
    """The derived Model 1 card: same weights, label Abnormal, threshold 1 - t(No Finding)."""
    t_nf = card2.thresholds["No Finding"]
    m1 = {k: v["model1"] for k, v in metrics.items() if isinstance(v, dict) and "model1" in v}
    card1 = card2.model_copy(
        update={
            "name": "model1",
            "labels": list(MODEL1_LABELS),
            "thresholds": {MODEL1_LABELS[0]: round(1.0 - t_nf, 6)},
            "hyperparameters": {
                "derived_from": {
                    "card": card2_path.name,
                    "rule": "P(Abnormal) = 1 - P(No Finding), threshold 1 - t(No Finding)",
                },
                "operating_point": "Youden's J of No Finding on the validation split",
            },
            "metrics": {"model1": m1},
        }
    )
    path.write_text(card_json(card1), encoding="utf-8")
