"""Pack the classifier training data into one small file that can travel to a GPU machine.

    nice -n 10 python -m models.training.pack \\
        --chexpert DATA/chexpert_small --chexpert DATA/chexpert_sample \\
        --nih DATA/nih_frontal/labels.csv --covid DATA/covid_chestxray \\
        --folder DATA/openist_normals/labels.csv:DATA/openist_normals:{id}.jpg \\
        --folder DATA/jsrt/labels.csv:DATA/jsrt:CXR_png/{id}.png \\
        --folder DATA/actualmed_partial/labels.csv:DATA/actualmed_partial \\
        --chexpert-test DATA/chexpert_sample --out var/pack/pack.npz --max-mb 28

Every study of the sources is read by the same loaders as :mod:`.train_model2` and split by
patient with :func:`models.training.datasets.sources.patient_split3` (same seed and fractions as
the Model 2 card, so the test split is the card's test split). Each frontal is cropped to its
lungs exactly as the Analyzer serves it (:class:`models.training.images.LungCropper`: the
serving lung-mask card, ``validate_image``, ``LungMasker.predict`` and the crop box), laterals
are left whole, and both are squashed to ``--size`` square by
:func:`models.classifiers.resize_square` (the serving resize), rounded to uint8 and JPEG-encoded
at the highest quality that keeps the whole pack within ``--max-mb``. With ``--view-size`` the
view classifier's images (whole images, its own per-source patient split, as
:mod:`.train_view`) are packed too.

The pack holds encoded images, raw CheXpert-coded labels (NaN = blank), split and source codes
and SHA-256-derived keys (``key_hash``, ``patient_hash``): no patient names, IDs or paths.
:func:`read_pack` loads it with numpy only (no pickle).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.labels import OBSERVATIONS

log = logging.getLogger(__name__)

#: split codes of the pack (``chexpert_test`` = the ``--chexpert-test`` folders, never trained on)
PACK_SPLITS = ("train", "val", "test", "chexpert_test")
#: split codes of the view-classifier images
VIEW_SPLITS = ("train", "held_out", "chexpert_test")
PACK_VERSION = 1


def short_hash(text: str) -> str:
    """First 16 hex digits of SHA-256: a key that identifies a study without naming it."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(img: np.ndarray, quality: int) -> bytes:
    """uint8 2-D image -> JPEG bytes (baseline, no chroma: greyscale)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf.tobytes())


def decode(data: bytes | np.ndarray) -> np.ndarray:
    """JPEG bytes -> uint8 2-D image."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError("JPEG decoding failed")
    return img


def concat(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Blobs -> (one uint8 array, int64 offsets of length n + 1)."""
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)
    return data, offsets


def blob(data: np.ndarray, offsets: np.ndarray, i: int) -> np.ndarray:
    """The ``i``-th blob of :func:`concat`'s output."""
    return data[int(offsets[i]) : int(offsets[i + 1])]


@dataclass
class Encoded:
    """Images encoded at one JPEG quality and how far the decoded pixels moved."""

    quality: int
    blobs: list[bytes]
    mae: float  # mean |decoded - original| in 0..255 units
    max_mean_error: float  # worst image's mean absolute error
    psnr_db: float

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs)


def encode_all(images: Sequence[np.ndarray], quality: int) -> Encoded:
    blobs = [encode(im, quality) for im in images]
    errs, mse = [], []
    for im, b in zip(images, blobs, strict=True):
        d = decode(b).astype(np.float32) - im.astype(np.float32)
        errs.append(float(np.abs(d).mean()))
        mse.append(float((d * d).mean()))
    m = float(np.mean(mse)) if mse else 0.0
    return Encoded(
        quality=quality,
        blobs=blobs,
        mae=float(np.mean(errs)) if errs else 0.0,
        max_mean_error=float(np.max(errs)) if errs else 0.0,
        psnr_db=float(10 * np.log10(255.0**2 / m)) if m > 0 else float("inf"),
    )


