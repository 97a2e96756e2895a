"""Inference throughput of each model (images/s) at batch 1 and batch 16, on CPU and on CUDA when
available, in one run; Model 2's Grad-CAM one study at a time against batched (ms per study,
ratio); plus the whole Analyzer (mask -> crop -> Model 1 + Model 2 -> Grad-CAM).

    .venv/bin/python bench/models.py [--threads 2] [--weights-dir models/weights] [--repeats 3]

Networks come from the committed cards (their input sizes); a missing card falls back to a
randomly initialised network of the default architecture (speed does not depend on the weights).
The ratio column is throughput relative to the same model at batch 1 on the CPU (the baseline,
measured in the same run). Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder is first on sys.path and would shadow the ``models`` package
# with this very file: put the repository first instead.
REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.config import BUNDLED_WEIGHTS  # noqa: E402


def _nets(
    weights_dir: Path,
) -> dict[str, tuple[Callable[[torch.Tensor], object], torch.nn.Module, int]]:
    from models.classifiers import MultiViewClassifier, load_classifier
    from models.pix2pix import UNetGenerator
    from models.registry import read_card
    from models.view_classifier import ViewClassifier, ViewCNN

    out: dict[str, tuple[Callable[[torch.Tensor], object], torch.nn.Module, int]] = {}
    p = weights_dir / "lung_mask.json"
    if p.exists():
        c = read_card(p)
        gen = UNetGenerator(
            ngf=int(c.hyperparameters.get("ngf", 16)), depth=int(c.hyperparameters.get("depth", 8))
        )
        out["lung_mask (Pix2Pix U-Net)"] = (gen, gen, c.input_size)
    else:
        gen = UNetGenerator(ngf=16, depth=8)
        out["lung_mask (random, ngf 16)"] = (gen, gen, 256)
    for name in ("model1", "model2"):
        p = weights_dir / f"{name}.json"
        if p.exists():
            card, net = load_classifier(p)
            size = card.input_size
            what = f"{len(card.members) or 1} x DenseNet"
        else:
            net, size = MultiViewClassifier(1 if name == "model1" else 14), 224
            what = "random DenseNet"
        out[f"{name} frontal ({what})"] = (net, net, size)
        out[f"{name} frontal+lateral (studies/s)"] = ((lambda x, n=net: n(x, x)), net, size)
    p = weights_dir / "view_classifier.json"
    if p.exists():
        vc = ViewClassifier.from_card(p)
        out["view classifier"] = (vc.net, vc.net, vc.card.input_size)
    else:
        v = ViewCNN()
        out["view classifier"] = (v, v, 128)
    return out


def _throughput(
    fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int, device: torch.device
) -> float:
    from models.common import autocast

    with torch.inference_mode(), autocast(device):
        fn(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * x.shape[0] / (time.perf_counter() - t0)


def _analyzer_rate(weights_dir: Path, device: str, batch: int, repeats: int) -> float | None:
    from models.analyzer import Analyzer
    from models.api import StudyInput
    from models.config import ModelsConfig

    try:
        an = Analyzer.from_config(ModelsConfig(weights_dir=weights_dir), device=device)
    except Exception as exc:  # noqa: BLE001 - a missing card just skips this row
        print(f"  (analyzer skipped: {exc})")
        return None
    rng = np.random.default_rng(0)
    studies = [
        StudyInput(
            str(i),
            rng.random((1024, 1024), dtype=np.float32),
            rng.random((1024, 1024), dtype=np.float32) if i % 2 else None,
        )
        for i in range(batch)
    ]
    an.analyse(studies[:1])
    t0 = time.perf_counter()
    for _ in range(repeats):
        an.analyse(studies)
    return repeats * batch / (time.perf_counter() - t0)


def _gradcam_rows(weights_dir: Path, device: str, batch: int, repeats: int) -> None:
    """Model 2's Grad-CAM for ``batch`` studies with three Present labels each: one study at a
    time (the Analyzer before batching; the baseline) against ``heatmaps_batch`` (one forward
    pass and one backward pass per label for the batch), ms per study and the ratio, with the
    largest difference between the two paths' uint8 maps."""
    from models.classifiers import Classifier

    path = weights_dir / "model2.json"
    try:
        model = Classifier.from_card(path, device)
    except Exception as exc:  # noqa: BLE001 - a missing card just skips these rows
        print(f"  (Grad-CAM skipped: {exc})")
        return
    rng = np.random.default_rng(1)
    size = model.card.input_size
    base = rng.random((size, size), dtype=np.float32)
    images = [
        np.clip(base + rng.normal(0, 0.1, base.shape), 0, 1).astype(np.float32)
        for _ in range(batch)
    ]
    laterals: list[np.ndarray | None] = [None] * batch
    labels = [["Lung Opacity", "Pleural Effusion", "Edema"]] * batch
    model.heatmaps_batch(images[:2], laterals[:2], labels[:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        alone = [model.heatmaps(im, None, labs) for im, labs in zip(images, labels, strict=True)]
    one = (time.perf_counter() - t0) / (repeats * batch)
    t0 = time.perf_counter()
    for _ in range(repeats):
        batched = model.heatmaps_batch(images, laterals, labels)
    many = (time.perf_counter() - t0) / (repeats * batch)
    diff = max(
        int(np.abs(a[k].astype(int) - b[k].astype(int)).max())
        for a, b in zip(alone, batched, strict=True)
        for k in a
    )
    print(
        f"{'Grad-CAM, 3 labels, per study':34s} {size:6d} {device:>6s} {batch:5d} "
        f"{one * 1000:7.1f}ms {1.0:6.2f}"
    )
    print(
        f"{'Grad-CAM, 3 labels, batched':34s} {size:6d} {device:>6s} {batch:5d} "
        f"{many * 1000:7.1f}ms {one / many:6.2f}   (largest map difference {diff}/255)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights-dir", type=Path, default=BUNDLED_WEIGHTS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-analyzer", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    nets = _nets(args.weights_dir)
    print(
        f"torch {torch.__version__}, CPU threads {args.threads}, "
        f"CUDA {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}"
    )
    print(
        f"{'model':34s} {'input':>6s} {'device':>6s} {'batch':>5s} {'images/s':>9s} {'ratio':>6s}"
    )
    for name, (fn, module, size) in nets.items():
        base = None
        for dev in devices:
            module.to(dev).eval()
            for batch in (1, 16):
                x = torch.rand(batch, 1, size, size, device=dev)
                reps = args.repeats if dev.type == "cpu" else max(args.repeats, 20)
                rate = _throughput(fn, x, max(1, reps if batch == 1 else max(1, reps // 2)), dev)
                base = base or rate
                print(
                    f"{name:34s} {size:6d} {dev.type:>6s} {batch:5d} {rate:9.1f} {rate / base:6.2f}"
                )
        module.to("cpu")
    for dev in devices:
        _gradcam_rows(args.weights_dir, dev.type, 16, args.repeats if dev.type == "cpu" else 10)
    if not args.no_analyzer:
        for dev in devices:
            for batch in (1, 16):
                rate = _analyzer_rate(
                    args.weights_dir, dev.type, batch, 1 if dev.type == "cpu" else 3
                )
                if rate is not None:
                    print(
                        f"{'Analyzer (1024 px studies, end to end)':34s} {'':>6s} "
                        f"{dev.type:>6s} {batch:5d} "
                        f"{rate:9.1f} {'':>6s}"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
