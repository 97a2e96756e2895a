"""Fit Model 2 (and the view classifier) from a pack (:mod:`.pack`) on one GPU within a time budget.

    PYTHONUNBUFFERED=1 timeout 330 python3 -m models.training.gpu_fit \\
        --pack var/pack/pack.npz --out $OUT --budget-s 300
    python -m models.training.gpu_fit --pack var/pack/pack.npz --out /tmp/fit --quick   # CPU

Needs only torch, torchvision, numpy and OpenCV (no pydantic, scipy or sklearn): the networks
here are twins of :class:`models.classifiers.MultiViewClassifier` and
:class:`models.view_classifier.ViewCNN` with the same parameter names and shapes, so the saved
safetensors load into the serving classes unchanged (``tests/models/training`` checks this).

Steps, all on the device:

1. Decode the pack (JPEG, OpenCV threads) into uint8 tensors on the GPU; a 224 px copy is made
   by antialiased resize of the 320 px images.
2. View classifier (frontal vs lateral, whole images at the pack's view size, its own split):
   trained first, as it is cheap.
3. Model 2 candidates (``--candidates``: architecture:size pairs, e.g. the shipped small
   DenseNet and DenseNet-121 at 224 and 320 px) are timed for a few steps; the epoch count E
   is the largest (<= ``--max-epochs``) for which all of them fit in about half the remaining
   budget (candidates at the end of the list are dropped if even ``--min-epochs`` do not fit).
   Each is trained E epochs with seed ``--seed`` (0) and scored on the validation split (never
   the test split): the score is the mean of the 5-label competition AUROC and Model 1's AUROC.
4. The winner is trained again (the next seed) for ``--long-factor`` times E epochs, as far as the
   budget allows: the serving code loads one network, so a longer run is worth more than an
   ensemble (``--seeds`` > 1 adds seeds at E epochs, measured as an ensemble only).
   :mod:`.finish` ships whichever of the winner's runs scores best on validation.

With ``--balance-sources`` the loss weights each label's positives and negatives equally within
each source (:func:`source_balance`), so that the site alone predicts little; Model 2 3.2.0's four
members were trained so, on the CPU (``--device cpu --candidates small:224 --epochs 12
--long-factor 1 --view-epochs 0 --seed N``, 9-25 minutes each on 2 cores).

Training: GPU augmentation per image (gamma exp(U(-0.3, 0.3)), rotation +-10 deg, zoom +-10%,
shift +-6% with affine_grid/grid_sample, contrast/brightness +-15%; never a flip), lateral
dropout 0.3, masked BCE over the 14 labels under the uncertainty policy (u-ignore: uncertain
and blank labels are out of the loss), AdamW + one-cycle, bf16 autocast and channels-last on
CUDA. Frontal and lateral images of a batch go through the shared backbone in one pass.

Outputs under ``--out`` (7 files, each < 16 MB, about 45 MB at most): ``fit_log.json`` (every
run's validation metrics and curve, epochs/s, images/s, losses, the choice), ``logits.npz``
(val / test / chexpert_test logits of every run with the pack's key hashes and raw labels, and
the view classifier's probabilities), ``model2_s<seed>.safetensors`` and ``model2_long.safetensors``
(the winner, float16), ``candidates.safetensors`` (other candidates' weights (``--seed``) as fit
in 15 MB, keys prefixed ``<candidate>/``), ``view_classifier.safetensors`` and ``fit.log``.
Files are rewritten as runs finish, so a run cut short still leaves its finished results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

from models.labels import COMPETITION, OBSERVATIONS, PATHOLOGIES
from models.training.pack import PACK_SPLITS, VIEW_SPLITS, blob, decode, read_pack

log = logging.getLogger("gpu_fit")

#: architecture name -> DenseNet hyper-parameters (the names the card records)
ARCHS: dict[str, dict[str, Any]] = {
    "small": {"growth_rate": 12, "block_config": [3, 6, 12, 8], "num_init_features": 24},
    "mid": {"growth_rate": 16, "block_config": [6, 12, 24, 16], "num_init_features": 32},
    "d121": {"growth_rate": 32, "block_config": [6, 12, 24, 16], "num_init_features": 64},
    "tiny": {"growth_rate": 4, "block_config": [1, 1, 1, 1], "num_init_features": 8},
}
#: by priority; "?" marks a candidate dropped first when the budget leaves under
#: ``--target-epochs`` for all
DEFAULT_CANDIDATES = "small:224,small:320,d121:224,d121:320,mid:320?"
MEAN, STD = 0.5, 0.25  # the cards' input normalisation
MAX_FILE_BYTES = 15_500_000
MAX_OUT_BYTES = 56_000_000  # what comes back from the device: 64 MB, less room for the logs


# --- networks: twins of the serving classes ----------------------------------------------------


def densenet_backbone(
    growth_rate: int, block_config: Sequence[int], num_init_features: int
) -> nn.Sequential:
    """As :func:`models.classifiers.densenet_backbone`: torchvision DenseNet features with a
    1-channel stem."""
    net = DenseNet(
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        num_init_features=num_init_features,
    )
    net.features.conv0 = nn.Conv2d(
        1, num_init_features, kernel_size=7, stride=2, padding=3, bias=False
    )
    nn.init.kaiming_normal_(net.features.conv0.weight)
    features: nn.Sequential = net.features
    return features


class FusionNet(nn.Module):
    """Same parameters as :class:`models.classifiers.MultiViewClassifier`; :meth:`forward` runs
    frontal and lateral images through the backbone in one pass (same result in eval mode)."""

    def __init__(
        self,
        num_labels: int,
        *,
        growth_rate: int,
        block_config: Sequence[int],
        num_init_features: int,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.features = densenet_backbone(growth_rate, block_config, num_init_features)
        norm5 = self.features.norm5
        assert isinstance(norm5, nn.BatchNorm2d)
        dim = int(norm5.num_features)
        self.lateral_missing = nn.Parameter(torch.zeros(dim))
        self.lateral_view = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * dim, num_labels)
        nn.init.zeros_(self.head.bias)

    def forward(self, frontal: torch.Tensor, lateral: torch.Tensor, rows: torch.Tensor) -> Any:
        """``frontal`` (B,1,S,S); ``lateral`` (L,1,S,S) with L >= len(rows) (extra rows are
        padding and ignored); ``rows`` (n,) the study rows the first n laterals belong to."""
        b, n = frontal.shape[0], int(rows.shape[0])
        x = torch.cat([frontal, lateral]) if lateral.shape[0] else frontal
        feat = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)
        lat = self.lateral_missing.expand(b, -1).to(feat.dtype).clone()
        if n:
            lat = lat.index_copy(0, rows, feat[b : b + n] + self.lateral_view.to(feat.dtype))
        return self.head(self.dropout(torch.cat([feat[:b], lat], dim=1)))


class ViewNet(nn.Module):
    """Same parameters as :class:`models.view_classifier.ViewCNN`."""

    def __init__(self, width: int = 16, blocks: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i in range(blocks):
            cout = width * 2 ** min(i, 3)
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> Any:
        f = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.head(f).squeeze(1)


# --- metrics (numpy only) ----------------------------------------------------------------------


def auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Mann-Whitney AUROC (ties count one half); None with one class."""
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(p, kind="mergesort")
    ps = np.asarray(p, dtype=np.float64)[order]
    ranks = np.empty(len(ps))
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(ps))
    r[order] = ranks
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def model1_target(raw: np.ndarray) -> np.ndarray:
    """Model 1's label per study (1 abnormal, 0 normal, NaN otherwise), as
    :func:`models.training.datasets.chexpert.model1_raw` (uncertain-only studies are NaN)."""
    labels = list(OBSERVATIONS)
    nf = raw[:, labels.index("No Finding")]
    path = raw[:, [labels.index(o) for o in PATHOLOGIES]]
    out = np.full(len(raw), np.nan, dtype=np.float32)
    out[(nf == 0) | np.any(path == 1, axis=1)] = 1.0
    out[nf == 1] = 0.0
    return out


