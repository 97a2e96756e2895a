"""Lung-mask datasets: radiographs paired with binary lung masks.

Recognised layouts (``root`` is the folder passed as ``--data``):

- Kaggle "Chest Xray Masks and Labels" / JSRT-SCR as shipped in ``shared/data/jsrt``:
  ``CXR_png/<ID>.png`` with ``masks/<ID>_mask.png`` (Shenzhen naming) or ``masks/<ID>.png``
  (Montgomery naming in the Kaggle set);
- Montgomery County original: ``CXR_png/<ID>.png`` with ``ManualMask/leftMask/<ID>.png`` and
  ``ManualMask/rightMask/<ID>.png`` (the two are combined);
- OpenIST (``shared/data/openist_normals``): ``labels.csv`` (``id,finding,original_file``) listing
  every case, ``<ID>.jpg`` beside ``<ID>_mask.png`` in the same folder
  (:func:`find_openist_pairs`; strict: a bad row or a missing file is an error naming the file and
  line). Chosen whenever the folder has no ``CXR_png/`` but a ``labels.csv`` with an ``id`` column;
- flat: ``<ID>.png`` next to ``<ID>_mask.png`` in one folder.

Images are read as grayscale and scaled to float32 [0, 1]; masks are 0/1 (any non-zero pixel is
lung). Both are resized to the square network input by a plain (anisotropic) resize,
:func:`models.lung_mask.resize_image`, the mapping :class:`models.lung_mask.LungMasker` uses at
inference.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from models.lung_mask import resize_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class MaskDatasetError(ValueError):
    """The dataset folder has no recognisable image/mask pairs or a file cannot be read."""


@dataclass(frozen=True)
class MaskPair:
    """One radiograph and the mask file(s) whose union is its lung mask."""

    id: str
    image: Path
    masks: tuple[Path, ...]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for suf in IMAGE_SUFFIXES:
            cand = folder / f"{name}{suf}"
            if cand.is_file():
                return cand
    return None


def _is_openist(root: Path) -> bool:
    labels = root / "labels.csv"
    if (root / "CXR_png").is_dir() or not labels.is_file():
        return False
    with labels.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    return "id" in [h.strip() for h in header]


def find_openist_pairs(root: Path) -> list[MaskPair]:
    """Pairs of the OpenIST layout: every row of ``labels.csv`` (``id`` column, one case per
    row) must name an ``<ID>.jpg`` (or another image suffix) with ``<ID>_mask.png`` beside it.
    Raises :class:`MaskDatasetError` naming the file and line of a bad row, a duplicate ID or a
    missing image/mask."""
    root = Path(root)
    labels = root / "labels.csv"
    if not labels.is_file():
        raise MaskDatasetError(f"{labels}: missing (the OpenIST layout lists its cases there)")
    pairs: list[MaskPair] = []
    seen: dict[str, int] = {}
    with labels.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "id" not in [f.strip() for f in reader.fieldnames]:
            raise MaskDatasetError(f"{labels}:1: header has no 'id' column: {reader.fieldnames}")
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise MaskDatasetError(f"{labels}:{line}: wrong number of fields")
            case = (row.get("id") or row.get(" id") or "").strip()
            if not case or "/" in case or "\\" in case or case.startswith("."):
                raise MaskDatasetError(f"{labels}:{line}: empty or invalid id {case!r}")
            if case in seen:
                raise MaskDatasetError(
                    f"{labels}:{line}: id {case} repeats line {seen[case]} (one row per case)"
                )
            seen[case] = line
            image = next(
                (
                    root / f"{case}{suf}"
                    for suf in IMAGE_SUFFIXES
                    if (root / f"{case}{suf}").is_file()
                ),
                None,
            )
            if image is None:
                raise MaskDatasetError(f"{labels}:{line}: image {root / case}.jpg is missing")
            mask = root / f"{case}_mask.png"
            if not mask.is_file():
                raise MaskDatasetError(f"{labels}:{line}: mask {mask} is missing")
            pairs.append(MaskPair(case, image, (mask,)))
    if not pairs:
        raise MaskDatasetError(f"{labels}: lists no cases")
    return sorted(pairs, key=lambda p: p.id)


def find_pairs(root: Path) -> list[MaskPair]:
    """Return the image/mask pairs under ``root`` sorted by ID; images without a mask are skipped
    (and counted in the log), except in the OpenIST layout where every listed case must be
    complete. Raises :class:`MaskDatasetError` when no pair is found."""
    root = Path(root)
    if not root.is_dir():
        raise MaskDatasetError(f"lung-mask dataset folder {root} does not exist")
    if _is_openist(root):
        return find_openist_pairs(root)
    pairs: list[MaskPair] = []
    skipped = 0
    img_dir = root / "CXR_png" if (root / "CXR_png").is_dir() else root
    left, right = root / "ManualMask" / "leftMask", root / "ManualMask" / "rightMask"
    for img in _images_in(img_dir):
        stem = img.stem
        if stem.endswith("_mask"):
            continue
        found: tuple[Path, ...] | None = None
        if (root / "masks").is_dir():
            m = _find_mask(root / "masks", stem)
            found = (m,) if m else None
        if found is None and left.is_dir() and right.is_dir():
            lm, rm = _find_mask(left, stem), _find_mask(right, stem)
            found = (lm, rm) if lm and rm else None
        if found is None and img_dir == root:
            m = root / f"{stem}_mask{img.suffix}"
            found = (m,) if m.is_file() else None
        if found is None:
            skipped += 1
            continue
        pairs.append(MaskPair(stem, img, found))
    if not pairs:
        raise MaskDatasetError(
            f"no image/mask pairs found under {root}: expected CXR_png/<ID>.png with "
            f"masks/<ID>_mask.png, ManualMask/leftMask+rightMask/<ID>.png, "
            f"or <ID>.png + <ID>_mask.png"
        )
    if skipped:
        log.info("lung-mask dataset %s: %d images without a mask skipped", root, skipped)
    return pairs


def split_ids(ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: the same IDs, fraction and seed always give the same
    split, whatever order ``ids`` come in. Returns (train, val), each sorted."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    uniq = sorted(set(ids))
    if len(uniq) < 2:
        raise ValueError(f"need at least 2 distinct IDs to split, got {len(uniq)}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_val = min(len(uniq) - 1, max(1, int(round(len(uniq) * val_fraction))))
    val = sorted(uniq[i] for i in order[:n_val])
    val_set = set(val)
    return [i for i in uniq if i not in val_set], val


def read_gray(path: Path) -> np.ndarray:
    """Read an image file as 2-D float32 in [0, 1] (8- or 16-bit, colour files averaged)."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise MaskDatasetError(f"cannot read image {path}: missing, unreadable or not an image")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2GRAY)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def read_mask(pair: MaskPair) -> np.ndarray:
    """The union of the pair's mask files as uint8 0/1 at the image's resolution."""
    out: np.ndarray | None = None
    for p in pair.masks:
        m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise MaskDatasetError(f"cannot read mask {p} for image {pair.image}")
        m = (m > 0).astype(np.uint8)
        out = m if out is None else np.maximum(out, m)
    assert out is not None
    return out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return (
        cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5
    ).astype(np.uint8)


