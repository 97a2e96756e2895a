"""``worker.service.Service``: what each role starts and stops, on a real SQLite queue.

The worker role's pipeline is replaced by a fake processor (no models are loaded)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from db import migrate
from db.errors import DatabaseNotReady
from db.records import ClaimedStudy
from tests.conftest import free_port
from worker.config import AppConfig, parse_config
from worker.service import Service


@pytest.fixture
def cfg(tmp_path: Path) -> AppConfig:
    return parse_config(
        {
            "dicom": {"storage_dir": str(tmp_path / "storage"), "port": free_port()},
            "queue": {"database_url": f"sqlite:///{tmp_path / 'db' / 'queue.sqlite3'}"},
            "worker": {"poll_interval_seconds": 0.05},
            "scheduler": {"delivery_max_attempts": 4},
            "health": {"port": free_port()},
        },
        environ={},
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _readyz(cfg: AppConfig) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.health.port}/readyz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _job_ids(svc: Service) -> set[str]:
    assert svc.scheduler is not None
    return {job.id for job in svc.scheduler.get_jobs()}


def test_scp_role_creates_the_schema_listens_and_stops(cfg: AppConfig) -> None:
    svc = Service(cfg, role="scp")
    svc.start()
    try:
        url = cfg.queue.database_url
        assert migrate.current_revision(url) == migrate.head_revision()  # empty db: migrated
        assert svc.queue is not None
        assert svc.queue.delivery_max_attempts == 4  # scheduler.delivery_max_attempts
        assert _listening(cfg.dicom.port)
        assert cfg.dicom.storage_dir.is_dir()
        assert svc.loop is None
        assert _job_ids(svc) == {"completion", "purge", "leases", "storage"}
        assert svc.scheduler is not None and svc.scheduler.running
        code, ready = _readyz(cfg)
        assert code == 200 and set(ready["checks"]) == {"database", "storage", "scp"}
    finally:
        svc.stop()
    assert not svc.scheduler.running
    assert not _listening(cfg.dicom.port)
    assert not _listening(cfg.health.port)


def test_worker_role_runs_the_loop_and_the_delivery_job(
    cfg: AppConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.pipeline

    class FakePipeline:
        def process(self, studies: Sequence[ClaimedStudy]) -> None:
            raise AssertionError("nothing is ready: nothing to process")

    monkeypatch.setattr(
        worker.pipeline.Pipeline, "from_config", classmethod(lambda cls, c, q: FakePipeline())
    )
    cfg.worker.overlap = False  # the fake is the processor itself (overlap would wrap it)
    svc = Service(cfg, role="worker")
    svc.start()
    try:
        assert svc.scp is None and not _listening(cfg.dicom.port)
        assert svc.loop is not None and isinstance(svc.loop.processor, FakePipeline)
        assert svc.loop.worker_id == cfg.worker.name
        assert _job_ids(svc) == {"leases", "delivery"}
        thread = svc._loop_thread
        assert thread is not None and thread.is_alive()
        code, ready = _readyz(cfg)
        assert code == 200 and set(ready["checks"]) == {"database", "models"}
        assert ready["checks"]["models"]["detail"].endswith(
            f"worker loop {cfg.worker.name} running"
        )
        svc.loop.stop()
        thread.join(5)
        code, ready = _readyz(cfg)
        assert code == 503 and "worker loop is not running" in ready["checks"]["models"]["detail"]
    finally:
        svc.stop()
    assert not thread.is_alive()
    assert svc.scheduler is not None and not svc.scheduler.running


def test_refuses_an_out_of_date_database(cfg: AppConfig) -> None:
    url = cfg.queue.database_url
    migrate.upgrade(url, "0001_initial")
    svc = Service(cfg, role="scp")
    with pytest.raises(DatabaseNotReady, match="cxr-worker db upgrade"):
        svc.start()
    assert svc.scp is None and svc.scheduler is None  # nothing was started
    assert not _listening(cfg.health.port)  # and the health endpoint was closed again
    assert migrate.current_revision(url) == "0001_initial"  # and nothing was changed
