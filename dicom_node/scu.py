"""Deliver our objects (Structured Reports, key images) to a DICOM destination by C-STORE.

:func:`send` opens one association per call, proposing only the SOP classes being sent, each
with the transfer syntax its dataset is encoded in (plus the other uncompressed little endian
syntax for uncompressed data), stores every instance and classifies each outcome:

============================================  ==========  ==========
outcome                                       delivered   retryable
============================================  ==========  ==========
0x0000 Success                                yes         no
Warning (0xB000, 0xB006, 0xB007, 0x0001,      yes         no
0x0107, 0x0116: stored, with a remark)
0xA7xx Out of resources                       no          yes
no association (refused, rejected, aborted,   no          yes
timeout), no response, association lost
any other status (0xA900, 0xCxxx, 0x0122...)  no          no
no accepted presentation context, unreadable  no          no
or unencodable dataset
============================================  ==========  ==========

The scheduler retries the retryable ones with back-off and records the others as failed. Nothing
here raises for a network problem: every instance gets a :class:`SendResult`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from dicom_node.config import DestinationConfig, validate_ae_title

log = logging.getLogger(__name__)

_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class SendResult:
    """The outcome of storing one instance at one destination."""

    sop_instance_uid: str
    delivered: bool
    retryable: bool
    status: str  # e.g. "0x0000 Success", "0xA700 Out of Resources", "connection failed: ..."
    status_code: int | None = None  # the DIMSE status when one was received


def classify_status(code: int) -> tuple[bool, bool]:
    """(delivered, retryable) for a C-STORE response status."""
    if code == 0x0000:
        return True, False
    if code_to_category(code) == "Warning" or code in (0xB000, 0xB006, 0xB007):
        return True, False
    if 0xA700 <= code <= 0xA7FF:
        return False, True
    return False, False


def _status_text(code: int) -> str:
    from pynetdicom._globals import STATUS_UNKNOWN
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    desc = STORAGE_SERVICE_CLASS_STATUS.get(code)
    if desc is None:
        category = code_to_category(code)
        if 0xA700 <= code <= 0xA7FF:
            return f"0x{code:04X} Out of Resources"
        if 0xC000 <= code <= 0xCFFF:
            return f"0x{code:04X} Cannot Understand"
        return f"0x{code:04X} {category if category != STATUS_UNKNOWN else 'Unknown status'}"
    return f"0x{code:04X} {desc[0]}: {desc[1]}" if desc[1] else f"0x{code:04X} {desc[0]}"


def _load(item: Dataset | str | Path) -> tuple[Dataset | None, str, str]:
    """(dataset or None, SOP Instance UID or a label, error text)."""
    if isinstance(item, Dataset):
        return item, str(item.get("SOPInstanceUID", "")), ""
    try:
        ds = pydicom.dcmread(str(item))
    except Exception as exc:
        return None, str(item), f"cannot read {item}: {type(exc).__name__}: {exc}"
    return ds, str(ds.get("SOPInstanceUID", "")), ""


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(ts)
    # a dataset built in memory without file meta: pydicom encodes it as explicit little endian
    return ExplicitVRLittleEndian


def _contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[UID]]]:
    """One presentation context per (SOP class, transfer syntax) sent.

    An acceptor accepts at most one transfer syntax per context, so a JPEG 2000 CR and an
    uncompressed CR need two contexts; an uncompressed one also offers the other uncompressed
    little-endian syntaxes (pynetdicom converts between them)."""
    wanted: dict[tuple[str, UID], list[UID]] = {}
    for ds in datasets:
        ts = _transfer_syntax(ds)
        key = (str(ds.SOPClassUID), ts)
        if key not in wanted:
            wanted[key] = [ts, *(x for x in _UNCOMPRESSED_LE if ts in _UNCOMPRESSED_LE and x != ts)]
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]


def _make_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=validate_ae_title(calling_ae))
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def _associate(ae: AE, dest: DestinationConfig) -> Association:
    """Associate with ``dest``, over DICOM TLS when ``dest.tls`` is set."""
    tls_args = None
    if dest.tls is not None:
        from .tls import client_context  # noqa: PLC0415

        tls_args = (client_context(dest.tls), dest.tls.server_hostname or dest.host)
    return ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)


def _why_not_established(assoc: Association, dest: DestinationConfig) -> str:
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        detail = ""
        if rsp is not None:
            detail = f": {rsp.result_str}, source {rsp.source_str}, reason {rsp.reason_str}"
        return f"association rejected by {where}{detail}"
    # pynetdicom reports a refused TCP connection as an abort too, so the two are not told apart
    return (
        f"association with {where} failed: connection refused or unreachable, no answer within "
        "the timeout, or aborted by the peer"
    )


def send(
    datasets_or_paths: Iterable[Dataset | str | Path],
    destination: DestinationConfig,
    *,
    calling_ae: str,
) -> list[SendResult]:
    """C-STORE every instance to ``destination``; one :class:`SendResult` per input, in order.

    The calling AE title is ``destination.calling_ae_title`` when set, else ``calling_ae``.
    """
    items = list(datasets_or_paths)
    loaded = [_load(item) for item in items]
    results: list[SendResult | None] = [None] * len(items)
    sendable: list[tuple[int, Dataset]] = []
    for i, (ds, uid, error) in enumerate(loaded):
        if ds is None:
            results[i] = SendResult(uid, False, False, error)
        elif "SOPClassUID" not in ds or not uid:
            results[i] = SendResult(
                uid or str(items[i]), False, False, "dataset has no SOP Class/Instance UID"
            )
        else:
            sendable.append((i, ds))
    if not sendable:
        return [r for r in results if r is not None]

    contexts = _contexts([ds for _, ds in sendable])
    n_contexts = len(contexts)
    if n_contexts > _MAX_CONTEXTS:
        raise ValueError(
            f"{n_contexts} presentation contexts needed for one association "
            f"(at most {_MAX_CONTEXTS}); send fewer SOP class/transfer syntax combinations per call"
        )
    ae = _make_ae(destination.calling_ae_title or calling_ae, destination.timeout_s)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)

    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc: Association | None = None
    try:
        assoc = _associate(ae, destination)
    except Exception as exc:  # e.g. an unresolvable host name
        reason = f"connection to {where} failed: {type(exc).__name__}: {exc}"
    else:
        reason = "" if assoc.is_established else _why_not_established(assoc, destination)
    if assoc is None or not assoc.is_established:
        log.warning(
            "delivery to %s: %s; %d instance(s) to retry", destination.name, reason, len(sendable)
        )
        for i, ds in sendable:
            results[i] = SendResult(str(ds.SOPInstanceUID), False, True, reason)
        return [r for r in results if r is not None]

    try:
        for i, ds in sendable:
            results[i] = _store_one(assoc, ds, where)
    finally:
        if assoc.is_established:
            try:
                assoc.release()
            except Exception:  # pragma: no cover - release problems must not lose results
                assoc.abort()
    delivered = sum(1 for r in results if r is not None and r.delivered)
    log.info("delivery to %s: %d of %d instance(s) stored", destination.name, delivered, len(items))
    return [r for r in results if r is not None]


def _store_one(assoc: Association, ds: Dataset, where: str) -> SendResult:
    uid = str(ds.SOPInstanceUID)
    if not assoc.is_established:
        return SendResult(
            uid, False, True, f"association with {where} was lost before this instance"
        )
    sop_class = str(ds.SOPClassUID)
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
    if not accepted:
        return SendResult(
            uid,
            False,
            False,
            f"{where} accepted no presentation context for SOP class {sop_class} "
            f"({UID(sop_class).name}) with transfer syntax {_transfer_syntax(ds).name}",
        )
    try:
        rsp = assoc.send_c_store(ds)
    except (ValueError, AttributeError, TypeError) as exc:
        # pynetdicom could not encode the dataset in any accepted transfer syntax
        return SendResult(uid, False, False, f"cannot send to {where}: {type(exc).__name__}: {exc}")
    except (ConnectionError, OSError, RuntimeError) as exc:
        return SendResult(
            uid, False, True, f"association with {where} failed: {type(exc).__name__}: {exc}"
        )
    if rsp is None or "Status" not in rsp:
        return SendResult(
            uid,
            False,
            True,
            f"no C-STORE response from {where} (timeout, abort or invalid response)",
        )
    code = int(rsp.Status)
    delivered, retryable = classify_status(code)
    text = _status_text(code)
    comment = rsp.get("ErrorComment")
    if comment:
        text += f" ({str(comment)[:120]})"
    if not delivered:
        log.warning("C-STORE of %s to %s: %s", uid, where, text)
    return SendResult(uid, delivered, retryable, text, code)


def echo(destination: DestinationConfig, calling_ae: str) -> tuple[bool, str]:
    """C-ECHO ``destination``: (True, detail) when it answered 0x0000, else (False, why)."""
    ae = _make_ae(destination.calling_ae_title or calling_ae, destination.timeout_s)
    ae.add_requested_context(Verification)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        assoc = _associate(ae, destination)
    except Exception as exc:
        return False, f"connection to {where} failed: {type(exc).__name__}: {exc}"
    if not assoc.is_established:
        return False, _why_not_established(assoc, destination)
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if rsp is None or "Status" not in rsp:
        return False, f"no C-ECHO response from {where}"
    code = int(rsp.Status)
    return (code == 0x0000), f"C-ECHO {where}: status 0x{code:04X}"
