"""The storage SCP that PACS sends studies to (C-ECHO and C-STORE).

An instance is answered 0x0000 only once its file is durably on disk (see
:mod:`dicom_node.storage`) AND the sink has committed its row. Every failure is mapped to its
status by :func:`dicom_node.statuses.status_for`; no exception escapes a handler. The bytes are
stored exactly as received: nothing is decoded or re-encoded, pixel data included.

Every storage SOP class is accepted (a PACS routing a whole study sends SRs, key object
selections, presentation states, PDFs... with the images, and fails its job when one is refused);
only the radiograph classes of :data:`dicom_node.classify.ANALYSED_SOP_CLASSES` are ever analysed,
and this worker's own outputs coming back are recognised by their series
(:func:`dicom_node.classify.own_output`).

Logs carry UIDs, AE titles (control characters escaped) and statuses, never patient names, IDs or
birth dates.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import socket
import ssl
import threading
import time
import traceback
from io import BytesIO
from typing import Any, Protocol, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from .classify import ANALYSED_SOP_CLASSES, chest_eligibility, own_output
from .config import DicomNodeConfig
from .conformance import ReceivedInstance, inspect_dataset
from .derived import DeviceInfo
from .hardening import BoundedSocket, GuardedAE, GuardedHandler, GuardedServer
from .sink import InstanceSink, SinkUnavailable, StoredInstance
from .statuses import (
    PROCESSING_FAILURE,
    STORED_WITH_WARNING,
    SUCCESS,
    DatasetTooLarge,
    StoreFailure,
    UndecodableDataset,
    status_for,
    status_name,
)
from .storage import InstanceStorage
from .uids import InvalidUID, validate_uid
from .views import view_from_headers

log = logging.getLogger(__name__)

#: The image classes a chest study's radiographs arrive in (analysed when the header says
#: chest), and CT (a routing rule that also forwards a CT). Tests send each of them in every
#: transfer syntax of :data:`TRANSFER_SYNTAXES`.
STORAGE_SOP_CLASSES: dict[str, str] = {
    **ANALYSED_SOP_CLASSES,
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
}

#: Every storage SOP class pynetdicom knows (SR of every kind, key object selection, presentation
#: states, encapsulated PDF/CDA, secondary captures, waveforms, ...): accepted, stored and
#: acknowledged; only :data:`ANALYSED_SOP_CLASSES` are analysed.
ACCEPTED_SOP_CLASSES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*STORAGE_SOP_CLASSES, *(str(c.abstract_syntax) for c in AllStoragePresentationContexts)]
    )
)

TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian (retired)",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.70": (
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [SV1])"
    ),
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-Lossless)",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 with RPCL Options (Lossless Only)",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}

# Largest P-DATA PDU we accept. Bigger PDUs mean fewer Python-level round trips per instance;
# pynetdicom's default (16 KiB) makes a 7 MB image cost ~450 PDUs. Peers may send smaller ones.
DEFAULT_MAX_PDU = 1024 * 1024

_PREAMBLE = b"\x00" * 128 + b"DICM"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object, limit: int = 64) -> str:
    r"""``value`` as one log-safe line: control characters escaped (``\n``, ``\x1b``), at most
    ``limit`` characters. A peer's AE title can hold anything; a newline in it must not forge a
    log line."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SCPEvents(Protocol):
    """What the SCP reports as it works (the application counts it for its metrics)."""

    def instance_received(self, status: int) -> None:
        """One C-STORE was answered with ``status``."""
        ...

    def association_rejected(self, reason: str) -> None:
        """An association request was rejected (``reason``: e.g. "calling AE title not
        recognised")."""
        ...


class _NoEvents:
    def instance_received(self, status: int) -> None:
        pass

    def association_rejected(self, reason: str) -> None:
        pass


def _sop(event: Event) -> str:
    try:
        return printable(cast(C_STORE, event.request).AffectedSOPInstanceUID or "", 70)
    except Exception:
        return ""


def _peer(event: Event) -> str:
    r = event.assoc.requestor
    return f"{printable(r.address)}:{r.port}"


def handle_echo(event: Event) -> int:
    """C-ECHO: always success while the service runs."""
    log.info("C-ECHO from %s (%s)", printable(event.assoc.requestor.ae_title), _peer(event))
    return SUCCESS


#: A-ASSOCIATE-RJ (source, diagnostic) from a service user, in words.
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised (dicom.allowed_calling_ae_titles)",
    (1, 7): "called AE title not recognised (dicom.ae_title)",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded (dicom.max_associations)",
}


