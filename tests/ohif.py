"""The real OHIF viewer for tests: its built ``dist/`` served on 127.0.0.1, reading a real Orthanc.

``make viewer-deps`` puts ``@ohif/app`` (npm, pinned :data:`OHIF_VERSION`) under
``var/viewer/ohif-app-<version>/`` and the node tools (playwright-core, dcmjs, the Cornerstone3D
SR adapters) under ``tests/js/node_modules``; Debian's chromium, chromium-driver and
orthanc-dicomweb come from apt. Nothing is downloaded at test time.

:class:`OhifServer` serves ``dist/`` like a production web server would: a generated
``app-config.js`` whose one data source is the DICOMweb API at ``/dicom-web`` of the same origin,
that path proxied to Orthanc's DICOMweb plugin (so the browser needs no CORS), and every other
unknown path answered with ``index.html`` (the viewer is a single-page app: ``/viewer?...`` is a
client route). It listens on 127.0.0.1 only, on a free port, in a thread of the test process.

:func:`run_node` runs one of the scripts in ``tests/js`` and returns what it printed as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import REPO

OHIF_VERSION = "3.13.2"
JS_DIR = REPO / "tests" / "js"
CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")

_MIME = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
    ".xml": "application/xml",
}
# forwarded both ways between the browser and Orthanc
_REQUEST_HEADERS = ("Accept", "Content-Type", "Range")
_RESPONSE_HEADERS = ("Content-Type", "Content-Range", "Accept-Ranges")


class ViewerMissing(RuntimeError):
    """The viewer or a node tool is missing; the message names the make target that installs it."""


def ohif_dist() -> Path:
    """OHIF's built ``dist/`` (``$CXR_OHIF_DIST`` or what ``make viewer-deps`` unpacked)."""
    env = os.environ.get("CXR_OHIF_DIST")
    dist = Path(env) if env else REPO / "var" / "viewer" / f"ohif-app-{OHIF_VERSION}" / "dist"
    if not (dist / "index.html").is_file():
        raise ViewerMissing(f"OHIF {OHIF_VERSION} is not installed at {dist}: run make viewer-deps")
    return dist


def node_tools_ready() -> None:
    """Raise :class:`ViewerMissing` unless node, the node modules and chromium are installed."""
    if shutil.which("node") is None:
        raise ViewerMissing("node is not installed: run make viewer-deps (apt nodejs)")
    for mod in ("playwright-core", "dcmjs", "@cornerstonejs/adapters"):
        if not (JS_DIR / "node_modules" / mod / "package.json").is_file():
            raise ViewerMissing(f"tests/js/node_modules/{mod} is missing: run make viewer-deps")
    if not Path(CHROMIUM).is_file():
        raise ViewerMissing(f"{CHROMIUM} is missing: run make viewer-deps (apt chromium)")


def app_config(dicomweb_root: str) -> str:
    """OHIF's ``app-config.js`` with one DICOMweb data source at ``dicomweb_root``."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (test)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "orthanc",
        "investigationalUseDialog": {"option": "never"},
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        self.server.requests.append(self.path)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/") or path == "/dicom-web":
            self._proxy()
            return
        if path == "/app-config.js":
            self._send(200, self.server.config_js.encode(), _MIME[".js"])
            return
        target = (self.server.dist / path.lstrip("/")).resolve()
        if self.server.dist in target.parents and target.is_file():
            self._send(
                200, target.read_bytes(), _MIME.get(target.suffix, "application/octet-stream")
            )
        elif Path(path).suffix in _MIME and not path.endswith(".html"):
            self._send(404, b"not found", "text/plain")
        else:  # a client-side route of the single-page app
            self._send(200, (self.server.dist / "index.html").read_bytes(), _MIME[".html"])

    def _proxy(self) -> None:
        req = urllib.request.Request(self.server.upstream + self.path, method="GET")
        for name in _REQUEST_HEADERS:
            if self.headers.get(name):
                req.add_header(name, self.headers[name])
        try:
            with urllib.request.urlopen(req, timeout=120) as rsp:
                status, body, headers = rsp.status, rsp.read(), rsp.headers
        except urllib.error.HTTPError as e:
            status, body, headers = e.code, e.read(), e.headers
        except urllib.error.URLError as e:
            self._send(502, f"Orthanc unreachable: {e.reason}".encode(), "text/plain")
            return
        self.send_response(status)
        for name in _RESPONSE_HEADERS:
            if headers.get(name):
                self.send_header(name, headers[name])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.upstream = upstream.rstrip("/")
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.config_js = app_config(self.url + "/dicom-web")
        self.requests: list[str] = []


class OhifServer:
    """OHIF's ``dist/`` on 127.0.0.1 with ``/dicom-web`` proxied to ``orthanc_url``."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.url = server.url

    @property
    def requests(self) -> list[str]:
        """The paths the browser asked for, in order (for failure messages)."""
        return list(self._server.requests)

    def viewer_url(self, study_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    @classmethod
    @contextmanager
    def start(cls, orthanc_url: str, dist: Path | None = None) -> Iterator[OhifServer]:
        server = _Server(dist or ohif_dist(), orthanc_url)
        thread = threading.Thread(target=server.serve_forever, name="ohif-http", daemon=True)
        thread.start()
        try:
            yield cls(server, thread)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)


def run_node(
    script: str, *args: str, timeout_s: float = 300.0, check: bool = True
) -> dict[str, Any]:
    """Run ``tests/js/<script>`` with node; its last stdout line is a JSON object, returned.

    ``check`` False returns that object even when the script exited non-zero (it says why)."""
    node_tools_ready()
    proc = subprocess.run(
        ["node", str(JS_DIR / script), *args],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "CXR_CHROMIUM": CHROMIUM},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    failed = AssertionError(
        f"node {script} exited with {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
        f"stderr:\n{proc.stderr[-4000:]}"
    )
    if not lines or (check and proc.returncode != 0):
        raise failed
    try:
        out = json.loads(lines[-1])
    except ValueError:
        raise failed from None
    if not isinstance(out, dict):
        raise AssertionError(f"node {script} printed {lines[-1][:200]!r}, not a JSON object")
    out.setdefault("exit_code", proc.returncode)
    return out
