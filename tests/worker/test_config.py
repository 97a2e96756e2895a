"""config.yaml validation: every error names the key path, the bad value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from worker.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_is_valid() -> None:
    cfg = load_config(REPO / "config.yaml", environ={})
    assert cfg.dicom.ae_title == "CXR_WORKER"
    assert cfg.queue.database_url.startswith("sqlite:///")
    # relative paths resolve against the config file, not the working directory
    assert cfg.dicom.storage_dir == REPO / "var" / "storage"
    assert cfg.queue.database_url == f"sqlite:///{REPO / 'var' / 'queue.sqlite3'}"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"dicom": {"port": 70000}},
            "config.yaml: dicom.port: 70000 is not a valid TCP port (1-65535)",
        ),
        ({"dicom": {"port": 0}}, "dicom.port: 0 is not a valid TCP port (1-65535)"),
        ({"dicom": {"prot": 104}}, "dicom.prot: unknown key"),
        ({"surprise": {}}, "surprise: unknown key"),
        (
            {"dicom": {"ae_title": "THIS_IS_FAR_TOO_LONG"}},
            "dicom.ae_title: 'THIS_IS_FAR_TOO_LONG' is not a valid AE title",
        ),
        (
            {"dicom": {"allowed_calling_ae_titles": ["OK", "BAD\\AE"]}},
            "dicom.allowed_calling_ae_titles: 'BAD\\\\AE' is not a valid AE title",
        ),
        (
            {"queue": {"database_url": "mysql://x"}},
            "queue.database_url: 'mysql://x' is not a supported database URL",
        ),
        (
            {"queue": {"lease_seconds": 10, "heartbeat_seconds": 30}},
            "heartbeat_seconds (30.0) must be shorter than lease_seconds (10.0)",
        ),
        (
            {"completion": {"quiet_seconds": 100, "max_wait_seconds": 10}},
            "max_wait_seconds (10.0) must be at least quiet_seconds (100.0)",
        ),
        (
            {"dicom": {"bind_host": "999.1.1.1"}},
            "config.yaml: dicom.bind_host: '999.1.1.1' is not a valid IPv4 address",
        ),
        (
            {"health": {"host": "no-such-host.invalid"}},
            "health.host: 'no-such-host.invalid' is neither an IP address nor a name",
        ),
        ({"health": {"port": 0}}, "health.port: 0 is not a valid TCP port (1-65535)"),
        (
            {"completion": {"lateral_grace_seconds": -1}},
            "completion.lateral_grace_seconds: -1 is not valid",
        ),
        (
            {"queue": {"database_url": "postgresql+asyncpg://u@h/db"}},
            "queue.database_url: 'postgresql+asyncpg://u@h/db': the driver in "
            "'postgresql+asyncpg' is not installed; use postgresql+psycopg://USER@HOST/DB",
        ),
        (
            {"logging": {"format": "xml"}},
            "logging.format: 'xml' is not valid: Input should be 'text' or 'json'",
        ),
        (
            {"worker": {"device": "tpu"}},
            "worker.device: 'tpu' is not valid: Input should be 'auto', 'cpu' or 'cuda'",
        ),
        (
            {"destinations": [{"name": "pacs", "ae_title": "P", "host": "h", "port": 99999}]},
            "destinations.0.port: 99999 is not a valid TCP port",
        ),
        (
            {"destinations": [{"name": "pacs", "ae_title": "P", "host": "h"}]},
            "destinations.0.port: required key is missing",
        ),
    ],
)
def test_errors_name_path_value_and_rule(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, environ={})
    assert expected in str(exc.value)


def test_all_errors_reported_at_once() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(
            {"dicom": {"port": 70000, "ae_title": ""}, "worker": {"batch_size": 0}}, environ={}
        )
    lines = str(exc.value).splitlines()
    assert len(lines) == 3, lines


def test_defaults_for_operations() -> None:
    cfg = parse_config({}, environ={})
    assert (cfg.health.enabled, cfg.health.host, cfg.health.port) == (True, "127.0.0.1", 11113)
    assert cfg.completion.lateral_grace_seconds == 120.0
    assert cfg.logging.format == "text"
    host, pid = cfg.worker.name.rsplit(":", 1)
    assert host and int(pid) == os.getpid()
    # an environment URL without a driver is normalised too
    env = {"CXR_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/cxr"}
    assert parse_config({}, environ=env).queue.database_url.startswith("postgresql+psycopg://")


def test_environment_overrides_database_url(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/cxr"
    cfg = parse_config(
        {"queue": {"database_url": "sqlite:///x.db"}}, environ={"CXR_DATABASE_URL": url}
    )
    assert cfg.queue.database_url == url


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p, environ={})


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            {
                "dicom": {"port": 4242},
                "queue": {"database_url": "postgresql+psycopg://u:secret@h/db"},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "check-config", str(good)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "port: 4242" in out.stdout
    assert "secret" not in out.stdout  # the password is never printed
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  port: 70000\n")
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2
    assert "dicom.port: 70000 is not a valid TCP port (1-65535)" in out.stderr
