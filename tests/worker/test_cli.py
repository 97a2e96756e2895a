"""The admin's command line against a real SQLite queue and a real dcmtk peer."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

import worker.cli
from db.errors import DatabaseNotReady, QueueUnavailable
from db.migrate import head_revision
from db.queue import Queue
from db.retry import ErrorKind
from dicom_node.sink import StoredInstance
from models.registry import ModelLoadError
from tests.conftest import REPO, free_port
from worker.config import ConfigError, load_config
from worker.scheduler import retention_purge


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CXR_CONFIG", "CXR_DATABASE_URL")}
    env["PYTHONPATH"] = str(REPO)  # cwd may be a folder without the project
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
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
        StoredInstance(
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
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_before_or_after_the_subcommand(config: Path, tmp_path: Path, where: str) -> None:
    # run from a folder without config.yaml: if --config were dropped, the default would not exist
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        given = ("--config", str(config))
        return cli(*(given + command if where == "before" else command + given), cwd=elsewhere)

    out = run("status")
    assert out.returncode == 1 and "cxr-worker db upgrade" in out.stderr, out.stderr
    out = run("db", "upgrade")
    assert out.returncode == 0 and head_revision() in out.stdout, out.stderr
    assert (tmp_path / "queue.sqlite3").is_file()  # the file config.yaml names, not ./var/
    out = run("status", "--json")
    assert out.returncode == 0, out.stderr
    assert '"counts"' in out.stdout
    out = run("check-config")
    assert out.returncode == 0 and f"# effective configuration ({config}): OK" in out.stdout
    out = run("requeue", "--failed")
    assert out.returncode == 0 and "requeued 0" in out.stdout, out.stderr


def test_config_after_the_subcommand_wins(config: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "config.yaml"
    other.parent.mkdir()
    other.write_text(yaml.safe_dump({"queue": {"database_url": "sqlite:///other.sqlite3"}}))
    assert cli("db", "upgrade", "--config", str(config)).returncode == 0
    # the subcommand's --config names the upgraded database: status works
    out = cli("--config", str(other), "status", "--config", str(config))
    assert out.returncode == 0, out.stderr
    # and the other way round it names the empty one: refused
    out = cli("--config", str(config), "status", "--config", str(other))
    assert out.returncode == 1 and "other.sqlite3" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status"], None),
        (["--config", "a.yaml", "status"], Path("a.yaml")),
        (["-c", "a.yaml", "status"], Path("a.yaml")),
        (["status", "--config", "b.yaml"], Path("b.yaml")),
        (["--config", "a.yaml", "status", "-c", "b.yaml"], Path("b.yaml")),
        (["--config", "a.yaml", "db", "upgrade"], Path("a.yaml")),
        (["db", "--config", "a.yaml", "upgrade"], Path("a.yaml")),
        (["db", "upgrade", "--config", "b.yaml"], Path("b.yaml")),
        (["-c", "a.yaml", "db", "-c", "b.yaml", "upgrade"], Path("b.yaml")),
        (["--config", "a.yaml", "serve", "--role", "scp"], Path("a.yaml")),
        (["echo", "pacs", "--config", "b.yaml"], Path("b.yaml")),
    ],
)
def test_config_option_parsing(argv: list[str], expected: Path | None) -> None:
    assert worker.cli.build_parser().parse_args(argv).config == expected


def test_status_refuses_a_database_without_schema(config: Path) -> None:
    out = cli("status", "--config", str(config))
    assert out.returncode == 1
    assert "cxr-worker db upgrade" in out.stderr


def test_db_upgrade_status_requeue(config: Path) -> None:
    out = cli("db", "upgrade", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert head_revision() in out.stdout
    queue = Queue.from_url(
        load_config(config, environ={}).queue.database_url, lease_seconds=60, max_attempts=1
    )
    _record(queue, "1.2.3", "1.2.3.4")
    time.sleep(0.01)
    queue.sweep_completion(quiet_seconds=0.001, max_wait_seconds=0.001)
    claimed = queue.claim("w1")
    queue.fail(claimed[0].id, "w1", error="model crashed", kind=ErrorKind.INVALID)

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


def _raise(exc: BaseException) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        raise exc

    return command


@pytest.mark.parametrize(
    ("exc", "code", "stderr"),
    [
        (DatabaseNotReady("database x has no schema"), 1, "error: database x has no schema\n"),
        (QueueUnavailable("database x is down"), 1, "error: database x is down\n"),
        (ModelLoadError("model2.json: not found"), 1, "error: model2.json: not found\n"),
        (ConfigError("config.yaml: dicom.port: bad"), 2, "configuration error:\n"),
        (KeyboardInterrupt(), 130, ""),
    ],
)
def test_errors_are_recognised_by_class(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: BaseException,
    code: int,
    stderr: str,
) -> None:
    monkeypatch.setattr(worker.cli, "cmd_status", _raise(exc))
    assert worker.cli.main(["status"]) == code
    assert capsys.readouterr().err.startswith(stderr)


def test_an_unknown_error_with_a_known_name_is_not_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class QueueUnavailable(Exception):  # same name, another class: a bug, shown as a traceback
        pass

    monkeypatch.setattr(worker.cli, "cmd_status", _raise(QueueUnavailable("boom")))
    with pytest.raises(QueueUnavailable, match="boom"):
        worker.cli.main(["status"])


# ----------------------------------------------------------------- history and status


def _history_study(queue: Queue) -> str:
    """A study with a frontal and an SR, analysed, reported, delivered once and retried once."""
    from db.queue import DeliveryOutcome, NewDelivery

    study = "1.2.826.0.1.3680043.10.9"
    _record(queue, study, study + ".1")
    queue.record_instance(
        StoredInstance(
            study_uid=study,
            series_uid=study + ".9",
            sop_instance_uid=study + ".2",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="SR",
            body_part=None,
            view_position=None,
            eligible=False,
            ineligible_reason="Modality SR is not a radiograph (CR or DX)",
            rel_path=f"{study}/x.dcm",
            size_bytes=10,
            calling_ae="BAD\nAE",
        )
    )
    queue.sweep_completion(
        quiet_seconds=1, max_wait_seconds=60, now=datetime.now(UTC) + timedelta(seconds=2)
    )
    [c] = queue.claim("host:1234", now=datetime.now(UTC) + timedelta(seconds=3))
    sr = "1.2.840.10008.5.1.4.1.1.88.34"
    queue.complete(
        c.id,
        "host:1234",
        result_payload={},
        report_sop_instance_uid="2.25.42",
        deliveries=[
            NewDelivery("pacs", "2.25.42", sr, "r.dcm"),
            NewDelivery("archive", "2.25.42", sr, "r.dcm"),
        ],
        now=datetime.now(UTC) + timedelta(seconds=4),
    )
    later = datetime.now(UTC) + timedelta(seconds=5)
    rows = {r.destination: r for r in queue.due_deliveries(now=later)}
    queue.record_delivery(
        rows["pacs"].id, DeliveryOutcome(True, "0x0000 Success"), attempts_so_far=0, now=later
    )
    queue.record_delivery(
        rows["archive"].id,
        DeliveryOutcome(False, "association rejected", ErrorKind.NETWORK),
        attempts_so_far=0,
        now=later,
    )
    return study


def test_history_prints_the_whole_trail(config: Path) -> None:
    assert cli("db", "upgrade", "--config", str(config)).returncode == 0
    queue = Queue.from_url(
        load_config(config, environ={}).queue.database_url, lease_seconds=60, max_attempts=3
    )
    study = _history_study(queue)
    out = cli("history", study, "--config", str(config))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"study {study}: done, 2 instance(s), 1 result(s), 2 delivery(ies)"
    body = "\n".join(lines[2:])
    order = [
        "created, receiving",
        "instance received",
        "receiving -> ready",
        "ready -> processing",
        "processing -> done",
        "delivery 1 to pacs: created, pending",
        "delivery 2 to archive: created, pending",
        "delivery 1 to pacs: pending -> delivered",
        "delivery 2 to archive: pending -> retry",
    ]
    positions = [body.index(what) for what in order]
    assert positions == sorted(positions), body
    assert "CR Computed Radiography Image Storage, 1.2.826.0.1.3680043.10.9.1 [analysed]" in body
    assert "X-Ray Radiation Dose SR Storage" in body
    assert "[stored only: Modality SR is not a radiograph (CR or DX)]" in body
    assert "BAD\\nAE" in body and "BAD\nAE" not in out.stdout  # the peer's AE title, escaped
    assert "host:1234" in body and "sent to pacs: 0x0000 Success" in body
    assert len(lines) == 2 + 10  # 8 events (4 of the study, 4 of its deliveries), 2 instances
    out = cli("history", study, "--json", "--config", str(config))
    rows = json.loads(out.stdout)
    assert len(rows) == 10 and rows[0]["what"] == "created, receiving"
    out = cli("history", "9.9.9", "--config", str(config))
    assert out.returncode == 1 and "not in the queue" in out.stderr

    out = cli("status", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "result 1 stored, report 2.25.42, for archive, pacs" in out.stdout
    assert "to pacs: delivered 1; 1 attempt(s); last: 0x0000 Success" in out.stdout
    assert "to archive: retry 1; 1 attempt(s); next retry 20" in out.stdout
    assert "last: association rejected" in out.stdout
    queue.close()


def test_status_shows_attempts_last_error_and_next_retry(config: Path) -> None:
    assert cli("db", "upgrade", "--config", str(config)).returncode == 0
    queue = Queue.from_url(
        load_config(config, environ={}).queue.database_url,
        lease_seconds=60,
        max_attempts=3,
        retry_base_seconds=600,
    )
    _record(queue, "1.2.5", "1.2.5.1")
    queue.sweep_completion(
        quiet_seconds=1, max_wait_seconds=60, now=datetime.now(UTC) + timedelta(seconds=2)
    )
    [c] = queue.claim("w1", now=datetime.now(UTC) + timedelta(seconds=3))
    queue.fail(c.id, "w1", error="cannot decode 'Jane^Doe'\nnext", kind=ErrorKind.TRANSIENT)
    out = cli("status", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "attempts: 1 of 3; last error (20" in out.stdout
    assert "cannot decode '…'\\nnext" in out.stdout and "Jane" not in out.stdout
    assert re.search(
        r"next retry: 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in (59\d|600) s\)", out.stdout
    )
    data = json.loads(cli("status", "--json", "--config", str(config)).stdout)
    [s] = data["latest"]
    assert s["attempts"] == 1 and s["last_error"] == "cannot decode '…'\\nnext"
    queue.close()


# ----------------------------------------------------------------- configuration checks


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("999.1.1.1", "dicom.bind_host: '999.1.1.1' is not a valid IPv4 address"),
        ("no-such-host.invalid", "is neither an IP address nor a name this machine can resolve"),
        (
            "192.0.2.1",
            "dicom.bind_host: cannot listen on '192.0.2.1': it is not an address of this machine",
        ),
    ],
)
def test_check_config_refuses_a_bind_host_it_cannot_use(
    tmp_path: Path, host: str, message: str
) -> None:
    out = cli("check-config", str(_write(tmp_path, {"dicom": {"bind_host": host}})))
    assert out.returncode == 2, out.stdout
    assert message in out.stderr


def test_check_config_normalises_the_database_url(tmp_path: Path) -> None:
    path = _write(tmp_path, {"queue": {"database_url": "postgresql://cxr:secret@db.example/cxr"}})
    out = cli("check-config", str(path))
    assert out.returncode == 0, out.stderr
    assert "database_url: postgresql+psycopg://cxr:***@db.example/cxr" in out.stdout
    path = _write(tmp_path, {"queue": {"database_url": "postgresql+psycopg2://cxr:secret@db/cxr"}})
    out = cli("check-config", str(path))
    assert out.returncode == 2 and "use postgresql+psycopg://USER@HOST/DB" in out.stderr
    assert "secret" not in out.stderr


def test_worker_names_are_unique_per_process(tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    names = {
        yaml.safe_load(cli("check-config", str(path)).stdout)["worker"]["name"] for _ in range(2)
    }
    assert len(names) == 2
    host = socket.gethostname()
    assert all(re.fullmatch(rf"{re.escape(host)}:\d+", n) for n in names), names


@pytest.mark.parametrize("busy", ["dicom", "health"])
def test_serve_names_a_busy_port(tmp_path: Path, busy: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        ports = {"dicom": free_port(), "health": free_port()}
        ports[busy] = taken
        path = _write(
            tmp_path,
            {
                "dicom": {"storage_dir": "storage", "port": ports["dicom"]},
                "queue": {"database_url": "sqlite:///q.sqlite3"},
                "health": {"port": ports["health"]},
            },
        )
        out = cli("serve", "--role", "scp", "--config", str(path))
    assert out.returncode == 1
    key = "dicom.bind_host, dicom.port" if busy == "dicom" else "health.host, health.port"
    assert f"cannot listen on 127.0.0.1:{taken}" in out.stderr
    assert "the port is already in use by another process" in out.stderr and key in out.stderr
    assert "Traceback" not in out.stderr
