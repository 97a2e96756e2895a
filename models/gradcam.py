"""Grad-CAM (Selvaraju et al. 2017) on the frontal image's last dense block.

The caller splits its network in two: ``feature_fn(x) -> feature map`` (the last dense block,
after its norm and ReLU) and ``head_fn(feature map) -> logits`` (pooling, fusion with the lateral,
linear head). A heatmap is ReLU(sum_k w_k A_k) with w_k the spatially averaged gradient of the
label's logit, upsampled to the network input, stretched to 0..255 and handed over as uint8 at
that resolution (:class:`models.api.Heatmap` says where it lies in the original frontal image).
A 320 px map is 100 KB, where a float32 map in a 2k frontal's frame was ~16 MB: maps stay small
until the key image draws them at display size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch

from models.api import CropBox


def grad_cam(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    label_indices: Sequence[int],
) -> np.ndarray:
    """Heatmaps for one image ``x`` (1, C, H, W): uint8 (K, H, W), one per label index, each
    stretched so that its minimum is 0 and its maximum 255 (all 0 when the map is flat).

    Gradients are computed even under ``torch.no_grad`` callers (enabled locally); the network's
    parameters are not changed and need not require grad."""
    if x.shape[0] != 1:
        raise ValueError(f"grad_cam takes one image at a time, got a batch of {x.shape[0]}")
    return grad_cam_batch(feature_fn, head_fn, x, [label_indices])[0]


def grad_cam_batch(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    wanted: Sequence[Sequence[int]],
) -> list[np.ndarray]:
    """Heatmaps for a batch ``x`` (N, C, H, W): for image i, uint8 (K_i, H, W) for the label
    indices ``wanted[i]``, as :func:`grad_cam` makes them one image at a time.

    One forward pass for the batch and one backward pass per distinct label (the sum of that
    label's logits over the images that want it), not one forward and one backward per image
    and label: the network runs in eval mode, where no layer mixes images of a batch, so each
    image's gradient is its own. ``head_fn`` takes the whole batch's feature map."""
    if x.shape[0] != len(wanted):
        raise ValueError(f"{x.shape[0]} images but {len(wanted)} label lists")
    h, w = x.shape[-2:]
    if not any(wanted):
        return [np.zeros((0, h, w), dtype=np.uint8) for _ in wanted]
    labels = sorted({j for js in wanted for j in js})
    cams: dict[tuple[int, int], torch.Tensor] = {}
    with torch.enable_grad():
        fmap = feature_fn(x).detach().float().requires_grad_(True)
        logits = head_fn(fmap).float()
        for k, j in enumerate(labels):
            rows = [i for i, js in enumerate(wanted) if j in js]
            (grad,) = torch.autograd.grad(
                logits[rows, j].sum(), fmap, retain_graph=k < len(labels) - 1
            )
            sel = torch.tensor(rows, device=fmap.device)
            weights = grad.index_select(0, sel).mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * fmap.detach().index_select(0, sel)).sum(dim=1))
            for r, i in enumerate(rows):
                cams[(i, j)] = cam[r]
    order = [(i, j) for i, js in enumerate(wanted) for j in js]
    cam_all = torch.nn.functional.interpolate(
        torch.stack([cams[key] for key in order])[:, None],
        size=(h, w),
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    flat = cam_all.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    out = torch.where(
        hi - lo > 1e-12, (cam_all - lo) / (hi - lo).clamp(min=1e-12), torch.zeros_like(cam_all)
    )
    # quantised on the device: a quarter of the bytes to copy back
    maps = out.clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    result, at = [], 0
    for js in wanted:
        result.append(maps[at : at + len(js)])
        at += len(js)
    return result


def to_original_frame(
    cam: np.ndarray, crop: CropBox, original_shape: tuple[int, int]
) -> np.ndarray:
    """Map a heatmap over the (resized) crop back into the original frontal frame: resized to the
    crop's size and placed at the crop box; zero outside it. float32 in [0, 1].

    For analysis and tests only: the worker never makes this full-resolution copy (the key image
    upsamples the uint8 map straight to display size). A uint8 ``cam`` is read as 0..255."""
    out = np.zeros(original_shape, dtype=np.float32)
    ch, cw = crop.y1 - crop.y0, crop.x1 - crop.x0
    if ch <= 0 or cw <= 0:
        raise ValueError(f"crop box {crop} is empty")
    scale = 1 / 255 if cam.dtype == np.uint8 else 1.0
    resized = cv2.resize(cam.astype(np.float32) * scale, (cw, ch), interpolation=cv2.INTER_LINEAR)
    out[crop.y0 : crop.y1, crop.x0 : crop.x1] = np.clip(resized, 0.0, 1.0)
    return out
