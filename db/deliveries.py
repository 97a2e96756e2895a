"""The delivery state machine (one row per result object x destination), the ONLY module that
writes ``deliveries.state``.

Like studies (:mod:`db.states`): a transition table, every change a compare-and-set
(``UPDATE deliveries SET state = :new ... WHERE id = :id AND state = :expected``) that writes an
``events`` row (with ``delivery_id``) in the same transaction, and retries decided by
:func:`db.retry.decide` on a typed :class:`~db.retry.ErrorKind`::

    (created) -> pending -> delivered | retry | failed;  retry -> delivered | retry | failed
    any state -> pending (operator resend)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.engine import Conflict, Database, due_by, lock_rows, locked_ids
from db.reads import delivery_row
from db.records import DeliveryRow, EventRow, NewDelivery
from db.retry import ErrorKind, decide
from db.schema import deliveries_table as deliveries
from db.schema import results_table as results
from db.schema import studies_table as studies
from db.states import check_allowed, compare_and_set, utcnow, write_event

log = logging.getLogger(__name__)


class DeliveryState(StrEnum):
    """Where one delivery stands (``deliveries.state``)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


D = DeliveryState
#: Every allowed (from, to). ``None`` as "from" is the creation of the delivery.
DELIVERY_TRANSITIONS: frozenset[tuple[DeliveryState | None, DeliveryState]] = frozenset(
    {
        (None, D.PENDING),  # queued with its result (Queue.complete)
        (D.PENDING, D.DELIVERED),  # sent
        (D.PENDING, D.RETRY),  # not sent, worth another try later
        (D.PENDING, D.FAILED),  # not sent, giving up (permanent error or attempts used)
        (D.RETRY, D.DELIVERED),
        (D.RETRY, D.RETRY),  # another failed try, still worth retrying
        (D.RETRY, D.FAILED),
        (D.PENDING, D.PENDING),  # operator resend (attempts reset) ...
        (D.RETRY, D.PENDING),
        (D.DELIVERED, D.PENDING),
        (D.FAILED, D.PENDING),
    }
)
#: States a sender still has to act on (``values`` for SQL).
OPEN = (D.PENDING.value, D.RETRY.value)


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one send attempt came to: the worker reports it, the queue decides what follows."""

    delivered: bool
    status: str  # DICOM status text / error text (no patient data)
    kind: ErrorKind | None = None  # why it failed; None when delivered

    def __post_init__(self) -> None:
        if not self.delivered and self.kind is None:
            raise ValueError(
                f"a failed delivery ({self.status!r}) needs a kind (db.retry.ErrorKind) saying "
                "why it failed, so the queue can decide whether to retry"
            )


def transition(
    conn: Connection,
    delivery_id: int,
    expected: DeliveryState,
    new: DeliveryState,
    *,
    actor: str,
    reason: str,
    now: datetime,
    values: dict[str, Any] | None = None,
) -> sa.Row[Any] | None:
    """Compare-and-set ``expected -> new`` plus an event row. Returns the changed row (id,
    study_id, destination) or None if the delivery is gone or no longer ``expected``."""
    check_allowed(DELIVERY_TRANSITIONS, f"delivery {delivery_id}", expected, new)
    c = deliveries.c
    row = compare_and_set(
        conn,
        deliveries,
        delivery_id,
        expected,
        new,
        now=now,
        values=values or {},
        returning=(c.id, c.study_id, c.destination),
    )
    if row is None:
        return None
    event = EventRow(now, expected.value, new.value, reason, actor, delivery_id=delivery_id)
    write_event(conn, row.study_id, event)
    log.info("delivery %s: %s -> %s by %s: %s", delivery_id, expected, new, actor, reason)
    return row


def create(
    conn: Connection,
    study_id: int,
    result_id: int,
    new: Sequence[NewDelivery],
    *,
    actor: str,
    at: datetime,
) -> None:
    """Queue one pending delivery per entry of ``new``, each with its creation event."""
    for n in new:
        check_allowed(DELIVERY_TRANSITIONS, f"delivery to {n.destination}", None, D.PENDING)
        delivery_id = conn.execute(
            sa.insert(deliveries)
            .values(
                study_id=study_id,
                result_id=result_id,
                destination=n.destination,
                sop_instance_uid=n.sop_instance_uid,
                sop_class_uid=n.sop_class_uid,
                path=n.path,
                state=D.PENDING.value,
                attempts=0,
                next_attempt_at=None,
                last_status=None,
                updated_at=at,
            )
            .returning(deliveries.c.id)
        ).scalar_one()
        why = f"queued for {n.destination}"
        write_event(conn, study_id, EventRow(at, None, D.PENDING.value, why, actor, delivery_id))


def due(db: Database, *, now: datetime | None, limit: int, hold: timedelta) -> list[DeliveryRow]:
    """Open deliveries due at ``now``; each is held for ``hold`` (``next_attempt_at`` moves on)
    so a second sender skips it, and comes back by itself if the sender dies before recording
    its outcome. Handing out is not a state change (no event)."""
    at = utcnow(now)

    def run(conn: Connection) -> list[DeliveryRow]:
        ids = locked_ids(
            conn,
            sa.select(deliveries.c.id)
            .where(deliveries.c.state.in_(OPEN), due_by(deliveries.c.next_attempt_at, at))
            .order_by(
                deliveries.c.next_attempt_at.is_not(None),
                deliveries.c.next_attempt_at,
                deliveries.c.id,
            )
            .limit(limit),
        )
        if not ids:
            return []
        conn.execute(
            sa.update(deliveries).where(deliveries.c.id.in_(ids)).values(next_attempt_at=at + hold)
        )
        rows = conn.execute(
            sa.select(deliveries, studies.c.study_uid)
            .join(studies, studies.c.id == deliveries.c.study_id)
            .where(deliveries.c.id.in_(ids))
            .order_by(deliveries.c.id)
        )
        return [delivery_row(r) for r in rows]

    return db.write(run)


def record(
    db: Database,
    delivery_id: int,
    outcome: DeliveryOutcome,
    *,
    attempts_so_far: int,
    max_attempts: int,
    actor: str = "scheduler",
    now: datetime | None = None,
) -> DeliveryState:
    """Record one send attempt: delivered; or not, and then retried after
    :func:`~db.retry.decide`'s delay, or failed for good. Returns the delivery's state after.
    Raises LookupError for an unknown delivery id. A delivery that is no longer open (another
    sender recorded it first) is left as it is."""
    at = utcnow(now)
    delay = None
    if not outcome.delivered and outcome.kind is not None:  # (DeliveryOutcome requires a kind)
        delay = decide(outcome.kind, attempts_so_far + 1, max_attempts=max_attempts)
    state = db.write(lambda c: _record(c, delivery_id, outcome, delay, actor=actor, at=at))
    log.info("delivery %s: %s (%s)", delivery_id, state, outcome.status)
    return state


def _record(
    conn: Connection,
    delivery_id: int,
    outcome: DeliveryOutcome,
    delay: float | None,
    *,
    actor: str,
    at: datetime,
) -> DeliveryState:
    row = conn.execute(
        lock_rows(
            conn,
            sa.select(deliveries.c.state, deliveries.c.destination).where(
                deliveries.c.id == delivery_id
            ),
        )
    ).first()
    if row is None:
        raise LookupError(f"delivery {delivery_id} does not exist (purged?); nothing recorded")
    current = D(row.state)
    if current.value not in OPEN:
        log.warning(
            "delivery %s is already %s: outcome %r not recorded", delivery_id, current, outcome
        )
        return current
    new, reason = _next(row.destination, outcome, delay)
    moved = transition(
        conn,
        delivery_id,
        current,
        new,
        actor=actor,
        now=at,
        reason=reason,
        values={
            "attempts": deliveries.c.attempts + 1,
            "next_attempt_at": None if delay is None else at + timedelta(seconds=delay),
            "last_status": outcome.status,
        },
    )
    if moved is None:
        raise Conflict(f"delivery {delivery_id} changed state while recording its outcome")
    return new


def _next(
    destination: str, outcome: DeliveryOutcome, delay: float | None
) -> tuple[DeliveryState, str]:
    """The state an outcome leads to, and the event's reason."""
    if outcome.delivered:
        return D.DELIVERED, f"sent to {destination}: {outcome.status}"
    if delay is not None:
        return D.RETRY, f"not sent to {destination}: {outcome.status}; retry in {delay:g}s"
    return D.FAILED, f"not sent to {destination}: {outcome.status}; giving up ({outcome.kind})"


def resend(conn: Connection, study_uid: str, *, actor: str, at: datetime) -> int:
    """Every delivery of the study's latest result back to pending, attempts reset."""
    rid = conn.execute(  # the latest result, whether or not it has deliveries
        sa.select(sa.func.max(results.c.id))
        .join(studies, studies.c.id == results.c.study_id)
        .where(studies.c.study_uid == study_uid)
    ).scalar()
    if rid is None:
        return 0
    rows = conn.execute(
        lock_rows(
            conn,
            sa.select(deliveries.c.id, deliveries.c.state)
            .where(deliveries.c.result_id == rid)
            .order_by(deliveries.c.id),
        )
    ).all()
    moved = [
        transition(
            conn,
            r.id,
            D(r.state),
            D.PENDING,
            actor=actor,
            now=at,
            reason=f"resend requested by {actor}",
            values={"attempts": 0, "next_attempt_at": None, "last_status": "resend requested"},
        )
        for r in rows
    ]
    return sum(m is not None for m in moved)
