"""``/healthz``, ``/readyz`` and ``/metrics`` over real HTTP (urllib to 127.0.0.1).

The service test runs ``cxr-worker serve --role scp`` as a child process on the real PostgreSQL,
reached through a TCP proxy the test cuts and restores: the database "goes down" for that service
alone (the shared server keeps running), ``/readyz`` turns 503 naming the database, and turns 200
again once it is back."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE

from tests.conftest import drop_pg_database, free_port, make_pg_database
from tests.dicom_net import fresh
from tests.raw_assoc import raw_associate
from tests.service import ServiceProcess, wait_for, write_config
from tests.study_objects import text_report
from worker.health import Check, HealthServer, storage_check
from worker.metrics import Metrics

pytestmark = [pytest.mark.network]


def get(url: str, timeout_s: float = 20.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as rsp:
            return rsp.status, rsp.headers["Content-Type"], rsp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def send(port: int, *items: Any) -> list[int]:
    """C-STORE ``items`` to the service (called AE CXR_WORKER, calling TEST_SCU)."""
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for item in items:
        ae.add_requested_context(item.SOPClassUID, item.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


# --------------------------------------------------------------------------- in process


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HealthServer]:
    checks = {"storage": lambda: storage_check(tmp_path, 1), "models": lambda: Check(True, "ok")}
    h = HealthServer(
        "127.0.0.1", free_port(), metrics=Metrics(disk_paths={"storage": tmp_path}), checks=checks
    )
    h.start()
    yield h
    h.stop()


def test_endpoints_answer_over_http(server: HealthServer, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{server.port}"
    code, ctype, body = get(base + "/healthz")
    assert (code, ctype, json.loads(body)) == (200, "application/json", {"status": "alive"})
    code, _, body = get(base + "/readyz")
    ready = json.loads(body)
    assert code == 200 and ready["ready"] is True
    assert ready["checks"]["storage"]["ok"] and "writable" in ready["checks"]["storage"]["detail"]
    assert not list(tmp_path.glob(".readyz-*"))  # the probe file is removed

    server.metrics.instance_received(0x0000)
    server.metrics.instance_received(0xA700)
    server.metrics.study_analysed(analysis_seconds=3.2, end_to_end_seconds=45.0)
    code, ctype, body = get(base + "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")  # any Prometheus
    got = samples(body)
    assert got[("cxr_instances_received_total", (("status", "0x0000 Success"),))] == 1
    assert (
        got[("cxr_instances_received_total", (("status", "0xA700 Refused: Out of Resources"),))]
        == 1
    )
    assert got[("cxr_analysis_seconds_count", ())] == 1
    assert got[("cxr_analysis_seconds_bucket", (("le", "5.0"),))] == 1
    assert got[("cxr_analysis_seconds_bucket", (("le", "2.0"),))] == 0
    assert got[("cxr_end_to_end_seconds_sum", ())] == 45.0
    assert got[("cxr_database_up", ())] == 0  # no queue attached
    assert got[("cxr_disk_free_bytes", (("path", "storage"),))] > 0
    assert get(base + "/nope")[0] == 404


def test_readyz_is_503_naming_the_failed_check(server: HealthServer) -> None:
    server.checks["scp"] = lambda: Check(False, "SCP CXR_WORKER on 127.0.0.1:104 is not listening")
    server.checks["broken"] = lambda: 1 / 0  # type: ignore[return-value,operator]
    code, _, body = get(f"http://127.0.0.1:{server.port}/readyz")
    ready = json.loads(body)
    assert code == 503 and ready["ready"] is False
    assert ready["checks"]["scp"] == {
        "ok": False,
        "detail": "SCP CXR_WORKER on 127.0.0.1:104 is not listening",
    }
    assert ready["checks"]["broken"] == {"ok": False, "detail": "check failed: ZeroDivisionError"}
    assert ready["checks"]["models"]["ok"] is True


def test_storage_below_threshold_is_not_ready(tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    check = storage_check(tmp_path, int(free_mb) + 10_000)
    assert not check.ok and "below dicom.min_free_disk_mb" in check.detail
    assert not storage_check(tmp_path / "missing", 1).ok


def test_a_busy_port_is_named(server: HealthServer) -> None:
    from dicom_node.scp import ListenError

    other = HealthServer("127.0.0.1", server.port, metrics=Metrics(), checks={})
    with pytest.raises(ListenError, match="already in use by another process"):
        other.start()


# ------------------------------------------------------------------- the real service


@pytest.fixture
def pg_through_proxy(pg_admin_url: str) -> Iterator[tuple[str, Any]]:
    from tests.tcp_proxy import TcpProxy

    url, name = make_pg_database(pg_admin_url)
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    # postgresql:// without a driver: the config normalises it to postgresql+psycopg://
    yield f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}", proxy
    proxy.cut()
    drop_pg_database(pg_admin_url, name)


@pytest.mark.postgres
def test_service_readyz_follows_the_database_and_metrics_count(
    tmp_path: Path, pg_through_proxy: tuple[str, Any], sc_ds: Any
) -> None:
    url, proxy = pg_through_proxy
    port = free_port()
    cfg = write_config(
        tmp_path,
        port=port,
        queue={"database_url": url},
        dicom={"allowed_calling_ae_titles": ["TEST_SCU"]},
    )
    health_port = int(yaml.safe_load(cfg.read_text())["health"]["port"])
    base = f"http://127.0.0.1:{health_port}"
    with ServiceProcess(cfg, role="scp").start(port=port) as svc:
        assert get(base + "/healthz")[0] == 200
        code, _, body = get(base + "/readyz")
        ready = json.loads(body)
        assert code == 200, body
        assert set(ready["checks"]) == {"database", "storage", "scp"}  # role scp: no models
        assert "schema revision 0003_views_and_errors" in ready["checks"]["database"]["detail"]
        assert ready["checks"]["scp"]["detail"] == f"SCP CXR_WORKER on 127.0.0.1:{port} listening"

        frontal = fresh(sc_ds)
        assert send(port, frontal, text_report(frontal)) == [0, 0]
        assert raw_associate(port, called=b"CXR_WORKER", calling=b"STRANGER") == 3  # rejected
        assert raw_associate(port, called=b"CXR_WORKER", calling=b"EVIL\nFORGED LINE") in (0, 7)
        got = samples(get(base + "/metrics")[2])
        assert got[("cxr_instances_received_total", (("status", "0x0000 Success"),))] == 2
        assert got[("cxr_studies", (("state", "receiving"),))] == 1
        assert got[("cxr_studies", (("state", "done"),))] == 0
        assert got[("cxr_database_up", ())] == 1
        assert got[("cxr_oldest_ready_study_age_seconds", ())] == 0
        assert got[("cxr_disk_free_bytes", (("path", "storage"),))] > 0
        rejected = (
            "cxr_associations_rejected_total",
            (("reason", "calling AE title not recognised"),),
        )
        assert got[rejected] == 1

        proxy.cut()  # the database is gone for this service

        def unready() -> dict[str, Any] | None:
            code, _, body = get(base + "/readyz")
            return json.loads(body) if code == 503 else None

        down = wait_for(unready, timeout_s=60, what="/readyz to turn 503", service=svc)
        assert down["checks"]["database"]["ok"] is False
        assert "is unavailable" in down["checks"]["database"]["detail"]
        assert down["checks"]["scp"]["ok"] and down["checks"]["storage"]["ok"]
        assert get(base + "/healthz")[0] == 200  # alive all the same
        assert send(port, fresh(sc_ds)) == [0xA700]  # PACS is told to retry later
        got = samples(get(base + "/metrics")[2])
        assert got[("cxr_database_up", ())] == 0
        assert (
            got[("cxr_instances_received_total", (("status", "0xA700 Refused: Out of Resources"),))]
            == 1
        )

        proxy.restore()
        wait_for(
            lambda: get(base + "/readyz")[0] == 200,
            timeout_s=60,
            what="/readyz to turn 200 again",
            service=svc,
        )
        assert send(port, fresh(sc_ds)) == [0]
    log = svc.tail(200_000)
    assert (
        "association rejected: calling AE 'STRANGER', called AE 'CXR_WORKER', from 127.0.0.1:"
        in log
    )
    assert "EVIL\\nFORGED LINE" in log  # escaped in pynetdicom's own complaint too
    # a line at the margin is a record: no forged one, no traceback line posing as one
    assert not any(
        line.startswith(("FORGED", "Traceback", "ValueError")) for line in log.splitlines()
    )


def test_json_logging_and_quiet_libraries(tmp_path: Path) -> None:
    """``logging.format: json``: every line a JSON object; highdicom/pynetdicom/alembic INFO
    chatter is not there, the service's own INFO lines are."""
    port = free_port()
    cfg = write_config(tmp_path, port=port, logging={"level": "INFO", "format": "json"})
    with ServiceProcess(cfg, role="scp").start(port=port) as svc:
        pass
    lines = [line for line in svc.tail(200_000).splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line parses
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    names = {e["logger"] for e in entries}
    assert "worker.service" in names and "dicom_node.scp" in names
    chatty = [
        e for e in entries if e["logger"].split(".")[0] in ("pynetdicom", "alembic", "highdicom")
    ]
    assert all(e["level"] in ("WARNING", "ERROR", "CRITICAL") for e in chatty), chatty


def test_an_address_of_another_machine_is_named() -> None:
    from dicom_node.scp import ListenError

    server = HealthServer("192.0.2.1", free_port(), metrics=Metrics(), checks={})  # TEST-NET-1
    with pytest.raises(ListenError, match="192.0.2.1 is not an address of this machine"):
        server.start()


def test_listen_errors_name_the_cause() -> None:
    import errno

    from dicom_node.scp import listen_error

    def why(code: int) -> str:
        return listen_error("0.0.0.0", 104, OSError(code, "x"), what="DICOM", key="dicom.port")

    assert "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)" in why(
        errno.EACCES
    )
    assert "already in use by another process (find it with: ss -ltnp 'sport = :104')" in why(
        errno.EADDRINUSE
    )
    assert "0.0.0.0 is not an address of this machine" in why(errno.EADDRNOTAVAIL)
