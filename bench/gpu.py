"""GPU benchmark, one script for one lent GPU machine (<= 8 minutes): end-to-end studies/s through
the real worker, GPU decode bit-exactness and throughput, models-only throughput.

Sections, each in its own try/except (an error is printed and recorded, the next section runs),
skipped once the time budget (``--budget-s``) is spent; every figure goes to
``<out>/gpu_bench.json``, rewritten after each section:

1. ``env``: torch, CUDA device, nvImageCodec, cores.
2. ``bitexact``: RG1 J2K lossless decoded on the GPU (``dicom_node.gpu_decode``) against pydicom's
   CPU decode, element by element; the windowed images with GPU decode on and off; the lossy J2K
   and the JPEG baseline image's largest difference.
3. ``decode``: GPU decode images/s at batch 64 (to device memory, and to host arrays as the
   worker takes them) against the CPU decoder on every core (a process pool).
4. ``e2e_*``: DICOM files on disk queued ready in a fresh SQLite queue, then the real worker
   (``worker.stages.StagedPipeline`` when it exists, else ``worker.pipeline.Pipeline``) driven by
   ``worker.loop.WorkerLoop`` until every study's SR and key image are written, its result row
   stored and (when the pynetdicom receiver started) its SR delivered over C-STORE on 127.0.0.1.
   Scenarios: uncompressed 1024 px (the SIIM image, decompressed once), uncompressed 2k (RG1,
   decompressed once), JPEG 2000 lossless 2k (RG1_J2KR) with GPU decode, and the same J2K studies
   with ``CXR_GPU_DECODE=off`` (the CPU-decode baseline). Each prints studies/s and the mean of
   every per-stage time the worker recorded per study.
   With ``--processes N`` (default the ``worker.processes: auto`` rule: on CUDA half the
   cores, on the CPU one per core, at most 8 and one per 2 GiB) these four run through N
   worker processes
   (``worker.processes.WorkerProcesses``, as ``serve`` starts them; each loads its own models
   and handles a warm-up batch before the clock starts; the clock stops when every study is
   done and delivered, or at ``--scenario-s``), and ``e2e_uncompressed_1k_in_process`` runs
   the uncompressed 1k studies through the one-process worker first, the baseline of the
   ratio printed at the end.
5. ``models``: lung mask generator and Model 2 images/s at batch 64, bf16 vs fp32; the whole
   analyzer (preprocessing, mask post-processing, both models, Grad-CAM) on 64 decoded 2k images.
6. ``compile``: the same networks under ``torch.compile`` (first-call time and images/s).

    python3 bench/gpu.py --out DIR                       # the GPU run
    .venv/bin/python bench/gpu.py --quick --device cpu --out /tmp/g   # a dry run on any machine
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

DATA = REPO / "tests" / "data"
J2KR = DATA / "RG1_J2KR.dcm"
J2KI = DATA / "RG1_J2KI.dcm"
SIIM = DATA / "siim_cr_pa_secondary_capture.dcm"

log = logging.getLogger("bench.gpu")


def say(*parts: object) -> None:
    print(*parts, flush=True)


# --- bookkeeping ----------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    out: Path
    work: Path
    t_start: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    analyzer: Any = None
    templates: dict[str, Path] = field(default_factory=dict)
    receiver_port: int | None = None

    def left(self) -> float:
        return float(self.args.budget_s) - (time.perf_counter() - self.t_start)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t_start, 1)
        path = self.out / "gpu_bench.json"
        path.write_text(json.dumps(self.results, indent=2, default=str))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed_rate(ctx: Ctx, fn: Callable[[], object], per_call: int, seconds: float) -> float:
    """Items/s of ``fn`` (``per_call`` items per call) over about ``seconds`` after one warm-up."""
    fn()
    ctx.sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n >= 3 and time.perf_counter() - t0 >= seconds:
            break
        if n >= 2 and ctx.args.quick:
            break
    ctx.sync()
    return n * per_call / (time.perf_counter() - t0)


# --- 1. environment -------------------------------------------------------------------------------


def section_env(ctx: Ctx) -> dict[str, Any]:
    from dicom_node import gpu_decode

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(ctx.device),
        "pydicom": pydicom.__version__,
    }
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        nv = gpu_decode._nvimgcodec()
        info["nvimgcodec"] = getattr(nv, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        info["nvimgcodec"] = f"absent ({type(exc).__name__})"
    info["gpu_decode_available"] = gpu_decode.available()
    for mod in ("pylibjpeg", "openjpeg", "libjpeg", "PIL", "highdicom", "pynetdicom"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception:  # noqa: BLE001
            info[mod] = "absent"
    for k, v in info.items():
        say(f"  {k}: {v}")
    return info


def make_templates(ctx: Ctx) -> dict[str, Path]:
    """The studies' source files: the SIIM JPEG and RG1 J2K images decompressed once (saved
    Explicit VR Little Endian) and RG1 J2K lossless as it is."""
    tdir = ctx.work / "templates"
    tdir.mkdir(parents=True, exist_ok=True)
    out = {"j2k_2k": J2KR}
    for name, src in (("unc_1k", SIIM), ("unc_2k", J2KR)):
        ds = pydicom.dcmread(src)
        arr = ds.pixel_array
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        ds["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if "LossyImageCompression" in ds and name == "unc_2k":
            pass
        path = tdir / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[name] = path
    for k, p in out.items():
        say(f"  template {k}: {p.name} {p.stat().st_size / 1e6:.1f} MB")
    return out


# --- 2. bit-exactness -----------------------------------------------------------------------------


def section_bitexact(ctx: Ctx) -> dict[str, Any]:
    from dicom_node import gpu_decode
    from dicom_node.pixels import load_image

    res: dict[str, Any] = {"gpu_decode_available": gpu_decode.available()}
    ds = pydicom.dcmread(J2KR)
    cpu = ds.pixel_array
    res["cpu"] = {"shape": list(cpu.shape), "dtype": str(cpu.dtype), "max": int(cpu.max())}
    gpu = gpu_decode.decode_first_frames([ds])[0]
    if gpu is None:
        res["j2k_lossless_bit_exact"] = None
        res["note"] = "GPU decode not available or failed: nothing to compare"
        say("  GPU decode unavailable: bit-exactness not checked")
        return res
    same = gpu.shape == cpu.shape and gpu.dtype == cpu.dtype and np.array_equal(gpu, cpu)
    res["gpu"] = {"shape": list(gpu.shape), "dtype": str(gpu.dtype), "max": int(gpu.max())}
    res["j2k_lossless_bit_exact"] = bool(same)
    if gpu.shape == cpu.shape:
        diff = np.abs(gpu.astype(np.int64) - cpu.astype(np.int64))
        res["j2k_lossless_mismatches"] = int(np.count_nonzero(diff))
        res["j2k_lossless_max_abs_diff"] = int(diff.max())
    os.environ[gpu_decode.ENV_SWITCH] = "off"
    try:
        off = load_image(J2KR).pixels
    finally:
        os.environ.pop(gpu_decode.ENV_SWITCH, None)
    on = load_image(J2KR).pixels
    res["windowed_image_identical"] = bool(np.array_equal(on, off))
    for label, path in (("j2k_lossy", J2KI), ("jpeg_baseline", SIIM)):
        d = pydicom.dcmread(path)
        g = gpu_decode.decode_first_frames([d])[0]
        c = d.pixel_array
        if g is None or g.shape != c.shape:
            res[f"{label}_max_abs_diff"] = None
        else:
            res[f"{label}_max_abs_diff"] = int(
                np.abs(g.astype(np.int64) - c.astype(np.int64)).max()
            )
    say(
        f"  J2K lossless GPU vs CPU bit-exact: {res['j2k_lossless_bit_exact']} "
        f"(mismatching pixels {res.get('j2k_lossless_mismatches')}); windowed image identical: "
        f"{res['windowed_image_identical']}; lossy J2K max diff {res['j2k_lossy_max_abs_diff']}, "
        f"JPEG baseline max diff {res['jpeg_baseline_max_abs_diff']}"
    )
    return res


# --- 3. decode throughput -------------------------------------------------------------------------


def _cpu_decode(path: str) -> int:
    os.environ["CXR_GPU_DECODE"] = "off"
    return int(pydicom.dcmread(path).pixel_array.shape[0])


def section_decode(ctx: Ctx) -> dict[str, Any]:
    from dicom_node import gpu_decode

    res: dict[str, Any] = {}
    batch = 4 if ctx.args.quick else 64
    ds = pydicom.dcmread(J2KR)
    if gpu_decode.available():
        nv = gpu_decode._nvimgcodec()
        dec: Any = gpu_decode._decoder()
        stream = gpu_decode.first_frame_codestream(ds)
        params = gpu_decode._decode_params(nv)

        def to_device() -> None:
            imgs = dec.decode([stream] * batch, params=params)
            # zero-copy views of the decoded frames as torch tensors (what a GPU consumer reads)
            ts = [torch.as_tensor(im, device="cuda") for im in imgs]
            assert len(ts) == batch

        res["gpu_to_device_img_s"] = round(timed_rate(ctx, to_device, batch, 5.0), 1)
        dss = [ds] * batch
        res["gpu_to_host_img_s"] = round(
            timed_rate(ctx, lambda: gpu_decode.decode_first_frames(dss), batch, 5.0), 1
        )
    workers = os.cpu_count() or 1
    n = workers * (1 if ctx.args.quick else 3)
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA and threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
        list(pool.map(_cpu_decode, [str(J2KR)] * workers))  # start the workers
        t0 = time.perf_counter()
        list(pool.map(_cpu_decode, [str(J2KR)] * n))
        res["cpu_pool_img_s"] = round(n / (time.perf_counter() - t0), 1)
    res["cpu_workers"] = workers
    res["batch"] = batch
    say(f"  J2K lossless 2k decode: {res}")
    return res


# --- 4. end to end --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RECEIVER = r"""
import sys
from pynetdicom import AE, evt, StoragePresentationContexts
def handle(event):
    return 0x0000
