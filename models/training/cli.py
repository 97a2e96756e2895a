"""Train and evaluate the models: ``cxr-worker train|evaluate lungmask|classifier|viewclassifier``.

    python -m models.training train lungmask --data DATA/jsrt --threads 2 --max-minutes 40
    python -m models.training train classifier --model model2 --chexpert DATA/chexpert_sample \\
        --out models/weights/model2.json
    python -m models.training train viewclassifier --chexpert DATA/chexpert_sample \\
        --out models/weights/view_classifier.json
    python -m models.training evaluate lungmask --data DATA/jsrt
    python -m models.training evaluate classifier --card models/weights/model2.json \\
        --chexpert-test DATA/chexpert_sample --out report.json --roc roc.png

Building the parser imports neither torch nor the training code: a subcommand's module is
imported when it runs. ``cxr-worker`` mounts the same subcommands with :func:`add_subcommands`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from models.config import BUNDLED_WEIGHTS
from models.labels import POLICIES

LUNG_MASK_CARD = BUNDLED_WEIGHTS / "lung_mask.json"


def _run_options(p: argparse.ArgumentParser, *, device: str = "auto", threads: int | None) -> None:
    p.add_argument("--device", default=device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=threads, help="CPU threads for torch")


def _fit_options(p: argparse.ArgumentParser, *, val_fraction: float, threads: int | None) -> None:
    p.add_argument("--val-fraction", type=float, default=val_fraction)
    p.add_argument("--seed", type=int, default=0)
    _run_options(p, threads=threads)


def _card_options(p: argparse.ArgumentParser, *, version: str) -> None:
    p.add_argument("--version", default=version, help="model version written to the card")
    p.add_argument("--notes", default="", help="written to the card's notes")
    p.add_argument("--no-progress", action="store_true")


def train_lungmask_arguments(p: argparse.ArgumentParser) -> None:
    """``train lungmask``: see :mod:`models.training.train_lungmask`."""
    p.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="dataset folder (CXR_png/ + masks/, Montgomery ManualMask/, OpenIST labels.csv + "
        "<ID>.jpg/<ID>_mask.png, or flat); repeat for several sites (each split on its own)",
    )
    p.add_argument("--out", type=Path, default=LUNG_MASK_CARD, help="model card path to write")
    p.add_argument(
        "--tune-fraction",
        type=float,
        default=0.1,
        help="fraction of each site's non-test cases used to pick the best epoch",
    )
    p.add_argument("--init-from", type=Path, metavar="CARD", help="fine-tune this generator")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint written after every epoch (default var/train/<out stem>.ckpt)",
    )
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ngf", type=int, default=16, help="generator width")
    p.add_argument("--ndf", type=int, default=16, help="discriminator width")
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lambda-l1", type=float, default=100.0)
    p.add_argument(
        "--lambda-seg",
        type=float,
        default=10.0,
        help="weight of the BCE + soft-Dice term (0 = the paper's cGAN + L1 loss)",
    )
    p.add_argument("--dropout", type=float, default=0.5)
    _fit_options(p, val_fraction=0.15, threads=0)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this much training time (0 = no limit); best weights kept",
    )
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (tests)")
    p.add_argument("--version", default="1.0.0", help="model version written to the card")
    p.add_argument(
        "--data-description",
        default="",
        help="what the training data is (source, licence), written to the card",
    )
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="skip the full-resolution evaluation written to the card at the end",
    )


def train_classifier_arguments(p: argparse.ArgumentParser) -> None:
    """``train classifier``: see :mod:`models.training.train_model2`."""
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
        help="plain folder + label CSV (see models/training/datasets/folder.py); repeatable",
    )
    _more_sources(p)
    p.add_argument("--uncertainty", choices=POLICIES, default="lsr-ones")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--lateral-dropout",
        type=float,
        default=0.3,
        help="probability of hiding a study's lateral in training, so frontal-only works",
    )
    _fit_options(p, val_fraction=0.25, threads=None)
    p.add_argument("--out", type=Path, required=True, help="model card path (weights go beside it)")
    _card_options(p, version="0.1.0")
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
    _model2_options(p)


def _more_sources(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nih",
        action="append",
        metavar="CSV",
        help="NIH ChestX-ray14 labels (Data_Entry_2017.csv or labels.csv); repeatable",
    )
    p.add_argument(
        "--covid",
        action="append",
        metavar="CSV|DIR",
        help="COVID-19 image data collection metadata.csv (or its folder); repeatable",
    )


def _model2_options(p: argparse.ArgumentParser) -> None:
    """Options of the three-way Model 2 run (models.training.train_model2)."""
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="model2: patients held out as the reported test split (> 0 selects the calibrated "
        "three-way run; --val-fraction is then the calibration/threshold split)",
    )
    p.add_argument(
        "--chexpert-test",
        action="append",
        metavar="DIR",
        help="CheXpert folders whose test_labels.csv/valid.csv studies are only measured",
    )
    p.add_argument("--model1-out", type=Path, help="write the derived Model 1 card here")
    p.add_argument("--growth-rate", type=int, default=16)
    p.add_argument("--block-config", default="4,8,12,8", help="DenseNet layers per block")
    p.add_argument("--init-features", type=int, default=32)
    p.add_argument("--gamma", type=float, default=0.3, help="gamma jitter strength (0 = off)")
    p.add_argument(
        "--specificity",
        type=float,
        default=0.9,
        help="operating point: pathology thresholds at this specificity on validation negatives",
    )
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--max-train-studies", type=int, default=0, help="subsample training studies")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this many minutes")
    p.add_argument("--cache", type=Path, help="image cache file (.npz), built once and reused")
    p.add_argument(
        "--crop-boxes", type=Path, help="lung crop boxes file (.json), reused across sizes"
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint file: saved each epoch, resumed")
    p.add_argument("--log-file", type=Path, help="also log progress to this file")


def train_view_arguments(p: argparse.ArgumentParser) -> None:
    """``train viewclassifier``: see :mod:`models.training.train_view`."""
    p.add_argument("--chexpert", action="append", metavar="DIR")
    p.add_argument(
        "--chexpert-test",
        action="append",
        metavar="DIR",
        help="CheXpert folders whose test_labels.csv images are only evaluated",
    )
    p.add_argument("--folder", action="append", metavar="CSV:DIR[:TEMPLATE]")
    p.add_argument(
        "--covid", action="append", metavar="CSV", help="COVID-19 collection metadata.csv"
    )
    p.add_argument("--nih", action="append", metavar="CSV", help="NIH labels.csv (frontals)")
    p.add_argument(
        "--max-patients-per-source",
        type=int,
        default=0,
        help="cap the patients of each source without laterals (0 = all)",
    )
    p.add_argument("--init-from", type=Path, metavar="CARD", help="fine-tune this view card")
    p.add_argument(
        "--crop-boxes", type=Path, help="lung crop boxes file (.json), reused across sizes"
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint file: saved each epoch, resumed")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gamma", type=float, default=0.5, help="gamma jitter strength (0 = off)")
    _fit_options(p, val_fraction=0.25, threads=None)
    p.add_argument("--out", type=Path, required=True)
    _card_options(p, version="0.1.0")


def evaluate_lungmask_arguments(p: argparse.ArgumentParser) -> None:
    """``evaluate lungmask``: see :mod:`models.training.eval_lungmask`."""
    p.add_argument(
        "--card", type=Path, default=LUNG_MASK_CARD, help="model card of the lung-mask generator"
    )
    p.add_argument("--data", type=Path, required=True, help="dataset folder (as for training)")
    p.add_argument(
        "--all",
        action="store_true",
        help="evaluate every pair in --data instead of the card's validation split",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("var/eval/lungmask"),
        help="folder for report.json and overlays.png",
    )
    p.add_argument("--margin", type=float, default=0.05, help="crop margin (fraction)")
    _run_options(p, threads=0)
    p.add_argument("--grid", type=int, default=16, help="images in the overlay grid (0 = none)")
    p.add_argument(
        "--qc-calibration",
        action="store_true",
        help="print the range of each mask-quality feature over the ground-truth masks of the "
        "card's training cases (what models.crop.QualityLimits was calibrated on) and exit",
    )


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """``evaluate classifier|viewclassifier``: see :mod:`models.training.evaluate`."""
    p.add_argument("--card", type=Path, required=True)
    p.add_argument("--chexpert", action="append", metavar="DIR", help="CheXpert train.csv studies")
    p.add_argument(
        "--chexpert-test", action="append", metavar="DIR", help="CheXpert test_labels.csv studies"
    )
    p.add_argument("--mimic", action="append", metavar="DIR")
    p.add_argument("--folder", action="append", metavar="CSV:DIR[:TEMPLATE]")
    p.add_argument(
        "--held-out",
        action="store_true",
        help="keep only the studies the card's <card>.split.json held out (plus CheXpert test)",
    )
    p.add_argument("--split", help="split file (default: beside the card)")
    p.add_argument("--frontal-only", action="store_true", help="ignore laterals (classifier)")
    _more_sources(p)
    p.add_argument(
        "--lung-mask",
        type=Path,
        metavar="CARD",
        help="lung-mask card the served path crops with (default: the bundled one)",
    )
    p.add_argument("--crop-margin", type=float, default=0.05, help="as models.crop_margin_fraction")
    p.add_argument(
        "--probabilities", type=Path, metavar="CSV", help="write per-study probabilities (CSV)"
    )
    p.add_argument(
        "--card-metrics",
        metavar="NAME",
        help="also store the report in the card's metrics as served_NAME",
    )
    _run_options(p, device="cpu", threads=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON report")
    p.add_argument("--roc", type=Path, help="ROC curves PNG (classifier)")


def evaluate_ctr_arguments(p: argparse.ArgumentParser) -> None:
    """``evaluate ctr``: see :mod:`models.training.eval_ctr`."""
    p.add_argument("--card", type=Path, default=LUNG_MASK_CARD, help="lung-mask model card")
    p.add_argument(
        "--chexpert", action="append", metavar="DIR", help="folder with CheXpert-v1.0(-small)/"
    )
    p.add_argument(
        "--nih", action="append", metavar="DIR", help="NIH folder with labels.csv + images/"
    )
    p.add_argument(
        "--held-out",
        type=Path,
        metavar="SPLIT",
        help="keep only the CheXpert studies in this split file's held_out_keys",
    )
    p.add_argument("--margin", type=float, default=0.05, help="crop margin (fraction)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, help="JSON report")
    p.add_argument("--per-image", type=Path, help="CSV of every image's ratio and label")
    _run_options(p, threads=0)


Arguments = Callable[[argparse.ArgumentParser], None]

#: verb -> kind -> (its arguments, the module whose ``run(args) -> int`` carries it out)
COMMANDS: dict[str, dict[str, tuple[Arguments, str]]] = {
    "train": {
        "lungmask": (train_lungmask_arguments, "models.training.train_lungmask"),
        "classifier": (train_classifier_arguments, "models.training.train_model2"),
        "viewclassifier": (train_view_arguments, "models.training.train_view"),
    },
    "evaluate": {
        "lungmask": (evaluate_lungmask_arguments, "models.training.eval_lungmask"),
        "classifier": (evaluate_arguments, "models.training.evaluate"),
        "viewclassifier": (evaluate_arguments, "models.training.evaluate"),
        "ctr": (evaluate_ctr_arguments, "models.training.eval_ctr"),
    },
}


class _Run:
    """``args.func``: import the subcommand's module when it runs, then call its ``run``."""

    def __init__(self, module: str) -> None:
        self.module = module

    def __call__(self, args: argparse.Namespace) -> int:
        run: Callable[[argparse.Namespace], int] = importlib.import_module(self.module).run
        return run(args)


def add_subcommands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``train`` and ``evaluate`` (each with ``lungmask|classifier|viewclassifier``) to
    ``subparsers``. The parsed namespace's ``func(args) -> int`` runs the chosen command."""
    for verb, kinds in COMMANDS.items():
        p = subparsers.add_parser(verb, help=f"{verb} a model ({', '.join(kinds)})")
        msub = p.add_subparsers(dest="model_kind", required=True)
        for kind, (arguments, module) in kinds.items():
            m = msub.add_parser(kind)
            arguments(m)
            m.set_defaults(func=_Run(module))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.training train|evaluate KIND [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m models.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
