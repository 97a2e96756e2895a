"""End-to-end fixtures: a dcmtk storescp as a results destination (a peer nobody here wrote)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.conftest import free_port
from tests.service import c_echo


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
        self.proc = subprocess.Popen([exe, "-aet", self.aet, "-od", str(self.out), "-uf", "+xa", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs-received", free_port(), "PACS_SIM").start()
    try:
        yield scp
    finally:
        scp.stop()