@dataclass(frozen=True)
class Augment:
    """Random geometric (same for image and mask) and intensity (image only) perturbations."""

    rotate_deg: float = 10.0
    scale: float = 0.10
    aspect: float = 0.08
    shift: float = 0.06
    brightness: float = 0.08
    contrast: float = 0.15
    gamma: float = 0.30

    def __call__(
        self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w = img.shape
        ang = rng.uniform(-self.rotate_deg, self.rotate_deg)
        s = rng.uniform(1 - self.scale, 1 + self.scale)
        a = math.exp(rng.uniform(-self.aspect, self.aspect))
        tx, ty = rng.uniform(-self.shift, self.shift) * w, rng.uniform(-self.shift, self.shift) * h
        rot = cv2.getRotationMatrix2D((w / 2, h / 2), ang, 1.0)
        m = np.vstack([rot, [0, 0, 1]])
        sc = np.array([[s * a, 0, (1 - s * a) * w / 2], [0, s / a, (1 - s / a) * h / 2], [0, 0, 1]])
        mat = (sc @ m)[:2]
        mat[:, 2] += (tx, ty)
        img = cv2.warpAffine(
            img, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        mask = cv2.warpAffine(
            mask.astype(np.float32),
            mat,
            (w, h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        mask = (mask >= 0.5).astype(np.uint8)
        g = math.exp(rng.uniform(-self.gamma, self.gamma))
        img = np.clip(img, 0.0, 1.0) ** g
        c = rng.uniform(1 - self.contrast, 1 + self.contrast)
        b = rng.uniform(-self.brightness, self.brightness)
        img = np.clip((img - 0.5) * c + 0.5 + b, 0.0, 1.0).astype(np.float32)
        return img, mask


class LungMaskDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Pairs resized once to ``size`` and held in memory (small sets: JSRT is 197 images).

    Items are ``(image, mask)``: image ``1 x size x size`` normalised as ``(x - mean) / std``, mask
    ``1 x size x size`` float 0/1. With ``augment`` each access draws a fresh perturbation from
    a generator seeded by ``seed`` (reproducible with ``num_workers=0``)."""

    def __init__(
        self,
        pairs: list[MaskPair],
        size: int,
        *,
        mean: float = 0.5,
        std: float = 0.5,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if not pairs:
            raise MaskDatasetError("LungMaskDataset got no pairs")
        self.ids = [p.id for p in pairs]
        self.size, self.mean, self.std, self.augment = size, mean, std, augment
        self.rng = np.random.default_rng(seed)
        self.images = [resize_image(read_gray(p.image), size) for p in pairs]
        self.masks = [resize_mask(read_mask(p), size) for p in pairs]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.images[idx], self.masks[idx]
        if self.augment is not None:
            img, mask = self.augment(img, mask, self.rng)
        x = torch.from_numpy((img.astype(np.float32) - self.mean) / self.std)[None]
        y = torch.from_numpy(mask.astype(np.float32))[None]
        return x, y
