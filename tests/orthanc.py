"""A real Orthanc PACS for tests: started from the Debian package with its own config in a temp dir.

    with Orthanc.start(tmp_path, modalities={"cxr": ("CXR_WORKER", 11112)}) as pacs:
        pacs.upload(Path("tests/data/RG1_UNCR.dcm"))
        pacs.store_to("cxr", instance_ids)

DICOM and HTTP ports are chosen free; storage and index live in the temp dir; the REST API refuses
non-local clients (``RemoteAccessAllowed`` false) and needs no password; the only DICOM peers it
knows are on 127.0.0.1. (Orthanc 1.10 has no DICOM bind-address option: its DICOM port listens on
all interfaces, on a random port, for the few seconds a test runs.) Stopped by PID: SIGTERM, then
SIGKILL. ``lua_script`` loads a Lua script (e.g. to react to received structured reports).

In a fixture:
``with Orthanc.start(tmp_path / "orthanc", aet=..., modalities=...) as pacs: yield pacs``
(``Orthanc.launch`` + ``stop()`` when the lifetime is not a ``with`` block). Skip with
``pytest.mark.skipif(not orthanc_available(), ...)`` where Orthanc may be missing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import free_port

ORTHANC_BIN = os.environ.get("CXR_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get(
    "CXR_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
)


def orthanc_available() -> bool:
    return Path(ORTHANC_BIN).is_file() or shutil.which("Orthanc") is not None


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed.

    The message has the URL and Orthanc's answer."""


class Orthanc:
    """A running Orthanc process and a small client for its REST API."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        workdir: Path,
        http_port: int,
        dicom_port: int,
        aet: str,
        log_path: Path,
    ) -> None:
        self.proc = proc
        self.workdir = workdir
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.aet = aet
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{http_port}"

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def launch(
        cls,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, int]] | None = None,
        lua_script: Path | None = None,
        extra_config: Mapping[str, Any] | None = None,
        dicomweb: bool = False,
        timeout_s: float = 60.0,
    ) -> Orthanc:
        """Start Orthanc; ``modalities`` maps a name to (AE title, port) of a peer on 127.0.0.1.

        ``dicomweb`` loads Debian's DICOMweb plugin (QIDO-RS/WADO-RS/STOW-RS under
        ``/dicom-web/``, what a web viewer such as OHIF reads)."""
        exe = ORTHANC_BIN if Path(ORTHANC_BIN).is_file() else shutil.which("Orthanc")
        if not exe:
            raise OrthancError(f"Orthanc is not installed ({ORTHANC_BIN}); apt-get install orthanc")
        if dicomweb and not Path(DICOMWEB_PLUGIN).is_file():
            raise OrthancError(
                f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN}); "
                "apt-get install orthanc-dicomweb (make viewer-deps)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = free_port(), free_port()
        while dicom_port == http_port:
            dicom_port = free_port()
        config: dict[str, Any] = {
            "Name": f"test-orthanc-{aet}",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                name: {"AET": ae, "Host": "127.0.0.1", "Port": port}
                for name, (ae, port) in (modalities or {}).items()
            },
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "LuaScripts": [str(lua_script)] if lua_script else [],
            "SaveJobs": False,
            "StableAge": 2,
            "DeidentifyLogs": True,
        }
        if dicomweb:
            # "Full": the metadata route reads every attribute from the stored files, so an SR's
            # ContentSequence reaches the viewer whole
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            }
        config.update(extra_config or {})
        cfg_path = workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        log_path = workdir / "orthanc.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [exe, str(cfg_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
            )
        pacs = cls(proc, workdir, http_port, dicom_port, aet, log_path)
        try:
            pacs._wait_ready(timeout_s)
        except BaseException:
            pacs.stop()
            raise
        return pacs

    @classmethod
    @contextmanager
    def start(cls, workdir: Path, **kw: Any) -> Iterator[Orthanc]:
        pacs = cls.launch(workdir, **kw)
        try:
            yield pacs
        finally:
            pacs.stop()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                self.get("/system")
                return
            except (OrthancError, OSError) as e:
                last = str(e)
            time.sleep(0.2)
        raise OrthancError(
            f"Orthanc did not answer {self.url}/system within {timeout_s:.0f} s ({last}):\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate by PID, then kill if it does not exit within ``timeout_s``."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ REST

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout_s: float = 120.0,
    ) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as rsp:
                data = rsp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise OrthancError(f"{method} {self.url}{path} -> HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise OrthancError(f"{method} {self.url}{path} failed: {e.reason}") from None
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        ctype = "application/dicom" if isinstance(payload, bytes) else "application/json"
        return self.request("POST", path, body, ctype)

    def upload(self, path: Path) -> str:
        """``POST /instances`` a DICOM file; returns Orthanc's instance ID."""
        rsp = self.post("/instances", Path(path).read_bytes())
        if not isinstance(rsp, dict) or rsp.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"uploading {path} to Orthanc failed: {rsp}")
        return str(rsp["ID"])

    def store_to(
        self, modality: str, resources: list[str], *, timeout_s: float = 120.0
    ) -> dict[str, Any]:
        """``POST /modalities/{modality}/store`` synchronously; returns Orthanc's answer.

        Raises :class:`OrthancError` when Orthanc reports a failed C-STORE."""
        rsp = self.request(
            "POST",
            f"/modalities/{modality}/store",
            json.dumps({"Resources": resources, "Synchronous": True}).encode(),
            timeout_s=timeout_s,
        )
        if not isinstance(rsp, dict):
            raise OrthancError(f"unexpected answer from Orthanc store: {rsp!r}")
        if rsp.get("FailedInstancesCount", 0):
            raise OrthancError(
                f"Orthanc could not store {rsp['FailedInstancesCount']} instance(s): {rsp}"
            )
        return rsp

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        data = self.request("GET", f"/instances/{instance_id}/file")
        return data if isinstance(data, bytes) else base64.b64decode(data)

    def jobs(self) -> list[dict[str, Any]]:
        """Every job Orthanc remembers (``GET /jobs?expand``), oldest first."""
        return sorted(self.get("/jobs?expand") or [], key=lambda j: str(j.get("CreationTime")))

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's ID of the study with this Study Instance UID, or None."""
        found = self.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
        ids = [x["ID"] for x in (found or []) if x.get("Type") == "Study"]
        return ids[0] if ids else None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's instances with their main tags (``GET /studies/{id}/instances``)."""
        sid = self.study_id(study_uid)
        return [] if sid is None else list(self.get(f"/studies/{sid}/instances"))
