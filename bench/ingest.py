"""Ingest benchmark: our storage SCP against dcmtk's ``storescp``, same files, same run.

Generates N copies of ``tests/data/RG1_UNCR.dcm`` (7.2 MB CR) with fresh Study/Series/SOP
Instance UIDs, then sends them with dcmtk ``storescu`` over ONE association each to

  (a) dcmtk ``storescp --output-directory`` (writes files; no fsync, no database), and
  (b) our :class:`dicom_node.scp.StorageSCP` with the real queue on SQLite (atomic write,
      fsync of file and folder, checks, one committed row per instance),

and prints MB/s for each and the ratio ours/dcmtk (target >= 0.7). Not a pass/fail test.

    .venv/bin/python bench/ingest.py [--count 200] [--rounds 1] [--no-fsync]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
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
from dicom_node.config import DicomNodeConfig  # noqa: E402
from dicom_node.scp import StorageSCP  # noqa: E402
from worker.ingest import QueueSink  # noqa: E402

log = logging.getLogger("bench.ingest")
PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root
# storescp's largest receive PDU (its default is 16 KiB); ours is dicom_node.scp.DEFAULT_MAX_PDU.
# Each server gets its best setting, so the ratio compares the servers, not their defaults.
DCMTK_MAX_PDU = 131072


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def make_copies(source: Path, out: Path, count: int, per_study: int = 2) -> int:
    """Write ``count`` copies with fresh UIDs (``per_study`` instances per study).

    Returns the total bytes written."""
    ds = pydicom.dcmread(source)
    total = 0
    study = series = ""
    for i in range(count):
        if i % per_study == 0:
            study, series = generate_uid(PREFIX), generate_uid(PREFIX)
        sop = generate_uid(PREFIX)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        path = out / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def storescu(port: int, aec: str, src: Path) -> float:
    """Send every file under ``src`` on one association; return wall seconds. Raises on failure."""
    cmd = [
        "storescu",
        "-aet",
        "BENCH",
        "-aec",
        aec,
        "+sd",
        "+r",
        "-nh",
        "127.0.0.1",
        str(port),
        str(src),
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu to port {port} failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt


def count_files(d: Path) -> int:
    return sum(1 for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))


def run_dcmtk(src: Path, work: Path, n: int) -> float:
    out = work / "dcmtk_out"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            "storescp",
            "-aet",
            "DCMTK",
            "--max-pdu",
            str(DCMTK_MAX_PDU),
            "--output-directory",
            str(out),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(port)
        dt = storescu(port, "DCMTK", src)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    got = count_files(out)
    if got != n:
        raise RuntimeError(f"dcmtk storescp wrote {got} files, expected {n}")
    shutil.rmtree(out)
    return dt


def run_ours(src: Path, work: Path, n: int, fsync: bool) -> float:
    out = work / "ours_out"
    url = f"sqlite:///{work / 'queue.sqlite3'}"
    upgrade(url)
    queue = Queue.from_url(url, lease_seconds=300, max_attempts=3)
    port = free_port()
    cfg = DicomNodeConfig(ae_title="CXR_WORKER", port=port, storage_dir=out, min_free_disk_mb=100)
    scp = StorageSCP(cfg, QueueSink(queue), fsync=fsync)
    scp.start()
    try:
        dt = storescu(port, "CXR_WORKER", src)
    finally:
        scp.stop()
        queue.close()
    got = count_files(out)
    if got != n:
        raise RuntimeError(f"our SCP wrote {got} files, expected {n}")
    shutil.rmtree(out)
    (work / "queue.sqlite3").unlink()
    for extra in ("queue.sqlite3-wal", "queue.sqlite3-shm"):
        (work / extra).unlink(missing_ok=True)
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument(
        "--rounds", type=int, default=1, help="alternate dcmtk/ours this many times; best of each"
    )
    ap.add_argument("--source", type=Path, default=REPO / "tests/data/RG1_UNCR.dcm")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)"
    )
    ap.add_argument(
        "--no-fsync", action="store_true", help="ours without fsync (to measure its cost)"
    )
    ap.add_argument(
        "--profile", type=Path, default=None, help="write a cProfile of our SCP run here"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"error: dcmtk's {tool} is not on PATH (apt-get install dcmtk)", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="cxr-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        total = make_copies(args.source, src, args.count)
        mb = total / 1e6
        print(
            f"{args.count} instances of {args.source.name}, {mb:.0f} MB in total, "
            "one association each"
        )
        best_d = best_o = float("inf")
        for r in range(1, args.rounds + 1):
            # Start each run with no dirty pages left by the previous step, so neither server pays
            # for the other's (or the generator's) writeback.
            os.sync()
            d = run_dcmtk(src, work, args.count)
            os.sync()
            if args.profile:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
                o = run_ours(src, work, args.count, fsync=not args.no_fsync)
                prof.disable()
                prof.dump_stats(args.profile)
            else:
                o = run_ours(src, work, args.count, fsync=not args.no_fsync)
            print(
                f"round {r}: dcmtk storescp {mb / d:7.1f} MB/s ({d:.2f} s)   "
                f"ours {mb / o:7.1f} MB/s ({o:.2f} s)"
            )
            best_d, best_o = min(best_d, d), min(best_o, o)
        fs = "no fsync" if args.no_fsync else "fsync + SQLite commit per instance"
        print(f"dcmtk storescp: {mb / best_d:.1f} MB/s")
        print(f"ours ({fs}): {mb / best_o:.1f} MB/s")
        print(f"ratio ours/dcmtk: {best_d / best_o:.2f} (target >= 0.70)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
