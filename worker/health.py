"""The monitoring endpoint of a ``serve`` process (config ``health:``), plain HTTP:

- ``GET /healthz``: 200 while the process runs (a liveness probe: restart it when this fails);
- ``GET /readyz``: 200 when every check of this process's role passes, else 503; the JSON body
  names each check and why it failed: the database answers at the current schema, the storage
  folder is writable with more than ``dicom.min_free_disk_mb`` free, the SCP is listening (roles
  all/scp), the models are loaded and the worker loop runs (roles all/worker);
- ``GET /metrics``: Prometheus text format (:mod:`worker.metrics`).

Nothing here carries patient data: checks name folders, addresses and database URLs (password
hidden).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import exposition, generate_latest

from db.errors import QueueError
from dicom_node.scp import ListenError, listen_error

from .metrics import Metrics

log = logging.getLogger(__name__)

#: The text format every Prometheus server reads (0.0.4; newer clients default to 1.0.0).
METRICS_CONTENT_TYPE: str = getattr(
    exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST
)


@dataclass(frozen=True)
class Check:
    """One readiness check: passed or not, and a sentence saying what was found."""

    ok: bool
    detail: str


#: A readiness check of the running service.
CheckFn = Callable[[], Check]


def storage_check(folder: Path, min_free_mb: int) -> Check:
    """The folder exists, a file can be written and removed in it, and more than ``min_free_mb``
    MiB are free (below that the SCP answers C-STOREs with 0xA700)."""
    try:
        free_mb = shutil.disk_usage(folder).free / 2**20
        probe = folder / f".readyz-{uuid.uuid4().hex}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        return Check(False, f"storage folder {folder} is not writable: {exc.strerror or exc}")
    if free_mb < min_free_mb:
        return Check(
            False,
            f"storage folder {folder} has {free_mb:.0f} MiB free, below dicom.min_free_disk_mb "
            f"({min_free_mb}): C-STOREs are answered 0xA700",
        )
    return Check(True, f"storage folder {folder} writable, {free_mb:.0f} MiB free")


def database_check(ping: Callable[[], str]) -> Check:
    """``ping`` (:meth:`db.queue.Queue.ping`) answers with the schema revision."""
    try:
        return Check(True, f"database answers at schema revision {ping()}")
    except QueueError as exc:
        return Check(False, str(exc))


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``host:port``, served from a thread.

    ``checks``: name -> readiness check, looked up at every request (the service adds checks as
    its parts start)."""

    def __init__(
        self, host: str, port: int, *, metrics: Metrics, checks: dict[str, CheckFn]
    ) -> None:
        self.host, self.wanted_port = host, port
        self.metrics = metrics
        self.checks = checks
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def ready(self) -> tuple[bool, dict[str, Check]]:
        """Run every check now; ready when all pass (and there is at least one)."""
        results = {}
        for name, fn in list(self.checks.items()):
            try:
                results[name] = fn()
            except Exception as exc:  # noqa: BLE001 - a broken check is a failed check
                results[name] = Check(False, f"check failed: {type(exc).__name__}")
                log.warning("readiness check %s raised", name, exc_info=True)
        return bool(results) and all(c.ok for c in results.values()), results

    def start(self) -> None:
        """Listen and serve in a thread; :class:`~dicom_node.scp.ListenError` saying why when
        the address cannot be bound."""
        handler = _handler_class(self)
        server_class = _HTTPServer6 if ":" in self.host else ThreadingHTTPServer
        try:
            server = server_class((self.host, self.wanted_port), handler)
        except OSError as exc:
            why = listen_error(
                self.host, self.wanted_port, exc, what="HTTP health", key="health.host, health.port"
            )
            raise ListenError(exc.errno, why) from exc
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="health-http"
        )
        self._thread.daemon = True
        self._thread.start()
        log.info(
            "health endpoint on http://%s:%d (/healthz /readyz /metrics)", self.host, self.port
        )

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the health server is not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _HTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler_class(health: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cxr-pacs-worker"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, "application/json", b'{"status": "alive"}\n')
            elif path == "/readyz":
                ok, results = health.ready()
                body = {"ready": ok, "checks": {k: asdict(v) for k, v in results.items()}}
                data = (json.dumps(body, indent=2) + "\n").encode()
                self._send(200 if ok else 503, "application/json", data)
            elif path == "/metrics":
                self._send(200, METRICS_CONTENT_TYPE, generate_latest(health.metrics.registry))
            else:
                self._send(404, "text/plain", b"not found: try /healthz, /readyz or /metrics\n")

        def _send(self, code: int, ctype: str, data: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base name
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
