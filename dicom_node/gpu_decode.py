"""JPEG 2000 and JPEG pixel data decoded on an NVIDIA GPU through nvImageCodec.

Used by :func:`dicom_node.pixels.load_image` (one instance) and
:func:`dicom_node.pixels.load_images` (many at once, one batched decode call) when all of
these hold; otherwise the CPU decoders decode:

- the ``nvidia.nvimgcodec`` package is installed (PyPI ``nvidia-nvimgcodec-cu13`` with
  ``nvidia-nvjpeg2k-cu13``, or the ``-cu12`` pair) and a CUDA device answers;
- the environment variable ``CXR_GPU_DECODE`` is not ``off`` (the benchmark's CPU baseline, or a
  host whose GPU must be left to the models);
- the instance is grayscale (one sample), unsigned, 8 or 16 bits allocated, encapsulated in a
  JPEG 2000 / HTJ2K or JPEG baseline / extended transfer syntax.

Only the stored values come from the GPU (the first frame's, as the CPU path takes); the grayscale
pipeline after them (padding, Modality LUT, VOI, MONOCHROME1 inversion) is the CPU path's, so a
lossless J2K image gives bit-identical stored values and therefore the identical image
(``bench/gpu.py`` checks this on the device). A frame the GPU cannot decode, or whose decoded
shape or depth is not what the header says, falls back to the CPU decoder for that instance.

Nothing here imports torch or nvImageCodec at import time.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

log = logging.getLogger(__name__)

ENV_SWITCH = "CXR_GPU_DECODE"

#: transfer syntaxes decoded on the GPU (JPEG lossless, process 14, stays on the CPU)
GPU_SYNTAXES = frozenset(
    {
        JPEG2000Lossless,
        JPEG2000,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        HTJ2K,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
    }
)

_lock = threading.Lock()
#: one decoder per process and thread: a forked child must not reuse its parent's CUDA objects,
#: and the prepare stage's threads decode side by side. (pid, thread id) -> decoder or None
_decoders: dict[tuple[int, int], Any] = {}


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "auto").strip().lower() in {"off", "0", "false", "no"}


def _nvimgcodec() -> Any:
    return importlib.import_module("nvidia.nvimgcodec")


def _decoder() -> Any | None:
    """This thread's nvImageCodec decoder, or None when the package or a GPU is missing."""
    key = (os.getpid(), threading.get_ident())
    with _lock:
        if key in _decoders:
            return _decoders[key]
        if any(k[0] == key[0] and v is None for k, v in _decoders.items()):
            _decoders[key] = None  # this process already found no GPU decoder
            return None
        dec: Any | None = None
        try:
            dec = _nvimgcodec().Decoder()
            log.debug("GPU decoding of JPEG 2000 / JPEG through nvImageCodec is available")
        except Exception as exc:  # noqa: BLE001 - missing package, no driver, no device
            log.debug("nvImageCodec unavailable (%s: %s); CPU decoding", type(exc).__name__, exc)
            dec = None
        _decoders[key] = dec
        return dec


def available() -> bool:
    """True when GPU decoding can run in this process (package, device, not switched off)."""
    return not _switched_off() and _decoder() is not None


def eligible(ds: Dataset) -> bool:
    """Whether ``ds``'s pixel data is of a kind this module decodes (see the module docstring)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts not in GPU_SYNTAXES or "PixelData" not in ds:
        return False
    try:
        return (
            int(ds.get("SamplesPerPixel", 1)) == 1
            and int(ds.get("PixelRepresentation", 0)) == 0
            and int(ds.get("BitsAllocated", 0)) in (8, 16)
            and 0 < int(ds.get("BitsStored", ds.get("BitsAllocated", 0))) <= 16
            and int(ds.Rows) > 1
            and int(ds.Columns) > 1
        )
    except (TypeError, ValueError, AttributeError):
        return False


def wanted(ds: Dataset) -> bool:
    """True when ``ds`` should be decoded here rather than by the CPU decoders."""
    return eligible(ds) and available()


def first_frame_codestream(ds: Dataset) -> bytes:
    """The first frame's compressed bytes from the encapsulated Pixel Data."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return next(generate_frames(ds.PixelData, number_of_frames=frames))


def _decode_params(nvimgcodec: Any) -> Any:
    spec = nvimgcodec.ColorSpec
    unchanged = getattr(spec, "UNCHANGED", None) or getattr(spec, "SYS_UNCHANGED", None)
    kwargs: dict[str, Any] = {"allow_any_depth": True}
    if unchanged is not None:
        kwargs["color_spec"] = unchanged
    return nvimgcodec.DecodeParams(**kwargs)


def _as_stored(ds: Dataset, image: Any) -> np.ndarray | None:
    """A decoded device image -> host array shaped and typed as pydicom's ``pixel_array``."""
    arr = np.asarray(image.cpu())
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.shape != (rows, cols):
        return None
    want = np.uint8 if int(ds.BitsAllocated) == 8 else np.uint16
    if arr.dtype != want:
        if arr.dtype.kind not in "ui" or arr.max(initial=0) > np.iinfo(want).max:
            return None
        arr = arr.astype(want)
    return np.ascontiguousarray(arr)


def decode_first_frames(datasets: Sequence[Dataset]) -> list[np.ndarray | None]:
    """Stored values of each dataset's first frame, decoded on the GPU in one batched call; None
    for a dataset that is not eligible or that the GPU could not decode (decode it on the CPU)."""
    out: list[np.ndarray | None] = [None] * len(datasets)
    if not datasets or _switched_off():
        return out
    decoder = _decoder()
    if decoder is None:
        return out
    todo: list[int] = []
    streams: list[bytes] = []
    for i, ds in enumerate(datasets):
        if not eligible(ds):
            continue
        try:
            streams.append(first_frame_codestream(ds))
            todo.append(i)
        except Exception as exc:  # noqa: BLE001 - the CPU decoder will report it properly
            log.debug("frame extraction failed (%s); CPU decoding", type(exc).__name__)
    if not streams:
        return out
    try:
        images = decoder.decode(streams, params=_decode_params(_nvimgcodec()))
    except Exception as exc:  # noqa: BLE001
        log.warning("GPU decode of %d frame(s) failed (%s); CPU decoding", len(streams), exc)
        return out
    for i, image in zip(todo, images, strict=True):
        if image is None:
            continue
        try:
            out[i] = _as_stored(datasets[i], image)
        except Exception as exc:  # noqa: BLE001
            log.debug("GPU result unusable (%s); CPU decoding", type(exc).__name__)
    return out
