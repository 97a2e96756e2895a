"""The storage SCP that PACS sends studies to (C-ECHO and C-STORE).

An instance is answered 0x0000 only once its file is durably on disk (see
:mod:`dicom_node.storage`) AND the sink has committed its row. Every failure is mapped to its
status by :func:`dicom_node.statuses.status_for`; no exception escapes a handler. The bytes are
stored exactly as received: nothing is decoded or re-encoded, pixel data included.

Logs carry UIDs, AE titles and statuses, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging
import threading
import time
from io import BytesIO
from typing import Any, cast

from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from .classify import chest_eligibility
from .config import DicomNodeConfig
from .conformance import inspect_dataset
from .sink import InstanceSink, StoredInstance
from .statuses import PROCESSING_FAILURE, SUCCESS, UndecodableDataset, status_for, status_name
from .storage import InstanceStorage
from .uids import validate_uid

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    # Not analysed, but accepted (stored, acknowledged, study marked ignored) so a PACS routing
    # rule that also forwards a CT does not keep retrying a rejected presentation context.
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
}

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
    "1.2.840.10008.1.2.5": "RLE Lossless",
}

# Largest P-DATA PDU we accept. Bigger PDUs mean fewer Python-level round trips per instance;
# pynetdicom's default (16 KiB) makes a 7 MB image cost ~450 PDUs. Peers may send smaller ones.
DEFAULT_MAX_PDU = 1024 * 1024

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _sop(event: Event) -> str:
    try:
        return str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")[:70]
    except Exception:
        return ""


def handle_echo(event: Event) -> int:
    """C-ECHO: always success while the service runs."""
    log.info("C-ECHO from %s (%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address)
    return SUCCESS


def _store(
    event: Event, storage: InstanceStorage, sink: InstanceSink, calling_ae: str
) -> tuple[int, str, Any]:
    req = cast(C_STORE, event.request)
    sop_instance = validate_uid(
        str(req.AffectedSOPInstanceUID or ""), what="Affected SOP Instance UID"
    )
    sop_class = validate_uid(str(req.AffectedSOPClassUID or ""), what="Affected SOP Class UID")
    if sink.instance_exists(sop_instance):
        return SUCCESS, "duplicate, already stored", None
    ts = str(event.context.transfer_syntax)
    if not isinstance(req.DataSet, BytesIO):
        # pynetdicom keeps the dataset in memory unless _config.STORE_RECV_CHUNKED_DATASET is set
        # (this SCP never sets it); an empty request has no dataset at all
        raise UndecodableDataset("the C-STORE request carries no dataset")
    with req.DataSet.getbuffer() as received:
        info = inspect_dataset(
            received,
            transfer_syntax=ts,
            affected_sop_class_uid=sop_class,
            affected_sop_instance_uid=sop_instance,
        )
        eligible, reason = chest_eligibility(info.header)
        storage.check_free_space(len(received))
        meta = create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(ts),
        )
        meta.SourceApplicationEntityTitle = calling_ae
        stored = storage.write(
            info.study_uid, sop_instance, (_PREAMBLE, encode_file_meta(meta), received)
        )
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
        )
    )
    outcome = "stored" if new else "stored (row already committed by a concurrent duplicate)"
    if not eligible:
        outcome += f", not analysed: {reason}"
    return SUCCESS, outcome, info


def handle_store(event: Event, storage: InstanceStorage, sink: InstanceSink) -> int:
    """C-STORE: store durably, record, answer. Returns a status; never raises."""
    started = time.perf_counter()
    calling_ae = "?"
    study = ""
    try:
        calling_ae = str(event.assoc.requestor.ae_title)
        status, outcome, info = _store(event, storage, sink, calling_ae)
        study = info.study_uid if info is not None else ""
    except Exception as exc:  # noqa: BLE001 - the whole point: map, never propagate
        status = status_for(exc)
        outcome = f"{type(exc).__name__}: {exc}"
        if status == PROCESSING_FAILURE:
            log.error(
                "C-STORE sop=%s from %s failed unexpectedly", _sop(event), calling_ae, exc_info=True
            )
    level = logging.INFO if status == SUCCESS else logging.WARNING
    log.log(
        level,
        "C-STORE sop=%s study=%s from %s -> %s: %s (%.0f ms)",
        _sop(event),
        study or "?",
        calling_ae,
        status_name(status),
        outcome,
        (time.perf_counter() - started) * 1000,
    )
    return status


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
    ) -> None:
        self.config = config
        self.sink = sink
        self.storage = InstanceStorage(
            config.storage_dir, min_free_disk_mb=config.min_free_disk_mb, fsync=fsync
        )
        self.maximum_pdu_size = maximum_pdu_size
        self.ae: AE | None = None
        self.server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    def _build_ae(self) -> AE:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.require_called_aet = True  # A-ASSOCIATE-RJ permanent, service-user, reason 7
        ae.require_calling_aet = list(cfg.allowed_calling_ae_titles)  # empty: any; else reason 3
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = self.maximum_pdu_size
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.add_supported_context(Verification)
        syntaxes = list(TRANSFER_SYNTAXES)
        for sop_class in STORAGE_SOP_CLASSES:
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
            # No identifiers (which may contain patient data) in pynetdicom's own logs.
            _config.LOG_REQUEST_IDENTIFIERS = False
            _config.LOG_RESPONSE_IDENTIFIERS = False
            self.storage.prepare()
            self.storage.remove_stale_temp_files()
            self.ae = self._build_ae()
            handlers: list[Any] = [
                (evt.EVT_C_ECHO, handle_echo),
                (evt.EVT_C_STORE, handle_store, [self.storage, self.sink]),
            ]
            try:
                server = self.ae.start_server(
                    (self.config.bind_host, self.config.port), block=False, evt_handlers=handlers
                )
            except OSError as exc:
                where = f"{self.config.bind_host}:{self.config.port}"
                raise OSError(
                    exc.errno,
                    f"cannot listen on {where} for DICOM ({exc.strerror}); "
                    "is another process using dicom.port?",
                ) from exc
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
            log.info("storage SCP %s stopped", self.config.ae_title)

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
