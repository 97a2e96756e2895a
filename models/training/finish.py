"""Turn a :mod:`.gpu_fit` result into the Model 2 / Model 1 (and view classifier) cards, on the CPU.

    nice -n 10 python -m models.training.finish --fit FIT_DIR --pack var/pack/pack.npz \\
        --chexpert DATA/chexpert_small --chexpert DATA/chexpert_sample \\
        --nih DATA/nih_frontal/labels.csv --covid DATA/covid_chestxray \\
        --folder DATA/openist_normals/labels.csv:DATA/openist_normals:{id}.jpg \\
        --folder DATA/jsrt/labels.csv:DATA/jsrt:CXR_png/{id}.png \\
        --folder DATA/actualmed_partial/labels.csv:DATA/actualmed_partial \\
        --chexpert-test DATA/chexpert_sample --version 3.0.0 \\
        --out models/weights/model2.json --model1-out models/weights/model1.json \\
        --view-folder DATA/actualmed_partial/labels.csv:DATA/actualmed_partial \\
        --view-folder DATA/frontal_small/labels.csv:DATA/frontal_small \\
        --view-folder 'DATA/jsrt/labels.csv:DATA/jsrt/CXR_png:{id}.png' \\
        --view-folder 'DATA/openist_normals/labels.csv:DATA/openist_normals:{id}.jpg' \\
        --view-out models/weights/view_classifier.json --view-version 0.3.0

Steps: the studies are read and split exactly as the pack was (same sources, seed and fractions;
the pack's key hashes are checked against them). The fitted weights (``--weights``; default
the winning candidate's run with the best validation score: its ``--seed`` run or the longer
run) are scored **through the serving path** (:class:`models.analyzer.Analyzer`: decode, lung
mask, crop, resize, normalisation) with calibration switched off, giving raw logits per validation,
test and CheXpert-test study. Platt scaling per label is fitted on the validation logits,
thresholds are set there (pathologies at ``--specificity`` of validation negatives, No Finding
at Youden's J, as :mod:`.train_model2`), test and CheXpert test are only measured. The cards,
weights, split file and the derived Model 1 card are written with
:func:`models.training.train_model2.write_cards`; then ``cxr-worker evaluate classifier`` is
run on the card (held-out split, and CheXpert test) to write ``<card>.eval.json``,
``<card>.eval_chexpert_test.json``, the ROC figures and the ``served_*`` card metrics.

With ``--member CARD`` (given two or more times) the shipped model is an **ensemble** of those
one-network Model 2 cards instead of the fit's weights (same architecture, input size,
normalisation and labels, checked): the ensemble's logits are the mean of the members' raw
logits through the serving path (:class:`models.classifiers.LogitMean`), Platt scaling and
thresholds are fitted to that mean on validation as above, every member and the ensemble are
scored on validation (``metrics.ensemble_selection``), and the card lists the members (each
weights file copied byte for byte as ``<out stem>.member<i>.safetensors`` with its SHA-256, the
machine it was trained on and how). ``--member-of ENSEMBLE_CARD`` puts an earlier ensemble's
members first (their records rebuilt from that card), so a new network can join them. The fit
folder supplies the design measurements, unless ``--design-from CARD`` keeps an earlier card's
(for a fit that trained one network and compared nothing). ``--selection REPORT`` copies the
ranking that :mod:`.select_members` wrote (every subset of the candidate networks, scored within
source and pooled on validation) into ``metrics.ensemble_selection.within_source``.

With ``--view-out`` the view classifier of the fit is scored on its held-out images and CheXpert
test (whole images through :class:`models.view_classifier.ViewClassifier`) and its card written.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.classifiers import ARCHITECTURE, MultiViewClassifier
from models.labels import COMPETITION, OBSERVATIONS
from models.registry import (
    Member,
    ModelCard,
    Normalisation,
    load_member_weights,
    read_card,
    save_ensemble,
    save_model,
    sha256_file,
    to_float,
)
from models.training.calibration import (
    apply_platt,
    fit_platt,
    operating_thresholds,
    per_source,
    report,
)
from models.training.datasets.chexpert import StudyRecord
from models.training.gpu_fit import ARCHS, BALANCE_CLIP
from models.training.metrics import youden_threshold
from models.training.pack import PACK_SPLITS, read_pack, short_hash

log = logging.getLogger(__name__)

SPLITS = ("val", "test", "chexpert_test")


def served_logits(
    card_path: Path, records: Sequence[StudyRecord], lung_mask: Path, margin: float
) -> tuple[np.ndarray, list[str]]:
    """Raw logits (studies x labels) of an uncalibrated card's network on ``records`` through the
    serving path (:func:`models.training.evaluate.served_probabilities`), and failed keys (NaN
    rows)."""
    from models.training.evaluate import served_analyzer, served_probabilities

    analyzer, _ = served_analyzer(card_path, lung_mask=lung_mask, margin=margin)
    _, p2, failed = served_probabilities(analyzer, records)
    p = np.clip(p2.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p)).astype(np.float32), failed


#: what a member card's hyperparameters say about how it was trained (kept per member)
MEMBER_TRAINING = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "uncertainty",
    "augment",
    "lateral_dropout",
    "seed",
    "init_from",
    "loss_weighting",
)
ARCH_KEYS = ("growth_rate", "block_config", "num_init_features")


def same_shape(card: ModelCard, first: ModelCard, what: str, first_name: str) -> None:
    """Refuse a member whose network differs from the first member's."""
    same = (
        card.architecture == first.architecture
        and card.input_size == first.input_size
        and card.normalisation == first.normalisation
        and card.labels == first.labels
        and all(card.hyperparameters.get(k) == first.hyperparameters.get(k) for k in ARCH_KEYS)
        and card.hyperparameters.get("input_crop") == first.hyperparameters.get("input_crop")
    )
    if not same:
        raise SystemExit(
            f"{what} differs from {first_name} in architecture, input, normalisation, labels "
            "or crop: members must be the same network shape"
        )


