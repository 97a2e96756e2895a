"""Cardiothoracic ratio (CTR) measured on the lung mask of a frontal radiograph.

On the rows where both lungs are present (:func:`models.crop.row_profile`):

- **cardiac span**: the widest gap between the two lungs' medial borders on one row of the heart
  rows (:data:`models.crop.HEART_ROWS`, the lower part of those rows, where the heart lies
  between the lungs; the upper mediastinum is excluded), leaving out rows where a lung has
  tapered into its costophrenic recess (narrower than :data:`MIN_LUNG_WIDTH` of its widest row);
- **thoracic span**: the widest distance between the lungs' outer borders (the inner margins of
  the ribs) over all shared rows;
- ``ratio = cardiac / thoracic``.

Measured by ``cxr-worker evaluate ctr`` this ratio barely separates Cardiomegaly (NIH PA AUROC
about 0.54). Variants were tried on a development half of the NIH PA films (by a hash of the
patient id): Danzer's MR + ML from the midline and a looser taper limit (0.15 or none) rank
better there (AUROC 0.65-0.67) but measure the costophrenic recesses instead of the heart, giving
ratios around 0.76 on films without cardiomegaly (0.5 is the customary PA limit). A measurement
shown to a reader with coordinates must mean what it says, so the anatomically plausible
definition above is kept and its weak discrimination is reported rather than hidden.

Both segments are horizontal, in the frontal image's pixel coordinates (continuous: pixel
``(row r, column c)`` covers ``[c, c + 1) x [r, r + 1)``; a segment runs along its row's centre
line ``y = r + 0.5``).

Heart borders are not segmented: the lungs' medial borders stand in for them, so the span
includes any mediastinal fat or vessels beside the heart (as readers of a mask-based CTR expect).
The ratio is read only on PA films with a mask that passed its quality checks; otherwise it is
still measured (when two lungs exist) but ``interpretable`` is False with the reason. AP films
magnify the heart (the source is close and the heart far from the detector), so a PA threshold
such as 0.5 does not apply. NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

import numpy as np

from models.api import CardiothoracicRatio, LineSegment, LungMaskResult
from models.crop import HEART_ROWS, row_profile, two_lungs

#: the customary PA threshold for an enlarged heart (reported alongside, not used by the models)
PA_THRESHOLD = 0.5
#: a heart row needs both lungs at least this fraction of their widest row's width
MIN_LUNG_WIDTH = 0.5


def spans(mask: np.ndarray) -> tuple[LineSegment, LineSegment] | None:
    """(cardiac, thoracic) segments of a 0/1 lung mask at any resolution, or None when it has
    fewer than two lungs or no heart rows between them."""
    lungs = two_lungs(mask)
    if lungs is None:
        return None
    prof = row_profile(*lungs)
    if prof.shape[0] < 4:
        return None
    lo, hi = (int(round(f * (prof.shape[0] - 1))) for f in HEART_ROWS)
    heart = prof[lo : hi + 1]
    # drop rows where a lung has tapered into its costophrenic recess (narrower than
    # MIN_LUNG_WIDTH of its widest row): its medial edge retreats laterally there
    wa, wb = prof[:, 2] - prof[:, 1] + 1, prof[:, 4] - prof[:, 3] + 1
    keep = (heart[:, 2] - heart[:, 1] + 1 >= MIN_LUNG_WIDTH * wa.max()) & (
        heart[:, 4] - heart[:, 3] + 1 >= MIN_LUNG_WIDTH * wb.max()
    )
    heart = heart[keep]
    if heart.shape[0] == 0:
        return None
    gaps = heart[:, 3] - heart[:, 2] - 1  # background pixels between the medial borders
    i = int(np.argmax(gaps))
    widths = prof[:, 4] - prof[:, 1] + 1
    j = int(np.argmax(widths))
    if gaps[i] <= 0 or widths[j] <= 0:
        return None
    r = float(heart[i, 0]) + 0.5
    cardiac = LineSegment(x0=float(heart[i, 2] + 1), y0=r, x1=float(heart[i, 3]), y1=r)
    t = float(prof[j, 0]) + 0.5
    thoracic = LineSegment(x0=float(prof[j, 1]), y0=t, x1=float(prof[j, 4] + 1), y1=t)
    return cardiac, thoracic


def measure(lung_mask: LungMaskResult, projection: str | None) -> CardiothoracicRatio | None:
    """The CTR of a frontal film from its lung mask (original resolution), or None when the mask
    has no two lungs to measure between. ``projection`` is the frontal's ``"PA"``/``"AP"`` (None:
    unknown, read as PA, the department's standard erect chest film)."""
    found = spans(lung_mask.mask)
    if found is None:
        return None
    cardiac, thoracic = found
    ratio = round(cardiac.length / thoracic.length, 4)
    reasons: list[str] = []
    proj = (projection or "").upper()
    if proj == "AP":
        reasons.append("AP projection magnifies the heart: the ratio is only read on PA films")
    elif proj not in ("", "PA"):
        reasons.append(f"projection {proj} is not a PA frontal")
    if not lung_mask.quality.ok:
        rule = lung_mask.quality.rule or "quality"
        reasons.append(f"the lung mask failed its quality check ({rule})")
    return CardiothoracicRatio(
        ratio=ratio,
        cardiac=cardiac,
        thoracic=thoracic,
        interpretable=not reasons,
        reason="; ".join(reasons),
    )