def handle_rejected(event: Event, events: SCPEvents) -> None:
    """Log who was turned away, and why: calling AE, called AE and peer address (escaped)."""
    try:
        rq = event.assoc.requestor.primitive
        rj = event.assoc.acceptor.primitive
        source = int(getattr(rj, "result_source", 0) or 0)
        diagnostic = int(getattr(rj, "diagnostic", 0) or 0)
        reason = _REJECT_REASONS.get((source, diagnostic), f"source {source} reason {diagnostic}")
        log.warning(
            "association rejected: calling AE %r, called AE %r, from %s: %s",
            printable(getattr(rq, "calling_ae_title", "?")),
            printable(getattr(rq, "called_ae_title", "?")),
            _peer(event),
            reason,
        )
        events.association_rejected(reason.split(" (")[0])
    except Exception:  # noqa: BLE001 - a notification handler must never raise
        log.warning("association rejected (details unavailable)", exc_info=True)


def _identity(ds: Any) -> str:
    """A digest of the patient identity in a header (compared, never shown)."""
    parts = []
    for kw in ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate"):
        try:
            parts.append(str(ds.get(kw, "") or "").strip().upper())
        except Exception:  # noqa: BLE001 - an undecodable value still compares as "unreadable"
            parts.append("\x00unreadable")
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "replace")).hexdigest()


def _keep_aside(
    storage: InstanceStorage,
    sink: InstanceSink,
    info: ReceivedInstance,
    chunks: tuple[bytes, bytes, memoryview],
    digest: str,
    existing: str,
) -> tuple[int, str]:
    """A SOP Instance UID already stored with other content: keep the new object beside it,
    flag the stored study, answer the 0xB000 warning (see :mod:`dicom_node.statuses`)."""
    old = storage.root / existing
    what = []
    if not existing.startswith(f"{info.study_uid}/"):
        what.append("another StudyInstanceUID")
    try:
        from pydicom import dcmread  # noqa: PLC0415

        if _identity(dcmread(old, stop_before_pixels=True)) != _identity(info.header):
            what.append("another patient identity")
    except Exception:  # noqa: BLE001 - the flag is raised anyway
        what.append("an unreadable stored copy")
    stored = storage.write(info.study_uid, info.sop_instance_uid, chunks, aside=digest[:16])
    detail = (
        f"SOP Instance UID {info.sop_instance_uid} received again with different content "
        f"({', '.join(what) or 'same study and patient'}); the stored object is unchanged, "
        f"the new one is kept aside at {stored.rel_path} and not analysed: check the sender"
    )
    sink.record_conflict(info.sop_instance_uid, detail)
    return STORED_WITH_WARNING, detail


def _store(
    event: Event,
    storage: InstanceStorage,
    sink: InstanceSink,
    calling_ae: str,
    device: DeviceInfo,
    max_dataset_bytes: int,
) -> tuple[int, str, Any]:
    req = cast(C_STORE, event.request)
    sop_instance = validate_uid(
        str(req.AffectedSOPInstanceUID or ""), what="Affected SOP Instance UID"
    )
    sop_class = validate_uid(str(req.AffectedSOPClassUID or ""), what="Affected SOP Class UID")
    ts = str(event.context.transfer_syntax)
    if not isinstance(req.DataSet, BytesIO):
        # pynetdicom keeps the dataset in memory unless _config.STORE_RECV_CHUNKED_DATASET is set
        # (this SCP never sets it); an empty request has no dataset at all
        raise UndecodableDataset("the C-STORE request carries no dataset")
    with req.DataSet.getbuffer() as received:
        if len(received) > max_dataset_bytes:
            raise DatasetTooLarge(
                f"the dataset has {len(received)} bytes, more than {max_dataset_bytes} "
                "(dicom.max_dataset_mb)"
            )
        existing = sink.stored_rel_path(sop_instance)
        digest = hashlib.sha256(received).hexdigest()
        if existing is not None and storage.dataset_digest(existing) == digest:
            return SUCCESS, "duplicate (same bytes), already stored", None
        info = inspect_dataset(
            received,
            transfer_syntax=ts,
            affected_sop_class_uid=sop_class,
            affected_sop_instance_uid=sop_instance,
            require_pixels=sop_class in ANALYSED_SOP_CLASSES,
            max_dataset_bytes=max_dataset_bytes,
        )
        own = own_output(info.header, device)
        eligible, reason = (False, own) if own else chest_eligibility(info.header)
        storage.check_free_space(len(received))
        meta = create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(ts),
        )
        meta.SourceApplicationEntityTitle = calling_ae
        chunks = (_PREAMBLE, encode_file_meta(meta), received)
        if existing is not None:
            status, outcome = _keep_aside(storage, sink, info, chunks, digest, existing)
            return status, outcome, info
        stored = storage.write(info.study_uid, sop_instance, chunks)
    new = sink.record_instance(
        StoredInstance(
            study_uid=info.study_uid,
            series_uid=info.series_uid,
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            transfer_syntax_uid=ts,
            modality=info.modality,
            body_part=info.body_part,
            view_position=info.view_position,
            eligible=eligible,
            ineligible_reason=reason,
            rel_path=stored.rel_path,
            size_bytes=stored.size_bytes,
            calling_ae=calling_ae,
            view=view_from_headers(info.header).view if eligible else None,
        )
    )
    outcome = "stored" if new else "stored (row already committed by a concurrent duplicate)"
    if not eligible:
        outcome += f", not analysed: {reason}"
    return SUCCESS, outcome, info