def read_members(cards: Sequence[Path], out: Path) -> list[tuple[Path, ModelCard, Member]]:
    """The ensemble's members from one-network Model 2 cards (SHA-256 checked): each member's
    weights file, card, and :class:`Member` entry (file name ``<out stem>.member<i>``)."""
    found: list[tuple[Path, ModelCard, Member]] = []
    for i, path in enumerate(cards):
        card, _ = load_member_weights(path)
        if card.members:
            raise SystemExit(f"--member {path} is itself an ensemble; give one-network cards")
        if found:
            same_shape(card, found[0][1], f"--member {path}", str(cards[0]))
        hp, m = card.hyperparameters, card.metrics
        trained_on = str(hp.get("trained_on") or f"{m.get('device')}: {m.get('machine')}")
        how = ", ".join(f"{k} {hp[k]}" for k in MEMBER_TRAINING if hp.get(k) is not None)
        desc = (
            f"{card.name} {card.version} (weights sha256 {card.sha256[:12]}): {how}; "
            f"{m.get('machine', '')}; {m.get('train_seconds')} s training"
        )
        member = Member(
            weights_file=f"{out.stem}.member{i}.safetensors",
            sha256=card.sha256,
            trained_on=trained_on,
            description=desc,
        )
        found.append((path.parent / card.weights_file, card, member))
    return found


def members_of(path: Path) -> list[tuple[Path, ModelCard, Member]]:
    """The members of an ensemble card (each weights file's SHA-256 checked), each with a
    one-network card rebuilt from the ensemble card's records of it (architecture, input and
    crop of the ensemble; training hyper-parameters, machine and seconds of the member), so
    that a new ensemble can keep them beside new ``--member`` cards."""
    card, _ = load_member_weights(path)
    if not card.members:
        raise SystemExit(f"--member-of {path} is not an ensemble card")
    hp = card.hyperparameters
    trained = hp.get("ensemble", {}).get("members", {})
    records = card.metrics.get("members", {})
    found = []
    for m in card.members:
        own = trained.get(m.weights_file, {})
        rec = records.get(m.weights_file, {})
        version = str(own.get("from_card") or f"{card.name} {card.version}").partition(" ")[2]
        single = card.model_copy(
            update={
                "version": version or card.version,
                "weights_file": m.weights_file,
                "sha256": m.sha256,
                "members": [],
                "hyperparameters": {
                    **{k: hp[k] for k in (*ARCH_KEYS, "input_crop") if k in hp},
                    **{k: own[k] for k in MEMBER_TRAINING if own.get(k) is not None},
                    "trained_on": m.trained_on,
                },
                "metrics": {
                    k: rec.get(k) for k in ("machine", "train_seconds", "train_loss_per_epoch")
                },
            }
        )
        found.append((path.parent / m.weights_file, single, m))
    return found


def numbered(
    members: list[tuple[Path, ModelCard, Member]], out: Path
) -> list[tuple[Path, ModelCard, Member]]:
    """The members in order, each weights file named ``<out stem>.member<i>.safetensors``."""
    return [
        (src, card, m.model_copy(update={"weights_file": f"{out.stem}.member{i}.safetensors"}))
        for i, (src, card, m) in enumerate(members)
    ]


