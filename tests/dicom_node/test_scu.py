"""dicom_node.scu over real associations on 127.0.0.1: dcmtk storescp and pynetdicom peers."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from dicom_node.config import DestinationConfig
from dicom_node.scu import SendResult, classify_status, echo, send
from tests.conftest import DATA, free_port

pytestmark = pytest.mark.network


def _dest(port: int, ae_title: str = "PEER", timeout_s: float = 10.0) -> DestinationConfig:
    return DestinationConfig(
        name="peer", ae_title=ae_title, host="127.0.0.1", port=port, timeout_s=timeout_s
    )


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[DestinationConfig, Path]]:
    exe = shutil.which("storescp")
    if exe is None:
        pytest.fail("storescp not found: install dcmtk (make system-deps)")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-aet", "STORESCP", "+xa", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    dest = _dest(port, "STORESCP")
    try:
        deadline = time.monotonic() + 15
        while True:
            ok, detail = echo(dest, "CXR_WORKER")
            if ok:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"storescp did not start: {detail}")
            time.sleep(0.2)
        yield dest, out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _received_uids(folder: Path) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in folder.iterdir()
        if p.is_file()
    }


@pytest.fixture(scope="module")
def report_dataset(data_dir: Path) -> Dataset:
    """A real SR built by dicom_node.sr from RG1's header (in memory, with file meta)."""
    from dicom_node.sr import AlgorithmInfo, FindingResult, ReportInput, build_report

    frontal = pydicom.dcmread(data_dir / "RG1_UNCR.dcm", stop_before_pixels=True)
    algo = AlgorithmInfo("m", "1", "0" * 64)
    return build_report(
        ReportInput(
            frontal=frontal,
            model1=FindingResult("Abnormal", 0.6, 0.5),
            findings=[FindingResult("Edema", 0.2, 0.5)],
            model1_algorithm=algo,
            model2_algorithm=algo,
        )
    )


def test_send_to_dcmtk_storescp(
    storescp: tuple[DestinationConfig, Path], report_dataset: Dataset, data_dir: Path
) -> None:
    dest, out = storescp
    items: list[Dataset | Path] = [
        report_dataset,
        data_dir / "RG1_J2KR.dcm",
        data_dir / "siim_cr_pa_secondary_capture.dcm",
    ]
    results = send(items, dest, calling_ae="CXR_WORKER")
    assert [r.delivered for r in results] == [True, True, True], results
    assert all(r.status_code == 0 and not r.retryable for r in results)
    uids = [r.sop_instance_uid for r in results]
    assert uids[0] == report_dataset.SOPInstanceUID
    assert _received_uids(out) == set(uids)
    # the compressed instance arrived in its own transfer syntax, bit for bit in pixel data
    j2k = next(
        p
        for p in out.iterdir()
        if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == uids[1]
    )
    received = pydicom.dcmread(j2k)
    original = pydicom.dcmread(data_dir / "RG1_J2KR.dcm")
    assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert received.PixelData == original.PixelData


def test_echo_ok_and_closed_port(storescp: tuple[DestinationConfig, Path]) -> None:
    dest, _ = storescp
    ok, detail = echo(dest, "CXR_WORKER")
    assert ok and "0x0000" in detail
    ok, detail = echo(_dest(free_port(), timeout_s=3), "CXR_WORKER")
    assert not ok and "failed" in detail


def test_closed_port_is_retryable(report_dataset: Dataset) -> None:
    t0 = time.monotonic()
    results = send([report_dataset], _dest(free_port(), timeout_s=3), calling_ae="CXR_WORKER")
    assert len(results) == 1
    r = results[0]
    assert not r.delivered and r.retryable and r.status_code is None
    assert "connection" in r.status and r.sop_instance_uid == report_dataset.SOPInstanceUID
    assert time.monotonic() - t0 < 10


# --- pynetdicom peers with scripted answers ------------------------------------------------------


def _peer(
    handler: Callable[[evt.Event], int],
    *,
    ae_title: str = "PEER",
    require_called: bool = False,
    sop_classes: list[str] | None = None,
) -> tuple[object, int]:
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = require_called
    for sop in sop_classes or []:
        ae.add_supported_context(
            sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"]
        )
    if sop_classes is None:
        from pynetdicom import StoragePresentationContexts

        for cx in StoragePresentationContexts:
            ae.add_supported_context(
                cx.abstract_syntax,
                ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"],
            )
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)]
    )
    return server, port