def fit_quality(
    images: Sequence[np.ndarray], budget_bytes: int, qualities: Sequence[int]
) -> Encoded:
    """The highest quality of ``qualities`` whose encoding fits ``budget_bytes`` (the lowest
    when none does; the caller checks)."""
    best: Encoded | None = None
    for q in sorted(qualities, reverse=True):
        enc = encode_all(images, q)
        log.info(
            "JPEG quality %d: %.2f MB, MAE %.3f/255 (worst image %.3f), PSNR %.1f dB",
            q,
            enc.nbytes / 1e6,
            enc.mae,
            enc.max_mean_error,
            enc.psnr_db,
        )
        best = enc
        if enc.nbytes <= budget_bytes:
            break
    assert best is not None
    return best


@dataclass
class Study:
    key: str
    patient: str
    source: str
    split: str
    raw: np.ndarray
    frontal: int  # image index
    lateral: int  # image index or -1


@dataclass
class Collected:
    images: list[np.ndarray] = field(default_factory=list)
    cropped: list[bool] = field(default_factory=list)
    studies: list[Study] = field(default_factory=list)


def collect_studies(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The labelled Model 2 studies of each pack split (the card's patient-level split)."""
    from models.training.datasets.sources import patient_split3, read_studies, studies_from_args
    from models.training.studies import labelled

    everything = studies_from_args(args)
    if not everything:
        raise SystemExit("no training data: give --chexpert, --nih, --covid, --mimic or --folder")
    parts = patient_split3(everything, args.val_fraction, args.test_fraction, args.seed)
    out = {k: labelled(parts[k], "model2") for k in ("train", "val", "test")}
    out["chexpert_test"] = read_studies(chexpert_test=args.chexpert_test or [])
    return out


def build_images(
    splits: dict[str, list[Any]], size: int, cropper: Any, progress_every: int = 100
) -> Collected:
    """Decode, crop (frontals, with ``cropper``) and resize every image of ``splits``."""
    from models.classifiers import resize_square
    from models.training.datasets.chexpert import load_image

    def prep(path: Path, crop: bool) -> np.ndarray:
        img = load_image(path)
        if crop and cropper is not None:
            img = cropper(img)
        return (resize_square(img, size) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)

    col = Collected()
    total = sum(len(v) for v in splits.values())
    t0, n = time.time(), 0
    for split, recs in splits.items():
        for r in recs:
            col.images.append(prep(r.frontal, True))
            col.cropped.append(cropper is not None)
            fi, li = len(col.images) - 1, -1
            if r.lateral is not None:
                col.images.append(prep(r.lateral, False))
                col.cropped.append(False)
                li = len(col.images) - 1
            col.studies.append(
                Study(r.key, r.patient, r.source, split, np.asarray(r.raw, np.float32), fi, li)
            )
            n += 1
            if n % progress_every == 0 or n == total:
                el = time.time() - t0
                log.info(
                    "packed %d/%d studies (%d images) in %.0f s, ~%.0f s left",
                    n,
                    total,
                    len(col.images),
                    el,
                    el / n * (total - n),
                )
    return col


def collect_view_images(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The view classifier's images and split, as :func:`models.training.train_view.run`."""
    from models.training.datasets.chexpert import patient_split
    from models.training.datasets.sources import read_view_images
    from models.training.train_view import cap_patients, covid_view_images, nih_view_images

    images = read_view_images(chexpert=args.chexpert or [], folder=args.view_folder or [])
    for c in args.covid or []:
        images += covid_view_images(Path(c))
    for c in args.nih or []:
        images += nih_view_images(Path(c))
    images = cap_patients(images, args.view_max_patients, args.seed)
    train, held = patient_split(images, args.view_val_fraction, args.seed)
    test = read_view_images(chexpert_test=args.chexpert_test or [])
    return {"train": train, "held_out": held, "chexpert_test": test}


def build_view(splits: dict[str, list[Any]], size: int) -> tuple[list[np.ndarray], list[Any]]:
    from models.classifiers import resize_square
    from models.training.datasets.chexpert import load_image

    imgs, rows = [], []
    for split, ims in splits.items():
        for im in ims:
            a = resize_square(load_image(im.path), size)
            imgs.append((a * 255.0 + 0.5).clip(0, 255).astype(np.uint8))
            rows.append((split, im))
    return imgs, rows


def _codes(values: Sequence[str], names: Sequence[str]) -> np.ndarray:
    return np.array([list(names).index(v) for v in values], dtype=np.int16)


def write_pack(
    path: Path,
    col: Collected,
    enc: Encoded,
    meta: dict[str, Any],
    view: tuple[Encoded, list[Any]] | None = None,
) -> None:
    """Write the pack (.npz, no pickled objects)."""
    sources = sorted({s.source for s in col.studies})
    data, offsets = concat(enc.blobs)
    arrays: dict[str, np.ndarray] = {
        "images": data,
        "offsets": offsets,
        "cropped": np.array(col.cropped, dtype=bool),
        "frontal": np.array([s.frontal for s in col.studies], dtype=np.int32),
        "lateral": np.array([s.lateral for s in col.studies], dtype=np.int32),
        "raw": np.stack([s.raw for s in col.studies]).astype(np.float32),
        "split": _codes([s.split for s in col.studies], PACK_SPLITS),
        "split_names": np.array(PACK_SPLITS),
        "source": _codes([s.source for s in col.studies], sources),
        "source_names": np.array(sources),
        "key_hash": np.array([short_hash(s.key) for s in col.studies]),
        "patient_hash": np.array([short_hash(s.patient) for s in col.studies]),
        "labels": np.array(OBSERVATIONS),
    }
    if view is not None:
        venc, rows = view
        vsources = sorted({im.source for _, im in rows})
        vdata, voffsets = concat(venc.blobs)
        arrays.update(
            view_images=vdata,
            view_offsets=voffsets,
            view_lateral=np.array([im.lateral for _, im in rows], dtype=bool),
            view_split=_codes([s for s, _ in rows], VIEW_SPLITS),
            view_split_names=np.array(VIEW_SPLITS),
            view_source=_codes([im.source for _, im in rows], vsources),
            view_source_names=np.array(vsources),
            view_patient_hash=np.array([short_hash(im.patient) for _, im in rows]),
        )
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def read_pack(path: Path) -> dict[str, Any]:
    """Every array of a pack (``meta`` parsed from JSON)."""
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, Any] = {k: z[k] for k in z.files}
    out["meta"] = json.loads(str(out["meta"]))
    return out


def parse_with_sources(
    extra: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """The pack's source, split and crop arguments (:func:`parse_args`) together with
    ``extra``'s (an ``add_help=False`` parser), read from one command line."""
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest)
    for k, v in vars(known).items():
        setattr(args, k, v)
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.training.pack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, what in (
        ("--chexpert", "CheXpert folder (train.csv); repeatable"),
        ("--mimic", "MIMIC-CXR-JPG folder; repeatable"),
        ("--nih", "NIH labels.csv; repeatable"),
        ("--covid", "COVID-19 collection folder or metadata.csv; repeatable"),
        ("--folder", "CSV:DIR[:TEMPLATE] folder spec; repeatable"),
        ("--chexpert-test", "CheXpert folder with test_labels.csv/valid.csv; repeatable"),
        ("--view-folder", "folder spec read for the view classifier only; repeatable"),
    ):
        p.add_argument(name, action="append", help=what)
    p.add_argument("--lung-mask", type=Path, default=Path("models/weights/lung_mask.json"))
    p.add_argument("--crop-margin", type=float, default=0.05, help="as models.crop_margin_fraction")
    p.add_argument("--crop-boxes", type=Path, default=Path("var/pack/crop_boxes.json"))
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--max-mb", type=float, default=28.0, help="size limit of the whole pack")
    p.add_argument("--qualities", default="95,92,90,88,85,82,80,78,75,72,70,65,60")
    p.add_argument("--view-size", type=int, default=0, help="0 = no view-classifier images")
    p.add_argument("--view-quality", type=int, default=90)
    p.add_argument("--view-val-fraction", type=float, default=0.25)
    p.add_argument("--view-max-patients", type=int, default=150)
    p.add_argument("--max-studies", type=int, default=0, help="first N studies per split (tests)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("var/pack/pack.npz"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from models.training.images import LungCropper

    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.set_num_threads(max(1, args.threads))
    t0 = time.time()
    splits = collect_studies(args)
    if args.max_studies:
        splits = {k: v[: args.max_studies] for k, v in splits.items()}
    log.info("studies per split: %s", {k: len(v) for k, v in splits.items()})
    cropper = LungCropper(args.lung_mask, args.crop_margin, torch.device("cpu"), args.crop_boxes)
    col = build_images(splits, args.size, cropper)
    cropper.flush()
    t_images = time.time() - t0
    view = None
    view_bytes = 0
    vmeta: dict[str, Any] = {}
    if args.view_size:
        vsplits = collect_view_images(args)
        if args.max_studies:
            vsplits = {k: v[: args.max_studies] for k, v in vsplits.items()}
        vimgs, vrows = build_view(vsplits, args.view_size)
        venc = encode_all(vimgs, args.view_quality)
        view, view_bytes = (venc, vrows), venc.nbytes
        vmeta = {
            "size": args.view_size,
            "images": len(vimgs),
            "laterals": int(sum(im.lateral for _, im in vrows)),
            "per_split": {k: len(v) for k, v in vsplits.items()},
            "jpeg_quality": venc.quality,
            "mb": round(venc.nbytes / 1e6, 3),
            "mae_255": round(venc.mae, 3),
            "split": f"as train_view: per-source patient split, {args.view_val_fraction:.0%} "
            f"held out, seed {args.seed}, sources without laterals capped at "
            f"{args.view_max_patients} patients",
        }
        log.info("view images: %s", vmeta)
    budget = int(args.max_mb * 1e6) - view_bytes - 200_000  # labels, keys and npz overhead
    enc = fit_quality(col.images, budget, [int(q) for q in args.qualities.split(",")])
    from models.registry import read_card

    lm = read_card(args.lung_mask)
    meta = {
        "pack_version": PACK_VERSION,
        "size": args.size,
        "images": len(col.images),
        "studies": len(col.studies),
        "per_split": {k: len(v) for k, v in splits.items()},
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "crop": f"frontals: lungs by {lm.name} {lm.version} (sha256 {lm.sha256[:16]}), margin "
        f"{args.crop_margin}, models.training.images.LungCropper (the Analyzer's mask + crop); "
        "laterals whole; models.classifiers.resize_square to size, uint8",
        "lung_mask_sha256": lm.sha256,
        "crop_margin": args.crop_margin,
        "jpeg_quality": enc.quality,
        "jpeg_mae_255": round(enc.mae, 4),
        "jpeg_worst_image_mae_255": round(enc.max_mean_error, 4),
        "jpeg_psnr_db": round(enc.psnr_db, 2),
        "image_mb": round(enc.nbytes / 1e6, 3),
        "build_seconds_images": round(t_images, 1),
        "sources": {
            k: getattr(args, k) or []
            for k in ("chexpert", "mimic", "nih", "covid", "folder", "chexpert_test")
        },
        "view": vmeta,
    }
    write_pack(args.out, col, enc, meta, view)
    size = args.out.stat().st_size
    log.info("wrote %s: %.2f MB in %.0f s; %s", args.out, size / 1e6, time.time() - t0, meta)
    if size > args.max_mb * 1e6:
        log.error("pack is %.2f MB, over --max-mb %.1f", size / 1e6, args.max_mb)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