def _safe_outcome(exc: BaseException) -> str:
    """What a failure may say in the log: our own messages (written without patient data), or
    for anything else the exception class only (a library's text may quote a value)."""
    if isinstance(exc, (StoreFailure, InvalidUID, SinkUnavailable)):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, "?")
        return f"{type(exc).__name__}: errno {exc.errno} ({code})"
    return f"{type(exc).__name__} (details withheld: the text may quote patient data)"


def handle_store(
    event: Event,
    storage: InstanceStorage,
    sink: InstanceSink,
    device: DeviceInfo | None = None,
    events: SCPEvents | None = None,
    max_dataset_bytes: int = 256 * 1024 * 1024,
) -> int | Dataset:
    """C-STORE: store durably, record, answer. Returns a status (a dataset with an
    ErrorComment for the 0xB000 warning); never raises. ``device``: this worker's identity, to
    recognise its own outputs (default: ``DeviceInfo()``)."""
    started = time.perf_counter()
    calling_ae = "?"
    study = ""
    try:
        calling_ae = str(event.assoc.requestor.ae_title)
        status, outcome, info = _store(
            event, storage, sink, calling_ae, device or DeviceInfo(), max_dataset_bytes
        )
        study = info.study_uid if info is not None else ""
    except Exception as exc:  # noqa: BLE001 - the whole point: map, never propagate
        status = status_for(exc)
        outcome = _safe_outcome(exc)
        if status == PROCESSING_FAILURE:
            log.error(
                "C-STORE sop=%s from %s failed unexpectedly (%s); at:\n%s",
                _sop(event),
                printable(calling_ae),
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
    level = logging.INFO if status == SUCCESS else logging.WARNING
    log.log(
        level,
        "C-STORE sop=%s study=%s from %s -> %s: %s (%.0f ms)",
        _sop(event),
        study or "?",
        printable(calling_ae),
        status_name(status),
        printable(outcome, 500),
        (time.perf_counter() - started) * 1000,
    )
    if events is not None:
        try:
            events.instance_received(status)
        except Exception:  # noqa: BLE001 - counting must never change the answer
            log.warning("counting a received instance failed", exc_info=True)
    if status == STORED_WITH_WARNING:
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = "SOP Instance UID reused, other content: kept aside"
        return rsp
    return status


def listen_error(host: str, port: int, exc: OSError, *, what: str, key: str) -> str:
    """Why ``host:port`` cannot be listened on, in words an admin can act on (``key`` names
    the config keys, e.g. ``dicom.bind_host/dicom.port``)."""
    where = f"{host}:{port}"
    code = exc.errno
    if code == errno.EADDRINUSE:
        return (
            f"cannot listen on {where} for {what}: the port is already in use by another process "
            f"(find it with: ss -ltnp 'sport = :{port}'); stop it or change {key}"
        )
    if code == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where} for {what}: {host} is not an address of this machine; "
            f"use one of its addresses, 127.0.0.1, or 0.0.0.0 for all ({key})"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"cannot listen on {where} for {what}: permission denied (ports below 1024 need "
            f"root or CAP_NET_BIND_SERVICE); use a port from 1024 up ({key})"
        )
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {where} for {what}: {host} cannot be resolved ({key})"
    return f"cannot listen on {where} for {what}: {exc.strerror or exc} ({key})"


class ListenError(OSError):
    """The SCP could not listen on its address; the message says why and what to change."""


