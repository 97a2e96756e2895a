"""Small helpers shared by training, evaluation and inference code: device, seeds, autocast,
and the CUDA input path (pinned host memory, one asynchronous copy per batch, resizes on the
device).

Kept deliberately small; nothing here knows about a particular model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def select_device(pref: str | torch.device | None = "auto") -> torch.device:
    """Return the device to run on.

    ``pref`` is ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    Asking for CUDA on a machine without it raises :class:`RuntimeError` rather than silently
    running on the CPU, so a misconfigured GPU node is noticed."""
    if isinstance(pref, torch.device):
        pref = str(pref)
    choice = (pref or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {pref!r} requested but CUDA is not available on this machine: "
                f"use --device cpu (or 'auto')"
            )
        return torch.device(choice)
    if choice == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device {pref!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) so runs are reproducible."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bfloat16 autocast on CUDA; a no-op on the CPU (where fp32 is both faster and exact)."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op CPU threads (training on a shared machine)."""
    if threads is not None and threads > 0:
        torch.set_num_threads(threads)
        log.debug("torch threads set to %d", threads)


# --- inference on an accelerator ----------------------------------------------------------------
#
# On CUDA the networks' inputs are prepared on the device: the full-resolution float32 images are
# copied once into pinned host memory, sent with one asynchronous copy per batch, and resized
# there. A crop that is a numpy view of an image already sent is cut from the device copy instead
# of being sent again (the lung crop Model 2 reads is a view of the frontal the lung mask read).
# On the CPU none of this runs: the OpenCV resizes stay the reference path.


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) in channels-last memory order (what cuDNN's fastest kernels read)."""
    return x.contiguous(memory_format=torch.channels_last)


def compile_module(module: torch.nn.Module, enabled: bool) -> Callable[..., torch.Tensor]:
    """``module`` itself, or ``torch.compile(module)`` when ``enabled`` (compiled lazily, on the
    first call; the first batch of each new shape is slow)."""
    if not enabled:
        return module
    compiled: Callable[..., torch.Tensor] = torch.compile(module)
    return compiled


class _Pinned:
    """Two pinned host buffers used in turn; a buffer is reused only once the copy that last read
    it has finished (its event)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def take(self, elements: int) -> tuple[int, torch.Tensor]:
        i = self.turn
        self.turn ^= 1
        event = self.events[i]
        if event is not None:
            event.synchronize()
        buf = self.buffers[i]
        if buf is None or buf.numel() < elements:
            # grow by half again so that a slowly growing batch does not re-pin every time
            buf = torch.empty(int(elements * 1.5), dtype=torch.float32, pin_memory=True)
            self.buffers[i] = buf
        return i, buf

    def done(self, i: int, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        self.events[i] = event


_PINNED: dict[torch.device, _Pinned] = {}
_COPY_POOL: ThreadPoolExecutor | None = None
_PARALLEL_COPY_BYTES = 32 << 20


def _copy_pool() -> ThreadPoolExecutor:
    global _COPY_POOL
    if _COPY_POOL is None:
        _COPY_POOL = ThreadPoolExecutor(
            max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="pinned-copy"
        )
    return _COPY_POOL


@dataclass
class _Sent:
    """An image already on the device, kept while its host array lives."""

    host: weakref.ReferenceType[np.ndarray]
    start: int  # address of the host array's first element
    shape: tuple[int, int]
    strides: tuple[int, int]
    tensor: torch.Tensor


class DeviceImages:
    """Host images (2-D float arrays) on a CUDA device; see the comment above.

    ``send(images)`` returns one float32 (H, W) device tensor per image. Entries are dropped when
    their host array is freed, and the oldest first beyond ``max_bytes``."""

    def __init__(self, device: torch.device, max_bytes: int = 4 << 30) -> None:
        self.device = device
        self.max_bytes = max_bytes
        self._sent: dict[int, _Sent] = {}
        self._bytes = 0

    def _forget(self, key: int) -> None:
        entry = self._sent.pop(key, None)
        if entry is not None:
            self._bytes -= entry.tensor.numel() * 4

    def _lookup(self, a: np.ndarray) -> torch.Tensor | None:
        """A device view of ``a`` when ``a`` is (a view into) an image already sent."""
        if a.dtype != np.float32 or a.ndim != 2:
            return None
        addr = a.__array_interface__["data"][0]
        for entry in self._sent.values():
            host = entry.host()
            if host is None or entry.strides != a.strides:
                continue
            offset = addr - entry.start
            if offset < 0 or offset % 4:
                continue
            row_bytes = entry.strides[0]
            y0, rest = divmod(offset, row_bytes)
            x0 = rest // 4
            h, w = a.shape
            if y0 + h <= entry.shape[0] and x0 + w <= entry.shape[1]:
                return entry.tensor[y0 : y0 + h, x0 : x0 + w]
        return None

    def _remember(self, a: np.ndarray, tensor: torch.Tensor) -> None:
        if not (a.flags.c_contiguous and a.dtype == np.float32):
            return
        key = id(a)
        self._forget(key)
        self._sent[key] = _Sent(
            weakref.ref(a),
            a.__array_interface__["data"][0],
            (int(a.shape[0]), int(a.shape[1])),
            (int(a.strides[0]), int(a.strides[1])),
            tensor,
        )
        self._bytes += tensor.numel() * 4
        weakref.finalize(a, self._forget, key)
        while self._bytes > self.max_bytes and self._sent:
            self._forget(next(iter(self._sent)))

    def send(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [self._lookup(a) for a in images]
        todo = [i for i, t in enumerate(out) if t is None]
        if todo:
            sizes = [int(images[i].size) for i in todo]
            pinned = _PINNED.setdefault(self.device, _Pinned())
            slot, buf = pinned.take(sum(sizes))
            offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            host = buf.numpy()

            def fill(k: int) -> None:
                a = images[todo[k]]
                dst = host[offsets[k] : offsets[k + 1]].reshape(a.shape)
                np.copyto(dst, a, casting="same_kind")

            if sum(sizes) * 4 >= _PARALLEL_COPY_BYTES and len(todo) > 1:
                list(_copy_pool().map(fill, range(len(todo))))
            else:
                for k in range(len(todo)):
                    fill(k)
            flat = buf[: offsets[-1]].to(self.device, non_blocking=True)
            pinned.done(slot, torch.cuda.current_stream(self.device))
            for k, i in enumerate(todo):
                t = flat[offsets[k] : offsets[k + 1]].view(images[i].shape)
                out[i] = t
                self._remember(images[i], t)
        return [t for t in out if t is not None]


_DEVICE_IMAGES: dict[torch.device, DeviceImages] = {}


def device_images(device: torch.device) -> DeviceImages:
    """The process's :class:`DeviceImages` for ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _DEVICE_IMAGES.setdefault(dev, DeviceImages(dev))


def resize_on_device(img: torch.Tensor, size: int, *, area: bool) -> torch.Tensor:
    """A (H, W) device image resized to (size, size): area averaging (OpenCV's INTER_AREA when
    shrinking) or bilinear with half-pixel centres (OpenCV's INTER_LINEAR)."""
    x = img[None, None]
    if tuple(img.shape) == (size, size):
        return img
    if area:
        return F.adaptive_avg_pool2d(x, (size, size))[0, 0]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
