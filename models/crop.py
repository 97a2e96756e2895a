"""Lung-mask post-processing and crop box (numpy + OpenCV only; no torch).

Pipeline for one probability map (any size, values in [0, 1]):

1. threshold at the card's ``lung`` threshold;
2. keep the two largest 8-connected components (the lungs), drop everything else;
3. fill holes inside each kept component (nodules, the hilum) from its outer contour;
4. smooth with a morphological opening then closing (elliptical kernel scaled to the map size);
5. resize to the original image's resolution (linear on the 0/1 mask, re-thresholded at 0.5);
6. bounding box of the mask plus a margin (a fraction of the box's width/height on each side),
   clipped to the image;
7. quality checks (:func:`assess`), each a named rule: exactly two components (``components``),
   area fraction in a plausible range (``area``), left/right balance (``balance``), solidity
   (area / convex hull) of each lung (``solidity``), the mask touching the image border
   (``touches_border``), each lung's height and width against the image (``lung_height``,
   ``lung_width``) and against the other lung (``lung_proportions``, ``apex_level``), the gap
   between the lungs' medial borders collapsing over the heart (``cardiac_gap``) and a lung's
   medial contour crossing the midline (``crosses_midline``). The geometry
   (:func:`lung_geometry`) is measured on the cleaned mask at the network's square resolution,
   so fractions do not depend on the original aspect ratio. ``MaskQuality.rule`` names the first
   failing rule and ``reason`` lists every failure. A failed check keeps the mask but returns the
   full-image box.

The limits of the geometric rules were calibrated on the lung-mask generator's **training** masks
(JSRT + OpenIST ground truth at 256 x 256, see ``QualityLimits``); the false-flag rate is measured
on held-out cases by ``cxr-worker evaluate lungmask`` (``quality_ok_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Geometric rules, calibrated on the lung-mask generator's training masks (JSRT 167 + OpenIST
    # 191 ground-truth masks at 256 x 256, the held-out test cases excluded); each limit sits
    # beyond the most extreme training mask (in brackets) with a margin. Fractions of the square
    # network map.
    # touches_border: a lung within max_border_gap of the top edge (flag_top_edge); within it of
    # the bottom edge while the other lung's bottom lies more than max_edge_offset further away
    # [training masks: bottom offsets of masks touching the bottom <= 0.035, apex offsets <=
    # 0.043]; or lung along more than max_border_contact of any side [0.25]
    flag_top_edge: bool = True
    max_border_gap: float = 0.005
    max_edge_offset: float = 0.055
    max_border_contact: float = 0.40
    lung_height: tuple[float, float] = (0.35, 0.99)  # each lung / image height [0.47-0.97]
    lung_width: tuple[float, float] = (0.17, 0.62)  # each lung / image width [0.25-0.51]
    min_height_ratio: float = 0.55  # shorter lung / taller lung [0.64]
    min_width_ratio: float = 0.50  # narrower lung / wider lung [0.65]
    max_apex_offset: float = 0.10  # difference of the two lungs' top rows / image height [0.043]
    min_cardiac_gap: float = 0.08  # narrowest medial gap over the heart rows / thorax [0.13]
    max_midline_crossing: float = 0.10  # medial edge past the thoracic midline / thorax [0.051]


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


@dataclass(frozen=True)
class LungGeometry:
    """Measurements of a two-lung mask at its own resolution (``rows x cols``).

    ``a`` is the lung on the image's left (the patient's right on a PA film), ``b`` the one on the
    image's right. Heights are fractions of the image height, widths of the image width. Row
    profiles cover the rows where both lungs are present."""

    rows: int
    cols: int
    border_gap: dict[str, float]  # side -> distance of the mask to it, fraction of that axis
    border_contact: dict[str, float]  # side -> fraction of that side's pixels that are lung
    # side -> (distance of a, distance of b) to the top and bottom sides, fractions of the height
    edge_gaps: dict[str, tuple[float, float]]
    height_a: float
    height_b: float
    width_a: float
    width_b: float
    thorax_width: float  # outer edge of a to outer edge of b, fraction of the image width
    # min over the heart rows of (b's medial edge - a's medial edge) / thorax width
    cardiac_gap: float
    # max over all shared rows of how far a medial edge passes the thoracic midline / thorax width
    midline_crossing: float
    # per shared row: (row, a outer, a medial, b medial, b outer) in pixels
    profile: np.ndarray = field(repr=False)

    @property
    def height_ratio(self) -> float:
        return min(self.height_a, self.height_b) / max(self.height_a, self.height_b, 1e-9)

    @property
    def width_ratio(self) -> float:
        return min(self.width_a, self.width_b) / max(self.width_a, self.width_b, 1e-9)


#: the heart rows: this fraction range of the rows both lungs share, from the top
HEART_ROWS = (0.45, 0.92)


def two_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The two largest 8-connected components as boolean masks, image-left first; None when the
    mask has fewer than two."""
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    if n < 3:
        return None
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")[:2] + 1
    first, second = sorted((int(i) for i in order), key=lambda i: float(centroids[i][0]))
    return labels == first, labels == second


