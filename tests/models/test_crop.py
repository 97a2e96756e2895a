"""Post-processing and crop arithmetic of models/crop.py on synthetic masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.api import CropBox
from models.crop import (
    QualityLimits,
    assess,
    bounding_box,
    fill_holes,
    keep_largest_components,
    mask_and_crop,
    postprocess,
    to_original,
)


def two_lungs(size: int = 256, *, right_scale: float = 1.0) -> np.ndarray:
    """A probability map with two lung-shaped ellipses (left of image = patient's right lung)."""
    m = np.zeros((size, size), np.float32)
    c = size // 2
    cv2.ellipse(m, (int(size * 0.32), c), (int(size * 0.12), int(size * 0.28)), 0, 0, 360, 0.9, -1)
    cv2.ellipse(
        m,
        (int(size * 0.68), c),
        (int(size * 0.12 * right_scale), int(size * 0.28 * right_scale)),
        0,
        0,
        360,
        0.9,
        -1,
    )
    return m


def test_keeps_two_largest_components_and_drops_specks() -> None:
    prob = two_lungs()
    prob[5:9, 5:9] = 1.0  # speck in a corner
    cv2.circle(prob, (128, 240), 6, 1.0, -1)  # small blob, third largest
    mask = postprocess(prob, 0.5)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    assert n - 1 == 2
    assert mask[7, 7] == 0 and mask[240, 128] == 0
    assert mask[128, 82] == 1 and mask[128, 174] == 1


def test_keep_largest_components_orders_by_area() -> None:
    m = np.zeros((50, 50), np.uint8)
    m[0:10, 0:10] = 1  # 100
    m[20:25, 20:25] = 1  # 25
    m[40:48, 40:48] = 1  # 64
    out = keep_largest_components(m, 2)
    assert out[5, 5] == 1 and out[44, 44] == 1 and out[22, 22] == 0
    assert keep_largest_components(np.zeros((5, 5), np.uint8)).sum() == 0


def test_fills_holes() -> None:
    prob = two_lungs()
    cv2.circle(prob, (82, 128), 12, 0.0, -1)  # a "nodule" hole inside the right lung
    assert prob[128, 82] == 0
    mask = postprocess(prob, 0.5)
    assert mask[128, 82] == 1
    ring = np.zeros((30, 30), np.uint8)
    cv2.circle(ring, (15, 15), 10, 1, 3)
    assert fill_holes(ring)[15, 15] == 1


def test_smoothing_removes_thin_bridge_noise() -> None:
    prob = two_lungs()
    prob[60:62, 82:174] = 1.0  # 2-pixel bridge that would merge the lungs
    mask = postprocess(prob, 0.5)
    n, _, _, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    assert n - 1 == 2


def test_bounding_box_margin_and_clipping() -> None:
    m = np.zeros((100, 200), np.uint8)
    m[20:60, 50:150] = 1  # box h=40, w=100
    assert bounding_box(m, 0.0) == CropBox(50, 20, 150, 60)
    assert bounding_box(m, 0.1) == CropBox(40, 16, 160, 64)
    assert bounding_box(m, 0.5) == CropBox(0, 0, 200, 80)  # x clipped at both sides, y at the top
    assert bounding_box(np.zeros((10, 20), np.uint8), 0.1) == CropBox(0, 0, 20, 10)
    with pytest.raises(ValueError, match="margin"):
        bounding_box(m, -0.1)


def test_maps_back_to_original_resolution() -> None:
    prob = two_lungs(256)
    res = mask_and_crop(prob, (1024, 768), margin=0.0)
    assert res.mask.shape == (1024, 768) and res.mask.dtype == np.uint8
    assert res.quality.ok, res.quality.reason
    # the ellipse spans x 0.20..0.80 and y 0.22..0.78 of the map; same fractions at full size
    c = res.crop
    assert abs(c.x0 / 768 - 0.20) < 0.01 and abs(c.x1 / 768 - 0.80) < 0.01
    assert abs(c.y0 / 1024 - 0.22) < 0.01 and abs(c.y1 / 1024 - 0.78) < 0.01
    assert to_original(np.ones((4, 4), np.uint8), (9, 7)).shape == (9, 7)


def test_margin_grows_crop_in_original_pixels() -> None:
    prob = two_lungs(256)
    tight = mask_and_crop(prob, (512, 512), margin=0.0).crop
    wide = mask_and_crop(prob, (512, 512), margin=0.1).crop
    w, h = tight.x1 - tight.x0, tight.y1 - tight.y0
    assert wide.x0 == tight.x0 - round(w * 0.1) and wide.y1 == tight.y1 + round(h * 0.1)


def test_quality_ok_for_plausible_mask() -> None:
    q = assess(postprocess(two_lungs()))
    assert q.ok and q.components == 2 and q.reason == ""
    assert 0.9 < q.left_right_balance <= 1.0
    assert 0.08 < q.area_fraction < 0.65


@pytest.mark.parametrize(
    ("prob", "reason"),
    [
        (np.zeros((256, 256), np.float32), "0 lung regions"),
        (two_lungs(right_scale=0.45), "balance"),
        (np.ones((256, 256), np.float32), "1 lung regions"),
    ],
)
def test_implausible_mask_falls_back_to_full_image(prob: np.ndarray, reason: str) -> None:
    res = mask_and_crop(prob, (300, 400), margin=0.05)
    assert not res.quality.ok
    assert reason in res.quality.reason
    assert res.crop == CropBox(0, 0, 400, 300)
    assert res.mask.shape == (300, 400)


def test_ragged_mask_is_rejected_by_solidity() -> None:
    prob = two_lungs(256)
    for y in range(50, 210, 18):  # comb-like bites out of the left lung's outer edge
        prob[y : y + 12, 40:100] = 0.0
    res = mask_and_crop(prob, (256, 256))
    assert not res.quality.ok and "solidity" in res.quality.reason
    assert res.crop == CropBox(0, 0, 256, 256)
    assert "solidity" not in assess(postprocess(two_lungs(256))).reason


def test_area_fraction_limit() -> None:
    prob = two_lungs(256)
    q = assess(postprocess(prob), QualityLimits(max_area_fraction=0.1))
    assert not q.ok and "lung area" in q.reason


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        postprocess(np.zeros((2, 3, 4), np.float32))
