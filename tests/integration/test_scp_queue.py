"""The storage SCP on the real queue (SQLite; SQLite and PostgreSQL where it matters): what the
SCP acknowledges is a committed row, duplicates stay one row, ignored studies, a database that is
down or goes away. pynetdicom and dcmtk as clients, real files from tests/data.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from db.queue import Queue
from tests.conftest import DATA, drop_pg_database, free_port, make_pg_database, open_queue
from tests.dicom_net import SCP_AET, SCU_AET, RunningSCP, echo, fresh, needs_dcmtk, save, send

pytestmark = pytest.mark.network

FUTURE = datetime.now(UTC) + timedelta(days=1)


def storescu(
    port: int, *files: Path, option: str | None = None, called: str = SCP_AET
) -> subprocess.CompletedProcess[str]:
    cmd = ["storescu", "-v", "-aet", SCU_AET, "-aec", called]
    if option:
        cmd.append(option)
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


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
    """The same bytes again: 0x0000, nothing written twice. The same SOP Instance UID with other
    content (issue 10, finding 2): 0xB000, the stored object untouched, the new one kept aside,
    the study flagged for the admin."""
    run = start_scp(any_queue)
    ds = fresh(sc_ds)
    assert send(run.port, ds) == [0x0000]
    path = run.storage / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    before = path.stat()
    content = path.read_bytes()
    assert send(run.port, ds) == [0x0000]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file, no second copy
    changed = Dataset()
    changed.update(ds)
    changed.file_meta = ds.file_meta
    changed.SeriesDescription = "a different dataset with the same SOP Instance UID"
    assert send(run.port, changed) == [0xB000]
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert path.read_bytes() == content
    aside = sorted(p.name for p in path.parent.iterdir() if p.name != path.name)
    assert len(aside) == 1 and aside[0].startswith(f"{ds.SOPInstanceUID}.aside-"), aside
    assert pydicom.dcmread(path.parent / aside[0]).SeriesDescription == changed.SeriesDescription
    study = any_queue.study(ds.StudyInstanceUID)
    assert study is not None and len(study.instances) == 1
    assert study.last_error is not None and "received again with different content" in (
        study.last_error
    )
    assert "same study and patient" in study.last_error


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


# ----------------------------------------------------------------------------- 0xA700 resources


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


# ----------------------------------------------------------------------------- SOP classes


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
