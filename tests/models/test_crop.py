"""Post-processing and crop arithmetic of models/crop.py on synthetic masks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.api import CropBox
from models.crop import (
    DEFAULT_LIMITS,
    QualityLimits,
    assess,
    bounding_box,
    fill_holes,
    keep_largest_components,
    lung_geometry,
    mask_and_crop,
    postprocess,
    to_original,
)

DATA = Path(__file__).resolve().parents[1] / "data"


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


def lungs_mask(
    a: tuple[float, float, float, float] = (0.30, 0.50, 0.13, 0.30),
    b: tuple[float, float, float, float] = (0.70, 0.50, 0.13, 0.30),
    size: int = 256,
) -> np.ndarray:
    """A 0/1 mask with two elliptical lungs, each (centre x, centre y, half width, half height)
    as fractions of the side."""
    m = np.zeros((size, size), np.uint8)
    for cx, cy, rx, ry in (a, b):
        centre = (int(round(cx * size)), int(round(cy * size)))
        axes = (int(round(rx * size)), int(round(ry * size)))
        cv2.ellipse(m, centre, axes, 0, 0, 360, 1, -1)
    return m


def test_plausible_lungs_pass_every_geometric_rule() -> None:
    m = lungs_mask()
    geo = lung_geometry(m)
    assert geo is not None
    assert geo.height_a == pytest.approx(0.6, abs=0.01) and geo.width_b == pytest.approx(
        0.26, abs=0.01
    )
    # medial edges at 0.43 and 0.57 of the width, thorax 0.17..0.83: gap 0.14 / 0.66
    assert geo.cardiac_gap == pytest.approx(0.14 / 0.66, abs=0.02)
    assert geo.midline_crossing < 0
    q = assess(m)
    assert q.ok and q.rule == "" and q.reason == "", q.reason


def test_nema_film_mask_of_the_first_generator_is_flagged_touches_border() -> None:
    """The mask the 1.0.0 generator drew on the bundled NEMA film (tests/data/RG1_UNCR.dcm, at the
    network's 256 x 256): one lung leaks into the bright band at the top edge. Its QC used to read
    'acceptable'."""
    m = (cv2.imread(str(DATA / "RG1_UNCR_lungmask_v1.png"), cv2.IMREAD_GRAYSCALE) > 127).astype(
        np.uint8
    )
    q = assess(m)
    assert not q.ok
    assert q.rule == "touches_border"
    assert "top image border" in q.reason
    # what the old rules alone said
    old = QualityLimits(flag_top_edge=False, max_edge_offset=1.0, max_border_contact=1.0)
    assert assess(m, old).ok


def test_apices_cut_by_the_top_edge_are_flagged_but_cut_costophrenic_angles_are_not() -> None:
    m = lungs_mask((0.30, 0.40, 0.13, 0.42), (0.70, 0.40, 0.13, 0.42))  # both cut at the top
    geo = lung_geometry(m)
    assert geo is not None and geo.border_gap["top"] == 0.0
    q = assess(m)
    assert q.rule == "touches_border" and "both lungs reach the top image border" in q.reason
    # both costophrenic recesses cut by the bottom edge (common on tightly cropped films): fine
    m = lungs_mask((0.30, 0.60, 0.13, 0.42), (0.70, 0.60, 0.13, 0.42))
    geo = lung_geometry(m)
    assert geo is not None and geo.border_gap["bottom"] == 0.0
    assert assess(m).ok, assess(m).reason
    # one lung down to the bottom edge while the other ends 20% higher: a leak
    m = lungs_mask((0.30, 0.60, 0.13, 0.42), (0.70, 0.45, 0.13, 0.35))
    q = assess(m)
    assert "one lung reaches the bottom image border" in q.reason, q.reason


def test_one_lung_leaking_to_the_top_edge_is_flagged() -> None:
    m = lungs_mask()
    m[0:60, 175:185] = 1  # a tongue from the right-hand lung up to the top edge
    q = assess(m)
    assert q.rule == "touches_border" and "top image border" in q.reason
    res = mask_and_crop(m.astype(np.float32), (512, 512))
    assert not res.quality.ok and res.crop == CropBox(0, 0, 512, 512)


def test_mask_running_along_a_side_is_flagged() -> None:
    m = lungs_mask((0.15, 0.5, 0.15, 0.40), (0.70, 0.5, 0.13, 0.30))
    m[20:236, 0:5] = 1
    q = assess(m)
    assert "touches_border" in q.reason and "left image border" in q.reason


def test_medial_borders_meeting_over_the_heart_are_flagged() -> None:
    # the lungs' lower medial parts sweep inwards and almost meet (2% of the width apart)
    m = lungs_mask()
    cv2.ellipse(m, (105, 170), (20, 30), 0, 0, 360, 1, -1)
    cv2.ellipse(m, (150, 170), (20, 30), 0, 0, 360, 1, -1)
    geo = lung_geometry(m)
    assert geo is not None and geo.cardiac_gap < DEFAULT_LIMITS.min_cardiac_gap
    q = assess(m)
    assert not q.ok and "cardiac_gap" in q.reason, q.reason


def test_lung_crossing_the_midline_is_flagged() -> None:
    m = lungs_mask((0.38, 0.45, 0.22, 0.30), (0.78, 0.55, 0.10, 0.30))
    geo = lung_geometry(m)
    assert geo is not None and geo.midline_crossing > DEFAULT_LIMITS.max_midline_crossing
    q = assess(m)
    assert not q.ok and "crosses_midline" in q.reason, q.reason


@pytest.mark.parametrize(
    ("a", "b", "rule"),
    [
        ((0.30, 0.5, 0.13, 0.15), (0.70, 0.5, 0.13, 0.15), "lung_height"),  # 30% tall
        ((0.30, 0.5, 0.06, 0.30), (0.70, 0.5, 0.06, 0.30), "lung_width"),  # 12% wide
        ((0.30, 0.5, 0.13, 0.36), (0.70, 0.4, 0.13, 0.19), "lung_proportions"),  # half as tall
    ],
)
def test_implausible_lung_height_or_width_is_flagged(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float], rule: str
) -> None:
    q = assess(lungs_mask(a, b))
    assert not q.ok
    assert rule in q.reason, q.reason
    assert q.rule in {"area", "balance", rule}  # an older rule may name the same failure first


def test_rule_names_the_first_failure_and_reason_lists_all() -> None:
    q = assess(np.zeros((64, 64), np.uint8))
    assert q.rule == "components" and q.reason.startswith("components: 0 lung regions")
    assert "area:" in q.reason


def test_lungs_whose_apices_lie_far_apart_are_flagged() -> None:
    # a "lung" found on the arm beside the chest: it starts a quarter of the image lower
    m = lungs_mask((0.20, 0.70, 0.10, 0.22), (0.70, 0.50, 0.13, 0.36))
    q = assess(m)
    assert not q.ok and "apex_level" in q.reason, q.reason
    assert "apex_level" not in assess(lungs_mask()).reason