def scores(raw: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """Per-label AUROC (studies labelled 1 or 0), the competition mean, the all-label mean,
    Model 1's AUROC and the selection score (mean of the competition mean and Model 1)."""
    labels = list(OBSERVATIONS)
    per: dict[str, float | None] = {}
    for j, lab in enumerate(labels):
        keep = (raw[:, j] == 0) | (raw[:, j] == 1)
        per[lab] = auroc(raw[keep, j], logits[keep, j]) if keep.any() else None
    comp = [v for c in COMPETITION if (v := per[c]) is not None]
    every = [v for v in per.values() if v is not None]
    y1 = model1_target(raw)
    keep = ~np.isnan(y1)
    m1 = auroc(y1[keep], -logits[keep, labels.index("No Finding")]) if keep.any() else None
    c5 = float(np.mean(comp)) if comp else None
    both = [v for v in (c5, m1) if v is not None]
    score = float(np.mean(both)) if both else None
    return {
        "competition5_mean_auroc": _r(c5),
        "mean_auroc_all_labels": _r(float(np.mean(every)) if every else None),
        "model1_auroc": _r(m1),
        "score": _r(score),
        "per_label": {k: _r(v) for k, v in per.items()},
    }


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


# --- data --------------------------------------------------------------------------------------


@dataclass
class Data:
    images: dict[int, torch.Tensor]  # size -> (N, S, S) uint8 on the device
    frontal_np: np.ndarray  # (studies,) image index of the frontal
    lateral_np: np.ndarray  # (studies,) image index of the lateral, -1 = none
    target: torch.Tensor  # (studies, 14) float, device (policy applied)
    mask: torch.Tensor  # (studies, 14) float, device
    raw: np.ndarray  # (studies, 14) CheXpert coding
    split: np.ndarray  # (studies,) split code
    key_hash: np.ndarray
    source: np.ndarray
    source_names: list[str]
    view_images: torch.Tensor | None = None  # (M, s, s) uint8, device
    view_lateral: np.ndarray | None = None
    view_split: np.ndarray | None = None
    view_source: np.ndarray | None = None
    view_source_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def rows(self, split: str) -> np.ndarray:
        out: np.ndarray = np.flatnonzero(self.split == PACK_SPLITS.index(split))
        return out


def policy_targets(raw: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """(target, mask) of every study under ``u-ignore``, ``u-zeros`` or ``u-ones``."""
    blank, unc = np.isnan(raw), raw == -1
    target = np.where(blank | unc, 0.0, raw).astype(np.float32)
    mask = (~blank).astype(np.float32)
    if policy == "u-ignore":
        mask[unc] = 0.0
    elif policy == "u-ones":
        target[unc] = 1.0
    elif policy != "u-zeros":
        raise ValueError(f"uncertainty policy {policy!r}: use u-ignore, u-zeros or u-ones")
    return target, mask


def decode_all(data: np.ndarray, offsets: np.ndarray, threads: int) -> np.ndarray:
    n = len(offsets) - 1
    first = decode(blob(data, offsets, 0))
    out = np.empty((n, *first.shape), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = decode(blob(data, offsets, i))

    with ThreadPoolExecutor(max_workers=threads) as ex:
        list(ex.map(one, range(n)))
    return out


def resize_uint8(imgs: torch.Tensor, size: int, chunk: int = 512) -> torch.Tensor:
    """(N, S, S) uint8 -> (N, size, size) uint8 by antialiased bilinear resize."""
    if imgs.shape[-1] == size:
        return imgs
    out = torch.empty((imgs.shape[0], size, size), dtype=torch.uint8, device=imgs.device)
    for s in range(0, imgs.shape[0], chunk):
        x = imgs[s : s + chunk, None].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out[s : s + chunk] = y[:, 0].round().clamp(0, 255).to(torch.uint8)
    return out


def load_data(
    path: Path,
    sizes: Sequence[int],
    device: torch.device,
    policy: str,
    threads: int,
    limit: dict[str, int] | None = None,
) -> Data:
    """The pack on ``device``: images at every size of ``sizes``; ``limit`` keeps the first n
    studies of each split (``--quick``)."""
    pk = read_pack(path)
    split = pk["split"].astype(np.int64)
    keep = np.arange(len(split))
    if limit:
        keep = np.concatenate(
            [np.flatnonzero(split == PACK_SPLITS.index(k))[:n] for k, n in limit.items()]
        )
    imgs = decode_all(pk["images"], pk["offsets"], threads)
    full = torch.from_numpy(imgs).to(device)
    images = {s: resize_uint8(full, s) for s in sorted(set(sizes))}
    raw = pk["raw"][keep]
    target, mask = policy_targets(raw, policy)
    data = Data(
        images=images,
        frontal_np=pk["frontal"][keep].astype(np.int64),
        lateral_np=pk["lateral"][keep].astype(np.int64),
        target=torch.from_numpy(target).to(device),
        mask=torch.from_numpy(mask).to(device),
        raw=raw,
        split=split[keep],
        key_hash=pk["key_hash"][keep],
        source=pk["source"][keep],
        source_names=[str(s) for s in pk["source_names"]],
        meta=pk["meta"],
    )
    if "view_images" in pk:
        vkeep = np.arange(len(pk["view_split"]))
        if limit:
            vs = pk["view_split"]
            # keep laterals in the quick subset: the first n of each split and class
            vkeep = np.concatenate(
                [
                    np.flatnonzero((vs == k) & (pk["view_lateral"] == lat))[: max(n // 2, 2)]
                    for k in range(len(VIEW_SPLITS))
                    for lat in (False, True)
                    for n in [min(limit.values())]
                ]
            )
        vimgs = decode_all(pk["view_images"], pk["view_offsets"], threads)[vkeep]
        data.view_images = torch.from_numpy(vimgs).to(device)
        data.view_lateral = pk["view_lateral"][vkeep]
        data.view_split = pk["view_split"][vkeep]
        data.view_source = pk["view_source"][vkeep]
        data.view_source_names = [str(s) for s in pk["view_source_names"]]
    return data


# --- augmentation (on the device) --------------------------------------------------------------


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.06,
    contrast: float = 0.15,
    gamma: float = 0.3,
) -> torch.Tensor:
    """``x``: (B,1,S,S) in [0, 1] -> augmented and normalised, as
    :func:`models.training.images.augment` with its ``gamma`` (gamma curve on [0, 1], affine with
    the image's minimum as background, contrast/brightness after normalisation; no flips)."""
    b, dev = x.shape[0], x.device

    def u() -> torch.Tensor:
        return torch.rand(b, generator=gen, device=dev) * 2 - 1

    if gamma > 0:
        x = x.clamp(0.0, 1.0).pow(torch.exp(u() * gamma).view(b, 1, 1, 1))
    x = (x - MEAN) / STD
    ang = u() * math.radians(rotate_deg)
    s = 1 + u() * scale
    tx, ty = u() * translate * 2, u() * translate * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(x - bg, grid, padding_mode="zeros", align_corners=False) + bg
    c = (1 + u() * contrast).view(b, 1, 1, 1)
    br = (u() * contrast).view(b, 1, 1, 1)
    return out * c + br


def unit(imgs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """uint8 images ``imgs[idx]`` as (B,1,S,S) float in [0, 1]."""
    return imgs[idx].unsqueeze(1).float().div_(255.0)


# --- Model 2 training --------------------------------------------------------------------------


@dataclass
class Run:
    name: str  # e.g. "d121:320"
    arch: str
    size: int
    seed: int
    epochs: int
    state: dict[str, torch.Tensor] | None = None
    losses: list[float] = field(default_factory=list)
    val_curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    complete: bool = False
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    val: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    tag: str = ""  # "long": the winner trained longer
    weights: str | None = None  # the safetensors file stem written for it

    @property
    def key(self) -> str:
        """Unique per run: candidate, seed and tag (the logits' name in logits.npz)."""
        return f"{self.name}/s{self.seed}{'-' + self.tag if self.tag else ''}"

    def summary(self) -> dict[str, Any]:
        return {
            "candidate": self.name,
            "key": self.key,
            "tag": self.tag,
            "weights": self.weights,
            "arch": self.arch,
            "arch_params": ARCHS[self.arch],
            "input_size": self.size,
            "seed": self.seed,
            "epochs": self.epochs,
            "complete": self.complete,
            "train_seconds": round(self.seconds, 1),
            "epochs_per_s": round(len(self.losses) / self.seconds, 4) if self.seconds else None,
            "train_images_per_s": round(self.images_per_s, 1),
            "train_loss_per_epoch": [round(x, 4) for x in self.losses],
            "validation": self.val,
            "validation_curve": self.val_curve,
            "error": self.error,
        }


def cpu_machine() -> str:
    """The CPU model and core count of this machine (the cards record where a model was
    trained; :func:`models.training.train_model2.machine` adds the GPU)."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


#: :func:`source_balance` clips a class weight to [1 / BALANCE_CLIP, BALANCE_CLIP]
BALANCE_CLIP = 5.0


def source_balance(
    target: np.ndarray,
    mask: np.ndarray,
    source: np.ndarray,
    rows: np.ndarray,
    clip: float = BALANCE_CLIP,
) -> np.ndarray:
    """Per-study, per-label loss weights (studies x labels) that balance each label's
    positives and negatives **within each source** of the training ``rows``.

    Sources differ wildly in prevalence (the COVID-19 collection is almost all abnormal, OpenIST
    all normal, CheXpert mostly abnormal), so a network can lower its loss by recognising the
    site instead of the finding, and then calls every film from a sick-looking site abnormal.
    Here, within a (source, label) cell with n labelled studies, a positive weighs n / (2 n_pos)
    and a negative n / (2 n_neg), clipped to [1 / ``clip``, ``clip``]: the cell's prior is then
    close to one half whatever the source, so the site alone predicts little. A cell with one
    class only (OpenIST's No Finding) keeps weight 1; rows outside ``rows`` and masked entries
    get 0. The weights are scaled to mean 1 over the labelled training entries."""
    w = np.zeros(target.shape, dtype=np.float32)
    for src in np.unique(source[rows]):
        r = rows[source[rows] == src]
        for j in range(target.shape[1]):
            lab = mask[r, j] > 0
            pos = lab & (target[r, j] > 0.5)
            neg = lab & ~pos
            n, n_pos, n_neg = int(lab.sum()), int(pos.sum()), int(neg.sum())
            if n == 0:
                continue
            if n_pos == 0 or n_neg == 0:
                w[r[lab], j] = 1.0
                continue
            w[r[pos], j] = np.clip(n / (2 * n_pos), 1 / clip, clip)
            w[r[neg], j] = np.clip(n / (2 * n_neg), 1 / clip, clip)
    labelled = w[rows][mask[rows] > 0]
    if labelled.size:
        w /= labelled.mean()
    return w


@dataclass
class Fitter:
    data: Data
    device: torch.device
    batch_size: int
    lr: float
    weight_decay: float
    lateral_dropout: float
    gamma: float
    eval_batch: int = 128
    balance_sources: bool = False
    balance_clip: float = BALANCE_CLIP
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        d = self.data
        if self.balance_sources:
            w = source_balance(
                d.target.cpu().numpy(),
                d.mask.cpu().numpy(),
                d.source,
                d.rows("train"),
                clip=self.balance_clip,
            )
            self.weights = torch.from_numpy(w).to(self.device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> Any:
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def build(self, arch: str, seed: int) -> FusionNet:
        torch.manual_seed(seed)
        net = FusionNet(len(OBSERVATIONS), **ARCHS[arch]).to(self.device)
        if self.cuda:
            net = net.to(memory_format=torch.channels_last)
        return net

    def _cl(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    def plan(
        self, rows: np.ndarray, bs: int, rng: np.random.Generator | None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches of ``rows`` (shuffled, with lateral dropout, when ``rng`` is given): per
        batch the study rows, the frontal image indices, the lateral image indices (padded to a
        multiple of 8 with repeats) and the batch positions of the laterals. Computed on the
        CPU and moved in one copy, so the training loop never waits for the device."""
        d = self.data
        if rng is not None:
            rows = rng.permutation(rows)
        parts: list[np.ndarray] = []
        bounds: list[tuple[int, int, int, int]] = []
        for s in range(0, len(rows), bs):
            r = rows[s : s + bs]
            if rng is not None and len(r) < bs:
                break  # drop the last incomplete training batch
            li = d.lateral_np[r]
            has = li >= 0
            if rng is not None and self.lateral_dropout > 0:
                has &= rng.random(len(r)) >= self.lateral_dropout
            pos = np.flatnonzero(has)
            idx = li[pos]
            if len(idx):
                idx = np.concatenate([idx, np.repeat(idx[:1], (-len(idx)) % 8)])
            bounds.append((len(r), len(r), len(idx), len(pos)))
            parts += [r, d.frontal_np[r], idx, pos]
        flat = torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(self.device)
        out = []
        o = 0
        for sizes in bounds:
            views = []
            for k in sizes:
                views.append(flat[o : o + k])
                o += k
            out.append((views[0], views[1], views[2], views[3]))
        return out

    def inputs(
        self,
        fi: torch.Tensor,
        li: torch.Tensor,
        size: int,
        gen: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised frontal and lateral batches (augmented when ``gen`` is given)."""
        imgs = self.data.images[size]
        f, lat = unit(imgs, fi), unit(imgs, li)
        if gen is not None:
            f = augment(f, gen, gamma=self.gamma)
            lat = augment(lat, gen, gamma=self.gamma) if lat.shape[0] else (lat - MEAN) / STD
        else:
            f, lat = (f - MEAN) / STD, (lat - MEAN) / STD
        return self._cl(f), self._cl(lat)

    def train(self, run: Run, deadline: float, log_every: int = 0, eval_points: int = 4) -> Run:
        d, dev = self.data, self.device
        rows_all = d.rows("train")
        n = len(rows_all)
        bs = min(self.batch_size, n)
        steps_per_epoch = max(1, n // bs)
        net = self.build(run.arch, run.seed)
        opt = torch.optim.AdamW(
            net.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=self.cuda or None
        )
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=run.epochs * steps_per_epoch, pct_start=0.15
        )
        gen = torch.Generator(device=dev).manual_seed(1000 + run.seed)
        rng = np.random.default_rng(run.seed)
        checkpoints = {
            max(1, round(run.epochs * k / eval_points)) for k in range(1, eval_points + 1)
        }
        t0 = time.time()
        seen = 0
        for epoch in range(run.epochs):
            net.train()
            total = torch.zeros((), device=dev)
            batches = self.plan(rows_all, bs, rng)
            for rows, fi, li, pos in batches:
                f, lat = self.inputs(fi, li, run.size, gen)
                with self.autocast():
                    logits = net(f, lat, pos)
                m = d.mask[rows] if self.weights is None else self.weights[rows]
                loss = F.binary_cross_entropy_with_logits(
                    logits.float(), d.target[rows], reduction="none"
                )
                loss = (loss * m).sum() / m.sum().clamp(min=1.0)
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                opt.step()
                sched.step()
                total += loss.detach()
                seen += int(fi.shape[0] + li.shape[0])
            run.losses.append(float(total) / len(batches))
            run.seconds = time.time() - t0
            run.images_per_s = seen / max(run.seconds, 1e-9)
            if epoch + 1 in checkpoints:
                val = scores(d.raw[d.rows("val")], self.logits(net, "val", run.size))
                run.val_curve.append(
                    {"epoch": epoch + 1, **{k: v for k, v in val.items() if k != "per_label"}}
                )
            if log_every and ((epoch + 1) % log_every == 0 or epoch + 1 == run.epochs):
                last = run.val_curve[-1] if run.val_curve else {}
                print(
                    f"  {run.name} s{run.seed} epoch {epoch + 1}/{run.epochs} loss "
                    f"{run.losses[-1]:.4f} {run.images_per_s:.0f} img/s {run.seconds:.0f} s "
                    f"val(ep {last.get('epoch')}) score {last.get('score')}",
                    flush=True,
                )
            if time.time() > deadline and epoch + 1 < run.epochs:
                run.error = f"stopped after epoch {epoch + 1}: time budget reached"
                print(f"  {run.name} s{run.seed}: {run.error}", flush=True)
                break
        else:
            run.complete = True
        for split in ("val", "test", "chexpert_test"):
            run.logits[split] = self.logits(net, split, run.size)
        run.val = scores(d.raw[d.rows("val")], run.logits["val"])
        run.state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        return run

    @torch.no_grad()
    def logits(self, net: FusionNet, split: str, size: int) -> np.ndarray:
        """Logits of every study of ``split`` (no augmentation, every lateral used), in order."""
        net.eval()
        out = []
        for _rows, fi, li, pos in self.plan(self.data.rows(split), self.eval_batch, None):
            f, lat = self.inputs(fi, li, size, None)
            with self.autocast():
                out.append(net(f, lat, pos).float().cpu())
        net.train()
        return torch.cat(out).numpy() if out else np.zeros((0, len(OBSERVATIONS)), np.float32)

    def time_steps(self, arch: str, size: int, steps: int) -> float:
        """Seconds per training epoch of ``arch`` at ``size``, from ``steps`` timed steps after
        two warm-up steps (a throw-away network)."""
        d, dev = self.data, self.device
        rows_all = d.rows("train")
        bs = min(self.batch_size, len(rows_all))
        net = self.build(arch, 0)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        gen = torch.Generator(device=dev).manual_seed(0)
        rng = np.random.default_rng(0)
        batches = self.plan(rows_all, bs, rng)

        def step(k: int) -> None:
            _rows, fi, li, pos = batches[k % len(batches)]
            f, lat = self.inputs(fi, li, size, gen)
            with self.autocast():
                loss = net(f, lat, pos).float().square().mean()
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()

        for k in range(2):
            step(k)
        sync(dev)
        t0 = time.time()
        for k in range(steps):
            step(k + 2)
        sync(dev)
        per_step = (time.time() - t0) / steps
        if self.cuda:
            torch.cuda.empty_cache()
        return per_step * max(1, len(rows_all) // bs)


def process_start() -> float:
    """Wall-clock time this process started (Linux /proc), so the budget counts the imports;
    now where /proc is missing."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(stat[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return time.time()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# --- view classifier ---------------------------------------------------------------------------


def train_view(
    data: Data, device: torch.device, epochs: int, seed: int, deadline: float
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, np.ndarray]]:
    """The view classifier on the pack's whole images (as :mod:`.train_view`: BCE with
    pos_weight, AdamW + one-cycle, gamma/affine/contrast jitter, horizontal flips allowed)."""
    assert data.view_images is not None and data.view_split is not None
    assert data.view_lateral is not None
    y_all = torch.from_numpy(data.view_lateral.astype(np.float32)).to(device)
    tr = torch.from_numpy(np.flatnonzero(data.view_split == 0)).to(device)
    torch.manual_seed(seed)
    net = ViewNet().to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    bs, lr = 64, 3e-3
    steps = max(1, len(tr) // bs)
    pos = float(y_all[tr].sum())
    pos_weight = torch.tensor([(len(tr) - pos) / max(pos, 1.0)], device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    t0, losses = time.time(), []
    for _epoch in range(epochs):
        net.train()
        perm = tr[torch.randperm(len(tr), generator=gen, device=device)]
        total = torch.zeros((), device=device)
        for s in range(steps):
            idx = perm[s * bs : (s + 1) * bs]
            x = augment(
                unit(data.view_images, idx),
                gen,
                rotate_deg=15,
                scale=0.15,
                translate=0.08,
                contrast=0.2,
                gamma=math.log1p(0.6),
            )
            flip = torch.rand(len(idx), generator=gen, device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(net(x), y_all[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
            total += loss.detach()
        losses.append(float(total) / steps)
        if time.time() > deadline:
            break
    net.eval()
    probs: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {
        "epochs": len(losses),
        "train_seconds": round(time.time() - t0, 1),
        "train_images": len(tr),
        "train_laterals": int(pos),
        "train_loss_per_epoch": [round(x, 4) for x in losses],
    }
    with torch.no_grad():
        for k, name in enumerate(VIEW_SPLITS):
            idx = torch.from_numpy(np.flatnonzero(data.view_split == k)).to(device)
            if not len(idx):
                continue
            x = (unit(data.view_images, idx) - MEAN) / STD
            p = torch.cat([torch.sigmoid(net(x[i : i + 256])) for i in range(0, len(x), 256)])
            probs[name] = p.float().cpu().numpy()
            y = data.view_lateral[data.view_split == k]
            pred = probs[name] >= 0.5
            report[name] = {
                "images": int(len(y)),
                "laterals": int(y.sum()),
                "errors": int((pred != y).sum()),
                "accuracy": round(float((pred == y).mean()), 4),
            }
    state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    return state, report, probs


# --- outputs -----------------------------------------------------------------------------------


def half_state(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        prefix + k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
    }


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(
        v.numel() * (2 if v.is_floating_point() else v.element_size()) for v in state.values()
    )


class Outputs:
    """Everything written under ``--out`` (rewritten as results arrive)."""

    def __init__(self, out: Path, data: Data) -> None:
        self.out = out
        self.data = data
        out.mkdir(parents=True, exist_ok=True)
        self.log: dict[str, Any] = {"runs": [], "pack": data.meta}
        self.view_probs: dict[str, np.ndarray] = {}

    def write_log(self) -> None:
        tmp = self.out / "fit_log.json.tmp"
        tmp.write_text(json.dumps(self.log, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.out / "fit_log.json")

    def write_logits(self, runs: Sequence[Run]) -> None:
        d = self.data
        arrays: dict[str, np.ndarray] = {}
        for split in ("val", "test", "chexpert_test"):
            rows = d.rows(split)
            arrays[f"{split}_key_hash"] = d.key_hash[rows]
            arrays[f"{split}_raw"] = d.raw[rows]
        names = []
        for r in runs:
            if not r.logits:
                continue
            tag = r.key
            names.append(tag)
            for split, lg in r.logits.items():
                arrays[f"{tag}/{split}"] = lg.astype(np.float32)
        arrays["runs"] = np.array(names)
        arrays["labels"] = np.array(OBSERVATIONS)
        for k, v in self.view_probs.items():
            arrays[f"view/{k}"] = v
        if d.view_lateral is not None and d.view_split is not None:
            arrays["view/lateral"] = d.view_lateral
            arrays["view/split"] = d.view_split
        tmp = self.out / "logits.tmp.npz"
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(self.out / "logits.npz")

    def write_weights(self, name: str, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.out / f"{name}.tmp"
        save_file(state, str(tmp))
        tmp.replace(self.out / f"{name}.safetensors")


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.training.gpu_fit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pack", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget, load included")
    p.add_argument("--reserve-s", type=float, default=25.0, help="kept for evaluation and saving")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="arch:size,... by priority")
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--min-epochs", type=int, default=6)
    p.add_argument("--target-epochs", type=int, default=15, help="drop '?' candidates below")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--epochs", type=int, default=0, help="fixed epoch count (skips the timing)")
    p.add_argument("--selection-share", type=float, default=0.5)
    p.add_argument(
        "--long-factor",
        type=float,
        default=2.0,
        help="train the winner again for this many times the selection epochs (time allowing)",
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="seeds of the winner at the selection length"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the selection runs (later runs count on)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lateral-dropout", type=float, default=0.3)
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument(
        "--balance-sources",
        action="store_true",
        help="weight the loss so each label's positives and negatives balance within each source",
    )
    p.add_argument(
        "--balance-clip",
        type=float,
        default=BALANCE_CLIP,
        help="with --balance-sources: class weights clipped to [1/clip, clip]",
    )
    p.add_argument("--uncertainty", default="u-ignore", choices=["u-ignore", "u-zeros", "u-ones"])
    p.add_argument("--view-epochs", type=int, default=40, help="0 = no view classifier")
    p.add_argument("--time-steps", type=int, default=8, help="timed steps per candidate")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="decode threads (0 = all cores)")
    p.add_argument("--quick", action="store_true", help="tiny CPU debug run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = process_start() if argv is None else time.time()
    deadline = t_start + args.budget_s
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if dev.type == "cuda":
        # benchmark mode re-tunes every new batch shape (laterals vary): off unless asked
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    threads = args.threads or os.cpu_count() or 4
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(args.out / "fit.log")],
    )

    def say(msg: str) -> None:
        log.info("[%5.0f s] %s", time.time() - t_start, msg)
        for h in logging.getLogger().handlers:
            h.flush()

    specs = [c.strip() for c in args.candidates.split(",") if c.strip()]
    optional = {
        (c.split(":")[0], int(c.rstrip("?").split(":")[1])) for c in specs if c.endswith("?")
    }
    cands = [(c.split(":")[0], int(c.rstrip("?").split(":")[1])) for c in specs]
    limit = None
    if args.quick:
        size_map = {224: 64, 320: 96}
        cands = [(a, size_map.get(s, s)) for a, s in cands]
        optional = {(a, size_map.get(s, s)) for a, s in optional}
        limit = {"train": 48, "val": 40, "test": 16, "chexpert_test": 4}
        args.max_epochs, args.min_epochs, args.time_steps = 2, 1, 2
        args.view_epochs = min(args.view_epochs, 1)
        args.batch_size = min(args.batch_size, 16)
        args.seeds = min(args.seeds, 2)
        args.long_factor = min(args.long_factor, 2.0)
    for a, _ in cands:
        if a not in ARCHS:
            raise SystemExit(f"unknown architecture {a!r}: one of {', '.join(ARCHS)}")
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    say(f"device {dev} ({gpu}), torch {torch.__version__}, {threads} decode threads")
    data = load_data(args.pack, [s for _, s in cands], dev, args.uncertainty, threads, limit)
    sync(dev)
    counts = {k: len(data.rows(k)) for k in PACK_SPLITS}
    say(f"pack loaded: {counts} studies, sizes {sorted(data.images)}")
    outs = Outputs(args.out, data)
    outs.log.update(
        device=f"{dev} ({gpu})",
        machine=cpu_machine(),
        torch=torch.__version__,
        args={k: str(v) for k, v in vars(args).items()},
        studies=counts,
        load_seconds=round(time.time() - t_start, 1),
    )
    outs.write_log()

    # view classifier first: it is cheap
    if args.view_epochs and data.view_images is not None:
        vdeadline = min(deadline - args.reserve_s, time.time() + 0.08 * args.budget_s)
        vstate, vrep, vprobs = train_view(data, dev, args.view_epochs, 0, vdeadline)
        outs.view_probs = vprobs
        outs.log["view_classifier"] = vrep
        outs.write_weights("view_classifier", half_state(vstate))
        outs.write_log()
        say(f"view classifier: {json.dumps({k: v for k, v in vrep.items() if 'loss' not in k})}")

    fitter = Fitter(
        data,
        dev,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lateral_dropout=args.lateral_dropout,
        gamma=args.gamma,
        balance_sources=args.balance_sources,
        balance_clip=args.balance_clip,
    )
    # timing -> epochs
    epoch_s: dict[tuple[str, int], float] = {}
    if not args.epochs:
        for a, s in cands:
            epoch_s[(a, s)] = fitter.time_steps(a, s, args.time_steps)
            say(f"timing {a}:{s}: {epoch_s[(a, s)]:.2f} s per epoch")
        budget = (deadline - time.time() - args.reserve_s) * args.selection_share
        first = cands[0]
        while cands:
            total = sum(epoch_s[c] for c in cands) * 1.1
            epochs = min(args.max_epochs, int(budget / total))
            opt = [c for c in cands if c in optional]
            if opt and epochs < args.target_epochs:
                say(f"dropping optional {opt[-1]}: {epochs} epochs < {args.target_epochs}")
                cands.remove(opt[-1])
                continue
            if epochs >= args.min_epochs:
                break
            say(f"dropping candidate {cands[-1]}: {args.min_epochs} epochs of all do not fit")
            cands = cands[:-1]
        if not cands:  # keep the first (the shipped kind) with what fits
            cands = [first]
            epochs = max(1, int(budget / (epoch_s[first] * 1.1)))
            say(f"only {first} for {epochs} epochs fits the budget")
    else:
        epochs = args.epochs
    outs.log["selection"] = {
        "epochs": epochs,
        "candidates": [f"{a}:{s}" for a, s in cands],
        "seconds_per_epoch_timed": {f"{a}:{s}": round(v, 3) for (a, s), v in epoch_s.items()},
        "rule": f"each candidate trained the same epochs with seed {args.seed}; score = mean of "
        "the validation 5-label competition AUROC and Model 1 AUROC; test split never used",
    }
    say(f"selection: {len(cands)} candidates x {epochs} epochs")

    runs: list[Run] = []
    hard = deadline - args.reserve_s
    for a, s in cands:
        run = Run(f"{a}:{s}", a, s, args.seed, epochs)
        try:
            fitter.train(run, hard, log_every=max(1, epochs // 4))
        except torch.OutOfMemoryError as exc:
            run.error = f"out of memory: {exc}"[:300]
            torch.cuda.empty_cache()
        runs.append(run)
        outs.log["runs"] = [r.summary() for r in runs]
        outs.write_log()
        v = run.val
        say(
            f"{run.name}: val score {v.get('score')} (5-label {v.get('competition5_mean_auroc')}"
            f", Model 1 {v.get('model1_auroc')}, all {v.get('mean_auroc_all_labels')}) "
            f"{run.seconds:.0f} s, {run.images_per_s:.0f} img/s {run.error or ''}"
        )
    done = [r for r in runs if r.complete and r.val.get("score") is not None]
    if not done:
        outs.write_logits(runs)
        raise SystemExit("no candidate finished")
    best = max(done, key=lambda r: r.val["score"])
    outs.log["selection"]["winner"] = best.name
    outs.log["selection"]["ranking"] = [
        (r.name, r.val["score"]) for r in sorted(done, key=lambda r: -r.val["score"])
    ]
    assert best.state is not None
    best.weights = f"model2_s{args.seed}"
    outs.write_weights(best.weights, half_state(best.state))
    outs.log["runs"] = [r.summary() for r in runs]
    others: dict[str, torch.Tensor] = {}
    winner_files = args.seeds + (1 if args.long_factor > 1 else 0)
    room = min(MAX_FILE_BYTES, MAX_OUT_BYTES - winner_files * state_bytes(best.state) - 1_000_000)
    for r in sorted(done, key=lambda r: -r.val["score"]):
        if r is best or r.state is None:
            continue
        st = half_state(r.state, prefix=f"{r.name}/")
        if state_bytes(others) + state_bytes(st) <= room:
            others.update(st)
    if others:
        outs.write_weights("candidates", others)
    outs.write_logits(runs)
    outs.write_log()
    say(f"winner {best.name} (score {best.val['score']}); seed {args.seed} written")

    # the winner again, trained longer (the serving code loads one network, so a longer run is
    # worth more than an ensemble); then extra seeds at the selection length while time allows
    per_epoch = best.seconds / max(len(best.losses), 1) * 1.1
    left = deadline - args.reserve_s - time.time()
    long_epochs = min(round(best.epochs * args.long_factor), int((left - 5) / per_epoch))
    if args.long_factor > 1 and long_epochs >= best.epochs * 1.3:
        run = Run(best.name, best.arch, best.size, args.seed + 1, long_epochs, tag="long")
        fitter.train(run, hard, log_every=max(1, long_epochs // 4))
        runs.append(run)
        if run.complete and run.state is not None:
            run.weights = "model2_long"
            outs.write_weights(run.weights, half_state(run.state))
        say(f"{run.name} long ({long_epochs} epochs): val score {run.val.get('score')}")
    else:
        say(f"no long run: {left:.0f} s left allow {long_epochs} epochs")
    outs.log["runs"] = [r.summary() for r in runs]
    outs.write_logits(runs)
    outs.write_log()
    seeds_done = [best]
    for seed in range(2, args.seeds + 1):
        left = deadline - args.reserve_s - time.time()
        if left < best.seconds * 1.15 + 3:
            say(f"no time for seed {seed} ({left:.0f} s left)")
            break
        run = Run(best.name, best.arch, best.size, args.seed + seed, best.epochs)
        fitter.train(run, hard, log_every=max(1, best.epochs // 2))
        runs.append(run)
        if run.complete and run.state is not None:
            seeds_done.append(run)
            run.weights = f"model2_s{args.seed + seed}"
            outs.write_weights(run.weights, half_state(run.state))
        outs.log["runs"] = [r.summary() for r in runs]
        say(f"{run.name} seed {seed}: val score {run.val.get('score')}")
        outs.write_logits(runs)
        outs.write_log()
    if len(seeds_done) > 1:
        mean_logits = np.mean([r.logits["val"] for r in seeds_done], axis=0)
        outs.log["ensemble"] = {
            "candidate": best.name,
            "seeds": [r.seed for r in seeds_done],
            "validation_mean_logits": scores(data.raw[data.rows("val")], mean_logits),
            "note": "measured only: the serving code loads one network",
        }
        say(f"ensemble of {len(seeds_done)}: {outs.log['ensemble']['validation_mean_logits']}")
    outs.log["total_seconds"] = round(time.time() - t_start, 1)
    outs.write_log()
    say(f"done; files: {sorted(p.name for p in args.out.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