def row_profile(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(k, 5)`` int array: for each row where both lungs have pixels, (row, a's outer/leftmost
    column, a's medial/rightmost column, b's medial/leftmost column, b's outer/rightmost
    column)."""
    cols = np.arange(a.shape[1])
    big = a.shape[1] + 1
    a_any, b_any = a.any(axis=1), b.any(axis=1)
    rows = np.nonzero(a_any & b_any)[0]
    if rows.size == 0:
        return np.zeros((0, 5), dtype=np.int64)
    ar, br = a[rows], b[rows]
    a_out = np.where(ar, cols, big).min(axis=1)
    a_med = np.where(ar, cols, -1).max(axis=1)
    b_med = np.where(br, cols, big).min(axis=1)
    b_out = np.where(br, cols, -1).max(axis=1)
    return np.stack([rows, a_out, a_med, b_med, b_out], axis=1).astype(np.int64)


def lung_geometry(mask: np.ndarray) -> LungGeometry | None:
    """Geometry of the two largest components of ``mask`` (None with fewer than two)."""
    lungs = two_lungs(mask)
    if lungs is None:
        return None
    a, b = lungs
    h, w = mask.shape
    ys, xs = np.nonzero(a | b)
    gaps = {
        "top": ys.min() / h,
        "bottom": (h - 1 - ys.max()) / h,
        "left": xs.min() / w,
        "right": (w - 1 - xs.max()) / w,
    }
    m = a | b
    contact = {
        "top": m[0].mean(),
        "bottom": m[-1].mean(),
        "left": m[:, 0].mean(),
        "right": m[:, -1].mean(),
    }

    def rows_of(x: np.ndarray) -> np.ndarray:
        return np.nonzero(x.any(axis=1))[0]

    ra, rb = rows_of(a), rows_of(b)
    edge_gaps = {
        "top": (ra.min() / h, rb.min() / h),
        "bottom": ((h - 1 - ra.max()) / h, (h - 1 - rb.max()) / h),
    }

    def extent(m: np.ndarray, axis: int) -> float:
        idx = np.nonzero(m.any(axis=axis))[0]
        return float(idx.max() - idx.min() + 1)

    prof = row_profile(a, b)
    thorax = float(xs.max() - xs.min() + 1)
    if prof.shape[0]:
        mid = (xs.min() + xs.max()) / 2.0
        crossing = float(max((prof[:, 2] - mid).max(), (mid - prof[:, 3]).max())) / thorax
        lo, hi = (int(round(f * (prof.shape[0] - 1))) for f in HEART_ROWS)
        heart = prof[lo : hi + 1]
        cardiac_gap = float((heart[:, 3] - heart[:, 2]).min()) / thorax
    else:  # no shared row: the lungs sit one above the other
        crossing, cardiac_gap = 1.0, 0.0
    return LungGeometry(
        rows=h,
        cols=w,
        border_gap={k: float(v) for k, v in gaps.items()},
        border_contact={k: float(v) for k, v in contact.items()},
        edge_gaps={k: (float(v[0]), float(v[1])) for k, v in edge_gaps.items()},
        height_a=extent(a, 1) / h,
        height_b=extent(b, 1) / h,
        width_a=extent(a, 0) / w,
        width_b=extent(b, 0) / w,
        thorax_width=thorax / w,
        cardiac_gap=cardiac_gap,
        midline_crossing=crossing,
        profile=prof,
    )


def _geometry_failures(geo: LungGeometry, limits: QualityLimits) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    # The top edge: a lung apex there is either a mask leaking to the edge (the bundled NEMA film)
    # or a film whose field cuts the apices (lung fields not fully included, a technically
    # inadequate PA film: 7 of the 358 training masks); both are flagged. The bottom edge: the
    # costophrenic recesses of tightly cropped films often touch it (21 OpenIST training masks),
    # so only one lung reaching it while the other stops well short is a leak. Any side: a mask
    # running along a long stretch of it.
    border: list[str] = []
    top = geo.edge_gaps["top"]
    if limits.flag_top_edge and min(top) <= limits.max_border_gap:
        which = "both lungs reach" if max(top) <= limits.max_border_gap else "a lung reaches"
        border.append(
            f"{which} the top image border: the mask leaks to the edge or the apices are cut off "
            f"(lung fields not fully included)"
        )
    for side, (ga, gb) in geo.edge_gaps.items():
        if side == "top" and limits.flag_top_edge:
            continue
        if min(ga, gb) <= limits.max_border_gap and abs(ga - gb) > limits.max_edge_offset:
            border.append(
                f"one lung reaches the {side} image border while the other stops "
                f"{abs(ga - gb):.1%} of the image height short of it (limit "
                f"{limits.max_edge_offset:.1%})"
            )
    for side, frac in geo.border_contact.items():
        if frac > limits.max_border_contact:
            border.append(
                f"the mask runs along {frac:.0%} of the {side} image border (limit "
                f"{limits.max_border_contact:.0%})"
            )
    if border:
        out.append(("touches_border", "; ".join(border)))
    for dim, (a, b), (lo, hi) in (
        ("height", (geo.height_a, geo.height_b), limits.lung_height),
        ("width", (geo.width_a, geo.width_b), limits.lung_width),
    ):
        if not (lo <= a <= hi and lo <= b <= hi):
            out.append(
                (
                    f"lung_{dim}",
                    f"lung {dim}s {a:.0%}/{b:.0%} of the image {dim} are outside {lo:.0%}-{hi:.0%}",
                )
            )
    if geo.height_ratio < limits.min_height_ratio or geo.width_ratio < limits.min_width_ratio:
        out.append(
            (
                "lung_proportions",
                f"the lungs' height ratio {geo.height_ratio:.2f} (limit "
                f"{limits.min_height_ratio:.2f}) or width ratio {geo.width_ratio:.2f} (limit "
                f"{limits.min_width_ratio:.2f}) is implausible",
            )
        )
    apex_offset = abs(geo.edge_gaps["top"][0] - geo.edge_gaps["top"][1])
    if apex_offset > limits.max_apex_offset:
        out.append(
            (
                "apex_level",
                f"the lungs' apices lie {apex_offset:.0%} of the image height apart (limit "
                f"{limits.max_apex_offset:.0%}): one region is not a lung",
            )
        )
    if geo.cardiac_gap < limits.min_cardiac_gap:
        out.append(
            (
                "cardiac_gap",
                f"the gap between the lungs over the heart narrows to {geo.cardiac_gap:.0%} of "
                f"the thorax width (limit {limits.min_cardiac_gap:.0%}): a lung runs over the "
                f"cardiac silhouette",
            )
        )
    if geo.midline_crossing > limits.max_midline_crossing:
        out.append(
            (
                "crosses_midline",
                f"a lung's medial contour crosses the thoracic midline by "
                f"{geo.midline_crossing:.0%} of the thorax width (limit "
                f"{limits.max_midline_crossing:.0%})",
            )
        )
    return out


def assess(mask: np.ndarray, limits: QualityLimits = DEFAULT_LIMITS) -> MaskQuality:
    """Plausibility of a cleaned mask (see :class:`QualityLimits` and the module docstring)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = sorted((int(a) for a in stats[1:, cv2.CC_STAT_AREA]), reverse=True)
    solidity = [_solidity(labels == i) for i in range(1, n)]
    area_fraction = float(sum(areas)) / float(mask.size)
    balance = (areas[1] / areas[0]) if len(areas) >= 2 and areas[0] > 0 else 0.0
    failures: list[tuple[str, str]] = []
    if len(areas) != 2:
        failures.append(("components", f"{len(areas)} lung regions found, expected 2"))
    if not limits.min_area_fraction <= area_fraction <= limits.max_area_fraction:
        failures.append(
            (
                "area",
                f"lung area {area_fraction:.1%} of the image is outside "
                f"{limits.min_area_fraction:.0%}-{limits.max_area_fraction:.0%}",
            )
        )
    if len(areas) >= 2 and balance < limits.min_balance:
        failures.append(
            ("balance", f"left/right balance {balance:.2f} below {limits.min_balance:.2f}")
        )
    if solidity and min(solidity) < limits.min_solidity:
        failures.append(
            (
                "solidity",
                f"lung region solidity {min(solidity):.2f} below {limits.min_solidity:.2f} "
                f"(ragged mask)",
            )
        )
    geo = lung_geometry(mask) if len(areas) >= 2 else None
    if geo is not None:
        failures += _geometry_failures(geo, limits)
    return MaskQuality(
        area_fraction=round(area_fraction, 4),
        components=len(areas),
        left_right_balance=round(float(balance), 4),
        ok=not failures,
        reason="; ".join(f"{rule}: {text}" for rule, text in failures),
        rule=failures[0][0] if failures else "",
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
