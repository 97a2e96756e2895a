"""Key image benchmark: ms per study for the display-resolution uint8 render against, in the same
process, the float32 full-resolution render it replaced (kept below as ``*_reference``).

Input: the NEMA RG1 radiograph resized to a 2k frontal (``--side``), a full-resolution lung mask,
14 findings of which 3 are Present with Grad-CAM maps at the model's resolution (320 x 320) over
the lung crop, a cardiothoracic ratio and a QC state. Each study gets other probabilities and
maps. Per study, both paths do what the worker does for a key image:

- new: hot regions from the uint8 maps (``StudyResult.regions``), build (render, SC dataset),
  PNG encode (:func:`dicom_node.key_image.encode_png`), file writes (one DICOM, one PNG);
- reference: each map copied into the frontal's frame as float32 (what the analyzer handed over),
  hot regions on those, the old render (float32 clip/resize of the full image and of every map),
  its PNG encode (OpenCV's defaults), the same file writes.

Prints wall and CPU ms per step and the ratio reference/new. Not a pass/fail test.

    .venv/bin/python bench/key_image.py [--studies 20] [--side 2048]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from dicom_node import derived  # noqa: E402
from dicom_node.key_image import (  # noqa: E402
    BANNER,
    HEATMAP_FLOOR,
    PNG_DEFLATE,
    HeatmapInfo,
    KeyImage,
    KeyImageInput,
    _color,
    _describe,
    _panel,
    _sc_image,
    _text,
    build_key_image,
    key_image_uid,
    write_key_image,
)
from dicom_node.pixels import load_image  # noqa: E402
from dicom_node.sr import (  # noqa: E402
    AlgorithmInfo,
    CropInfo,
    CtrInfo,
    DeviceInfo,
    FindingResult,
    LineInfo,
    MaskQualityInfo,
)

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
PRESENT = ["Cardiomegaly", "Pneumothorax", "Pleural Effusion"]
MODEL_SIDE = 320
ALGOS = [AlgorithmInfo("m1", "1.0", "a" * 64), AlgorithmInfo("m2", "2.0", "b" * 64)]


@dataclass
class Study:
    inp: KeyImageInput  # heat maps as the worker now hands them over (uint8, model resolution)
    full_maps: dict[str, np.ndarray]  # the same maps in the frontal's frame, float32 (the old way)


def _blob(side: int, cy: float, cx: float, s: float) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    g = np.exp(-(((yy - cy) / s) ** 2 + ((xx - cx) / s) ** 2))
    return np.asarray(np.round(g / g.max() * 255), dtype=np.uint8)


def studies(n: int, side: int) -> list[Study]:
    path = REPO / "tests/data/RG1_UNCR.dcm"
    base = pydicom.dcmread(path, stop_before_pixels=True)
    pixels = load_image(path).pixels
    scale = side / max(pixels.shape)
    h, w = round(pixels.shape[0] * scale), round(pixels.shape[1] * scale)
    image = np.ascontiguousarray(cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR))
    image = np.clip(image, 0, 1).astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5 : h * 4 // 5, w // 8 : w * 7 // 16] = 1
    mask[h // 5 : h * 4 // 5, w * 9 // 16 : w * 7 // 8] = 1
    crop = CropInfo(w // 10, h // 6, w * 9 // 10, h * 5 // 6)
    ctr = CtrInfo(
        0.52,
        LineInfo(w * 0.4, h * 0.6, w * 0.62, h * 0.6),
        LineInfo(w * 0.15, h * 0.55, w * 0.85, h * 0.55),
    )
    quality = MaskQualityInfo(0.31, 2, 0.87, True)
    out = []
    for i in range(n):
        ds = Dataset()
        ds.update(base)
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        probs = np.linspace(0.05, 0.45, len(LABELS)) + 0.001 * i
        findings = [
            FindingResult(lbl, 0.6 + 0.1 * PRESENT.index(lbl) if lbl in PRESENT else float(p), 0.5)
            for lbl, p in zip(LABELS, probs, strict=True)
        ]
        s = MODEL_SIDE
        maps = {
            "Cardiomegaly": _blob(s, s * 0.6, s * 0.5 + i % 7, s / 6),
            "Pneumothorax": _blob(s, s * 0.25, s * 0.25, s / 10),
            "Pleural Effusion": _blob(s, s * 0.8, s * 0.8 - i % 5, s / 8),
        }
        heat = {lbl: HeatmapInfo(v, crop) for lbl, v in maps.items()}
        inp = KeyImageInput(
            frontal=ds,
            image=image,
            model1=FindingResult("Abnormal", 0.8, 0.5),
            findings=findings,
            algorithms=ALGOS,
            report_uid=generate_uid(),
            lung_mask=mask,
            crop=crop,
            heatmaps=heat,
            mask_quality=quality,
            ctr=ctr,
            device=DeviceInfo(),
        )
        full = {lbl: to_original_frame_reference(v, crop, (h, w)) for lbl, v in maps.items()}
        out.append(Study(inp, full))
    return out


# --- the reference: the float32 full-resolution path as it was before issue 11 ----------------


def to_original_frame_reference(
    cam: np.ndarray, crop: CropInfo, shape: tuple[int, int]
) -> np.ndarray:
    """models.gradcam.to_original_frame as the analyzer ran it: a float32 map in the frame."""
    out = np.zeros(shape, dtype=np.float32)
    ch, cw = crop.y1 - crop.y0, crop.x1 - crop.x0
    resized = cv2.resize(cam.astype(np.float32) / 255, (cw, ch), interpolation=cv2.INTER_LINEAR)
    out[crop.y0 : crop.y1, crop.x0 : crop.x1] = np.clip(resized, 0.0, 1.0)
    return out


def regions_reference(inp: KeyImageInput, maps: dict[str, np.ndarray]) -> dict[str, CropInfo]:
    """worker.results.StudyResult.regions on full-frame float32 maps."""
    shape = np.asarray(inp.image).shape[:2]
    out = {}
    for f in inp.findings:
        heat = maps.get(f.label)
        if f.present and heat is not None:
            box = derived.hot_region(heat, (int(shape[0]), int(shape[1])))
            if box is not None:
                out[f.label] = box
    return out


def _grey_reference(image: np.ndarray, w: int, h: int) -> np.ndarray:
    gray = cv2.resize(np.clip(image, 0, 1), (w, h), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.cvtColor((gray * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))


def _region_reference(
    inp: KeyImageInput, maps: dict[str, np.ndarray], label: str
) -> CropInfo | None:
    box = inp.regions.get(label)
    if box is None and label in maps:
        rows, cols = np.asarray(inp.image).shape[:2]
        box = derived.hot_region(maps[label], (int(rows), int(cols)))
    return box or inp.crop


def _main_reference(
    inp: KeyImageInput, maps: dict[str, np.ndarray], w: int, h: int, scale: float
) -> np.ndarray:
    canvas = _grey_reference(np.asarray(inp.image, dtype=np.float32), w, h)
    line = max(2, w // 400)
    if inp.lung_mask is not None:
        mask = cv2.resize(
            (np.asarray(inp.lung_mask) > 0).astype(np.uint8),
            (w, h),
            interpolation=cv2.INTER_NEAREST,
        )
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, (0, 200, 0), line)
    lung = inp.crop
    if lung is not None:
        cv2.rectangle(
            canvas,
            (int(lung.x0 * scale), int(lung.y0 * scale)),
            (int(max(lung.x1 - 1, lung.x0) * scale), int(max(lung.y1 - 1, lung.y0) * scale)),
            (0, 220, 255),
            max(1, line // 2),
        )
    if inp.ctr is not None and inp.ctr.shown:
        for seg, color in ((inp.ctr.thoracic, (255, 0, 255)), (inp.ctr.cardiac, (255, 255, 0))):
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
            (255, 255, 0),
        )
    tags_at: dict[CropInfo, int] = {}
    for i, f in enumerate(inp.present):
        box = _region_reference(inp, maps, f.label)
        if box is None:
            continue
        color = _color(i)
        inset = 2 * i
        p0 = (int(box.x0 * scale) + inset, int(box.y0 * scale) + inset)
        p1 = (
            int(max(box.x1 - 1, box.x0) * scale) - inset,
            int(max(box.y1 - 1, box.y0) * scale) - inset,
        )
        cv2.rectangle(canvas, p0, p1, color, max(1, line - 1))
        tag = str(i + 1)
        fs = max(0.55, w / 1500)
        (tw, th), _ = cv2.getTextSize(tag, cv2.FONT_HERSHEY_SIMPLEX, fs, 2)
        shift = tags_at.get(box, 0)
        tags_at[box] = shift + 1
        x = min(max(p0[0] + shift * (tw + 10), 0), w - tw - 6)
        y = min(max(p0[1], th + 6), h - 4)
        cv2.rectangle(canvas, (x, y - th - 6), (x + tw + 6, y), color, -1)
        cv2.putText(
            canvas, tag, (x + 3, y - 3), cv2.FONT_HERSHEY_SIMPLEX, fs, (0, 0, 0), 2, cv2.LINE_AA
        )
    return canvas


def _strip_reference(
    inp: KeyImageInput, maps: dict[str, np.ndarray], width: int
) -> tuple[np.ndarray | None, list[str]]:
    items = [(i, f) for i, f in enumerate(inp.present) if f.label in maps]
    if not items:
        return None, []
    image = np.asarray(inp.image, dtype=np.float32)
    h0, w0 = image.shape
    per_row = max(1, min(len(items), width // 220))
    tw = min(width // per_row, 320)
    th = max(1, int(round(tw * h0 / w0)))
    label_h = 30
    rows = (len(items) + per_row - 1) // per_row
    strip = np.full((rows * (th + label_h), width, 3), 24, np.uint8)
    base = _grey_reference(image, tw, th)
    for k, (i, f) in enumerate(items):
        heat = cv2.resize(np.clip(np.asarray(maps[f.label], dtype=np.float32), 0, 1), (tw, th))
        colored = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
        alpha = (np.clip((heat - HEATMAP_FLOOR) / (1 - HEATMAP_FLOOR), 0, 1) * 0.5)[..., None]
        thumb = (base * (1 - alpha) + colored * alpha).astype(np.uint8)
        r, c = divmod(k, per_row)
        y, x = r * (th + label_h), c * tw
        strip[y : y + th, x : x + tw] = thumb
        cv2.rectangle(strip, (x, y), (x + tw - 1, y + th - 1), _color(i), 2)
        _text(strip, f"{i + 1} {f.label}"[:30], (x + 4, y + th + 21), 0.5, _color(i), outline=False)
    return strip, [f.label for _, f in items]


def render_reference(
    inp: KeyImageInput, maps: dict[str, np.ndarray]
) -> tuple[np.ndarray, list[str]]:
    image = np.asarray(inp.image, dtype=np.float32)
    h0, w0 = image.shape
    scale = min(1.0, inp.max_side / max(h0, w0))
    w, h = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
    main = _main_reference(inp, maps, w, h, scale)
    panel = _panel(inp, max(560, int(w * 0.6)), h)
    if panel.shape[0] > h:
        main = np.vstack([main, np.full((panel.shape[0] - h, w, 3), 24, np.uint8)])
    top = np.hstack([main, panel])
    band = np.zeros((44, top.shape[1], 3), np.uint8)
    _text(band, BANNER, (10, 32), 0.9, (40, 40, 255), outline=False)
    parts = [band, top]
    strip, shown = _strip_reference(inp, maps, top.shape[1])
    if strip is not None:
        parts.append(strip)
    canvas = np.vstack(parts)
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB), shown


def build_key_image_reference(inp: KeyImageInput, maps: dict[str, np.ndarray]) -> KeyImage:
    derived.check_same_patient_and_study([inp.frontal])
    rgb, shown = render_reference(inp, maps)
    header = derived.source_header(inp.frontal)
    sop_uid = key_image_uid(inp.frontal, inp.algorithms, inp.report_uid)
    series_uid = derived.key_image_series_uid(str(header.StudyInstanceUID), inp.device)
    orientation = header.get("PatientOrientation")
    known = orientation is not None and len(orientation) == 2 and all(str(v) for v in orientation)
    with derived.no_person_name_warnings():
        sc = _sc_image(inp, header, rgb, sop_uid, series_uid, orientation if known else None)
    if not known:
        sc.PatientOrientation = ""  # type: ignore[assignment]
    _describe(sc, inp, header)
    derived.sanitize_copied_attributes(sc)
    return KeyImage(dataset=sc, rgb=rgb, listed=inp.present, shown=shown)


def png_reference(key: KeyImage) -> bytes:
    """The old build's PNG: OpenCV's encoder at its default settings (timed as its own step)."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(key.rgb, cv2.COLOR_RGB2BGR))
    assert ok
    key.__dict__["png"] = png.tobytes()  # what write_key_image then writes
    return key.png


