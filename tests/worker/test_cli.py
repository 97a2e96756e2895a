"""The admin's command line against a real SQLite queue and a real dcmtk peer."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from db.queue import Queue
from tests.conftest import REPO, free_port
from worker.config import load_config
from worker.scheduler import retention_purge


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "dicom": {"storage_dir": "storage", "port": free_port()},
                "queue": {"database_url": "sqlite:///queue.sqlite3"},
                "destinations": [
                    {
                        "name": "pacs",
                        "ae_title": "PACS_SIM",
                        "host": "127.0.0.1",
                        "port": free_port(),
                    }
                ],
            }
        )
    )
    return p


def _record(queue: Queue, study: str, sop: str, *, eligible: bool = True) -> None:
    queue.record_instance(
        study_uid=study,
        series_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR",
        body_part="CHEST",
        view_position="PA",
        eligible=eligible,
        ineligible_reason=None if eligible else "not chest",
        rel_path=f"{study}/{sop}.dcm",
        size_bytes=10,
        calling_ae="TEST",
    )


def test_status_refuses_a_database_without_schema(config: Path) -> None:
    out = cli("status", "--config", str(config))
    assert out.returncode == 1
    assert "cxr-worker db upgrade" in out.stderr


def test_db_upgrade_status_requeue(config: Path) -> None:
    out = cli("db", "upgrade", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "0001" in out.stdout
    queue = Queue.from_url(
        load_config(config, environ={}).queue.database_url, lease_seconds=60, max_attempts=1
    )
    _record(queue, "1.2.3", "1.2.3.4")
    time.sleep(0.01)
    queue.sweep_completion(quiet_seconds=0.001, max_wait_seconds=0.001)
    claimed = queue.claim("w1")
    queue.fail(claimed[0].id, "w1", error="model crashed", retryable=False)

    out = cli("status", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "failed" in out.stdout and "1.2.3" in out.stdout and "model crashed" in out.stdout

    assert cli("requeue", "9.9.9", "--config", str(config)).returncode == 1
    out = cli("requeue", "--failed", "--config", str(config))
    assert out.returncode == 0 and "requeued 1" in out.stdout
    assert queue.study("1.2.3").state == "ready"
    out = cli("resend", "1.2.3", "--config", str(config))
    assert out.returncode == 1 and "no report" in out.stderr
    queue.close()


def test_echo_destination(config: Path, storescp) -> None:  # type: ignore[no-untyped-def]
    out = cli("echo", "pacs", "--config", str(config))
    assert out.returncode == 1 and "FAILED" in out.stdout  # nothing listens on that port
    data = yaml.safe_load(config.read_text())
    data["destinations"][0]["port"] = storescp.port
    config.write_text(yaml.safe_dump(data))
    out = cli("echo", "pacs", "--config", str(config))
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    out = cli("echo", "nope", "--config", str(config))
    assert out.returncode == 2 and "no destination named 'nope'" in out.stderr


def test_retention_purge_removes_old_finished_studies_only(tmp_path: Path) -> None:
    from db.migrate import upgrade
    from worker.config import parse_config

    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    upgrade(url)
    cfg = parse_config(
        {
            "dicom": {"storage_dir": str(tmp_path / "storage")},
            "queue": {"database_url": url},
            "scheduler": {"retention_days": 1},
        },
        environ={},
    )
    queue = Queue.from_url(url, lease_seconds=60, max_attempts=1)
    _record(queue, "1.1", "1.1.1", eligible=False)
    _record(queue, "2.2", "2.2.1")
    for uid in ("1.1", "2.2"):
        (tmp_path / "storage" / uid).mkdir(parents=True)
        (tmp_path / "storage" / uid / "x.dcm").write_bytes(b"x")
    queue.sweep_completion(
        quiet_seconds=0.001, max_wait_seconds=0.001, now=datetime.now(UTC) + timedelta(seconds=1)
    )
    assert queue.study("1.1").state == "ignored"
    # nothing is old enough yet
    assert retention_purge(cfg, queue) == 0
    assert retention_purge(cfg, queue, now=datetime.now(UTC) + timedelta(days=3)) == 1
    assert not (tmp_path / "storage" / "1.1").exists()
    assert (tmp_path / "storage" / "2.2" / "x.dcm").exists()  # ready: never purged
    assert queue.study("1.1") is None and queue.study("2.2") is not None
    queue.close()
