"""A Secondary Capture "key image" that tells the same story as the Structured Report.

For viewers that do not render Structured Reports. :func:`build_key_image` draws, from the same
records the report is built from (:mod:`worker.results` fills both), three parts:

- the **windowed frontal image** with the lung outline (green), the lung crop box (thin yellow),
  the cardiothoracic-ratio lines when interpretable (cyan: cardiac, magenta: thoracic) and, for
  each **Present** finding, the box the report marks it on, numbered and in its own colour. No
  colour wash covers the anatomy;
- a **text panel**: "NOT FOR DIAGNOSTIC USE", Model 1's decision with probability and threshold,
  **every** Present Model 2 finding with probability and threshold (numbered as on the image),
  the Absent ones summarised, the cardiothoracic ratio (or why it is not reported) and the lung
  mask's QC state with the check it failed;
- a **small-multiples strip**: one thumbnail per Present finding with a heat map, each showing
  that finding's heat map alone, so maps never stack.

Everything is drawn at display size in uint8: the radiograph is downscaled first (area average)
and each heat map (:class:`HeatmapInfo`, uint8 at the model's resolution) is upsampled straight to
its thumbnail, so no full-resolution float copy of the image or of a map is ever made.

It returns the RGB picture, its PNG bytes and an SC Image dataset in the same patient and study as
the frontal image, in a series of its own, with Burned In Annotation YES and a deterministic SOP
Instance UID (that of its report when given). Its Image Comments repeat the panel's findings as
text (:func:`listed_present` reads them back), so a test or a person can check that the key
image and the report say the same. No patient identifier is drawn into the pixels.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node import derived
from dicom_node.derived import (
    AlgorithmInfo,
    CropInfo,
    CtrInfo,
    DeviceInfo,
    FindingResult,
    MaskQualityInfo,
)

log = logging.getLogger(__name__)

BANNER = "NOT FOR DIAGNOSTIC USE"
DEFAULT_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "CXR AI key image - NOT FOR DIAGNOSTIC USE"
HEATMAP_FLOOR = 0.4  # a thumbnail colours its heat map only above this
HEATMAP_ALPHA = 0.5  # the colour's weight where the map is at its maximum
#: the colour's weight in 1/256 for each uint8 map value: 0 up to the floor, then linear
_ALPHA_LUT = np.round(
    np.clip((np.arange(256) / 255 - HEATMAP_FLOOR) / (1 - HEATMAP_FLOOR), 0, 1)
    * HEATMAP_ALPHA
    * 256
).astype(np.uint16)
# BGR colours (OpenCV order)
_LUNG = (0, 200, 0)
_CROP = (0, 220, 255)
_CARDIAC = (255, 255, 0)
_THORACIC = (255, 0, 255)
_WHITE, _GREY, _RED, _ORANGE, _GREEN = (
    (255, 255, 255),
    (170, 170, 170),
    (40, 40, 255),
    (0, 165, 255),
    (80, 220, 80),
)
#: one colour per Present finding, in report order (distinct from the outline colours)
PALETTE = [
    (40, 40, 255),
    (255, 140, 40),
    (60, 200, 255),
    (200, 90, 255),
    (80, 255, 160),
    (255, 90, 160),
    (0, 128, 255),
    (180, 255, 60),
    (255, 200, 120),
    (120, 120, 255),
]
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class HeatmapInfo:
    """A finding's heat map as the model made it: ``values`` uint8 (rows, cols) at the model's
    resolution, 0 cold to 255 the map's maximum, stretched over ``box`` of the frontal image
    (zero outside it); ``box`` None: over the whole image."""

    values: np.ndarray
    box: CropInfo | None = None

    def __post_init__(self) -> None:
        v = self.values
        if not isinstance(v, np.ndarray) or v.dtype != np.uint8 or v.ndim != 2 or 0 in v.shape:
            got = f"{v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
            raise TypeError(f"HeatmapInfo.values must be a non-empty 2-D uint8 array, got {got}")
        if self.box is not None:
            if not isinstance(self.box, CropInfo):
                raise TypeError(
                    f"HeatmapInfo.box must be a CropInfo or None, got {type(self.box).__name__}"
                )
            if self.box.x1 <= self.box.x0 or self.box.y1 <= self.box.y0:
                raise ValueError(f"HeatmapInfo.box {self.box} is empty")

    def placed(self, rows: int, cols: int) -> CropInfo:
        """The box it covers in an image of ``rows`` x ``cols``."""
        return self.box if self.box is not None else CropInfo(0, 0, cols, rows)

    def hot_region(self, shape: tuple[int, int]) -> CropInfo | None:
        """:func:`dicom_node.derived.hot_region` of this map, in pixels of the frontal image of
        ``shape`` (rows, columns): found at the model's resolution, then placed by the box."""
        rows, cols = shape
        b = self.placed(rows, cols)
        r = derived.hot_region(self.values, (b.y1 - b.y0, b.x1 - b.x0))
        if r is None:
            return None
        x0, y0 = min(b.x0 + r.x0, cols - 1), min(b.y0 + r.y0, rows - 1)
        return CropInfo(
            x0, y0, max(x0 + 1, min(cols, b.x0 + r.x1)), max(y0 + 1, min(rows, b.y0 + r.y1))
        )


