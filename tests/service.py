"""Run ``cxr-worker serve`` as a real child process for end-to-end tests, and stop it by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pynetdicom import AE

from tests.conftest import REPO, free_port

VERIFICATION = "1.2.840.10008.1.1"


def write_config(
    workdir: Path, *, port: int, ae_title: str = "CXR_WORKER", **sections: Any
) -> Path:
    """A config.yaml for a test service: SQLite, storage and results in ``workdir``, fast sweeps."""
    cfg: dict[str, Any] = {
        "dicom": {
            "ae_title": ae_title,
            "bind_host": "127.0.0.1",
            "port": port,
            "storage_dir": "storage",
            "min_free_disk_mb": 50,
        },
        "queue": {
            "database_url": "sqlite:///queue.sqlite3",
            "lease_seconds": 60,
            "heartbeat_seconds": 5,
        },
        # no lateral grace unless a test asks for one (most send single frontals)
        "completion": {
            "quiet_seconds": 2,
            "max_wait_seconds": 60,
            "lateral_grace_seconds": 0,
            "sweep_interval_seconds": 0.5,
        },
        "destinations": [],
        "results_dir": "results",
        "worker": {"device": "cpu", "batch_size": 4, "poll_interval_seconds": 0.3},
        "scheduler": {"lease_sweep_interval_seconds": 1, "delivery_retry_interval_seconds": 1},
        "logging": {"level": "INFO"},
        "health": {"host": "127.0.0.1", "port": free_port()},
    }
    if os.environ.get(
        "CXR_TEST_WEIGHTS_DIR"
    ):  # run the end-to-end tests with other (e.g. tiny) models
        cfg["models"] = {"weights_dir": os.environ["CXR_TEST_WEIGHTS_DIR"]}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def c_echo(port: int, called: str, calling: str = "TEST_SCU") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


class ServiceProcess:
    """``cxr-worker serve`` in its own process group; ``stop()`` ends it by PID."""

    def __init__(self, config: Path, *, role: str = "all") -> None:
        self.config = config
        self.role = role
        self.log = config.parent / f"service-{role}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self,
        *,
        port: int | None,
        ae_title: str = "CXR_WORKER",
        calling_ae: str = "TEST_SCU",
        timeout_s: float = 180.0,
    ) -> ServiceProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker.cli",
                    "serve",
                    "--config",
                    str(self.config),
                    "--role",
                    self.role,
                ],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if port is None:
            return self
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"cxr-worker serve exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if c_echo(port, ae_title, calling_ae):
                return self
            time.sleep(0.3)
        self.stop()
        raise AssertionError(
            f"cxr-worker serve did not answer C-ECHO within {timeout_s:.0f} s:\n{self.tail()}"
        )

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill9(self) -> None:
        """``kill -9`` the service: no shutdown code runs (the crash tests' power cut)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(
    predicate: Any,
    *,
    timeout_s: float,
    what: str,
    service: ServiceProcess | None = None,
    interval: float = 0.5,
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if service is not None and service.proc is not None and service.proc.poll() is not None:
            raise AssertionError(f"service exited while waiting for {what}:\n{service.tail()}")
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout_s:.0f} s waiting for {what}"
        + (f"\n{service.tail()}" if service else "")
    )


class StoreSCP:
    def __init__(self, out: Path, port: int, aet: str) -> None:
        self.out, self.port, self.aet = out, port, aet
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        exe = shutil.which("storescp")
        if exe is None:
            pytest.fail("dcmtk's storescp is not installed (make system-deps)")
        self.out.mkdir(parents=True, exist_ok=True)
        log = open(self.out.parent / f"storescp-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [exe, "-aet", self.aet, "-od", str(self.out), "+uf", "+xa", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if c_echo(self.port, self.aet):
                return self
            time.sleep(0.2)
        raise AssertionError("storescp did not start")

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.out.iterdir()) if p.is_file()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
