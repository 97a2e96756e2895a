"""``make demo``: the main job end to end on the embedded default, then a summary table.

Starts ``cxr-worker serve`` (SQLite, a local results folder as the destination) as a child process,
sends the bundled sample studies to it over DICOM, waits until every study has an outcome, prints
patient, views found, Model 1, the Present findings and the paths of the SR and key image, and stops
the service it started (by PID)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import yaml

if TYPE_CHECKING:
    from db.records import StudyDetail

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "data"
# Small, redistributable samples (see tests/data/README.md): a PA chest CR (NEMA WG04 via
# pydicom-data, JPEG 2000 lossless), the SIIM-ACR chest as Secondary Capture (torchxrayvision's test
# data, Apache-2.0) and an extremity CR that must be stored but not analysed.
DEFAULT_SAMPLES = ["RG1_J2KR.dcm", "siim_cr_pa_secondary_capture.dcm", "RG3_UNCR.dcm"]
TERMINAL = {"done", "failed", "ignored"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(workdir: Path, port: int, weights_dir: str | None = None) -> Path:
    cfg = {
        "dicom": {
            "ae_title": "CXR_WORKER",
            "bind_host": "127.0.0.1",
            "port": port,
            "storage_dir": "storage",
            "min_free_disk_mb": 200,
        },
        "queue": {
            "database_url": "sqlite:///queue.sqlite3",
            "lease_seconds": 120,
            "heartbeat_seconds": 10,
        },
        # the samples are single frontals: no lateral is coming, so do not wait for one
        "completion": {
            "quiet_seconds": 2,
            "max_wait_seconds": 30,
            "lateral_grace_seconds": 0,
            "sweep_interval_seconds": 0.5,
        },
        "destinations": [],
        "results_dir": "results",
        "health": {"port": _free_port()},  # never clash with a running service's 11113
        "worker": {"device": "auto", "batch_size": 8, "poll_interval_seconds": 0.5},
        "logging": {"level": "INFO"},
    }
    if weights_dir:
        cfg["models"] = {"weights_dir": str(Path(weights_dir).resolve())}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _wait_for_echo(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    from pynetdicom import AE

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the service exited with code {proc.returncode} before it answered C-ECHO"
            )
        ae = AE(ae_title="DEMO_SCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the service did not answer C-ECHO on port {port} within {timeout:.0f} s")


def send(paths: list[Path], port: int) -> list[tuple[str, str]]:
    from dicom_node.config import DestinationConfig
    from dicom_node.scu import send as scu_send

    dest = DestinationConfig(name="demo", ae_title="CXR_WORKER", host="127.0.0.1", port=port)
    results = scu_send(paths, dest, calling_ae="DEMO_SCU")
    return [(r.sop_instance_uid, r.status) for r in results]


def run(args: argparse.Namespace) -> int:
    from db.queue import Queue

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for p in ("queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm"):
        (workdir / p).unlink(missing_ok=True)
    port = _free_port()
    config = write_config(workdir, port, args.weights_dir)
    samples = (
        [Path(p) for p in args.samples] if args.samples else [SAMPLES / n for n in DEFAULT_SAMPLES]
    )
    t0 = time.monotonic()
    log = open(workdir / "service.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,
    )
    try:
        _wait_for_echo(port, proc, timeout=120)
        print(
            f"service up on 127.0.0.1:{port} (pid {proc.pid}) after {time.monotonic() - t0:.1f} s; "
            f"sending {len(samples)} sample instance(s)"
        )
        for uid, status in send(samples, port):
            print(f"  C-STORE {uid}: {status}")
        study_uids = sorted(
            {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in samples}
        )
        queue = Queue.from_url(
            f"sqlite:///{workdir / 'queue.sqlite3'}", lease_seconds=120, max_attempts=3
        )
        deadline = time.monotonic() + args.timeout
        while True:
            details = {u: queue.study(u) for u in study_uids}
            if all(d is not None and d.state in TERMINAL for d in details.values()):
                break
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the service exited with code {proc.returncode}; see {workdir / 'service.log'}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"studies still not finished after {args.timeout:.0f} s: "
                    + ", ".join(f"{d.state if d else 'missing'}" for d in details.values())
                )
            time.sleep(0.5)
        print_table(details, samples)
        print(
            f"\ndemo finished in {time.monotonic() - t0:.1f} s; "
            f"service log: {workdir / 'service.log'}"
        )
        return 0 if all(d is not None and d.state != "failed" for d in details.values()) else 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def print_table(details: dict[str, StudyDetail | None], samples: list[Path]) -> None:
    names = {}
    for p in samples:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        names[ds.StudyInstanceUID] = str(ds.get("PatientName", "")) or str(ds.get("PatientID", "?"))
    print()
    print(
        f"{'patient':<22} {'state':<8} {'views':<22} {'Model 1 (abnormal)':<24} "
        "Present findings (probability), as in the SR and key image"
    )
    print("-" * 110)
    for uid, d in details.items():
        if d is None:
            print(f"{names.get(uid, '?')[:22]:<22} missing")
            continue
        result = d.results[-1].payload if d.results else {}
        views = result.get("views", {})
        view_txt = ", ".join(f"{k}:{v}" for k, v in views.items()) or "-"
        m1 = result.get("model1")
        m1_txt = (
            f"{'abnormal' if m1['present'] else 'normal'} "
            f"p={m1['probability']:.2f}/t={m1['threshold']:.2f}"
            if m1
            else "-"
        )
        present = [f for f in result.get("model2", []) if f["present"]]
        present.sort(key=lambda f: -f["probability"])
        top_txt = ", ".join(
            f"{f['label']} {f['probability']:.2f}"
            + ("" if f.get("threshold_validated", True) else " (threshold unvalidated)")
            for f in present
        ) or ("none Present" if result else (d.state_reason or ""))
        print(
            f"{names.get(uid, '?')[:22]:<22} {d.state:<8} {view_txt[:22]:<22} "
            f"{m1_txt:<24} {top_txt}"
        )
        if result:
            print(f"{'':<22} SR:        {result.get('report_path', '-')}")
            if result.get("key_image_png"):
                print(f"{'':<22} key image: {result['key_image_png']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cxr-worker-demo", description=__doc__)
    p.add_argument("--workdir", default=str(REPO / "var" / "demo"))
    p.add_argument("--timeout", type=float, default=150.0)
    p.add_argument(
        "--weights-dir", default=None, help="model cards to use instead of the bundled ones"
    )
    p.add_argument("samples", nargs="*")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