@pytest.fixture
def peer() -> Iterator[Callable[..., int]]:
    servers: list[object] = []

    def start(handler: Callable[[evt.Event], int], **kw: object) -> int:
        server, port = _peer(handler, **kw)  # type: ignore[arg-type]
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.shutdown()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "delivered", "retryable"),
    [(0xA700, False, True), (0xA7FE, False, True), (0xC000, False, False), (0xA900, False, False),
     (0xB000, True, False), (0xB007, True, False), (0xB006, True, False)],
)  # fmt: skip
def test_statuses_are_classified(
    peer: Callable[..., int],
    report_dataset: Dataset,
    data_dir: Path,
    status: int,
    delivered: bool,
    retryable: bool,
) -> None:
    seen: list[str] = []

    def handler(event: evt.Event) -> int:
        seen.append(str(event.request.AffectedSOPInstanceUID))
        return status

    port = peer(handler)
    results = send(
        [report_dataset, data_dir / "RG1_UNCR.dcm"], _dest(port), calling_ae="CXR_WORKER"
    )
    assert len(seen) == 2  # both were attempted on the one association
    for r in results:
        assert (r.delivered, r.retryable, r.status_code) == (delivered, retryable, status)
        assert r.status.startswith(f"0x{status:04X}")


def test_proposes_only_the_sop_classes_sent(
    peer: Callable[..., int], report_dataset: Dataset, data_dir: Path
) -> None:
    proposed: list[set[str]] = []

    def on_request(event: evt.Event) -> None:
        proposed.append({cx.abstract_syntax for cx in event.assoc.requestor.requested_contexts})

    ae = AE(ae_title="PEER")
    ae.add_supported_context(
        ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    )
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000), (evt.EVT_REQUESTED, on_request)],
    )  # fmt: skip
    try:
        results = send(
            [report_dataset, data_dir / "RG1_UNCR.dcm"], _dest(port), calling_ae="CXR_WORKER"
        )
    finally:
        server.shutdown()
    assert proposed == [{str(report_dataset.SOPClassUID), ComputedRadiographyImageStorage}]
    sr, cr = results
    assert cr.delivered
    # the peer does not take SR: a permanent failure for that instance only
    assert not sr.delivered and not sr.retryable and "accepted no presentation context" in sr.status


def test_rejected_association_is_retryable(
    peer: Callable[..., int], report_dataset: Dataset
) -> None:
    port = peer(lambda e: 0x0000, ae_title="SOMEONE", require_called=True)
    (r,) = send([report_dataset], _dest(port, "PEER"), calling_ae="CXR_WORKER")
    assert not r.delivered and r.retryable and "rejected" in r.status
    ok, detail = echo(_dest(port, "PEER"), "CXR_WORKER")
    assert not ok and "rejected" in detail


def test_handler_crash_is_permanent_failure(
    peer: Callable[..., int], report_dataset: Dataset
) -> None:
    def handler(event: evt.Event) -> int:
        raise RuntimeError("boom")

    port = peer(handler)
    (r,) = send([report_dataset], _dest(port), calling_ae="CXR_WORKER")
    assert not r.delivered and not r.retryable and r.status_code == 0xC211


def test_unreadable_path_is_reported_not_raised(tmp_path: Path, report_dataset: Dataset) -> None:
    missing = tmp_path / "nope.dcm"
    results = send([missing], _dest(free_port(), timeout_s=2), calling_ae="CXR_WORKER")
    assert results == [SendResult(str(missing), False, False, results[0].status)]
    assert "cannot read" in results[0].status


def test_classify_status_table() -> None:
    assert classify_status(0x0000) == (True, False)
    assert classify_status(0x0107) == (True, False)  # warning category
    assert classify_status(0xA701) == (False, True)
    assert classify_status(0x0122) == (False, False)
    assert classify_status(0xC210) == (False, False)


def test_peer_that_never_answers_is_retryable(
    peer: Callable[..., int], report_dataset: Dataset, data_dir: Path
) -> None:
    def handler(event: evt.Event) -> int:
        time.sleep(4)
        return 0x0000

    port = peer(handler)
    t0 = time.monotonic()
    results = send(
        [report_dataset, data_dir / "RG1_UNCR.dcm"],
        _dest(port, timeout_s=1.5),
        calling_ae="CXR_WORKER",
    )
    assert time.monotonic() - t0 < 10
    assert all(not r.delivered and r.retryable for r in results), results
    assert "no C-STORE response" in results[0].status
    assert "lost" in results[1].status


def test_same_sop_class_in_two_transfer_syntaxes_goes_in_one_send(scp) -> None:  # type: ignore[no-untyped-def]
    """A JPEG 2000 CR and an uncompressed CR in one association need a context each: an acceptor
    accepts one transfer syntax per context (our own SCP prefers uncompressed)."""
    from dicom_node.config import DestinationConfig
    from dicom_node.scu import send as scu_send
    from tests.dicom_net import SCP_AET

    dest = DestinationConfig(name="self", ae_title=SCP_AET, host="127.0.0.1", port=scp.port)
    results = scu_send(
        [DATA / "RG1_J2KR.dcm", DATA / "RG3_UNCR.dcm", DATA / "siim_cr_pa_secondary_capture.dcm"],
        dest,
        calling_ae="SENDER",
    )
    assert [r.delivered for r in results] == [True, True, True], [r.status for r in results]
    stored = {p.name for p in scp.files()}
    assert len(stored) == 3
