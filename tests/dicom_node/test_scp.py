"""The storage SCP over real associations on 127.0.0.1: pynetdicom and dcmtk as clients, real files
from tests/data, an in-memory sink in place of the queue (tests/integration/test_scp_queue.py runs
the SCP on the real queue, SQLite and PostgreSQL).

One test per C-STORE status, the association rejections, and after every bad input a proof that
the service still serves.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import DATA
from tests.dicom_net import (
    SCP_AET,
    SCU_AET,
    RunningSCP,
    body_bytes,
    echo,
    fresh,
    needs_dcmtk,
    save,
    send,
)
from tests.fakes import MemorySink

pytestmark = pytest.mark.network


def still_serves(run: RunningSCP, sc: Dataset) -> None:
    """The service answers C-ECHO and stores a good instance after whatever came before."""
    assert echo(run.port) == 0x0000
    good = fresh(sc)
    assert send(run.port, good) == [0x0000]
    assert (run.storage / good.StudyInstanceUID / f"{good.SOPInstanceUID}.dcm").is_file()


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


def test_raw_bytes_are_stored_byte_for_byte(scp: RunningSCP) -> None:
    for name in ("RG1_UNCR.dcm", "RG1_JLSN.dcm"):
        assert send(scp.port, DATA / name, raw=True) == [0x0000]
        ds = pydicom.dcmread(DATA / name, stop_before_pixels=True)
        stored = scp.storage / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert body_bytes(stored) == body_bytes(DATA / name)


# ----------------------------------------------------------------------------- 0xC210 undecodable


@pytest.mark.parametrize("what", ["truncated", "garbage"])
def test_undecodable_dataset_is_c210_and_service_keeps_serving(
    what: str, scp: RunningSCP, memory_sink: MemorySink, tmp_path: Path, sc_ds: Dataset
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
    assert not memory_sink.instance_exists(ds.SOPInstanceUID)
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
    # issue 10: the SCP no longer lets pydicom warn/log the offending value (patient data)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert send(scp.port, ds) == [0xA900]
    assert not [w for w in seen if "../../etc" in str(w.message)]
    after = files()
    assert after - before == set(), f"files appeared: {sorted(after - before)}"
    assert not (scp.storage.parent.parent / "etc").exists()
    still_serves(scp, sc_ds)


# ----------------------------------------------------------------------------- 0xA700 resources


def test_disk_below_threshold_is_a700(
    start_scp: Callable[..., RunningSCP], memory_sink: MemorySink, sc_ds: Dataset
) -> None:
    run = start_scp(sink=memory_sink, min_free_disk_mb=10**9)  # a petabyte: never free
    ds = fresh(sc_ds)
    assert send(run.port, ds) == [0xA700]
    assert run.files() == []
    assert not memory_sink.instance_exists(ds.SOPInstanceUID)
    assert echo(run.port) == 0x0000


# ----------------------------------------------------------------------------- 0xC000 other


def test_unexpected_storage_failure_is_c000(
    scp: RunningSCP, memory_sink: MemorySink, sc_ds: Dataset
) -> None:
    ds = fresh(sc_ds)
    # something (an admin, a broken sync job) left a plain file where the study's folder must go
    (scp.storage / ds.StudyInstanceUID).write_bytes(b"not a folder")
    assert send(scp.port, ds) == [0xC000]
    assert not memory_sink.instance_exists(ds.SOPInstanceUID)
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
    start_scp: Callable[..., RunningSCP],
) -> None:
    run = start_scp(allowed_calling_ae_titles=["PACS1", "ORTHANC"])
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


def test_non_storage_sop_class_is_not_negotiated(scp: RunningSCP) -> None:
    """Every storage class is accepted (a PACS routing a whole study sends MR, SR, PDF... too:
    stored, not analysed); a service this SCP does not provide (worklist query) is refused."""
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context("1.2.840.10008.5.1.4.31")  # Modality Worklist FIND: not ours
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage: stored only
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assoc.release()
    assert "1.2.840.10008.5.1.4.31" not in accepted
    assert "1.2.840.10008.5.1.4.1.1.4" in accepted
    assert Verification in accepted


# ----------------------------------------------------------------------------- lifecycle


def test_stop_closes_the_port_and_aborts_idle_associations(
    start_scp: Callable[..., RunningSCP],
) -> None:
    run = start_scp()
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


def test_port_in_use_says_so(start_scp: Callable[..., RunningSCP]) -> None:
    run = start_scp()
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{run.port} for DICOM"):
        start_scp(port=run.port)


# ----------------------------------------------------------------------------- the record


def test_one_stored_instance_record_per_stored_file(
    scp: RunningSCP, memory_sink: MemorySink, rg1_ds: Dataset
) -> None:
    ds = fresh(rg1_ds)
    assert send(scp.port, ds) == [0x0000]
    [inst] = memory_sink.study(ds.StudyInstanceUID)
    stored = scp.storage / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert inst.rel_path == f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert inst.size_bytes == stored.stat().st_size
    assert (inst.sop_instance_uid, inst.series_uid) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    assert inst.sop_class_uid == ds.SOPClassUID
    assert inst.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert (inst.modality, inst.body_part, inst.view_position) == ("CR", "CHEST", "PA")
    assert inst.eligible and inst.ineligible_reason is None
    assert inst.calling_ae == SCU_AET and inst.received_at is None  # the queue's clock decides


def test_duplicate_is_not_recorded_twice(
    scp: RunningSCP, memory_sink: MemorySink, sc_ds: Dataset
) -> None:
    ds = fresh(sc_ds)
    assert send(scp.port, ds, ds) == [0x0000, 0x0000]
    assert len(memory_sink.study(ds.StudyInstanceUID)) == 1


def test_sink_unavailable_is_a700(start_scp: Callable[..., RunningSCP], sc_ds: Dataset) -> None:
    run = start_scp(sink=MemorySink(unavailable=True))
    assert send(run.port, fresh(sc_ds), fresh(sc_ds)) == [0xA700, 0xA700]
    assert run.files() == []
    assert echo(run.port) == 0x0000
