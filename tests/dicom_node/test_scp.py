"""The storage SCP over real associations on 127.0.0.1: pynetdicom and dcmtk as clients, the real
queue (SQLite; SQLite and PostgreSQL where it matters), real files from tests/data.

One test per C-STORE status, the association rejections, and after every bad input a proof that
the service still serves.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from db.queue import Queue
from tests.conftest import DATA, drop_pg_database, free_port, make_pg_database
from tests.dicom_node.conftest import (
    SCP_AET,
    SCU_AET,
    RunningSCP,
    body_bytes,
    echo,
    fresh,
    open_queue,
    save,
    send,
)

pytestmark = pytest.mark.network

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="dcmtk (storescu/echoscu) not installed"
)
FUTURE = datetime.now(UTC) + timedelta(days=1)


def still_serves(run: RunningSCP, sc: Dataset) -> None:
    """The service answers C-ECHO and stores a good instance after whatever came before."""
    assert echo(run.port) == 0x0000
    good = fresh(sc)
    assert send(run.port, good) == [0x0000]
    assert (run.storage / good.StudyInstanceUID / f"{good.SOPInstanceUID}.dcm").is_file()


def storescu(
    port: int, *files: Path, option: str | None = None, called: str = SCP_AET
) -> subprocess.CompletedProcess[str]:
    cmd = ["storescu", "-v", "-aet", SCU_AET, "-aec", called]
    if option:
        cmd.append(option)
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- C-ECHO


@needs_dcmtk
def test_echo_from_pynetdicom_and_dcmtk(scp: RunningSCP) -> None:
    assert echo(scp.port) == 0x0000
    r = subprocess.run(
        ["echoscu", "-v", "-aet", SCU_AET, "-aec", SCP_AET, "127.0.0.1", str(scp.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Received Echo Response (Success)" in r.stdout + r.stderr


# ----------------------------------------------------------------------------- 0x0000, real files


def _dcmtk_convert(tool: str, args: list[str], src: Path, dst: Path) -> Path:
    if shutil.which(tool) is None:
        pytest.skip(f"dcmtk's {tool} is not installed")
    subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True, timeout=120)
    return dst


def _input_file(kind: str, tmp_path: Path) -> tuple[Path, str | None]:
    """(file to send, storescu option proposing its transfer syntax)."""
    if kind == "RG1_UNCR":
        return DATA / "RG1_UNCR.dcm", None
    if kind == "RG1_J2KR":
        return DATA / "RG1_J2KR.dcm", "-xv"
    if kind == "RG1_J2KI":
        return DATA / "RG1_J2KI.dcm", "-xw"
    if kind == "RG1_JLSN":
        return DATA / "RG1_JLSN.dcm", "-xu"
    if kind == "secondary_capture":
        return DATA / "siim_cr_pa_secondary_capture.dcm", "-xy"
    if kind == "monochrome1":  # same UIDs as the SC file in tests/data: give it its own
        ds = fresh(pydicom.dcmread(DATA / "siim_fake_monochrome1.dcm"))
        return save(ds, tmp_path / "mono1.dcm"), "-xy"
    if kind == "RG3_UNCR":
        return DATA / "RG3_UNCR.dcm", None
    raw = _dcmtk_convert(
        "dcmdjpeg", [], DATA / "siim_cr_pa_secondary_capture.dcm", tmp_path / "raw.dcm"
    )
    if kind == "deflated":
        return _dcmtk_convert("dcmconv", ["+td"], raw, tmp_path / "deflated.dcm"), "-xd"
    if kind == "big_endian":
        return _dcmtk_convert("dcmconv", ["+tb"], raw, tmp_path / "big.dcm"), "-xb"
    if kind == "implicit":
        return _dcmtk_convert("dcmconv", ["+ti"], raw, tmp_path / "implicit.dcm"), "-xi"
    if kind == "rle":
        return _dcmtk_convert("dcmcrle", [], raw, tmp_path / "rle.dcm"), "-xr"
    if kind == "jpeg_lossless_sv1":
        return _dcmtk_convert("dcmcjpeg", [], raw, tmp_path / "jpegll.dcm"), "-xs"
    raise AssertionError(kind)


def _check_stored(run: RunningSCP, queue: Queue, sent: Path) -> pydicom.Dataset:
    orig = pydicom.dcmread(sent)
    stored_path = run.storage / orig.StudyInstanceUID / f"{orig.SOPInstanceUID}.dcm"
    assert stored_path.is_file(), f"not stored: {stored_path}"
    stored = pydicom.dcmread(stored_path)
    # stored as received: same transfer syntax, same pixel bytes (nothing decoded or re-encoded)
    assert stored.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID
    assert stored.file_meta.SourceApplicationEntityTitle == SCU_AET
    assert stored.PixelData == orig.PixelData
    study = queue.study(orig.StudyInstanceUID)
    assert study is not None and study.state == "receiving"
    [row] = [i for i in study.instances if i.sop_instance_uid == orig.SOPInstanceUID]
    assert row.rel_path == f"{orig.StudyInstanceUID}/{orig.SOPInstanceUID}.dcm"
    assert row.size_bytes == stored_path.stat().st_size
    assert row.transfer_syntax_uid == orig.file_meta.TransferSyntaxUID
    assert row.sop_class_uid == orig.SOPClassUID
    assert row.series_uid == orig.SeriesInstanceUID
    assert row.modality == "CR" and row.calling_ae == SCU_AET
    return stored


@needs_dcmtk
@pytest.mark.parametrize(
    "kind",
    [
        "RG1_UNCR",
        "RG1_J2KR",
        "RG1_J2KI",
        "RG1_JLSN",
        "secondary_capture",
        "monochrome1",
        "deflated",
        "big_endian",
        "implicit",
        "rle",
        "jpeg_lossless_sv1",
    ],
)
def test_storescu_real_files_are_stored_as_received_and_queued(
    kind: str, start_scp: Callable[..., RunningSCP], sqlite_queue: Queue, tmp_path: Path
) -> None:
    run = start_scp(sqlite_queue)
    path, option = _input_file(kind, tmp_path)
    r = storescu(run.port, path, option=option)
    assert r.returncode == 0, r.stderr
    assert "Received Store Response (Success)" in r.stdout + r.stderr
    stored = _check_stored(run, sqlite_queue, path)
    [row] = sqlite_queue.study(stored.StudyInstanceUID).instances  # type: ignore[union-attr]
    assert row.eligible and row.ineligible_reason is None
    assert row.body_part == "CHEST" and row.view_position == "PA"


@pytest.mark.slow
def test_on_sqlite_and_postgresql_uncompressed_and_jpeg2000(
    start_scp: Callable[..., RunningSCP], any_queue: Queue
) -> None:
    run = start_scp(any_queue)
    files = [DATA / "RG1_UNCR.dcm", DATA / "RG1_J2KR.dcm"]
    assert send(run.port, *files) == [0x0000, 0x0000]
    for f in files:
        _check_stored(run, any_queue, f)
    study = any_queue.study(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert study is not None and len(study.instances) == 2


def test_raw_bytes_are_stored_byte_for_byte(scp: RunningSCP) -> None:
    for name in ("RG1_UNCR.dcm", "RG1_JLSN.dcm"):
        assert send(scp.port, DATA / name, raw=True) == [0x0000]
        ds = pydicom.dcmread(DATA / name, stop_before_pixels=True)
        stored = scp.storage / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert body_bytes(stored) == body_bytes(DATA / name)


@needs_dcmtk
def test_extremity_cr_is_stored_acknowledged_and_its_study_ignored(
    scp: RunningSCP, sqlite_queue: Queue
) -> None:
    r = storescu(scp.port, DATA / "RG3_UNCR.dcm")
    assert r.returncode == 0 and "Received Store Response (Success)" in r.stdout + r.stderr
    stored = _check_stored(scp, sqlite_queue, DATA / "RG3_UNCR.dcm")
    [row] = sqlite_queue.study(stored.StudyInstanceUID).instances  # type: ignore[union-attr]
    assert not row.eligible
    assert row.ineligible_reason == "BodyPartExamined EXTREMITY is not the chest"
    assert sqlite_queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=FUTURE) == 1
    study = sqlite_queue.study(stored.StudyInstanceUID)
    assert study is not None and study.state == "ignored"
    assert "EXTREMITY" in (study.state_reason or "")


def test_ct_is_stored_acknowledged_and_ignored(
    scp: RunningSCP, sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    ct = fresh(sc_ds)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.Modality = "CT"
    assert send(scp.port, ct) == [0x0000]
    [row] = sqlite_queue.study(ct.StudyInstanceUID).instances  # type: ignore[union-attr]
    assert (
        not row.eligible and row.ineligible_reason == "Modality CT is not a radiograph (CR or DX)"
    )
    sqlite_queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=FUTURE)
    assert sqlite_queue.study(ct.StudyInstanceUID).state == "ignored"  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- duplicate: 0x0000


@pytest.mark.slow
def test_duplicate_is_success_and_nothing_is_rewritten(
    start_scp: Callable[..., RunningSCP], any_queue: Queue, sc_ds: Dataset
) -> None:
    run = start_scp(any_queue)
    ds = fresh(sc_ds)
    assert send(run.port, ds) == [0x0000]
    path = run.storage / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    before = path.stat()
    content = path.read_bytes()
    changed = Dataset()
    changed.update(ds)
    changed.file_meta = ds.file_meta
    changed.SeriesDescription = "a different dataset with the same SOP Instance UID"
    assert send(run.port, ds, changed) == [0x0000, 0x0000]
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert path.read_bytes() == content
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file, no second copy
    assert len(any_queue.study(ds.StudyInstanceUID).instances) == 1  # type: ignore[union-attr]


def test_concurrent_duplicates_are_stored_once(
    scp: RunningSCP, sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    ds = fresh(sc_ds)
    results: list[list[int]] = []
    threads = [
        threading.Thread(target=lambda: results.append(send(scp.port, ds))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [[0x0000]] * 4
    assert len(sqlite_queue.study(ds.StudyInstanceUID).instances) == 1  # type: ignore[union-attr]
    assert [p.name for p in (scp.storage / ds.StudyInstanceUID).iterdir()] == [
        f"{ds.SOPInstanceUID}.dcm"
    ]


# ----------------------------------------------------------------------------- 0xC210 undecodable


@pytest.mark.parametrize("what", ["truncated", "garbage"])
def test_undecodable_dataset_is_c210_and_service_keeps_serving(
    what: str, scp: RunningSCP, sqlite_queue: Queue, tmp_path: Path, sc_ds: Dataset
) -> None:
    src = (DATA / "RG1_UNCR.dcm").read_bytes()
    bad = tmp_path / "bad.dcm"
    header_len = len(src) - len(body_bytes(DATA / "RG1_UNCR.dcm"))
    if what == "truncated":
        bad.write_bytes(src[: len(src) // 2])
    else:  # a valid file meta followed by bytes that are no dataset
        bad.write_bytes(src[:header_len] + bytes(range(256)) * 64)
    assert send(scp.port, bad, raw=True) == [0xC210]
    assert scp.files() == []
    ds = pydicom.dcmread(DATA / "RG1_UNCR.dcm", stop_before_pixels=True)
    assert not sqlite_queue.instance_exists(ds.SOPInstanceUID)
    still_serves(scp, sc_ds)


# ----------------------------------------------------------------------------- 0xA900 mismatch


def test_sop_instance_uid_differing_from_request_is_a900(
    scp: RunningSCP, tmp_path: Path, sc_ds: Dataset
) -> None:
    ds = fresh(sc_ds)
    path = save(ds, tmp_path / "x.dcm")
    raw = bytearray(path.read_bytes())
    # the file meta (which the raw send uses as the request's Affected SOP Instance UID) now names
    # a different instance than the dataset does
    old = ds.SOPInstanceUID.encode()
    new = old[:-1] + (b"1" if old[-1:] != b"1" else b"2")
    i = raw.index(old)
    raw[i : i + len(old)] = new
    path.write_bytes(bytes(raw))
    assert send(scp.port, path, raw=True) == [0xA900]
    assert scp.files() == []
    still_serves(scp, sc_ds)


def test_missing_study_uid_is_a900(scp: RunningSCP, sc_ds: Dataset) -> None:
    ds = fresh(sc_ds)
    del ds.StudyInstanceUID
    assert send(scp.port, ds) == [0xA900]
    assert scp.files() == []
    still_serves(scp, sc_ds)


def test_garbage_pixel_data_is_a900(scp: RunningSCP, tmp_path: Path, sc_ds: Dataset) -> None:
    # uncompressed: Pixel Data that cannot hold Rows x Columns pixels
    native = fresh(pydicom.dcmread(DATA / "RG3_UNCR.dcm"))
    native.PixelData = native.PixelData[: len(native.PixelData) // 3 * 2]
    # JPEG 2000: the codestream replaced by garbage of the same length
    j2k = fresh(pydicom.dcmread(DATA / "RG1_J2KR.dcm"))
    path = save(j2k, tmp_path / "j2k.dcm")
    raw = bytearray(path.read_bytes())
    soc = raw.index(b"\xff\x4f\xff\x51")
    raw[soc : soc + 4096] = bytes(range(256)) * 16  # inside the first fragment
    path.write_bytes(bytes(raw))
    assert send(scp.port, native) == [0xA900]
    assert send(scp.port, path, raw=True) == [0xA900]
    assert scp.files() == []
    still_serves(scp, sc_ds)


@pytest.mark.parametrize("field", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_path_traversal_uid_is_rejected_and_nothing_written_outside(
    field: str, scp: RunningSCP, tmp_path: Path, sc_ds: Dataset
) -> None:
    ds = fresh(sc_ds)
    setattr(ds, field, "../../etc")

    def files() -> set[Path]:  # everything under tmp_path but the queue's own SQLite files
        return {p for p in tmp_path.rglob("*") if not p.name.startswith("queue.sqlite3")}

    before = files()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        assert send(scp.port, ds) == [0xA900]
    after = files()
    assert after - before == set(), f"files appeared: {sorted(after - before)}"
    assert not (scp.storage.parent.parent / "etc").exists()
    still_serves(scp, sc_ds)


# ----------------------------------------------------------------------------- 0xA700 resources


def test_disk_below_threshold_is_a700(
    start_scp: Callable[..., RunningSCP], sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    run = start_scp(sqlite_queue, min_free_disk_mb=10**9)  # a petabyte: never free
    ds = fresh(sc_ds)
    assert send(run.port, ds) == [0xA700]
    assert run.files() == []
    assert not sqlite_queue.instance_exists(ds.SOPInstanceUID)
    assert echo(run.port) == 0x0000


def test_database_unreachable_is_a700(start_scp: Callable[..., RunningSCP], sc_ds: Dataset) -> None:
    # a PostgreSQL URL where nothing listens: the database server is down
    down = Queue.from_url(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/cxr",
        lease_seconds=60,
        max_attempts=3,
    )
    run = start_scp(down)
    assert send(run.port, fresh(sc_ds), fresh(sc_ds)) == [0xA700, 0xA700]
    assert run.files() == []
    assert echo(run.port) == 0x0000
    down.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_database_dropped_then_restored(
    start_scp: Callable[..., RunningSCP], pg_admin_url: str, sc_ds: Dataset
) -> None:
    url, name = make_pg_database(pg_admin_url)
    queue = open_queue(url)
    try:
        run = start_scp(queue)
        first, second = fresh(sc_ds), fresh(sc_ds)
        assert send(run.port, first) == [0x0000]
        drop_pg_database(pg_admin_url, name)  # the database goes away under the running service
        assert send(run.port, second) == [0xA700]  # PACS will retry
        # the database comes back (restored empty here): the retry succeeds
        import sqlalchemy as sa

        eng = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        open_queue(url).close()
        assert send(run.port, second) == [0x0000]
        assert queue.instance_exists(second.SOPInstanceUID)
        assert (run.storage / second.StudyInstanceUID / f"{second.SOPInstanceUID}.dcm").is_file()
    finally:
        queue.close()
        drop_pg_database(pg_admin_url, name)


# ----------------------------------------------------------------------------- 0xC000 other


def test_unexpected_storage_failure_is_c000(
    scp: RunningSCP, sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    ds = fresh(sc_ds)
    # something (an admin, a broken sync job) left a plain file where the study's folder must go
    (scp.storage / ds.StudyInstanceUID).write_bytes(b"not a folder")
    assert send(scp.port, ds) == [0xC000]
    assert not sqlite_queue.instance_exists(ds.SOPInstanceUID)
    still_serves(scp, sc_ds)


# ----------------------------------------------------------------------------- association rules


def _assoc(port: int, *, called: str, calling: str):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


@needs_dcmtk
def test_wrong_called_ae_title_is_rejected(scp: RunningSCP, sc_ds: Dataset) -> None:
    assoc = _assoc(scp.port, called="NOT_US", calling=SCU_AET)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    # A-ASSOCIATE-RJ: rejected-permanent (1), service-user (1), called AE title not recognised (7)
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
    r = subprocess.run(
        ["echoscu", "-aet", SCU_AET, "-aec", "NOT_US", "127.0.0.1", str(scp.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stdout + r.stderr
    still_serves(scp, sc_ds)


def test_calling_ae_title_not_in_allow_list_is_rejected(
    start_scp: Callable[..., RunningSCP], sqlite_queue: Queue
) -> None:
    run = start_scp(sqlite_queue, allowed_calling_ae_titles=["PACS1", "ORTHANC"])
    assoc = _assoc(run.port, called=SCP_AET, calling="INTRUDER")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    # rejected-permanent (1), service-user (1), calling AE title not recognised (3)
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    ok = _assoc(run.port, called=SCP_AET, calling="PACS1")
    assert ok.is_established
    assert ok.send_c_echo().Status == 0x0000
    ok.release()


# ----------------------------------------------------------------------------- logging


def test_logs_carry_uids_and_statuses_but_no_patient_data(
    scp: RunningSCP, sc_ds: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    caplog.set_level(logging.DEBUG, logger="pynetdicom")  # even at DEBUG
    caplog.set_level(logging.INFO, logger="db")
    good = fresh(sc_ds)
    bad = fresh(sc_ds)
    for ds in (good, bad):
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "PHI-778899"
        ds.PatientBirthDate = "19410317"
    del bad.SeriesInstanceUID
    assert send(scp.port, good, bad) == [0x0000, 0xA900]
    text = caplog.text
    assert good.SOPInstanceUID in text and "0x0000" in text and "0xA900" in text
    for phi in ("Doe", "Jane", "PHI-778899", "19410317"):
        assert phi not in text, f"{phi!r} leaked into the logs"


@pytest.mark.parametrize(
    "sop_class",
    ["1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"],
    ids=["DX_for_presentation", "DX_for_processing"],
)
def test_digital_xray_sop_classes_are_accepted(
    sop_class: str, scp: RunningSCP, sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    dx = fresh(sc_ds)
    dx.SOPClassUID = dx.file_meta.MediaStorageSOPClassUID = sop_class
    dx.Modality = "DX"
    assert send(scp.port, dx) == [0x0000]
    [row] = sqlite_queue.study(dx.StudyInstanceUID).instances  # type: ignore[union-attr]
    assert row.sop_class_uid == sop_class and row.modality == "DX" and row.eligible


def test_unsupported_sop_class_is_not_negotiated(scp: RunningSCP) -> None:
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage: not ours
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assoc.release()
    assert "1.2.840.10008.5.1.4.1.1.4" not in accepted
    assert Verification in accepted


# ----------------------------------------------------------------------------- lifecycle


def test_stop_closes_the_port_and_aborts_idle_associations(
    start_scp: Callable[..., RunningSCP], sqlite_queue: Queue
) -> None:
    run = start_scp(sqlite_queue)
    assoc = _assoc(run.port, called=SCP_AET, calling=SCU_AET)
    assert assoc.is_established
    run.scp.stop(grace_s=0.5)  # the peer keeps its association open: aborted after the grace time
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", run.port)) != 0  # nothing listens any more
    run.scp.stop()  # idempotent


def test_port_in_use_says_so(start_scp: Callable[..., RunningSCP], sqlite_queue: Queue) -> None:
    run = start_scp(sqlite_queue)
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{run.port} for DICOM"):
        start_scp(sqlite_queue, port=run.port)
