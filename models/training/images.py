"""Image pipeline shared by the classifier and view-classifier training (and evaluation): a cache
of decoded, resized images, the lung crop used at inference, and batch augmentation."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.classifiers import resize_square
from models.registry import Normalisation
from models.training.datasets.chexpert import load_image


class ImageCache:
    """Images decoded once and kept resized as uint8 (a few hundred KB per image at 224 px).

    ``cropper`` (e.g. the lung masker) crops frontal images before resizing, as the Analyzer
    does at inference; laterals are never cropped."""

    def __init__(
        self, size: int, cropper: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        self.size = size
        self.cropper = cropper
        self._cache: dict[tuple[Path, bool], np.ndarray] = {}

    def get(self, path: Path, frontal: bool = False) -> np.ndarray:
        key = (path, frontal and self.cropper is not None)
        arr = self._cache.get(key)
        if arr is None:
            img = load_image(path)
            if key[1] and self.cropper is not None:
                img = self.cropper(img)
            arr = (resize_square(img, self.size) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
            self._cache[key] = arr
        return arr

    def save(self, path: Path) -> None:
        """Write every cached image to ``path`` (.npz; reused by :meth:`load` if the size and the
        cropper's identity match)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [f"{int(c)}|{p}" for p, c in self._cache]
        arrays = {f"a{i}": a for i, a in enumerate(self._cache.values())}
        np.savez(path, names=np.array(names), size=np.array(self.size), **arrays)  # type: ignore[arg-type]

    def load(self, path: Path) -> int:
        """Add the images cached in ``path`` (written by :meth:`save` at the same size); returns
        how many. A cache at another size is ignored."""
        if not path.exists():
            return 0
        with np.load(path) as z:
            if int(z["size"]) != self.size:
                return 0
            for i, name in enumerate(z["names"]):
                crop, _, p = str(name).partition("|")
                self._cache[(Path(p), crop == "1")] = z[f"a{i}"]
        return len(self._cache)

    def __len__(self) -> int:
        return len(self._cache)

    def tensor(self, path: Path, norm: Normalisation, frontal: bool = False) -> torch.Tensor:
        t = torch.from_numpy(self.get(path, frontal)).float().div_(255.0)[None]
        return (t - norm.mean) / norm.std


class LungCropper:
    """Crop a frontal image to its lungs with the lung-mask model (full image when the mask fails
    its quality checks), exactly as :class:`models.analyzer.Analyzer` does.

    ``boxes`` (JSON) keeps each image's crop box, keyed by the lung-mask card's SHA-256, the
    margin and the image's content hash, so caches at other input sizes reuse the mask work."""

    def __init__(
        self, card_path: Path, margin: float, device: torch.device, boxes: Path | None = None
    ) -> None:
        from models.lung_mask import LungMasker

        self.masker = LungMasker.from_card(card_path, device)
        self.margin = margin
        self.boxes = boxes
        self.known: dict[str, list[int]] = {}
        if boxes is not None and boxes.exists():
            self.known = json.loads(boxes.read_text(encoding="utf-8"))
        self.tag = f"{self.masker.card.sha256[:16]}:{margin}"

    def __call__(self, img: np.ndarray) -> np.ndarray:
        from models.classifiers import validate_image

        img = validate_image(img, "training image")
        key = f"{self.tag}:{hashlib.sha256(img.tobytes()).hexdigest()[:32]}"
        box = self.known.get(key)
        if box is None:
            c = self.masker.predict([img], margin=self.margin)[0].crop
            box = self.known[key] = [c.x0, c.y0, c.x1, c.y1]
            if len(self.known) % 200 == 0:
                self.flush()
        x0, y0, x1, y1 = box
        return img[y0:y1, x0:x1]

    def flush(self) -> None:
        """Write the known crop boxes to ``boxes``."""
        if self.boxes is not None:
            self.boxes.parent.mkdir(parents=True, exist_ok=True)
            self.boxes.write_text(json.dumps(self.known), encoding="utf-8")


def lung_cropper(card_path: Path, margin: float, device: torch.device) -> LungCropper:
    """:class:`LungCropper` without a box file."""
    return LungCropper(card_path, margin, device)


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.06,
    contrast: float = 0.15,
    gamma: float = 0.0,
    norm: Normalisation | None = None,
) -> torch.Tensor:
    """Random affine (rotation, zoom, shift; never a flip), contrast/brightness jitter and, with
    ``gamma`` > 0 and the input's ``norm``, a gamma curve exp(U(-gamma, gamma)) on the [0, 1]
    intensities, per image. Radiographs are not flipped: left and right (heart, aortic knob) are
    anatomy."""
    b = x.shape[0]
    if gamma > 0 and norm is not None:
        g = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * gamma).view(b, 1, 1, 1).to(x)
        unit = (x * norm.std + norm.mean).clamp(0.0, 1.0)
        x = (unit.pow(g) - norm.mean) / norm.std

    def u() -> torch.Tensor:
        return torch.rand(b, generator=gen) * 2 - 1

    ang = u() * math.radians(rotate_deg)
    s = 1 + u() * scale
    tx, ty = u() * translate * 2, u() * translate * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(x - bg, grid, padding_mode="zeros", align_corners=False) + bg
    c = (1 + u() * contrast).view(b, 1, 1, 1).to(x.device, x.dtype)
    br = (u() * contrast).view(b, 1, 1, 1).to(x.device, x.dtype)
    return out * c + br
