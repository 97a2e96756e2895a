"""Image pipeline shared by the classifier and view-classifier training (and evaluation): a cache
of decoded, resized images, the lung crop used at inference, and batch augmentation."""

from __future__ import annotations

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

    def tensor(self, path: Path, norm: Normalisation, frontal: bool = False) -> torch.Tensor:
        t = torch.from_numpy(self.get(path, frontal)).float().div_(255.0)[None]
        return (t - norm.mean) / norm.std


def lung_cropper(
    card_path: Path, margin: float, device: torch.device
) -> Callable[[np.ndarray], np.ndarray]:
    """Crop a frontal image to its lungs with the lung-mask model (full image when the mask fails
    its quality checks), exactly as :class:`models.analyzer.Analyzer` does."""
    from models.lung_mask import LungMasker

    masker = LungMasker.from_card(card_path, device)

    def crop(img: np.ndarray) -> np.ndarray:
        c = masker.predict([img], margin=margin)[0].crop
        return img[c.y0 : c.y1, c.x0 : c.x1]

    return crop


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.06,
    contrast: float = 0.15,
) -> torch.Tensor:
    """Random affine (rotation, zoom, shift) and contrast/brightness jitter, per image."""
    b = x.shape[0]

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
