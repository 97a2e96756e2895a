"""Decode a radiograph's pixels into what a radiologist would see on a viewer.

:func:`load_image` returns a 2-D ``float32`` array in [0, 1], 0 = black, at the original
resolution, after the DICOM grayscale pipeline:

1. decode the pixel data (every transfer syntax the SCP accepts: uncompressed, deflated, JPEG
   baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, through pydicom's pylibjpeg / pyjpegls
   plugins); a multi-frame image gives its first frame;
2. note the pixel padding values (PixelPaddingValue [+ PixelPaddingRangeLimit]) so they take no
   part in windowing and come out black;
3. Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence);
4. VOI: the first VOI LUT Sequence item, else the first Window Center/Width pair (with its
   VOI LUT Function), else a robust percentile window (0.5th-99.5th percentile of the non-padding
   pixels). A window that saturates almost the whole image (a wrong header) is replaced by the
   percentile window, and the fall-back is logged;
5. MONOCHROME1 (and MONOCHROME2 with Presentation LUT Shape INVERSE) is inverted so 0 = black.

Colour images (RGB, YBR, PALETTE COLOR) are converted to luminance and windowed by percentile.
Anything that cannot be decoded raises :class:`PixelDecodeError` naming the SOP Instance UID (never
patient identifiers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

from dicom_node import gpu_decode

log = logging.getLogger(__name__)

#: Below this fraction of pixels strictly inside the window, the header window is not trusted.
MIN_UNSATURATED_FRACTION = 0.05
PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLE = 1_000_000


class PixelDecodeError(ValueError):
    """The pixel data of an instance cannot be turned into an image."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, windowed grayscale image and what was done to get it."""

    pixels: np.ndarray  # float32 (rows, cols) in [0, 1], 0 = black as displayed
    rows: int
    cols: int
    photometric: str  # Photometric Interpretation as stored
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    voi_source: str  # "voi_lut_sequence" | "window" | "percentile" | "percentile_fallback"
    window: tuple[float, float] | None  # (center, width) in modality units, when linear
    inverted: bool
    number_of_frames: int
    padding_fraction: float  # fraction of pixels that were padding
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing when known and > 0


def _uid(ds: Dataset) -> str:
    uid = ds.get("SOPInstanceUID")
    if uid:
        return str(uid)
    filename = getattr(ds, "filename", None)
    return f"<none> in file {filename}" if filename else "<none>"


