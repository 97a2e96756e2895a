"""Send what is due to each destination. Whether and when to retry is the queue's decision
(:meth:`db.queue.Queue.record_delivery`); this module only sends and says what happened."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from db.deliveries import DeliveryOutcome
from db.queue import Queue
from db.records import DeliveryRow
from db.retry import ErrorKind
from dicom_node.config import DestinationConfig
from dicom_node.scu import SendResult, send

from .config import AppConfig

log = logging.getLogger(__name__)


def _outcome(res: SendResult | None) -> DeliveryOutcome:
    if res is None:
        return DeliveryOutcome(False, "not sent", ErrorKind.NETWORK)
    if res.delivered:
        return DeliveryOutcome(True, res.status)
    return DeliveryOutcome(
        False, res.status, ErrorKind.NETWORK if res.retryable else ErrorKind.REJECTED
    )


def _send_group(
    cfg: AppConfig, queue: Queue, dest: DestinationConfig, group: list[DeliveryRow]
) -> int:
    sendable = []
    for r in group:
        if Path(r.path).exists():
            sendable.append(r)
            continue
        queue.record_delivery(
            r.id,
            DeliveryOutcome(
                False,
                f"report file {r.path} is missing; run 'cxr-worker requeue'",
                ErrorKind.INVALID,
            ),
            attempts_so_far=r.attempts,
        )
    if not sendable:
        return 0
    results = send(
        [Path(r.path) for r in sendable],
        dest,
        calling_ae=dest.calling_ae_title or cfg.dicom.ae_title,
    )
    by_uid = {res.sop_instance_uid: res for res in results}
    delivered = 0
    for r in sendable:
        outcome = _outcome(by_uid.get(r.sop_instance_uid))
        state = queue.record_delivery(r.id, outcome, attempts_so_far=r.attempts)
        if outcome.delivered:
            delivered += 1
        else:
            log.warning(
                "delivery of %s to %s: %s (now %s)",
                r.sop_instance_uid,
                dest.name,
                outcome.status,
                state,
            )
    return delivered


def deliver_due(cfg: AppConfig, queue: Queue, *, limit: int = 200) -> int:
    """Send every delivery that is due; returns how many were delivered."""
    rows = queue.due_deliveries(limit=limit)
    by_dest: dict[str, list[DeliveryRow]] = defaultdict(list)
    for r in rows:
        by_dest[r.destination].append(r)
    destinations = {d.name: d for d in cfg.destinations}
    delivered = 0
    for name, group in by_dest.items():
        dest = destinations.get(name)
        if dest is None:
            gone = DeliveryOutcome(
                False, f"destination {name!r} is no longer in config.yaml", ErrorKind.CONFIG
            )
            for r in group:
                queue.record_delivery(r.id, gone, attempts_so_far=r.attempts)
            continue
        delivered += _send_group(cfg, queue, dest, group)
    return delivered
