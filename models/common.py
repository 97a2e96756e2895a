"""Small helpers shared by training, evaluation and inference code: device, seeds, autocast.

Kept deliberately small; nothing here knows about a particular model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

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
