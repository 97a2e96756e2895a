"""Lung-mask post-processing and crop box (numpy + OpenCV only; no torch).

Pipeline for one probability map (any size, values in [0, 1]):

1. threshold at the card's ``lung`` threshold;
2. keep the two largest 8-connected components (the lungs), drop everything else;
3. fill holes inside each kept component (nodules, the hilum) from its outer contour;
4. smooth with a morphological opening then closing (elliptical kernel scaled to the map size);
5. resize to the original image's resolution (linear on the 0/1 mask, re-thresholded at 0.5);
6. bounding box of the mask plus a margin (a fraction of the box's width/height on each side),
   clipped to the image;
7. quality checks: area fraction in a plausible range, exactly two components, left/right balance,
   solidity (area / convex hull) of each lung.
   A failed check keeps the mask but returns the full-image box and ``MaskQuality(ok=False, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from models.api import CropBox, LungMaskResult, MaskQuality


@dataclass(frozen=True)
class QualityLimits:
    """Plausibility limits for a frontal chest radiograph's lung mask."""

    min_area_fraction: float = 0.08
    max_area_fraction: float = 0.65
    min_balance: float = 0.35  # smaller lung / larger lung
    min_component_fraction: float = 0.005  # components smaller than this (of the image) are noise
    # area / convex-hull area of each lung; JSRT predictions are >= 0.79, ragged masks on images
    # unlike the training data fall below 0.7 and would give an unreliable crop
    min_solidity: float = 0.70


DEFAULT_LIMITS = QualityLimits()


def _check_map(prob: np.ndarray) -> np.ndarray:
    if not isinstance(prob, np.ndarray) or prob.ndim != 2 or prob.size == 0:
        raise ValueError(
            f"probability map must be a non-empty 2-D numpy array, got "
            f"{getattr(prob, 'shape', type(prob))}"
        )
    return prob


def keep_largest_components(mask: np.ndarray, k: int = 2, min_pixels: int = 1) -> np.ndarray:
    """uint8 0/1 mask with only the ``k`` largest 8-connected components of at least
    ``min_pixels``."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, dtype=np.uint8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable")[:k]
    keep = [int(i) + 1 for i in order if areas[i] >= min_pixels]
    return np.isin(labels, keep).astype(np.uint8)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every hole enclosed by a component (draw the outer contours filled)."""
    out = np.zeros(mask.shape, dtype=np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if contours:
        cv2.drawContours(out, contours, -1, color=1, thickness=cv2.FILLED)
    return out


def smooth(mask: np.ndarray, kernel_fraction: float = 0.02) -> np.ndarray:
    """Morphological opening then closing with an ellipse of ``kernel_fraction`` of the short
    side."""
    size = max(3, int(round(min(mask.shape) * kernel_fraction)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    return cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel)


def postprocess(
    prob: np.ndarray, threshold: float = 0.5, *, limits: QualityLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Clean binary lung mask (uint8 0/1) at the probability map's resolution."""
    prob = _check_map(prob)
    mask = (prob >= threshold).astype(np.uint8)
    min_pixels = max(1, int(limits.min_component_fraction * mask.size))
    mask = keep_largest_components(mask, 2, min_pixels)
    mask = fill_holes(mask)
    mask = smooth(mask)
    # smoothing can split or merge pieces; re-apply the two-component rule and fill again
    return fill_holes(keep_largest_components(mask, 2, min_pixels))


def to_original(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 0/1 mask to ``shape`` (rows, cols), the inverse of the network's anisotropic
    resize (:func:`models.lung_mask.resize_image`)."""
    h, w = int(shape[0]), int(shape[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"target shape must be positive, got {shape}")
    if mask.shape == (h, w):
        return mask.astype(np.uint8)
    up = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return (up >= 0.5).astype(np.uint8)


def bounding_box(mask: np.ndarray, margin: float) -> CropBox:
    """Tight box of the non-zero pixels grown by ``margin`` x (box width, box height) on each side,
    clipped to the image. An empty mask gives the full image."""
    if margin < 0:
        raise ValueError(f"crop margin must be >= 0, got {margin}")
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return CropBox(0, 0, w, h)
    y0, y1 = int(ys.min()), int(ys.max()) + 1
    x0, x1 = int(xs.min()), int(xs.max()) + 1
    my, mx = int(round((y1 - y0) * margin)), int(round((x1 - x0) * margin))
    return CropBox(x0=max(0, x0 - mx), y0=max(0, y0 - my), x1=min(w, x1 + mx), y1=min(h, y1 + my))


def _solidity(component: np.ndarray) -> float:
    contours, _ = cv2.findContours(
        component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    hull = cv2.contourArea(cv2.convexHull(np.vstack(contours))) if contours else 0.0
    return float(component.sum()) / hull if hull > 0 else 0.0


def assess(mask: np.ndarray, limits: QualityLimits = DEFAULT_LIMITS) -> MaskQuality:
    """Plausibility of a cleaned mask (see :class:`QualityLimits`)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = sorted((int(a) for a in stats[1:, cv2.CC_STAT_AREA]), reverse=True)
    solidity = [_solidity(labels == i) for i in range(1, n)]
    area_fraction = float(sum(areas)) / float(mask.size)
    balance = (areas[1] / areas[0]) if len(areas) >= 2 and areas[0] > 0 else 0.0
    reasons: list[str] = []
    if len(areas) != 2:
        reasons.append(f"{len(areas)} lung regions found, expected 2")
    if not limits.min_area_fraction <= area_fraction <= limits.max_area_fraction:
        reasons.append(
            f"lung area {area_fraction:.1%} of the image is outside "
            f"{limits.min_area_fraction:.0%}-{limits.max_area_fraction:.0%}"
        )
    if len(areas) >= 2 and balance < limits.min_balance:
        reasons.append(f"left/right balance {balance:.2f} below {limits.min_balance:.2f}")
    if solidity and min(solidity) < limits.min_solidity:
        reasons.append(
            f"lung region solidity {min(solidity):.2f} below {limits.min_solidity:.2f} "
            f"(ragged mask)"
        )
    return MaskQuality(
        area_fraction=round(area_fraction, 4),
        components=len(areas),
        left_right_balance=round(float(balance), 4),
        ok=not reasons,
        reason="; ".join(reasons),
    )


def mask_and_crop(
    prob: np.ndarray,
    original_shape: tuple[int, int],
    *,
    threshold: float = 0.5,
    margin: float = 0.05,
    limits: QualityLimits = DEFAULT_LIMITS,
) -> LungMaskResult:
    """Post-process a probability map, map it to ``original_shape`` and compute the crop.

    Quality is judged on the cleaned mask at the map's resolution (where the image is square, so
    area fractions do not depend on the original aspect ratio)."""
    clean = postprocess(prob, threshold, limits=limits)
    quality = assess(clean, limits)
    mask = to_original(clean, original_shape)
    h, w = mask.shape
    crop = bounding_box(mask, margin) if quality.ok else CropBox(0, 0, w, h)
    return LungMaskResult(mask=mask, crop=crop, quality=quality)
