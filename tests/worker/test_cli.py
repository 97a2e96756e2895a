"""The admin's command line against a real SQLite queue and a real dcmtk peer."""

from __future__ import annotations

import argparse
import os
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