def _ts(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _fail(ds: Dataset, what: str, exc: BaseException | None = None) -> PixelDecodeError:
    ts = _ts(ds)
    try:
        ts_name = pydicom.uid.UID(ts).name if ts else "unknown transfer syntax"
    except Exception:  # pragma: no cover - name lookup is best effort
        ts_name = ts
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    return PixelDecodeError(
        f"SOP Instance UID {_uid(ds)} ({ts_name}): {what}{detail}. The instance cannot be "
        "analysed; ask the sender to resend it uncompressed or in another transfer syntax."
    )


def _read(path_or_dataset: str | Path | Dataset) -> Dataset:
    if isinstance(path_or_dataset, Dataset):
        return path_or_dataset
    try:
        return pydicom.dcmread(str(path_or_dataset))
    except Exception as exc:
        raise PixelDecodeError(
            f"{path_or_dataset}: not a readable DICOM file: {type(exc).__name__}: {exc}"
        ) from exc


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(kw)
        try:
            if value is not None and len(value) == 2:
                r, c = float(value[0]), float(value[1])
                if r > 0 and c > 0:
                    return (r, c)
        except (TypeError, ValueError):
            continue
    return None


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    pad = ds.get("PixelPaddingValue")
    if pad is None or stored.ndim != 2:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    try:
        lo = int(pad)
        hi = int(limit) if limit is not None else lo
    except (TypeError, ValueError):
        return None
    lo, hi = min(lo, hi), max(lo, hi)
    mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def _percentile_window(values: np.ndarray) -> tuple[float, float]:
    flat = values.ravel()
    if flat.size > _PERCENTILE_SAMPLE:
        step = flat.size // _PERCENTILE_SAMPLE + 1
        flat = flat[::step]
    lo, hi = np.percentile(flat, PERCENTILES)
    return float(lo), float(hi)


def _linear(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window, output scaled to [0, 1]."""
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0).astype(np.float32)
    # LINEAR: needs width >= 1
    w = max(width - 1.0, 1e-6)
    return np.clip((x - (center - 0.5)) / w + 0.5, 0.0, 1.0).astype(np.float32)


def _first(value: object) -> float:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _unsaturated(out: np.ndarray, valid: np.ndarray | None) -> float:
    v = out if valid is None else out[valid]
    if v.size == 0:
        return 0.0
    return float(np.count_nonzero((v > 0.0) & (v < 1.0))) / v.size


def _to_gray(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        rgb = arr.astype(np.float32)
        gray: np.ndarray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return gray
    return arr


def load_image(
    path_or_dataset: str | Path | Dataset, *, stored: np.ndarray | None = None, gpu: bool = True
) -> DecodedImage:
    """Decode, window and orient one instance's image; see the module docstring for the steps.

    ``stored``: the first frame's stored values when already decoded (:func:`load_images`);
    ``gpu``: let :mod:`dicom_node.gpu_decode` decode JPEG 2000 / JPEG where it can.
    Raises :class:`PixelDecodeError` when the instance has no decodable 2-D image.
    """
    ds = _read(path_or_dataset)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise _fail(ds, "the instance has no Pixel Data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if stored is None and gpu and gpu_decode.wanted(ds):
        stored = gpu_decode.decode_first_frames([ds])[0]
    if stored is not None:
        arr = stored
    else:
        try:
            arr = ds.pixel_array
        except Exception as exc:
            raise _fail(ds, "the pixel data could not be decoded", exc) from exc
        if frames > 1:
            arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    expected_ndim = 3 if samples > 1 else 2
    if arr.ndim != expected_ndim or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise _fail(ds, f"decoded pixel array has unexpected shape {arr.shape}")

    color = samples > 1 or photometric == "PALETTE COLOR"
    padding = None if color else _padding_mask(ds, arr)
    valid = None if padding is None else ~padding
    window: tuple[float, float] | None = None

    if color:
        values = _to_gray(ds, arr).astype(np.float32)
        lo, hi = _percentile_window(values)
        out = _linear(values, lo, hi)
        voi_source = "percentile"
        window = ((lo + hi) / 2.0, hi - lo)
    else:
        try:
            values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        except Exception as exc:
            raise _fail(ds, "the Modality LUT could not be applied", exc) from exc
        out, voi_source, window = _apply_voi(ds, arr, values, valid)

    inverted = False
    if photometric == "MONOCHROME1":
        out = 1.0 - out
        inverted = True
    elif photometric == "MONOCHROME2" and str(ds.get("PresentationLUTShape", "")) == "INVERSE":
        out = 1.0 - out
        inverted = True
    if padding is not None:
        out[padding] = 0.0
    out = np.ascontiguousarray(out, dtype=np.float32)
    if not np.isfinite(out).all():
        raise _fail(ds, "windowing produced non-finite values")
    return DecodedImage(
        pixels=out,
        rows=int(out.shape[0]),
        cols=int(out.shape[1]),
        photometric=photometric,
        sop_instance_uid=_uid(ds),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        transfer_syntax_uid=_ts(ds),
        voi_source=voi_source,
        window=window,
        inverted=inverted,
        number_of_frames=frames,
        padding_fraction=0.0 if padding is None else float(padding.mean()),
        pixel_spacing_mm=_spacing(ds),
    )


def _voi_lut(item: Dataset, values: np.ndarray) -> np.ndarray:
    """PS3.3 C.11.2.1.1: a VOI LUT applied to modality values, output scaled to [0, 1]."""
    n_entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 65536
    data = item.LUTData
    if isinstance(data, bytes):
        lut = np.frombuffer(data, dtype=np.uint16 if bits > 8 else np.uint8)
    else:
        lut = np.asarray(
            data if isinstance(data, list | tuple | pydicom.multival.MultiValue) else [data]
        )
    lut = lut.astype(np.float64)[:n_entries]
    if lut.size == 0:
        raise ValueError("empty LUT Data")
    idx = np.clip(np.rint(values) - first_mapped, 0, lut.size - 1).astype(np.int64)
    top = float(2**bits - 1) if bits > 0 else float(lut.max() or 1.0)
    mapped: np.ndarray = np.clip(lut[idx] / top, 0.0, 1.0).astype(np.float32)
    return mapped


def _apply_voi(
    ds: Dataset, stored: np.ndarray, values: np.ndarray, valid: np.ndarray | None
) -> tuple[np.ndarray, str, tuple[float, float] | None]:
    """Return (image in [0, 1] before any inversion, VOI source, linear window if any)."""
    out: np.ndarray | None = None
    source = ""
    window: tuple[float, float] | None = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        try:
            out = _voi_lut(ds.VOILUTSequence[0], values)
            source = "voi_lut_sequence"
        except Exception as exc:
            log.warning(
                "SOP Instance UID %s: VOI LUT Sequence unusable (%s); trying window/percentile",
                _uid(ds),
                exc,
            )
            out = None
    if out is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = _first(ds.WindowCenter)
            width = _first(ds.WindowWidth)
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
            if width <= 0 or (function == "LINEAR" and width < 1):
                raise ValueError(f"window width {width} is not positive")
            out = _window(values, center, width, function)
            source = "window"
            window = (center, width)
        except (TypeError, ValueError, IndexError) as exc:
            log.warning("SOP Instance UID %s: window ignored (%s)", _uid(ds), exc)
            out = None
    if out is not None and _unsaturated(out, valid) < MIN_UNSATURATED_FRACTION:
        log.warning(
            "SOP Instance UID %s: the header's %s leaves under %.0f%% of the image unsaturated; "
            "using a percentile window instead",
            _uid(ds),
            source,
            MIN_UNSATURATED_FRACTION * 100,
        )
        out = None
        source = "percentile_fallback"
    if out is None:
        sample = values if valid is None else values[valid]
        if sample.size == 0:
            raise _fail(ds, "every pixel is padding")
        lo, hi = _percentile_window(sample)
        out = _linear(values, lo, hi)
        source = source or "percentile"
        window = ((lo + hi) / 2.0, hi - lo)
    return out, source, window


def load_images(paths: Sequence[str | Path | Dataset]) -> list[DecodedImage | PixelDecodeError]:
    """:func:`load_image` for many instances, their JPEG 2000 / JPEG first frames decoded on the
    GPU in one batched call where :mod:`dicom_node.gpu_decode` can: for each instance its
    image or the :class:`PixelDecodeError` that stopped it."""
    read: list[Dataset | PixelDecodeError] = []
    for p in paths:
        try:
            read.append(_read(p))
        except PixelDecodeError as exc:
            read.append(exc)
    datasets = [d for d in read if isinstance(d, Dataset)]
    decoded = iter(gpu_decode.decode_first_frames(datasets) if datasets else [])
    out: list[DecodedImage | PixelDecodeError] = []
    for d in read:
        if isinstance(d, PixelDecodeError):
            out.append(d)
            continue
        try:
            out.append(load_image(d, stored=next(decoded), gpu=False))
        except PixelDecodeError as exc:
            out.append(exc)
    return out