def selection_figures(labels: Sequence[str], raw: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """The fit's selection rule on one set of logits: 5-label competition mean AUROC, Model 1
    AUROC (of 1 - No Finding), the mean over all labels, and score = mean of the first two."""
    from sklearn.metrics import roc_auc_score

    per: dict[str, float] = {}
    for j, lab in enumerate(labels):
        keep = ((raw[:, j] == 0) | (raw[:, j] == 1)) & ~np.isnan(logits[:, j])
        y = raw[keep, j]
        if keep.any() and 0 < y.sum() < len(y):
            per[lab] = float(roc_auc_score(y, logits[keep, j]))
    c5 = float(np.mean([per[c] for c in COMPETITION if c in per]))
    m1 = per.get("No Finding", float("nan"))  # AUROC is the same for 1 - P and for labels 1 - y
    return {
        "competition5_mean_auroc": round(c5, 4),
        "model1_auroc": round(m1, 4),
        "mean_auroc_all_labels": round(float(np.mean(list(per.values()))), 4),
        "support_devices_auroc": round(per["Support Devices"], 4)
        if "Support Devices" in per
        else None,
        "score": round((c5 + m1) / 2, 4),
    }


def member_logits(
    members: list[tuple[Path, ModelCard, Member]],
    base: ModelCard,
    records: Sequence[StudyRecord],
    args: argparse.Namespace,
    tmp: Path,
) -> list[np.ndarray]:
    """Each member's own raw logits on ``records`` through the serving path (uncalibrated
    one-network cards in ``tmp``)."""
    out = []
    for i, (src, _, _) in enumerate(members):
        path = tmp / f"member{i}.json"
        dst = tmp / f"member{i}.safetensors"
        dst.write_bytes(src.read_bytes())
        single = base.model_copy(
            update={"weights_file": dst.name, "sha256": sha256_file(dst), "members": []}
        )
        path.write_text(json.dumps(single.model_dump(), indent=2) + "\n", encoding="utf-8")
        out.append(served_logits(path, records, args.lung_mask, args.crop_margin)[0])
    return out


def ensemble_metrics(
    members: list[tuple[Path, ModelCard, Member]],
    own: list[np.ndarray],
    labels: Sequence[str],
    raw_val: np.ndarray,
    logits_val: np.ndarray,
    ok_val: np.ndarray,
) -> dict[str, Any]:
    """The card's training record of an ensemble: each member's (from its card) and the
    validation selection figures of every member and of the ensemble (served path)."""
    figures = {
        m.weights_file: selection_figures(labels, raw_val, lg[ok_val])
        for (_, _, m), lg in zip(members, own, strict=True)
    }
    ens = selection_figures(labels, raw_val, logits_val)
    best = max(v["score"] for v in figures.values())
    if ens["score"] <= best:
        log.warning("the ensemble (%.4f) does not beat its best member (%.4f)", ens["score"], best)
    return {
        "device": "ensemble: "
        + "; ".join(f"{m.weights_file} on {m.trained_on}" for *_, m in members),
        "machine": "members trained as listed in members / hyperparameters.ensemble; logits "
        "averaged, calibrated and evaluated on the CPU",
        "members": {
            m.weights_file: {
                "from_card": f"{c.name} {c.version}",
                "sha256": m.sha256,
                "trained_on": m.trained_on,
                "machine": c.metrics.get("machine"),
                "train_seconds": c.metrics.get("train_seconds"),
                "train_loss_per_epoch": c.metrics.get("train_loss_per_epoch"),
            }
            for _, c, m in members
        },
        "ensemble_selection": {
            "rule": "validation split only (served path): score = mean of the 5-label "
            "competition AUROC and Model 1 AUROC; the test split is never used to choose",
            "members": figures,
            "ensemble_mean_logits": ens,
        },
    }


def read_selection(path: Path, members: list[tuple[Path, ModelCard, Member]]) -> dict[str, Any]:
    """:mod:`.select_members`' report, checked to have scored this ensemble (its members by
    SHA-256), with the shipped set marked."""
    report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    shas = sorted(m.sha256 for *_, m in members)
    shipped = [r for r in report["ranking"] if sorted(r.get("sha256", [])) == shas]
    if not shipped:
        raise SystemExit(f"{path} did not score these members together: run select_members on them")
    shipped[0]["shipped"] = True
    return report


def members_note(members: list[tuple[Path, ModelCard, Member]]) -> str:
    """The card notes' sentence naming the members."""
    parts = [f"member {i} ({m.weights_file}): {m.description}" for i, (*_, m) in enumerate(members)]
    return (
        f"Ensemble of {len(members)} networks of the same shape: the served logits are the mean "
        "of the members' raw logits, calibrated by this card's Platt scaling; the card's sha256 "
        "is the SHA-256 of the members' SHA-256s (one per line). " + "; ".join(parts) + "."
    )


def trained_on(fit_log: dict[str, Any]) -> str:
    """Where the fit ran: its device, and the machine's CPU when the fit recorded it."""
    device = str(fit_log.get("device"))
    return f"{device}: {fit_log['machine']}" if fit_log.get("machine") else device


def pick_weights(fit_log: dict[str, Any], weights: str) -> dict[str, Any]:
    """The fit-log run whose weights to ship: ``weights`` by file stem, or (``auto``) the run of
    the winning candidate with weights and the best validation score."""
    runs = [r for r in fit_log["runs"] if r.get("weights")]
    if weights != "auto":
        for r in runs:
            if r["weights"] == weights:
                return dict(r)
        raise SystemExit(f"no run of the fit wrote weights {weights!r}")
    winner = fit_log["selection"]["winner"]
    mine = [r for r in runs if r["candidate"] == winner and r["complete"]]
    if not mine:
        raise SystemExit(f"the fit wrote no weights for its winner {winner}")
    return dict(max(mine, key=lambda r: r["validation"].get("score") or 0.0))


def check_pack(pack: dict[str, Any], parts: dict[str, list[StudyRecord]]) -> None:
    """The pack's studies of every split are exactly these records (same split, same order)."""
    for split in ("train", *SPLITS):
        want = [short_hash(r.key) for r in parts[split]]
        have = [str(k) for k in pack["key_hash"][pack["split"] == PACK_SPLITS.index(split)]]
        if want != have:
            raise SystemExit(
                f"the {split} split of the pack ({len(have)} studies) is not the split these "
                f"sources give ({len(want)} studies): give the sources and seed the pack was "
                f"built from"
            )


def fit_args(fit_log: dict[str, Any], args: argparse.Namespace) -> argparse.Namespace:
    """The attributes :func:`models.training.train_model2.hyperparameters` and ``write_cards``
    read, from the fit log and this command's arguments."""
    a = fit_log["args"]
    return argparse.Namespace(
        crop_margin=args.crop_margin,
        lung_mask=args.lung_mask,
        epochs=fit_log["selection"]["epochs"],
        batch_size=int(a["batch_size"]),
        lr=float(a["lr"]),
        uncertainty=a["uncertainty"],
        no_augment=False,
        gamma=float(a["gamma"]),
        lateral_dropout=float(a["lateral_dropout"]),
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        specificity=args.specificity,
        out=args.out,
        model1_out=args.model1_out,
    )


def design_measurements(fit_log: dict[str, Any], pack_meta: dict[str, Any]) -> dict[str, Any]:
    """The fit's candidate comparison (validation only) for the card."""
    runs = fit_log.get("runs", [])
    return {
        "how": (
            f"gpu_fit on {fit_log.get('device')}: every candidate trained "
            f"{fit_log['selection']['epochs']} epochs with seed {fit_log['args'].get('seed', 0)} "
            "on the same patient-level split and scored on the validation split (pack images: "
            f"lung crops by the serving lung mask, JPEG quality {pack_meta.get('jpeg_quality')}, "
            f"mean error {pack_meta.get('jpeg_mae_255')}/255); score = mean of the 5-label "
            "competition AUROC and Model 1 AUROC; the test split was never used to choose"
        ),
        "candidates": {
            f"{r['candidate']} seed {r['seed']}": {
                "arch": r["arch_params"],
                "input_size": r["input_size"],
                "epochs": r["epochs"],
                "complete": r["complete"],
                "train_seconds": r["train_seconds"],
                "epochs_per_s": r["epochs_per_s"],
                "train_images_per_s": r["train_images_per_s"],
                **{
                    k: r["validation"].get(k)
                    for k in (
                        "score",
                        "competition5_mean_auroc",
                        "mean_auroc_all_labels",
                        "model1_auroc",
                    )
                },
            }
            for r in runs
        },
        "ranking": fit_log["selection"].get("ranking"),
        "winner": fit_log["selection"].get("winner"),
        "ensemble": fit_log.get("ensemble"),
        "view_classifier": fit_log.get("view_classifier"),
    }


def normals_tradeoff(
    labels: Sequence[str], raw: np.ndarray, probs: np.ndarray, specificities: Sequence[float]
) -> dict[str, Any]:
    """Validation: mean Present findings on No Finding studies and mean pathology sensitivity
    at each operating specificity (how the normals' behaviour trades against sensitivity)."""
    from models.training.calibration import present_on_normals

    out = {}
    for spec in specificities:
        t, _ = operating_thresholds(labels, raw, probs, spec)
        sens = []
        for j, lab in enumerate(labels):
            if lab in ("No Finding", "Support Devices"):
                continue
            pos = raw[:, j] == 1
            if pos.sum() >= 5:
                sens.append(float((probs[pos, j] >= t[lab]).mean()))
        pn = present_on_normals(labels, raw, probs, t)
        out[f"{spec:.2f}"] = {
            "present_on_no_finding": pn.get("mean_present"),
            "share_of_normals_with_none": pn.get("share_with_none"),
            "mean_pathology_sensitivity": round(float(np.mean(sens)), 4) if sens else None,
        }
    return out


def finish_view(args: argparse.Namespace, fit_dir: Path, fit_log: dict[str, Any]) -> None:
    """Score the fitted view classifier on its held-out images and CheXpert test (whole
    images, served path) and write its card and split file."""
    from models.training.pack import collect_view_images
    from models.training.train_view import accuracy_report
    from models.view_classifier import ARCHITECTURE as VIEW_ARCH
    from models.view_classifier import ViewClassifier

    view_args = argparse.Namespace(
        chexpert=args.chexpert,
        view_folder=args.view_folder,
        covid=args.covid,
        nih=args.nih,
        chexpert_test=args.chexpert_test,
        view_max_patients=args.view_max_patients,
        view_val_fraction=args.view_val_fraction,
        seed=args.seed,
    )
    splits = collect_view_images(view_args)
    old = read_card(args.view_out) if args.view_out.exists() else None
    from safetensors.torch import load_file

    state = to_float(load_file(str(fit_dir / "view_classifier.safetensors")))
    vrep = fit_log.get("view_classifier", {})
    card = ModelCard(
        name="view_classifier",
        version=args.view_version,
        architecture=VIEW_ARCH,
        weights_file=args.view_out.with_suffix(".safetensors").name,
        sha256="0" * 64,
        input_size=int(fit_log["pack"]["view"]["size"]),
        normalisation=Normalisation(mean=0.5, std=0.25),
        labels=["frontal", "lateral"],
        thresholds={"lateral": 0.5},
        hyperparameters={
            "width": 16,
            "blocks": 5,
            "epochs": vrep.get("epochs"),
            "batch_size": 64,
            "lr": 0.003,
            "seed": 0,
            "augment": "gamma exp(U(-ln 1.6, ln 1.6)), rotation 15 deg, zoom 15%, shift 8%, "
            "contrast/brightness 20%, horizontal flip (on the GPU)",
            "loss": "BCE with pos_weight = frontal/lateral ratio",
            "max_patients_per_source": args.view_max_patients,
            "trained_on": fit_log.get("device"),
        },
        training_data=f"{vrep.get('train_images')} images ({vrep.get('train_laterals')} "
        f"lateral) of the pack (whole images, {fit_log['pack']['view']['size']} px, JPEG)",
        split=fit_log["pack"]["view"].get("split", ""),
        notes=args.view_notes,
    )
    from models.training.datasets.chexpert import load_image

    metrics: dict[str, Any] = {"fit_on_pack_images": vrep}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(card, state, Path(tmp) / "view.json", half=True)
        vc = ViewClassifier.from_card(Path(tmp) / "view.json")
        for name in ("held_out", "chexpert_test"):
            items = [(im.path, int(im.lateral)) for im in splits[name]]
            probs = np.concatenate(
                [
                    vc.probabilities([load_image(p) for p, _ in items[i : i + 32]])
                    for i in range(0, len(items), 32)
                ]
            )
            metrics[name] = accuracy_report(items, probs >= card.threshold("lateral"))
    both = [metrics[k] for k in ("held_out", "chexpert_test")]
    images, errors = sum(m["images"] for m in both), sum(m["errors"] for m in both)
    metrics["held_out_plus_chexpert_test"] = {
        "images": images,
        "errors": errors,
        "accuracy": round(1 - errors / images, 4),
    }
    old_acc = old.metrics.get("held_out_plus_chexpert_test", {}).get("accuracy") if old else None
    new_acc = metrics["held_out_plus_chexpert_test"]["accuracy"]
    log.info(
        "view classifier: held-out + CheXpert test %.4f (committed card: %s)", new_acc, old_acc
    )
    if old_acc is not None and new_acc < old_acc and not args.view_force:
        log.warning(
            "view classifier not written: %.4f is below the committed %.4f", new_acc, old_acc
        )
        return
    card = card.model_copy(update={"metrics": metrics})
    save_model(card, state, args.view_out, half=True)
    args.view_out.with_suffix(".split.json").write_text(
        json.dumps(
            {"held_out_patients": sorted({im.patient for im in splits["held_out"]})}, indent=1
        )
        + "\n",
        encoding="utf-8",
    )
    log.info("wrote %s", args.view_out)


def run_evaluate(args: argparse.Namespace) -> None:
    """``cxr-worker evaluate classifier`` on the new card: held-out split and CheXpert test."""
    from models.training import evaluate

    base = {
        "card": args.out,
        "mimic": None,
        "split": None,
        "frontal_only": False,
        "lung_mask": args.lung_mask,
        "crop_margin": args.crop_margin,
        "probabilities": None,
        "device": "cpu",
        "threads": args.threads,
        "seed": args.seed,
    }
    stem = args.out.with_suffix("")
    runs = [
        dict(
            held_out=True,
            chexpert=args.chexpert,
            chexpert_test=None,
            nih=args.nih,
            covid=args.covid,
            folder=args.folder,
            card_metrics="test",
            out=Path(f"{stem}.eval.json"),
            roc=Path(f"{stem}.roc.png"),
        ),
        dict(
            held_out=False,
            chexpert=None,
            chexpert_test=args.chexpert_test,
            nih=None,
            covid=None,
            folder=None,
            card_metrics="chexpert_test",
            out=Path(f"{stem}.eval_chexpert_test.json"),
            roc=Path(f"{stem}.roc_chexpert_test.png"),
        ),
    ]
    for extra in runs:
        if extra["card_metrics"] == "chexpert_test" and not args.chexpert_test:
            continue
        evaluate.run(argparse.Namespace(**base, **extra))


def run(args: argparse.Namespace) -> int:
    from models.training.datasets.sources import patient_split3, read_studies, studies_from_args
    from models.training.studies import labelled
    from models.training.train_model2 import (
        CONSISTENCY_RULE,
        hyperparameters,
        write_cards,
        write_model1,
        write_split,
    )

    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    fit_dir = args.fit
    fit_log = json.loads((fit_dir / "fit_log.json").read_text(encoding="utf-8"))
    pack = read_pack(args.pack)
    labels = list(OBSERVATIONS)
    everything = studies_from_args(args)
    parts = patient_split3(everything, args.val_fraction, args.test_fraction, args.seed)
    parts = {k: labelled(v, "model2") for k, v in parts.items()}
    parts["chexpert_test"] = read_studies(chexpert_test=args.chexpert_test or [])
    check_pack(pack, parts)
    if args.limit:  # debugging: the first studies of each scored split only
        parts.update({k: parts[k][: args.limit] for k in SPLITS})
    winner = fit_log["selection"]["winner"]
    arch_name, size = winner.split(":")[0], int(winner.split(":")[1])
    arch = ARCHS[arch_name]
    from safetensors.torch import load_file

    members = numbered(
        [
            *(members_of(args.member_of) if args.member_of else []),
            *(read_members(args.member, args.out) if args.member else []),
        ],
        args.out,
    )
    if len(members) == 1:
        raise SystemExit("an ensemble needs two or more members (--member-of, --member)")
    for src, card, _ in members[1:]:
        same_shape(card, members[0][1], f"member {src}", f"member {members[0][0]}")
    if members:
        first = members[0][1]
        if first.labels != labels:
            raise SystemExit(f"--member {args.member[0]}: labels are not the 14 observations")
        arch = {k: first.hyperparameters[k] for k in ARCH_KEYS}
        size = first.input_size
        fitted: dict[str, Any] = {}
        net = MultiViewClassifier(len(labels), **arch)  # unused: the members are shipped
    else:
        fitted = pick_weights(fit_log, args.weights)
        state = to_float(load_file(str(fit_dir / f"{fitted['weights']}.safetensors")))
        net = MultiViewClassifier(len(labels), **arch)
        net.load_state_dict(state)
    norm = members[0][1].normalisation if members else Normalisation(mean=0.5, std=0.25)
    fargs = fit_args(fit_log, args)
    counts = {
        k: {s: sum(r.source == s for r in v) for s in sorted({r.source for r in v})}
        for k, v in parts.items()
    }
    base = ModelCard(
        name="model2",
        version=args.version,
        architecture=ARCHITECTURE,
        weights_file=args.out.with_suffix(".safetensors").name,
        sha256="0" * 64,
        input_size=size,
        normalisation=norm,
        labels=labels,
        hyperparameters={**arch, "input_crop": f"lungs (margin {args.crop_margin})"},
    )
    logits: dict[str, np.ndarray] = {}
    failed: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_card = Path(tmp) / "model2.json"
        if members:
            save_ensemble(base, [(src, m) for src, _, m in members], tmp_card)
        else:
            save_model(base, net.state_dict(), tmp_card, half=True)
        for split in SPLITS:
            if parts[split]:
                t = time.time()
                logits[split], failed[split] = served_logits(
                    tmp_card, parts[split], args.lung_mask, args.crop_margin
                )
                log.info(
                    "served logits of %d %s studies in %.0f s",
                    len(parts[split]),
                    split,
                    time.time() - t,
                )
        own = member_logits(members, base, parts["val"], args, Path(tmp)) if members else []
    raw = {k: np.stack([r.raw for r in parts[k]]) for k in logits}
    ok = {k: ~np.isnan(v).any(axis=1) for k, v in logits.items()}
    lv, rv = logits["val"][ok["val"]], raw["val"][ok["val"]]
    platt = fit_platt(labels, rv, lv)
    pv = apply_platt(labels, lv, platt)
    thresholds, unvalidated = operating_thresholds(labels, rv, pv, args.specificity)
    nf = labels.index("No Finding")
    keep = (rv[:, nf] == 0) | (rv[:, nf] == 1)
    t_nf = youden_threshold(rv[keep, nf], pv[keep, nf]) if keep.any() else None
    if t_nf is not None:
        thresholds["No Finding"] = round(t_nf, 6)
    metrics: dict[str, Any] = (
        ensemble_metrics(members, own, labels, rv, lv, ok["val"])
        if members
        else {
            "train_loss_per_epoch": fitted["train_loss_per_epoch"],
            "train_seconds": fitted["train_seconds"],
            "device": fit_log.get("device"),
            "machine": f"trained with models.training.gpu_fit on {trained_on(fit_log)} "
            f"(torch {fit_log.get('torch')}); calibrated and evaluated on the CPU",
        }
    )
    if args.selection:
        if not members:
            raise SystemExit(
                "--selection records how an ensemble's members were chosen: give --member"
            )
        chosen = read_selection(args.selection, members)
        metrics["ensemble_selection"]["within_source"] = chosen
    metrics.update(
        {
            "studies": counts,
            "pack": {k: v for k, v in fit_log["pack"].items() if k != "sources"},
            "validation": report(labels, rv, pv, thresholds, logits=lv, seed=args.seed),
            "validation_normals_tradeoff": normals_tradeoff(
                labels, rv, pv, (0.9, 0.95, 0.97, 0.98)
            ),
            "design_measurements": (
                read_card(args.design_from).metrics["design_measurements"]
                if args.design_from
                else design_measurements(fit_log, pack["meta"])
            ),
            "failed_studies": {k: len(v) for k, v in failed.items()},
        }
    )
    for name in ("test", "chexpert_test"):
        if name not in logits:
            continue
        lt, rt = logits[name][ok[name]], raw[name][ok[name]]
        pt = apply_platt(labels, lt, platt)
        rep = report(labels, rt, pt, thresholds, logits=lt, seed=args.seed)
        rep["studies"] = int(ok[name].sum())
        if name == "test":
            srcs = [r.source for r, k in zip(parts[name], ok[name], strict=True) if k]
            rep["per_source"] = per_source(labels, rt, pt, thresholds, srcs, seed=args.seed)
        metrics[name] = rep
    metrics["note"] = (
        "validation/test figures are of the served path (Analyzer: decode, lung mask, crop, "
        "resize, normalisation; calibration applied afterwards from the same logits); "
        "served_* are written by cxr-worker evaluate on the finished card"
    )
    hp = hyperparameters(fargs, arch, platt, unvalidated)
    hp["input_size_choice"] = f"{size} px, chosen on validation (see metrics.design_measurements)"
    if members:
        for k in MEMBER_TRAINING:
            hp.pop(k, None)
        hp["ensemble"] = {
            "rule": "mean of the members' raw logits (same inputs, one batch), then the "
            "card's Platt scaling per label; Grad-CAM: mean of the members' maps",
            "members": {
                m.weights_file: {
                    "from_card": f"{c.name} {c.version}",
                    "trained_on": m.trained_on,
                    **{k: c.hyperparameters.get(k) for k in MEMBER_TRAINING},
                }
                for _, c, m in members
            },
        }
    else:
        on = "GPU" if str(fit_log.get("device", "")).startswith("cuda") else "CPU"
        hp["augment"] = (
            f"on the {on}: gamma exp(U(-{fargs.gamma}, {fargs.gamma})), rotation 10 deg, zoom "
            "10%, shift 6%, contrast/brightness 15%; no flips"
        )
        if fit_log["args"].get("balance_sources") == "True":
            clip = float(fit_log["args"].get("balance_clip", BALANCE_CLIP))
            hp["loss_weighting"] = (
                "source-balanced: within each source, each label's positives and negatives "
                f"weigh n / (2 n_class), clipped to [{1 / clip:g}, {clip:g}] "
                "(gpu_fit.source_balance)"
            )
        hp["epochs"] = fitted["epochs"]
        hp["seed"] = fitted["seed"]
        hp["weights"] = (
            f"{fitted['weights']} of the fit ({fitted['epochs']} epochs, seed {fitted['seed']}; "
            f"validation score {fitted['validation'].get('score')})"
        )
        hp["trained_on"] = trained_on(fit_log)
    card = base.model_copy(
        update={
            "thresholds": thresholds,
            "hyperparameters": hp,
            "training_data": f"{len(parts['train'])} training studies; arguments: "
            + " ".join(
                [
                    *(f"--chexpert {d}" for d in args.chexpert or []),
                    *(f"--nih {d}" for d in args.nih or []),
                    *(f"--covid {d}" for d in args.covid or []),
                    *(f"--folder {d}" for d in args.folder or []),
                ]
            ),
            "split": (
                f"patient-level over all sources together (SHA-256 of seed {args.seed} and the "
                f"patient key): {args.test_fraction:.0%} of patients test (reported), "
                f"{args.val_fraction:.0%} validation (model choice, calibration and thresholds), "
                f"the rest training; studies per split and source: {json.dumps(counts)}; keys in "
                f"{args.out.with_suffix('.split.json').name}"
            ),
            "metrics": metrics,
            "notes": " ".join(
                [CONSISTENCY_RULE, members_note(members) if members else "", args.notes]
            ).strip(),
        }
    )
    split_parts = {k: parts[k] for k in ("train", "val", "test")}
    if members:
        card = save_ensemble(card, [(src, m) for src, _, m in members], args.out)
        write_model1(card, args.model1_out, args.out, card.metrics)
        write_split(fargs, split_parts)
    else:
        write_cards(fargs, card, net.state_dict(), split_parts)
    log.info("wrote %s and %s", args.out, args.model1_out)
    v, t = metrics["validation"], metrics.get("test", {})
    log.info(
        "validation: 5-label %.4f, Model 1 %.4f, ECE %.4f, Present on normals %s; test: 5-label "
        "%s, Model 1 %s, Present on normals %s",
        v["mean_competition_auroc"] or float("nan"),
        v["model1"]["auroc"] or float("nan"),
        v["mean_ece"] or float("nan"),
        v["present_on_no_finding"].get("mean_present"),
        t.get("mean_competition_auroc"),
        t.get("model1", {}).get("auroc"),
        t.get("present_on_no_finding", {}).get("mean_present"),
    )
    if not args.skip_evaluate:
        run_evaluate(args)
    if args.view_out is not None and (fit_dir / "view_classifier.safetensors").exists():
        finish_view(args, fit_dir, fit_log)
    log.info("finished in %.0f s", time.time() - t0)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from models.training.pack import parse_with_sources

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--fit", type=Path, required=True, help="folder gpu_fit wrote")
    extra.add_argument(
        "--weights",
        default="auto",
        help="weights file stem in --fit (auto: the winner's run with the best validation score)",
    )
    extra.add_argument(
        "--member",
        type=Path,
        action="append",
        default=[],
        help="a one-network Model 2 card; given 2+ times, ship their logit-mean ensemble",
    )
    extra.add_argument(
        "--member-of",
        type=Path,
        help="an ensemble card whose members come first (then the --member cards)",
    )
    extra.add_argument(
        "--design-from",
        type=Path,
        help="keep this card's metrics.design_measurements (a fit that compared no candidates)",
    )
    extra.add_argument(
        "--selection",
        type=Path,
        help="select_members' --report: recorded in metrics.ensemble_selection.within_source",
    )
    extra.add_argument("--specificity", type=float, default=0.95)
    extra.add_argument("--version", default="3.0.0")
    extra.add_argument("--notes", default="")
    extra.add_argument("--out", type=Path, default=Path("models/weights/model2.json"))
    extra.add_argument("--model1-out", type=Path, default=Path("models/weights/model1.json"))
    extra.add_argument("--view-out", type=Path, help="also write the view classifier card")
    extra.add_argument("--view-version", default="0.3.0")
    extra.add_argument("--view-notes", default="")
    extra.add_argument("--view-force", action="store_true", help="write it even if worse")
    extra.add_argument("--skip-evaluate", action="store_true")
    extra.add_argument("--limit", type=int, default=0, help="debug: score N studies per split")
    extra.add_argument("--pack", type=Path, default=Path("var/pack/pack.npz"))
    return parse_with_sources(extra, argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