class StorageSCP:
    """A pynetdicom storage SCP bound to a storage folder and an :class:`InstanceSink`.

    ``start()`` returns immediately; ``stop()`` stops listening, lets running associations
    finish for up to ``grace_s`` seconds, then aborts what is left.
    """

    def __init__(
        self,
        config: DicomNodeConfig,
        sink: InstanceSink,
        *,
        fsync: bool = True,
        maximum_pdu_size: int = DEFAULT_MAX_PDU,
        device: DeviceInfo | None = None,
        events: SCPEvents | None = None,
    ) -> None:
        """``device``: the identity the worker's reports carry (default: ``DeviceInfo`` with this
        node's AE title), so they are recognised when PACS routes them back. ``events``: told of
        every answered C-STORE and rejected association."""
        self.config = config
        self.sink = sink
        self.device = device or DeviceInfo(ae_title=config.ae_title)
        self.events: SCPEvents = events or _NoEvents()
        self.storage = InstanceStorage(
            config.storage_dir, min_free_disk_mb=config.min_free_disk_mb, fsync=fsync
        )
        self.maximum_pdu_size = maximum_pdu_size
        self.ae: AE | None = None
        self.server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    def _build_ae(self) -> AE:
        cfg = self.config
        ae = GuardedAE(ae_title=cfg.ae_title)
        ae.require_called_aet = True  # A-ASSOCIATE-RJ permanent, service-user, reason 7
        ae.require_calling_aet = list(cfg.allowed_calling_ae_titles)  # empty: any; else reason 3
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = self.maximum_pdu_size
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.add_supported_context(Verification)
        syntaxes = list(TRANSFER_SYNTAXES)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    def start(self) -> ThreadedAssociationServer:
        """Start listening on ``config.bind_host:config.port``; returns the running server."""
        with self._lock:
            if self.server is not None:
                return self.server
            if _config.STORE_RECV_CHUNKED_DATASET:
                # That mode hands the handler a temp file instead of the received bytes; this SCP
                # stores from memory (one copy, no second write) and would answer 0xC210 to all.
                raise RuntimeError(
                    "pynetdicom._config.STORE_RECV_CHUNKED_DATASET is True in this process; the "
                    "storage SCP needs it False (something else in the process changed this global)"
                )
            # pydicom's reading validation logs the offending value ("Invalid value for VR UI:
            # 'SMITH^JOHN'"): this SCP validates what it needs itself and logs no values.
            pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
            # No identifiers (which may contain patient data) in pynetdicom's own logs.
            _config.LOG_REQUEST_IDENTIFIERS = False
            _config.LOG_RESPONSE_IDENTIFIERS = False
            self.storage.prepare()
            self.storage.remove_stale_temp_files()
            self.ae = self._build_ae()
            handlers: list[Any] = [
                (evt.EVT_C_ECHO, handle_echo),
                (
                    evt.EVT_C_STORE,
                    handle_store,
                    [
                        self.storage,
                        self.sink,
                        self.device,
                        self.events,
                        self.config.max_dataset_mb * 1024 * 1024,
                    ],
                ),
                (evt.EVT_REJECTED, handle_rejected, [self.events]),
            ]
            ssl_context = None
            if self.config.tls is not None:
                from .tls import server_context  # noqa: PLC0415

                ssl_context = server_context(self.config.tls)
            try:
                server = self._serve(self.ae, handlers, ssl_context)
            except OSError as exc:
                why = listen_error(
                    self.config.bind_host,
                    self.config.port,
                    exc,
                    what="DICOM",
                    key="dicom.bind_host, dicom.port",
                )
                raise ListenError(exc.errno, why) from exc
            assert server is not None
            self.server = server
            log.info(
                "storage SCP %s listening on %s:%d, storing under %s",
                self.config.ae_title,
                self.config.bind_host,
                self.config.port,
                self.config.storage_dir,
            )
            return server

    def _serve(
        self, ae: AE, handlers: list[Any], ssl_context: ssl.SSLContext | None
    ) -> GuardedServer:
        """Start a :class:`~dicom_node.hardening.GuardedServer` in a daemon thread (what
        ``AE.start_server(block=False)`` does with pynetdicom's stock server)."""
        server = ae.make_server(
            (self.config.bind_host, self.config.port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=GuardedServer,
            request_handler=GuardedHandler,
        )
        assert isinstance(server, GuardedServer)
        server.max_per_peer = self.config.max_connections_per_peer
        server.handshake_timeout_s = self.config.acse_timeout_s
        server.pdu_limit = max(BoundedSocket.limit, self.maximum_pdu_size + 64 * 1024)
        thread = threading.Thread(
            target=server.serve_forever, name=f"AcceptorServer@{self.config.port}", daemon=True
        )
        thread.start()
        ae._servers.append(server)
        return server

    def is_listening(self) -> bool:
        """True while the server is started and its socket open."""
        server = self.server
        if server is None:
            return False
        sock = server.socket
        try:
            return sock is not None and sock.fileno() >= 0
        except OSError:
            return False

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("the SCP is not started")
        return int(self.server.server_address[1])

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop listening, wait up to ``grace_s`` for running associations, abort the rest."""
        with self._lock:
            server, ae = self.server, self.ae
            self.server = None
            if server is None or ae is None:
                return
            server.shutdown()
            deadline = time.monotonic() + grace_s
            while ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            left = ae.active_associations
            if left:
                log.warning(
                    "aborting %d association(s) still open after %.0f s", len(left), grace_s
                )
            ae.shutdown()
            if isinstance(ae, GuardedAE):
                for idle in ae.all_associations():  # connections that never associated
                    idle.abort()
            log.info("storage SCP %s stopped", self.config.ae_title)

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