@dataclass
class KeyImageInput:
    """What the key image shows. ``image`` is :attr:`dicom_node.pixels.DecodedImage.pixels`.

    ``findings`` are Model 2's results with their thresholds, ``regions`` the boxes the report
    marks Present findings on (a Present finding without one is numbered on the lung crop box).
    The SOP Instance UID derives from ``report_uid`` when given (the key image belongs to that
    report), else from the frontal image and ``algorithms``.
    """

    frontal: Dataset  # the source frontal image (header suffices)
    image: np.ndarray  # float (rows, cols) in [0, 1] or uint8, 0 = black; full resolution
    model1: FindingResult | None
    findings: Sequence[FindingResult]
    algorithms: list[AlgorithmInfo] = field(default_factory=list)
    report_uid: str | None = None
    lung_mask: np.ndarray | None = None  # 0/1 at the image's resolution
    crop: CropInfo | None = None
    heatmaps: Mapping[str, HeatmapInfo] = field(default_factory=dict)  # Present findings
    regions: Mapping[str, CropInfo] = field(default_factory=dict)  # label -> box, frontal pixels
    mask_quality: MaskQualityInfo | None = None
    ctr: CtrInfo | None = None
    device: DeviceInfo = field(default_factory=DeviceInfo)
    max_side: int = 1024  # the picture is downscaled so its longer side is at most this
    series_number: int = DEFAULT_SERIES_NUMBER
    instance_number: int = 1
    content_datetime: _dt.datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.frontal, Dataset):
            raise TypeError(
                "KeyImageInput.frontal must be a pydicom Dataset, "
                f"got {type(self.frontal).__name__}"
            )
        if self.model1 is not None and not isinstance(self.model1, FindingResult):
            raise TypeError(
                f"KeyImageInput.model1 must be a FindingResult or None, "
                f"got {type(self.model1).__name__}"
            )
        for i, f in enumerate(self.findings):
            if not isinstance(f, FindingResult):
                raise TypeError(
                    f"KeyImageInput.findings[{i}] must be a FindingResult, got {type(f).__name__}"
                )
        for label, heat in self.heatmaps.items():
            if not isinstance(heat, HeatmapInfo):
                raise TypeError(
                    f"KeyImageInput.heatmaps[{label!r}] must be a HeatmapInfo (uint8 map and its "
                    f"box), got {type(heat).__name__}"
                )
        for name, kind in (("mask_quality", MaskQualityInfo), ("ctr", CtrInfo)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"KeyImageInput.{name} must be a {kind.__name__} or None, "
                    f"got {type(value).__name__}"
                )
        derived.require_int(self.max_side, "KeyImageInput.max_side", minimum=1)
        derived.require_int(self.series_number, "KeyImageInput.series_number", minimum=1)
        derived.require_int(self.instance_number, "KeyImageInput.instance_number", minimum=1)

    @property
    def present(self) -> list[FindingResult]:
        """The Present Model 2 findings, in report order: every one is listed and numbered."""
        return [f for f in self.findings if f.present]