ae = AE(ae_title="BENCH_PACS")
ae.supported_contexts = StoragePresentationContexts
ae.maximum_pdu_size = 0
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, handle)])
"""


def start_receiver(ctx: Ctx) -> subprocess.Popen[bytes] | None:
    """A pynetdicom Storage SCP on 127.0.0.1 that accepts and discards (a PACS stand-in)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                ctx.receiver_port = port
                say(f"  receiver (pynetdicom storage SCP) on 127.0.0.1:{port}, pid {proc.pid}")
                return proc
        time.sleep(0.1)
    say("  receiver did not start: end-to-end runs exclude delivery")
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    return None


def fill_queue(root: Path, template: Path, n: int, *, ready: bool = True) -> Any:
    from db.migrate import upgrade
    from db.queue import Queue
    from dicom_node.sink import StoredInstance

    storage = root / "storage"
    url = f"sqlite:///{root / 'queue.sqlite3'}"
    upgrade(url)
    queue = Queue.from_url(url, lease_seconds=600, max_attempts=3)
    base = pydicom.dcmread(template)
    for _ in range(n):
        ds = copy.copy(base)  # PixelData bytes are shared; only the UIDs change
        ds.file_meta = copy.deepcopy(base.file_meta)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        rel = f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
        (storage / ds.StudyInstanceUID).mkdir(parents=True)
        ds.save_as(storage / rel, enforce_file_format=True)
        queue.record_instance(
            StoredInstance.from_dataset(
                ds, rel_path=rel, size_bytes=(storage / rel).stat().st_size, calling_ae="BENCH"
            )
        )
    if ready:
        queue.sweep_completion(quiet_seconds=0.001, max_wait_seconds=0.001)
    return queue


