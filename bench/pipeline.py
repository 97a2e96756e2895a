"""Pipeline benchmark: N ready studies through the real worker, batched vs one at a time.

Fills a fresh SQLite queue with N ready studies (the SIIM chest radiograph, 1024x1024 Secondary
Capture, with fresh UIDs: real pixels, distinct studies), then runs the real
:class:`worker.pipeline.Pipeline` (decode, views, lung mask, crop, Model 1, Model 2, Grad-CAM, SR,
key image, C-STORE to a dcmtk ``storescp``) through :class:`worker.loop.WorkerLoop` until every
study is delivered, and reports studies/s and the p50/p95 time from a study becoming ready to its
SR being delivered. In the same run, the naive baseline: batch size 1 (one image at a time through
every model, no batching). Prints both and the ratio. Not a pass/fail test.

    .venv/bin/python bench/pipeline.py [--studies 32] [--batch-size 8] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.queue import Queue  # noqa: E402
from dicom_node.sink import StoredInstance  # noqa: E402
from worker.config import parse_config  # noqa: E402
from worker.loop import WorkerLoop  # noqa: E402
from worker.pipeline import Pipeline  # noqa: E402

SOURCE = REPO / "tests" / "data" / "siim_cr_pa_secondary_capture.dcm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_storescp(out: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("storescp")
    if exe is None:
        sys.exit("storescp (dcmtk) is needed: make system-deps")
    port = free_port()
    out.mkdir(parents=True)
    proc = subprocess.Popen(
        [exe, "-aet", "BENCH_PACS", "-od", str(out), "+uf", "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    sys.exit("storescp did not start")


def fill_queue(root: Path, n: int, storage: Path) -> Queue:
    url = f"sqlite:///{root / 'queue.sqlite3'}"
    upgrade(url)
    queue = Queue.from_url(url, lease_seconds=600, max_attempts=3)
    base = pydicom.dcmread(SOURCE)
    for _ in range(n):
        ds = copy.deepcopy(base)
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
    queue.sweep_completion(quiet_seconds=0.001, max_wait_seconds=0.001)
    return queue


def run_once(
    label: str, n: int, batch: int, device: str, port: int, analyzer: object | None
) -> tuple[dict, object]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-pipeline-{label}-"))
    try:
        storage = root / "storage"
        queue = fill_queue(root, n, storage)
        cfg = parse_config(
            {
                "dicom": {"storage_dir": str(storage), "min_free_disk_mb": 10},
                "queue": {
                    "database_url": f"sqlite:///{root / 'queue.sqlite3'}",
                    "lease_seconds": 600,
                },
                "destinations": [
                    {"name": "pacs", "ae_title": "BENCH_PACS", "host": "127.0.0.1", "port": port}
                ],
                "results_dir": str(root / "results"),
                "worker": {"device": device, "batch_size": batch, "name": f"bench-{label}"},
            },
            environ={},
        )
        if analyzer is None:
            pipeline = Pipeline.from_config(cfg, queue)
        else:
            pipeline = Pipeline(cfg, queue, analyzer)
        loop = WorkerLoop(
            queue,
            pipeline,
            worker_id=f"bench-{label}",
            batch_size=batch,
            poll_interval=0.1,
            heartbeat_interval=30,
        )
        t0 = time.perf_counter()
        while loop.run_once():
            pass
        elapsed = time.perf_counter() - t0
        lat = []
        for s in queue.latest(n):
            d = queue.study(s.study_uid)
            assert d is not None and d.state == "done", (
                d.state if d else None,
                d.state_reason if d else None,
            )
            sent = [x.updated_at for x in d.deliveries if x.state == "delivered"]
            assert sent, f"study {s.study_uid} was not delivered"
            lat.append((max(sent) - d.ready_at).total_seconds())
        lat.sort()
        p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
        queue.close()
        return {
            "label": label,
            "batch": batch,
            "studies": n,
            "seconds": elapsed,
            "studies_per_s": n / elapsed,
            "p50": statistics.median(lat),
            "p95": p95,
        }, pipeline.analyzer
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--studies", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    proc, port = start_storescp(tmp / "received")
    try:
        import torch

        # warm-up and model loading outside the timed runs; the analyzer is shared by both runs
        _, analyzer = run_once("warmup", 2, 2, args.device, port, None)
        baseline, _ = run_once("naive", args.studies, 1, args.device, port, analyzer)
        batched, _ = run_once("batched", args.studies, args.batch_size, args.device, port, analyzer)
        dev = "cuda" if (args.device != "cpu" and torch.cuda.is_available()) else "cpu"
        print(
            f"device: {dev} ({torch.cuda.get_device_name(0) if dev == 'cuda' else os.cpu_count()} "
            f"{'GPU' if dev == 'cuda' else 'CPU cores'}), torch threads {torch.get_num_threads()}"
        )
        print(
            f"{'run':<10} {'batch':>5} {'studies':>7} {'seconds':>8} {'studies/s':>10} "
            f"{'p50 s':>7} {'p95 s':>7}"
        )
        for r in (baseline, batched):
            print(
                f"{r['label']:<10} {r['batch']:>5} {r['studies']:>7} {r['seconds']:>8.1f} "
                f"{r['studies_per_s']:>10.2f} {r['p50']:>7.1f} {r['p95']:>7.1f}"
            )
        print(
            "ratio batched/naive throughput: "
            f"{batched['studies_per_s'] / baseline['studies_per_s']:.2f}x"
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