@dataclass(frozen=True)
class KeyImage:
    dataset: Dataset  # Secondary Capture Image Storage, RGB, 8 bit
    rgb: np.ndarray  # uint8 (rows, cols, 3)
    listed: list[FindingResult]  # the Present findings the panel lists, numbered 1..n
    shown: list[str]  # labels whose heat maps the strip shows

    @cached_property
    def png(self) -> bytes:
        """The picture as PNG, encoded on first use (once): a caller that writes no PNG copy
        pays nothing for it."""
        return encode_png(self.rgb)


def key_image_uid(
    frontal: Dataset, algorithms: Sequence[AlgorithmInfo], report: str | None = None
) -> str:
    """The key image's SOP Instance UID: a function of its report's UID (or sources and models)."""
    if report:
        return derived.deterministic_uid("cxr-key-image-v1", "report", report)
    if not algorithms:
        raise ValueError(
            "key image: give report_uid or the algorithms, so its UID is deterministic"
        )
    return derived.deterministic_uid("cxr-key-image-v1", derived.report_uid([frontal], algorithms))


# --- drawing ------------------------------------------------------------------------------------


def _text(
    img: np.ndarray,
    text: str,
    org: tuple[int, int],
    scale: float,
    color: tuple[int, int, int],
    *,
    outline: bool = True,
) -> None:
    """``text`` at ``org``; ``outline`` (for text over the image) adds a black halo."""
    thickness = max(1, int(round(scale * 1.6)))
    if outline:
        cv2.putText(img, text, org, _FONT, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, _FONT, scale, color, thickness, cv2.LINE_AA)