def app_config(ctx: Ctx, root: Path, label: str, processes: int = 1) -> Any:
    from worker.config import parse_config

    dest = []
    if ctx.receiver_port is not None:
        dest = [
            {
                "name": "pacs",
                "ae_title": "BENCH_PACS",
                "host": "127.0.0.1",
                "port": ctx.receiver_port,
            }
        ]
    return parse_config(
        {
            "dicom": {"storage_dir": str(root / "storage"), "min_free_disk_mb": 10},
            "queue": {
                "database_url": f"sqlite:///{root / 'queue.sqlite3'}",
                "lease_seconds": 600,
            },
            "destinations": dest,
            "results_dir": str(root / "results"),
            "worker": {
                "device": ctx.args.device,
                "batch_size": ctx.args.batch_size,
                "name": f"bench-{label}",
                "processes": processes,
                "overlap": processes == 1 or ctx.args.child_overlap == "on",
                "poll_interval_seconds": 0.02,
            },
            "logging": {"level": "WARNING"},
        },
        environ={},
    )


def make_processor(cfg: Any, queue: Any, analyzer: Any, prepare_in: str) -> tuple[Any, str]:
    """The overlapped engine (``worker.stages.StagedPipeline`` around a pipeline that shares the
    loaded analyzer), or the serial pipeline where it is missing."""
    from worker.pipeline import Pipeline

    pipeline = Pipeline(cfg, queue, analyzer)
    try:
        from worker.stages import StagedPipeline
    except ImportError:
        return pipeline, "serial (worker.pipeline.Pipeline)"
    staged = StagedPipeline(pipeline, prepare_in=prepare_in)
    pool = getattr(staged, "_prepare_pool", None)
    if prepare_in == "process" and pool is not None:
        # start the pool's processes before the clock does (spawned: each imports the worker)
        list(pool.map(abs, range(4 * staged.prepare_workers)))
    engine = (
        f"overlapped (StagedPipeline: {staged.prepare_workers} prepare {prepare_in}s, "
        f"{staged.finish_workers} finish threads, {staged.max_inflight_batches} batches in flight)"
    )
    return staged, engine


