"""Hostile and faulty input over real associations (issue 10): a report never mixes two people, a
reused SOP Instance UID is never silently dropped, a full disk answers 0xA700, no patient data in
logs or the database, bounded memory against deflate bombs, idle sockets cannot lock senders out,
an absurd PDU length is dropped at once, malformed identity headers fail once, DICOM TLS with
dcmtk's tools and for deliveries."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from db.queue import Queue
from dicom_node.config import DestinationConfig, DicomNodeConfig
from dicom_node.derived import check_same_patient_and_study, patient_identity
from dicom_node.scu import send as scu_send
from tests.conftest import free_port
from tests.dicom_net import SCP_AET, UID_ROOT, RunningSCP, fresh, save, send
from tests.service import ServiceProcess, wait_for, write_config
from tests.study_objects import relabelled_lateral
from tests.worker.test_pipeline import Env, weights  # noqa: F401 - fixture

pytestmark = pytest.mark.network

CANARY = "SECRET^PATIENT"


@pytest.fixture(autouse=True)
def _no_validation_logging() -> Iterator[None]:
    old = pydicom_config.settings.reading_validation_mode
    yield
    pydicom_config.settings.reading_validation_mode = old


# ------------------------------------------------------------------ 1. identity across images


def test_identity_disagreement_is_never_analysed(
    tmp_path: Path,
    start_scp: Callable[..., RunningSCP],
    sc_ds: Dataset,
    weights: Path,  # noqa: F811
) -> None:
    env = Env(tmp_path, f"sqlite:///{tmp_path / 'q.sqlite3'}", weights)
    run = start_scp(env.queue)
    assert run.storage == env.storage
    frontal = fresh(sc_ds)
    frontal.PatientName = "CHARLIE^ONE"
    lateral = relabelled_lateral(sc_ds, frontal)
    lateral.PatientName = "CHARLIE^OTHER"  # same PatientID, same study, another person
    assert send(run.port, frontal, lateral) == [0, 0]
    env.ready_and_run()
    d = env.queue.study(frontal.StudyInstanceUID)
    assert d is not None and d.state == "ignored" and not d.results
    assert "PatientName" in (d.state_reason or "") and "CHARLIE" not in (d.state_reason or "")

    # the same person written differently (case, spaces, ^ padding) is one person
    a, b = fresh(sc_ds), fresh(sc_ds)
    a.PatientName, b.PatientName = "Charlie^One", "CHARLIE^ONE^^"
    assert patient_identity(a) == patient_identity(b)
    b.PatientBirthDate, b.StudyInstanceUID = "19000101", a.StudyInstanceUID
    with pytest.raises(ValueError, match="different PatientBirthDate") as ei:
        check_same_patient_and_study([a, b])  # the SR builder's last line
    assert "1900" not in str(ei.value)


# ------------------------------------------------------- 2. a reused UID from another patient


def test_reused_uid_from_another_patient_is_kept_aside_and_flagged(
    start_scp: Callable[..., RunningSCP], sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    run = start_scp(sqlite_queue)
    first = fresh(sc_ds)
    assert send(run.port, first) == [0x0000]
    other = fresh(sc_ds)  # another study...
    other.PatientID, other.PatientName = "OTHER-1", "OTHER^PERSON"  # ...another patient
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert send(run.port, other) == [0xB000]
    assert send(run.port, other) == [0xB000]  # again: still not dropped, same aside file
    kept = list((run.storage / other.StudyInstanceUID).glob(f"{first.SOPInstanceUID}.aside-*"))
    assert len(kept) == 1 and pydicom.dcmread(kept[0]).PatientID == "OTHER-1"
    d = sqlite_queue.study(first.StudyInstanceUID)
    assert d is not None and d.last_error is not None
    assert "another StudyInstanceUID, another patient identity" in d.last_error
    assert any("received again with different content" in (e.reason or "") for e in d.events)
    assert "OTHER" not in d.last_error
    assert (
        pydicom.dcmread(run.storage / first.StudyInstanceUID / f"{first.SOPInstanceUID}.dcm")[
            "PatientID"
        ].value
        == first.PatientID
    )


# ------------------------------------------------------------------------- 3. a real full disk


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with room for bytes but only 2 inodes: creating a study folder or temp file in it
    fails with a real ENOSPC from the kernel while ``statvfs`` still shows free blocks."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=2", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_enospc_answers_a700(
    tiny_tmpfs: Path, start_scp: Callable[..., RunningSCP], sc_ds: Dataset
) -> None:
    run = start_scp(storage_dir=tiny_tmpfs / "storage", min_free_disk_mb=1)
    (tiny_tmpfs / "storage").mkdir(exist_ok=True)
    assert send(run.port, fresh(sc_ds)) == [0xA700]
    with pytest.raises(ValueError, match=r"min_free_disk_mb >= 1"):
        DicomNodeConfig(min_free_disk_mb=0)


# -------------------------------------------------- 4. PHI canaries through every malformed path


def _patched(ds: Dataset, tmp: Path, name: str, old: bytes, new: bytes) -> Path:
    path = save(ds, tmp / f"{name}.dcm")
    data = path.read_bytes()
    assert old in data, name
    path.write_bytes(data.replace(old, new, 1))
    return path


def test_phi_canaries_reach_no_log_no_reason_no_status(
    tmp_path: Path,
    start_scp: Callable[..., RunningSCP],
    sc_ds: Dataset,
    weights: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = Env(tmp_path, f"sqlite:///{tmp_path / 'q.sqlite3'}", weights)
    run = start_scp(env.queue)
    files = []
    name_ul = fresh(sc_ds)
    name_ul.PatientName = CANARY  # 14 bytes: sent with VR UL
    files.append(
        _patched(
            name_ul,
            tmp_path,
            "ul",
            b"PN\x0e\x00" + CANARY.encode(),
            b"UL\x0e\x00" + CANARY.encode(),
        )
    )
    bad_sex = fresh(sc_ds)
    bad_sex.PatientSex = CANARY
    files.append(save(bad_sex, tmp_path / "sex.dcm"))
    id_fd = fresh(sc_ds)
    id_fd.PatientID = CANARY + "XX"  # 16 bytes: sent with VR FD
    files.append(
        _patched(
            id_fd,
            tmp_path,
            "fd",
            b"LO\x10\x00" + (CANARY + "XX").encode(),
            b"FD\x10\x00" + (CANARY + "XX").encode(),
        )
    )
    uid_phi = fresh(sc_ds)
    uid_phi.StudyInstanceUID = CANARY
    files.append(save(uid_phi, tmp_path / "uid.dcm"))
    with caplog.at_level(logging.DEBUG):
        statuses = send(run.port, *files, raw=True)
        env.ready_and_run()
    assert statuses[3] == 0xA900 and statuses[:3] == [0, 0, 0], statuses
    text = "\n".join(r.getMessage() for r in caplog.records) + "\n".join(
        str(r.exc_info) for r in caplog.records if r.exc_info
    )
    assert CANARY not in text and "SECRET" not in text
    studies = [env.queue.study(ds.StudyInstanceUID) for ds in (name_ul, bad_sex, id_fd)]
    for d in studies:
        assert d is not None
        dumped = repr(d)
        assert "SECRET" not in dumped, dumped
    # the wrong-VR name can never be read: failed once, not retried (ErrorKind.INVALID)
    ul = studies[0]
    assert ul is not None and ul.state == "failed" and ul.attempts == 1, ul.state
    assert "PatientName cannot be decoded" in (ul.last_error or "")
    cli = subprocess.run(
        [str(Path(".venv/bin/cxr-worker").resolve()), "status", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "CXR_DATABASE_URL": f"sqlite:///{tmp_path / 'q.sqlite3'}"},
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    listed = {s["study_uid"]: s for s in json.loads(cli.stdout)["latest"]}
    assert {str(ds.StudyInstanceUID) for ds in (name_ul, bad_sex, id_fd)} <= set(listed), listed
    assert listed[str(name_ul.StudyInstanceUID)]["state"] == "failed"
    assert "SECRET" not in cli.stdout + cli.stderr


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(".venv/bin/cxr-worker").resolve()), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_phi_canary_through_a_real_serve_process(
    tmp_path: Path,
    sc_ds: Dataset,
    weights: Path,  # noqa: F811
) -> None:
    """The UL-PatientName canary sent over a real association to ``cxr-worker serve`` (DEBUG
    logging): the study fails once, and neither the service's log file nor ``status --json``
    nor ``history --json`` holds the canary."""
    port = free_port()
    db_url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    config = write_config(
        tmp_path,
        port=port,
        ae_title=SCP_AET,
        queue={"database_url": db_url},
        completion={"quiet_seconds": 1},
        models={"weights_dir": str(weights)},
        logging={"level": "DEBUG"},
    )
    ds = fresh(sc_ds)
    ds.PatientName = CANARY
    path = _patched(
        ds, tmp_path, "ul", b"PN\x0e\x00" + CANARY.encode(), b"UL\x0e\x00" + CANARY.encode()
    )
    study = str(ds.StudyInstanceUID)
    with ServiceProcess(config) as svc:
        svc.start(port=port, ae_title=SCP_AET)
        assert send(port, path, raw=True) == [0]
        queue = Queue.from_url(db_url, lease_seconds=60, max_attempts=3)
        try:

            def failed() -> bool:
                d = queue.study(study)
                return d is not None and d.state == "failed"

            wait_for(failed, timeout_s=120, what="the UL-name study to fail", service=svc)
        finally:
            queue.close()
        status = _cli(config, "status", "--json")
        history = _cli(config, "history", study, "--json")
    assert status.returncode == 0 and history.returncode == 0, status.stderr + history.stderr
    listed = {s["study_uid"]: s for s in json.loads(status.stdout)["latest"]}
    assert listed[study]["state"] == "failed", listed
    assert "PatientName cannot be decoded" in (listed[study]["last_error"] or "")
    assert json.loads(history.stdout), "history printed no rows"
    log_text = svc.log.read_text(errors="replace")
    assert f"sop={ds.SOPInstanceUID}" in log_text  # the log is the service's, and it is DEBUG
    for where, text in (("log", log_text), ("status", status.stdout), ("history", history.stdout)):
        assert "SECRET" not in text, where


# ------------------------------------------------------------------ 5. deflate bombs, bounded


def _bomb(path: Path, inflated_mb: int) -> Path:
    sop = generate_uid(UID_ROOT)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(UID_ROOT)
    ds.Modality = "OT"
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    n = inflated_mb * 1024 * 1024
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(buf.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, n))
    zeros = bytes(1024 * 1024)
    for _ in range(inflated_mb):
        body += c.compress(zeros)
    body += c.flush()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta)  # type: ignore[arg-type]
        f.write(body)
    return path


def _vmhwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_three_concurrent_deflate_bombs_stay_bounded(
    tmp_path: Path, start_scp: Callable[..., RunningSCP]
) -> None:
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk's storescu not installed")
    run = start_scp(max_dataset_mb=64)
    bombs = [_bomb(tmp_path / f"bomb{i}.dcm", 512) for i in range(3)]
    assert all(b.stat().st_size < 2 * 1024 * 1024 for b in bombs)
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS (the SCP's)
    base = _vmhwm_kb()
    # the senders are dcmtk processes, so only the SCP's memory is measured here
    procs = [
        subprocess.Popen(
            ["storescu", "-v", "-xd", "-aec", SCP_AET, "127.0.0.1", str(run.port), str(b)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for b in bombs
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outs.append(out)
    peak_mb = (_vmhwm_kb() - base) / 1024
    print(f"3 concurrent 512 MiB deflate bombs, cap 64 MiB: SCP peak RSS +{peak_mb:.0f} MiB")
    assert all("refused: outofresources" in o.lower() for o in outs), outs
    assert peak_mb < 3 * 64 * 2 + 100, peak_mb
    assert run.files() == []


# ----------------------------------------------- 6. idle sockets, absurd PDU lengths, per peer


def test_twenty_idle_sockets_do_not_lock_senders_out(
    start_scp: Callable[..., RunningSCP], sc_ds: Dataset
) -> None:
    run = start_scp(max_associations=4, max_connections_per_peer=8, acse_timeout_s=20)
    idle = []
    for _ in range(20):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        try:
            s.connect(("127.0.0.1", run.port))
        except OSError:
            pass
        idle.append(s)
    try:
        time.sleep(0.3)
        t0 = time.perf_counter()
        assert send(run.port, fresh(sc_ds)) == [0x0000]
        latency = time.perf_counter() - t0
        print(f"store with 20 idle sockets open: {latency * 1000:.0f} ms")
        assert latency < 3.0
        # an announced PDU of 0xFFFFFFFF bytes: closed at once, not after a timeout
        with socket.create_connection(("127.0.0.1", run.port), timeout=10) as s:
            t0 = time.perf_counter()
            s.sendall(b"\x01\x00\xff\xff\xff\xff")
            try:
                got = s.recv(16)
            except ConnectionResetError:
                got = b""
            assert time.perf_counter() - t0 < 3.0 and got in (b"",) or got[:1] == b"\x07"
    finally:
        for s in idle:
            s.close()


# --------------------------------------------------------------------------- 7. DICOM TLS


def _certs(d: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk not installed")
def test_dicom_tls_with_dcmtk_and_for_deliveries(
    tmp_path: Path, start_scp: Callable[..., RunningSCP], sc_ds: Dataset
) -> None:
    c = _certs(tmp_path / "pki")
    tls = {
        "cert_file": c["server.pem"],
        "key_file": c["server.key"],
        "ca_file": c["ca.pem"],
        "require_client_cert": True,
    }
    run = start_scp(tls=tls)
    base = ["+tls", str(c["client.key"]), str(c["client.pem"]), "+cf", str(c["ca.pem"])]
    echo = subprocess.run(
        ["echoscu", "-aec", SCP_AET, *base, "127.0.0.1", str(run.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode == 0, echo.stderr
    path = save(fresh(sc_ds), tmp_path / "tls.dcm")
    store = subprocess.run(
        ["storescu", "-xy", "-aec", SCP_AET, *base, "127.0.0.1", str(run.port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert store.returncode == 0, store.stderr
    assert len(run.files()) == 1
    # without a client certificate: refused
    anon = subprocess.run(
        [
            "echoscu",
            "-aec",
            SCP_AET,
            "+tls",
            str(c["client.key"]),
            str(c["client.pem"]),
            "127.0.0.1",
            str(run.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert anon.returncode != 0
    # plain TCP to the TLS port: no association
    ae = AE(ae_title="PLAIN")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assert not ae.associate("127.0.0.1", run.port, ae_title=SCP_AET).is_established
    # a delivery over TLS to a TLS peer (our own SCP)
    dest = DestinationConfig(
        name="tls_pacs",
        ae_title=SCP_AET,
        host="127.0.0.1",
        port=run.port,
        tls={"ca_file": c["ca.pem"], "cert_file": c["client.pem"], "key_file": c["client.key"]},
    )
    res = scu_send([fresh(sc_ds)], dest, calling_ae="CXR_WORKER")
    assert [r.delivered for r in res] == [True], res
    assert len(run.files()) == 2