def _wrap(text: str, width: int, scale: float) -> list[str]:
    """``text`` in lines that fit ``width`` pixels at font ``scale`` (continuations indented)."""
    thickness = max(1, int(round(scale * 1.6)))
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if line and cv2.getTextSize(trial, _FONT, scale, thickness)[0][0] > width:
            lines.append(line)
            line = "    " + word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def _color(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _display_grey(image: np.ndarray, w: int, h: int) -> np.ndarray:
    """The radiograph as uint8 grey at ``w`` x ``h``: downscaled first (area average), then
    quantised, so the full-resolution image is read once and never copied."""
    if image.dtype not in (np.uint8, np.float32, np.float64):
        image = image.astype(np.float32)
    if image.shape != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    if image.dtype != np.uint8:
        image = np.asarray(cv2.convertScaleAbs(np.clip(image, 0.0, 1.0), alpha=255.0))
    return image


def _main(inp: KeyImageInput, grey: np.ndarray, scale: float) -> np.ndarray:
    h, w = grey.shape
    canvas = np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    line = max(2, w // 400)
    if inp.lung_mask is not None:
        mask = np.asarray(inp.lung_mask)
        if mask.dtype != np.uint8:  # 0/1 uint8 by contract; anything else costs a copy
            mask = (mask > 0).astype(np.uint8)
        # nearest-neighbour first, at display size; findContours reads any non-zero as inside
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, _LUNG, line)
    lung = inp.crop
    if lung is not None:
        cv2.rectangle(
            canvas,
            (int(lung.x0 * scale), int(lung.y0 * scale)),
            (int(max(lung.x1 - 1, lung.x0) * scale), int(max(lung.y1 - 1, lung.y0) * scale)),
            _CROP,
            max(1, line // 2),
        )
    if inp.ctr is not None and inp.ctr.shown:
        for seg, color in ((inp.ctr.thoracic, _THORACIC), (inp.ctr.cardiac, _CARDIAC)):
            p0 = (int(seg.x0 * scale), int(seg.y0 * scale))
            p1 = (int(seg.x1 * scale), int(seg.y1 * scale))
            cv2.line(canvas, p0, p1, color, line, cv2.LINE_AA)
            for p in (p0, p1):
                cv2.line(canvas, (p[0], p[1] - 3 * line), (p[0], p[1] + 3 * line), color, line)
        c = inp.ctr.cardiac
        _text(
            canvas,
            f"CTR {inp.ctr.ratio:.2f}",
            (int(min(c.x0, c.x1) * scale), int(c.y0 * scale) - 4 * line),
            max(0.5, w / 1800),
            _CARDIAC,
        )
    tags_at: dict[CropInfo, int] = {}
    for i, f in enumerate(inp.present):
        box = _region(inp, f.label)
        if box is None:
            continue
        color = _color(i)
        inset = 2 * i  # findings sharing a box stay distinguishable
        p0 = (int(box.x0 * scale) + inset, int(box.y0 * scale) + inset)
        p1 = (
            int(max(box.x1 - 1, box.x0) * scale) - inset,
            int(max(box.y1 - 1, box.y0) * scale) - inset,
        )
        cv2.rectangle(canvas, p0, p1, color, max(1, line - 1))
        tag = str(i + 1)
        fs = max(0.55, w / 1500)
        (tw, th), _ = cv2.getTextSize(tag, _FONT, fs, 2)
        shift = tags_at.get(box, 0)  # tags of findings sharing a box sit side by side
        tags_at[box] = shift + 1
        x = min(max(p0[0] + shift * (tw + 10), 0), w - tw - 6)
        y = min(max(p0[1], th + 6), h - 4)
        cv2.rectangle(canvas, (x, y - th - 6), (x + tw + 6, y), color, -1)
        cv2.putText(canvas, tag, (x + 3, y - 3), _FONT, fs, (0, 0, 0), 2, cv2.LINE_AA)
    return canvas


def _region(inp: KeyImageInput, label: str) -> CropInfo | None:
    """Where a Present finding is numbered: the report's box for it, else the box around its
    heat map's hot area (the same rule the worker uses for the report), else the lung box."""
    box = inp.regions.get(label)
    if box is None and label in inp.heatmaps:
        rows, cols = np.asarray(inp.image).shape[:2]
        box = inp.heatmaps[label].hot_region((int(rows), int(cols)))
    return box or inp.crop


def _panel_lines(inp: KeyImageInput) -> list[tuple[str, tuple[int, int, int]]]:
    rows: list[tuple[str, tuple[int, int, int]]] = [(BANNER, _RED)]
    if inp.model1 is not None:
        m1 = inp.model1
        verdict = "ABNORMAL" if m1.present else "no abnormality detected"
        rows.append(
            (
                f"Model 1: {verdict}  p={m1.probability:.2f} (threshold {m1.threshold:.2f})",
                _ORANGE if m1.present else _GREEN,
            )
        )
    present = inp.present
    rows.append(
        (
            f"Model 2: {len(present)} of {len(inp.findings)} findings Present (p >= threshold)",
            _WHITE,
        )
    )
    for i, f in enumerate(present):
        rows.append((f"{i + 1}  {f.label}  p={f.probability:.2f} ({f.threshold_text})", _color(i)))
    absent = [f for f in inp.findings if not f.present]
    if absent:
        rows.append((f"Absent: {', '.join(f.label for f in absent)}", _GREY))
    if inp.ctr is not None:
        if inp.ctr.shown:
            rows.append(
                (
                    f"Cardiothoracic ratio {inp.ctr.ratio:.2f} (cyan: cardiac, magenta: thoracic)",
                    _CARDIAC,
                )
            )
        else:
            why = inp.ctr.reason or "not interpretable on this image"
            rows.append((f"Cardiothoracic ratio not reported: {why}", _GREY))
    if inp.mask_quality is not None:
        q = inp.mask_quality
        rows.append(
            (
                f"Lung mask QC: {q.state}" + ("" if q.ok else "; full image analysed"),
                _GREEN if q.ok else _ORANGE,
            )
        )
    rows.append(
        ("green: lung outline   yellow: lung crop box   numbered boxes: Present findings", _GREY)
    )
    return rows


def _panel(inp: KeyImageInput, width: int, height: int) -> np.ndarray:
    scale = max(0.5, min(0.75, width / 900))
    step = int(34 * scale) + 6
    lines: list[tuple[str, tuple[int, int, int]]] = []
    for text, color in _panel_lines(inp):
        lines += [(part, color) for part in _wrap(text, width - 24, scale)]
    height = max(height, step * (len(lines) + 1))
    panel = np.full((height, width, 3), 24, np.uint8)
    for i, (text, color) in enumerate(lines):
        size = scale * (1.2 if i == 0 else 1.0)
        _text(panel, text, (12, step * (i + 1)), size, color, outline=False)
    return panel


def _thumb_heat(heat: HeatmapInfo, shape: tuple[int, int], tw: int, th: int) -> np.ndarray:
    """``heat`` in a ``tw`` x ``th`` thumbnail of the frontal image of ``shape``: uint8, resized
    from the model's resolution straight to its box's size there, zero outside the box."""
    rows, cols = shape
    b = heat.placed(rows, cols)
    sx, sy = tw / cols, th / rows
    x0, y0 = min(tw - 1, max(0, int(b.x0 * sx))), min(th - 1, max(0, int(b.y0 * sy)))
    x1 = min(tw, max(x0 + 1, int(round(b.x1 * sx))))
    y1 = min(th, max(y0 + 1, int(round(b.y1 * sy))))
    src = heat.values
    shrink = (x1 - x0) < src.shape[1] and (y1 - y0) < src.shape[0]
    out = np.zeros((th, tw), np.uint8)
    out[y0:y1, x0:x1] = cv2.resize(
        src, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )
    return out


def _heat_thumb(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``heat`` (uint8) in colour over ``base`` (BGR uint8): the colour's weight rises from 0 at
    :data:`HEATMAP_FLOOR` to :data:`HEATMAP_ALPHA` at the maximum; integer arithmetic only."""
    colored = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
    alpha: np.ndarray = _ALPHA_LUT[heat][..., None]
    mixed = base.astype(np.uint16) * (256 - alpha) + colored.astype(np.uint16) * alpha
    out: np.ndarray = (mixed >> 8).astype(np.uint8)
    return out


def _strip(inp: KeyImageInput, grey: np.ndarray, width: int) -> tuple[np.ndarray | None, list[str]]:
    """One thumbnail per Present finding with a heat map, that map alone over the image
    (``grey``: the radiograph at display size)."""
    items = [(i, f) for i, f in enumerate(inp.present) if f.label in inp.heatmaps]
    if not items:
        return None, []
    h0, w0 = np.asarray(inp.image).shape[:2]
    per_row = max(1, min(len(items), width // 220))
    tw = min(width // per_row, 320)
    th = max(1, int(round(tw * h0 / w0)))
    label_h = 30
    rows = (len(items) + per_row - 1) // per_row
    strip = np.full((rows * (th + label_h), width, 3), 24, np.uint8)
    base = cv2.cvtColor(
        cv2.resize(grey, (tw, th), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR
    )
    for k, (i, f) in enumerate(items):
        heat = _thumb_heat(inp.heatmaps[f.label], (int(h0), int(w0)), tw, th)
        thumb = _heat_thumb(base, heat)
        r, c = divmod(k, per_row)
        y, x = r * (th + label_h), c * tw
        strip[y : y + th, x : x + tw] = thumb
        cv2.rectangle(strip, (x, y), (x + tw - 1, y + th - 1), _color(i), 2)
        _text(strip, f"{i + 1} {f.label}"[:30], (x + 4, y + th + 21), 0.5, _color(i), outline=False)
    return strip, [f.label for _, f in items]


def render(inp: KeyImageInput) -> tuple[np.ndarray, list[str]]:
    """The annotated picture as RGB uint8, and the labels whose heat maps the strip shows."""
    image = np.asarray(inp.image)
    if image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"key image: expected a 2-D image, got shape {image.shape}")
    h0, w0 = image.shape
    scale = min(1.0, inp.max_side / max(h0, w0))
    w, h = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
    grey = _display_grey(image, w, h)
    main = _main(inp, grey, scale)
    panel = _panel(inp, max(560, int(w * 0.6)), h)
    if panel.shape[0] > h:  # a long list: pad the image below instead of cutting the text
        main = np.vstack([main, np.full((panel.shape[0] - h, w, 3), 24, np.uint8)])
    top = np.hstack([main, panel])
    band = np.zeros((44, top.shape[1], 3), np.uint8)
    _text(band, BANNER, (10, 32), 0.9, _RED, outline=False)
    parts = [band, top]
    strip, shown = _strip(inp, grey, top.shape[1])
    if strip is not None:
        parts.append(strip)
    return np.asarray(cv2.cvtColor(np.vstack(parts), cv2.COLOR_BGR2RGB)), shown


# --- the PNG copy ------------------------------------------------------------------------------


def _deflater() -> tuple[str, Callable[[bytes], bytes]]:
    """The deflate the PNG copy uses, at its fastest level: ISA-L's when the optional ``isal``
    package is installed (the same zlib stream, ~4x faster: ~7 ms against ~26 ms for a
    1542 x 1438 key image here), else the standard library's."""
    try:
        from isal import isal_zlib  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "zlib", lambda data: zlib.compress(data, 1)
    return "isal", lambda data: bytes(isal_zlib.compress(data, 1))


PNG_DEFLATE, _deflate = _deflater()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(rgb: np.ndarray) -> bytes:
    """``rgb`` (uint8 rows x columns x 3) as an 8-bit RGB PNG, in one deflate pass: every row
    "up"-filtered (a radiograph's neighbouring rows are alike; one numpy subtraction instead of
    libpng's per-row filter search) and deflated at the fastest level."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(
            f"encode_png: expected uint8 (rows, columns, 3), got {rgb.dtype} {rgb.shape}"
        )
    h, w = rgb.shape[:2]
    flat = np.ascontiguousarray(rgb).reshape(h, w * 3)
    rows = np.empty((h, 1 + w * 3), np.uint8)
    rows[:, 0] = 2  # PNG filter type 2, "Up": each byte minus the one above it, modulo 256
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bit, truecolour, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", _deflate(rows.tobytes()))
        + _chunk(b"IEND", b"")
    )


# --- the DICOM object ---------------------------------------------------------------------------


def comments(inp: KeyImageInput) -> str:
    """The Image Comments: the findings the picture lists, as text."""
    parts = [f"{BANNER}. Annotated copy of the frontal image."]
    if inp.model1 is not None:
        m1 = inp.model1
        parts.append(
            f"Model 1: {'ABNORMAL' if m1.present else 'no abnormality detected'} "
            f"p={m1.probability:.2f} (threshold {m1.threshold:.2f})."
        )
    present = inp.present
    parts.append(
        "Present: "
        + (
            "; ".join(f"{f.label} p={f.probability:.2f} ({f.threshold_text})" for f in present)
            if present
            else "none"
        )
        + "."
    )
    absent = [f.label for f in inp.findings if not f.present]
    if absent:
        parts.append(f"Absent: {', '.join(absent)}.")
    if inp.mask_quality is not None:
        parts.append(f"Lung mask QC: {inp.mask_quality.state}.")
    if inp.ctr is not None:
        parts.append(
            f"Cardiothoracic ratio: {inp.ctr.ratio:.2f}."
            if inp.ctr.shown
            else f"Cardiothoracic ratio not reported: {inp.ctr.reason or 'not interpretable'}."
        )
    return " ".join(parts)[:10240]


_PRESENT = re.compile(r"Present: (.*?)\.(?: [A-Z]|$)")


def listed_present(ds: Dataset) -> list[str]:
    """The labels of the Present findings a key image lists (from its Image Comments)."""
    m = _PRESENT.search(str(ds.get("ImageComments", "")))
    if m is None or m.group(1) == "none":
        return []
    return [part.split(" p=")[0] for part in m.group(1).split("; ")]


def build_key_image(inp: KeyImageInput) -> KeyImage:
    """Render and wrap the key image; raises ``ValueError`` on unusable input."""
    derived.check_same_patient_and_study([inp.frontal])
    rgb, shown = render(inp)
    header = derived.source_header(inp.frontal)
    sop_uid = key_image_uid(inp.frontal, inp.algorithms, inp.report_uid)
    series_uid = derived.key_image_series_uid(str(header.StudyInstanceUID), inp.device)
    orientation = header.get("PatientOrientation")
    known = orientation is not None and len(orientation) == 2 and all(str(v) for v in orientation)
    with derived.no_person_name_warnings():
        sc = _sc_image(inp, header, rgb, sop_uid, series_uid, orientation if known else None)
    if not known:
        sc.PatientOrientation = ""  # type: ignore[assignment]  # type 2: present, empty when the source did not say
    _describe(sc, inp, header)
    derived.sanitize_copied_attributes(sc)
    return KeyImage(dataset=sc, rgb=rgb, listed=inp.present, shown=shown)


def _sc_image(
    inp: KeyImageInput,
    header: Dataset,
    rgb: np.ndarray,
    sop_uid: str,
    series_uid: str,
    orientation: Sequence[object] | None,
) -> hd.sc.SCImage:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=inp.series_number,
        sop_instance_uid=sop_uid,
        instance_number=inp.instance_number,
        manufacturer=inp.device.manufacturer,
        # highdicom insists on a value; an unknown one is emptied by the caller
        patient_orientation=(
            (str(orientation[0]), str(orientation[1])) if orientation is not None else ("L", "F")
        ),
    )


def _describe(sc: Dataset, inp: KeyImageInput, header: Dataset) -> None:
    # Laterality is type 2C (paired body parts only): naming the body part lets validators see
    # that a chest needs none; when the source does not name it, say it is unknown (empty)
    if header.get("BodyPartExamined"):
        sc.BodyPartExamined = header.BodyPartExamined
    elif "Laterality" not in sc:
        sc.Laterality = ""
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.ImageComments = comments(inp)
    sc.DerivationDescription = "Downscaled, windowed frontal radiograph with model annotations"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    # the product and its version, never the host or process name
    sc.ManufacturerModelName = inp.device.name[:64]
    sc.SoftwareVersions = inp.device.version[:64]
    ref = Dataset()
    ref.ReferencedSOPClassUID = inp.frontal.SOPClassUID
    ref.ReferencedSOPInstanceUID = inp.frontal.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    when = inp.content_datetime or _dt.datetime.now()
    sc.ContentDate = when.strftime("%Y%m%d")
    sc.ContentTime = when.strftime("%H%M%S")
    sc.SeriesDate, sc.SeriesTime = sc.ContentDate, sc.ContentTime
    sc.InstanceCreationDate, sc.InstanceCreationTime = sc.ContentDate, sc.ContentTime


def write_key_image(
    key: KeyImage, dicom_path: str | Path, png_path: str | Path | None = None
) -> tuple[Path, Path | None]:
    """Write the DICOM file (and the PNG when ``png_path`` is given), each atomically: one
    DICOM encode, and one PNG encode (:attr:`KeyImage.png`, at deflate's fastest level)."""
    dicom_path = derived.atomic_write(key.dataset, dicom_path)
    out_png = None if png_path is None else derived.atomic_write(key.png, png_path)
    return dicom_path, out_png