def _close(processor: Any) -> None:
    for name in ("close", "shutdown"):
        fn = getattr(processor, name, None)
        if callable(fn):
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.warning("processor %s failed", name, exc_info=True)
            return


#: stage (as the brief names it) -> the worker's timings key (overlapped, then serial pipeline)
STAGES = {
    "decode": ("prepare", "read_decode"),
    "models": ("models", "models_batch_share"),
    "report": ("report", "report_sr"),
    "key_image": ("key_image",),
    "writes": ("writes",),
}


def _stage_summary(
    timings: list[dict[str, float]],
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Mean of every recorded key, and per stage ``[wall ms, CPU ms]`` per study."""
    keys = sorted({k for t in timings for k in t})
    means = {k: round(statistics.fmean([t[k] for t in timings if k in t]), 2) for k in keys}
    groups: dict[str, list[float]] = {}
    for stage, names in STAGES.items():
        for name in names:
            if f"{name}_wall_ms" in means:
                groups[stage] = [means[f"{name}_wall_ms"], means.get(f"{name}_cpu_ms", -1.0)]
                break
            if name in means:
                groups[stage] = [means[name], -1.0]
                break
    return means, groups


def _wait_done(queue: Any, total: int, cap: float) -> bool:
    """Until ``total`` studies are done and nothing is left to deliver, or ``cap`` seconds;
    True when all were done."""
    deadline = time.perf_counter() + cap
    while time.perf_counter() < deadline:
        snap = queue.snapshot()
        unsent = sum(v for (_, st), v in snap.deliveries.items() if st in ("pending", "retry"))
        finished = sum(snap.studies.get(k, 0) for k in ("done", "failed", "ignored"))
        if finished >= total and unsent == 0:
            return True
        time.sleep(0.05)
    return False


def _run_processes(
    ctx: Ctx, label: str, root: Path, template: str, n: int, processes: int
) -> tuple[Any, int, float, str]:
    """The multi-process worker (``worker.processes``, as ``serve`` runs it): children load
    their own models and each handles a warm-up batch, then ``n`` studies turn ready at once
    and the clock runs until every one is done (or the cap). (queue, studies done within the
    time, seconds, engine)."""
    from worker.processes import WorkerProcesses, threads_per_child

    queue = fill_queue(root, ctx.templates[template], 0, ready=False)
    cfg = app_config(ctx, root, label, processes)
    warm = processes * min(8, ctx.args.batch_size)
    fill_queue(root, ctx.templates[template], warm)
    workers = WorkerProcesses(cfg, processes)
    t0 = time.perf_counter()
    try:
        workers.start(ready_timeout=max(60.0, ctx.left() - 30))
        loaded = time.perf_counter() - t0
        _wait_done(queue, warm, max(10.0, min(120.0, ctx.left() - 60)))
        say(f"  {label}: {processes} worker processes up in {loaded:.1f} s, {warm} warm-up studies")
        fill_queue(root, ctx.templates[template], n, ready=False)
        cap = min(ctx.args.scenario_s, max(5.0, ctx.left() - 60))
        t0 = time.perf_counter()
        queue.sweep_completion(quiet_seconds=0.001, max_wait_seconds=0.001)
        _wait_done(queue, warm + n, cap)
        elapsed = time.perf_counter() - t0
        done = queue.snapshot().studies.get("done", 0) - warm
    finally:
        workers.stop(timeout=60)
    engine = (
        f"{processes} worker processes ({'overlapped' if cfg.worker.overlap else 'serial'} "
        f"pipeline each, {threads_per_child(processes)} torch threads each)"
    )
    return queue, done, elapsed, engine


def run_e2e(
    ctx: Ctx,
    label: str,
    template: str,
    n: int,
    *,
    gpu_decode_on: bool,
    prepare_in: str = "thread",
    processes: int = 1,
) -> dict[str, Any]:
    root = ctx.work / label
    root.mkdir(parents=True)
    if gpu_decode_on:
        os.environ.pop("CXR_GPU_DECODE", None)
    else:
        os.environ["CXR_GPU_DECODE"] = "off"  # the children inherit it
    timed: int | None = None  # studies done within the time (the processes' drain is not timed)
    per_study: dict[str, Any] = {}
    if processes > 1:
        try:
            queue, timed, elapsed, engine = _run_processes(ctx, label, root, template, n, processes)
        finally:
            os.environ.pop("CXR_GPU_DECODE", None)
        claimed = n
    else:
        queue, claimed, elapsed, engine, per_study = _run_in_process(
            ctx, label, root, template, n, prepare_in
        )
    res = _summary(ctx, label, queue, n, claimed, elapsed, engine, per_study, gpu_decode_on, timed)
    res["processes"] = processes
    return res


def _run_in_process(
    ctx: Ctx, label: str, root: Path, template: str, n: int, prepare_in: str
) -> tuple[Any, int, float, str, dict[str, Any]]:
    from worker.loop import WorkerLoop

    t0 = time.perf_counter()
    queue = fill_queue(root, ctx.templates[template], n)
    say(f"  {label}: {n} studies queued in {time.perf_counter() - t0:.1f} s")
    cfg = app_config(ctx, root, label)
    processor, engine = make_processor(cfg, queue, ctx.analyzer, prepare_in)
    loop = WorkerLoop(
        queue,
        processor,
        worker_id=f"bench-{label}",
        batch_size=ctx.args.batch_size,
        poll_interval=0.02,
        heartbeat_interval=30,
    )
    # the batches in flight when the cap is reached still finish (drain): leave room for them
    cap = min(ctx.args.scenario_s, max(5.0, ctx.left() - 60))
    try:
        t0 = time.perf_counter()
        claimed = 0
        while True:
            got = loop.run_once()
            claimed += got
            if not got or time.perf_counter() - t0 > cap:
                break
        loop.drain()
        elapsed = time.perf_counter() - t0
        stats = getattr(processor, "stats", None)
        per_study = stats.per_study() if stats is not None and hasattr(stats, "per_study") else {}
    finally:
        _close(processor)
        os.environ.pop("CXR_GPU_DECODE", None)
    return queue, claimed, elapsed, engine, per_study


def _summary(
    ctx: Ctx,
    label: str,
    queue: Any,
    n: int,
    claimed: int,
    elapsed: float,
    engine: str,
    per_study: dict[str, Any],
    gpu_decode_on: bool,
    timed: int | None = None,
) -> dict[str, Any]:
    """``timed``: studies done within ``elapsed`` when the drain after it was not timed (the
    processes' runs); by default every study done counts."""
    root = ctx.work / label
    states: dict[str, int] = {}
    timings: list[dict[str, float]] = []
    delivered = 0
    for s in queue.latest(n):
        d = queue.study(s.study_uid)
        if d is None:
            continue
        states[d.state] = states.get(d.state, 0) + 1
        if d.results:
            timings.append(
                {
                    k: float(v)
                    for k, v in (d.results[-1].payload.get("timings_ms") or {}).items()
                    if isinstance(v, int | float)
                }
            )
        delivered += any(x.state == "delivered" for x in d.deliveries)
    queue.close()
    done = states.get("done", 0) if timed is None else timed
    means, groups = _stage_summary(timings)
    res = {
        "engine": engine,
        "studies_queued": n,
        "studies_claimed": claimed,
        "studies_done": done,
        "states": states,
        "delivered": delivered if ctx.receiver_port is not None else "excluded",
        "seconds": round(elapsed, 2),
        "studies_per_s": round(done / elapsed, 2) if elapsed > 0 else None,
        "gpu_decode": gpu_decode_on,
        "batch_size": ctx.args.batch_size,
        "stage_ms_per_study": groups,
        "engine_stats_per_study": {k: list(v) for k, v in per_study.items()},
        "timings_ms_mean": means,
    }
    say(
        f"  {label}: {done}/{n} done in {elapsed:.1f} s = {res['studies_per_s']} studies/s "
        f"[{engine}; delivered {res['delivered']}]\n    stages [wall, CPU] ms/study {groups}"
    )
    shutil.rmtree(root, ignore_errors=True)
    return res


def load_analyzer(ctx: Ctx, *, compile_: bool = False) -> Any:
    from models.analyzer import Analyzer
    from models.config import ModelsConfig

    return Analyzer.from_config(
        ModelsConfig(inference={"compile": compile_}), device=str(ctx.device)
    )


def section_warmup(ctx: Ctx) -> dict[str, Any]:
    t0 = time.perf_counter()
    ctx.analyzer = load_analyzer(ctx)
    loaded = time.perf_counter() - t0
    n = 2 * ctx.args.batch_size
    return {
        "model_load_s": round(loaded, 1),
        "run_2k": run_e2e(ctx, "warmup2k", "unc_2k", n, gpu_decode_on=True),
        "run_j2k": run_e2e(ctx, "warmupj2k", "j2k_2k", n // 2, gpu_decode_on=True),
    }


# --- 5. models only -------------------------------------------------------------------------------


def _net_rates(ctx: Ctx, analyzer: Any, batch: int, seconds: float) -> dict[str, float]:
    from models.common import autocast, channels_last

    dev = ctx.device
    gen = analyzer.masker._forward
    clf = analyzer.model2
    net = getattr(clf, "_forward", None) or clf.net
    x_mask = torch.randn(batch, 1, analyzer.masker.size, analyzer.masker.size, device=dev)
    x_clf = torch.randn(batch, 1, clf.card.input_size, clf.card.input_size, device=dev)
    if analyzer.masker.channels_last:
        x_mask = channels_last(x_mask)
    if getattr(clf, "channels_last", False):
        x_clf = channels_last(x_clf)
    out: dict[str, float] = {}
    for precision in ("bf16", "fp32"):
        if precision == "bf16" and dev.type != "cuda":
            continue
        bf16 = precision == "bf16"

        def run_mask(bf16: bool = bf16) -> None:
            with torch.inference_mode():
                if bf16:
                    with autocast(dev):
                        gen(x_mask)
                else:
                    gen(x_mask)

        def run_clf(bf16: bool = bf16) -> None:
            with torch.inference_mode():
                if bf16:
                    with autocast(dev):
                        net(x_clf, None, None)
                else:
                    net(x_clf, None, None)

        out[f"lung_mask_{precision}_img_s"] = round(timed_rate(ctx, run_mask, batch, seconds), 1)
        out[f"model2_{precision}_img_s"] = round(timed_rate(ctx, run_clf, batch, seconds), 1)
    return out


def section_models(ctx: Ctx) -> dict[str, Any]:
    from dicom_node.pixels import load_image
    from models.api import StudyInput

    batch = 4 if ctx.args.quick else 64
    res: dict[str, Any] = {"batch": batch}
    res.update(_net_rates(ctx, ctx.analyzer, batch, 3.0))
    frontal = load_image(ctx.templates["unc_2k"]).pixels
    inputs = [
        StudyInput(key=str(i), frontal=frontal.copy(), lateral=None, projection="PA")
        for i in range(batch)
    ]
    ctx.analyzer.analyse(inputs)  # warm-up at this batch size
    ctx.sync()
    t0 = time.perf_counter()
    outs = ctx.analyzer.analyse(inputs)
    ctx.sync()
    dt = time.perf_counter() - t0
    ok = [o for o in outs if not isinstance(o, Exception)]
    res["analyzer_2k_studies_s"] = round(batch / dt, 1)
    if ok:
        keys = sorted({k for o in ok for k in o.timings_ms})
        res["analyzer_timings_ms_mean"] = {
            k: round(statistics.fmean([o.timings_ms.get(k, 0.0) for o in ok]), 2) for k in keys
        }
        res["analyzer_present_findings_mean"] = round(
            statistics.fmean([sum(f.present for f in o.model2) for o in ok]), 2
        )
    res["analyzer_errors"] = len(outs) - len(ok)
    say(f"  models: {res}")
    return res


def section_compile(ctx: Ctx) -> dict[str, Any]:
    if ctx.device.type != "cuda":
        return {"skipped": "torch.compile is measured on CUDA only"}
    t0 = time.perf_counter()
    compiled = load_analyzer(ctx, compile_=True)
    batch = 64
    res: dict[str, Any] = {}
    t1 = time.perf_counter()
    rates = _net_rates(ctx, compiled, batch, 3.0)
    res["load_s"] = round(t1 - t0, 1)
    res["first_calls_and_measure_s"] = round(time.perf_counter() - t1, 1)
    res.update({f"compiled_{k}": v for k, v in rates.items()})
    say(f"  compile: {res}")
    return res


# --- main -----------------------------------------------------------------------------------------


E2E = (
    "e2e_uncompressed_1k_in_process",
    "e2e_uncompressed_1k",
    "e2e_uncompressed_2k",
    "e2e_j2k_gpu_decode",
    "e2e_j2k_cpu_decode",
)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip sections after this")
    ap.add_argument("--scenario-s", type=float, default=30.0, help="cap per end-to-end run")
    ap.add_argument("--studies", type=int, default=0, help="studies per end-to-end run")
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every section")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument(
        "--cpu-prepare-in",
        default="process",
        choices=["thread", "process"],
        help="where the CPU-decode J2K baseline decodes (processes: every core)",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=0,
        help=(
            "worker processes for the e2e runs (worker.processes); default the 'auto' rule: "
            "on CUDA half the cores, on the CPU one per core, at most 8; 1: the in-process worker"
        ),
    )
    ap.add_argument(
        "--child-overlap",
        default="on",
        choices=["on", "off"],
        help="each worker process runs the overlapped pipeline (on) or one batch at a time",
    )
    args = ap.parse_args()
    if not args.batch_size:
        args.batch_size = 4 if args.quick else 64
    if not args.studies:
        args.studies = 6 if args.quick else 512
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    ctx = Ctx(args, args.out, work)
    from models.common import select_device

    ctx.device = select_device(args.device)
    if not args.processes:
        from worker.config import WorkerSection

        args.processes = WorkerSection(processes="auto").process_count(
            cuda=ctx.device.type == "cuda"
        )
    n, procs = args.studies, args.processes
    sections: list[tuple[str, Callable[[Ctx], Any], float]] = [
        ("env", section_env, 0),
        ("templates", lambda c: {k: str(v) for k, v in make_templates(c).items()}, 10),
        ("bitexact", section_bitexact, 10),
        ("warmup", section_warmup, 30),
        (  # the baseline: today's one-process overlapped worker
            "e2e_uncompressed_1k_in_process",
            lambda c: run_e2e(c, "unc1k1", "unc_1k", 2 * n, gpu_decode_on=True),
            30,
        ),
        (
            "e2e_uncompressed_1k",
            lambda c: run_e2e(c, "unc1k", "unc_1k", 2 * n, gpu_decode_on=True, processes=procs),
            40,
        ),
        (
            "e2e_uncompressed_2k",
            lambda c: run_e2e(c, "unc2k", "unc_2k", n, gpu_decode_on=True, processes=procs),
            40,
        ),
        (
            "e2e_j2k_gpu_decode",
            lambda c: run_e2e(c, "j2kgpu", "j2k_2k", n, gpu_decode_on=True, processes=procs),
            40,
        ),
        (
            "e2e_j2k_cpu_decode",
            lambda c: run_e2e(
                c,
                "j2kcpu",
                "j2k_2k",
                n,
                gpu_decode_on=False,
                prepare_in=args.cpu_prepare_in,
                processes=procs,
            ),
            40,
        ),
        ("models", section_models, 20),
        ("decode", section_decode, 20),
        ("compile", section_compile, 90),
    ]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    receiver = None
    try:
        for name, fn, needs in sections:
            if name in skip:
                ctx.results[name] = {"skipped": "--skip"}
                continue
            if name in ("warmup", *E2E) and "receiver" not in ctx.results:
                try:
                    receiver = start_receiver(ctx)
                except Exception as exc:  # noqa: BLE001
                    say(f"  receiver failed: {type(exc).__name__}: {exc}")
                ctx.results["receiver"] = ctx.receiver_port is not None
            if ctx.left() < needs:
                say(f"[{name}] skipped: {ctx.left():.0f} s of the budget left")
                ctx.results[name] = {"skipped": f"budget ({ctx.left():.0f} s left)"}
                continue
            if name in (*E2E, "models") and ctx.analyzer is None:
                try:
                    ctx.analyzer = load_analyzer(ctx)  # the warm-up failed or was skipped
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    ctx.results[name] = {"error": f"models not loaded: {type(exc).__name__}"}
                    continue
            say(f"[{name}] ({time.perf_counter() - ctx.t_start:.0f} s elapsed)")
            t0 = time.perf_counter()
            try:
                value = fn(ctx)
                if name == "templates":
                    ctx.templates = {k: Path(v) for k, v in value.items()}
                ctx.results[name] = value
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                sys.stdout.flush()
                ctx.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                if name == "templates":
                    ctx.templates = {"j2k_2k": J2KR}
            ctx.results.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
            ctx.save()
    finally:
        if receiver is not None and receiver.poll() is None:
            os.killpg(receiver.pid, signal.SIGTERM)
            receiver.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        ctx.save()
    say("\n=== summary ===")
    for name in E2E:
        r = ctx.results.get(name, {})
        say(
            f"{name:<22} {r.get('studies_per_s', r.get('error', r.get('skipped')))} studies/s "
            f"stages {r.get('stage_ms_per_study')}"
        )
    j = ctx.results
    one = j.get("e2e_uncompressed_1k_in_process", {}).get("studies_per_s")
    many = j.get("e2e_uncompressed_1k", {}).get("studies_per_s")
    if one and many:
        say(f"uncompressed 1k, {procs} worker processes / one process: {many / one:.2f}x")
    gpu = j.get("e2e_j2k_gpu_decode", {}).get("studies_per_s")
    cpu = j.get("e2e_j2k_cpu_decode", {}).get("studies_per_s")
    if gpu and cpu:
        say(f"J2K end to end, GPU decode / CPU decode: {gpu / cpu:.2f}x")
    say(f"bit-exact J2K lossless: {j.get('bitexact', {}).get('j2k_lossless_bit_exact')}")
    say(f"decode: {j.get('decode')}")
    say(f"models: { {k: v for k, v in j.get('models', {}).items() if k.endswith('_s')} }")
    say(f"compile: {j.get('compile')}")
    say(
        f"total {time.perf_counter() - ctx.t_start:.0f} s; figures in {args.out / 'gpu_bench.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