# --- timing -------------------------------------------------------------------------------------


class Clock:
    """Wall and CPU (all threads) milliseconds summed per step."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def time(self, step: str, fn: Callable[[], object]) -> object:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        self.wall[step] = self.wall.get(step, 0.0) + (time.perf_counter() - w0) * 1000
        self.cpu[step] = self.cpu.get(step, 0.0) + (time.process_time() - c0) * 1000
        return out


def run_new(s: Study, clock: Clock, out: Path, i: int) -> KeyImage:
    shape = np.asarray(s.inp.image).shape[:2]

    def regions() -> dict[str, CropInfo]:
        boxes = {}
        for f in s.inp.present:
            heat = s.inp.heatmaps.get(f.label)
            box = heat.hot_region((int(shape[0]), int(shape[1]))) if heat is not None else None
            if box is not None:
                boxes[f.label] = box
        return boxes

    boxes = clock.time("regions", regions)
    inp = replace(s.inp, regions=boxes)  # type: ignore[arg-type]
    key = clock.time("build", lambda: build_key_image(inp))
    assert isinstance(key, KeyImage)
    clock.time("png encode", lambda: key.png)
    clock.time("file writes", lambda: write_key_image(key, out / f"n{i}.dcm", out / f"n{i}.png"))
    return key


def run_reference(s: Study, clock: Clock, out: Path, i: int) -> KeyImage:
    # the analyzer's copy of each uint8 model-resolution map into the frame (float32)
    crop = s.inp.crop
    assert crop is not None
    shape = np.asarray(s.inp.image).shape[:2]
    maps = clock.time(
        "maps to frame",
        lambda: {
            lbl: to_original_frame_reference(h.values, crop, (int(shape[0]), int(shape[1])))
            for lbl, h in s.inp.heatmaps.items()
        },
    )
    assert isinstance(maps, dict)
    boxes = clock.time("regions", lambda: regions_reference(s.inp, maps))
    inp = replace(s.inp, regions=boxes, heatmaps={})  # type: ignore[arg-type]
    key = clock.time("build", lambda: build_key_image_reference(inp, maps))
    assert isinstance(key, KeyImage)
    clock.time("png encode", lambda: png_reference(key))
    clock.time("file writes", lambda: write_key_image(key, out / f"r{i}.dcm", out / f"r{i}.png"))
    return key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--side", type=int, default=2048, help="longest side of the frontal image")
    args = ap.parse_args()
    data = studies(args.studies, args.side)
    tmp = Path(tempfile.mkdtemp(prefix="bench-key-image-"))
    run_new(data[0], Clock(), tmp, 0)  # warm-up: imports, OpenCV's first calls
    run_reference(data[0], Clock(), tmp, 0)
    new, ref = Clock(), Clock()
    for i, s in enumerate(data):  # interleaved, so both see the same machine load
        k_new = run_new(s, new, tmp, i)
        k_ref = run_reference(s, ref, tmp, i)
        assert k_new.rgb.shape == k_ref.rgb.shape and k_new.shown == k_ref.shown
    n = len(data)
    h, w = np.asarray(data[0].inp.image).shape[:2]
    one = data[0].inp.heatmaps[PRESENT[0]].values
    print(
        f"studies {n}, frontal {w} x {h}, {len(PRESENT)} Present findings with maps, "
        f"key image {k_new.rgb.shape[1]} x {k_new.rgb.shape[0]}, "
        f"OpenCV threads {cv2.getNumThreads()}, PNG deflate {PNG_DEFLATE}"
    )
    print(
        f"memory per map: {one.nbytes / 1e6:.2f} MB uint8 {one.shape[1]} x {one.shape[0]} "
        f"(was {h * w * 4 / 1e6:.2f} MB float32 {w} x {h})"
    )
    print(f"{'ms per study':24s} {'reference':>16s} {'new':>16s}")
    print(f"{'':24s} {'wall':>8s}{'cpu':>8s} {'wall':>8s}{'cpu':>8s}")
    steps = ["maps to frame", "regions", "build", "png encode", "file writes"]
    for step in steps:
        rw, rc = ref.wall.get(step, 0.0) / n, ref.cpu.get(step, 0.0) / n
        nw, nc = new.wall.get(step, 0.0) / n, new.cpu.get(step, 0.0) / n
        print(f"  {step:22s} {rw:8.1f}{rc:8.1f} {nw:8.1f}{nc:8.1f}")
    rw, rc = sum(ref.wall.values()) / n, sum(ref.cpu.values()) / n
    nw, nc = sum(new.wall.values()) / n, sum(new.cpu.values()) / n
    print(f"  {'total':22s} {rw:8.1f}{rc:8.1f} {nw:8.1f}{nc:8.1f}")
    kr = sum(ref.wall.get(s, 0.0) for s in steps[:3]) / n
    kn = sum(new.wall.get(s, 0.0) for s in steps[:3]) / n
    print(
        f"key image (maps to frame, regions, build; wall): {kr:.1f} -> {kn:.1f} ms, "
        f"ratio {kr / kn:.1f}x"
    )
    print(f"with PNG encode and file writes (wall): {rw:.1f} -> {nw:.1f} ms, ratio {rw / nw:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
