"""The study state machine: the ONLY module that writes ``studies`` rows' state.

Every state change goes through :func:`transition`, a compare-and-set
(``UPDATE studies SET state = :new ... WHERE id = :id AND state = :expected``) that checks the row
it changed and writes an ``events`` row in the same transaction. Two workers can therefore never
both win a study, on either backend:

- PostgreSQL: candidates are selected ``FOR UPDATE SKIP LOCKED`` (workers do not even wait on each
  other), and the compare-and-set is the final word.
- SQLite: SQLAlchemy silently drops ``SKIP LOCKED``; write transactions start with
  ``BEGIN IMMEDIATE`` (see :mod:`db.engine`) so they are serialised, and the compare-and-set is
  what makes claiming correct.

Other columns of a study (activity times, heartbeats) change through :func:`touch`, which refuses
to write the state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.engine import lock_rows
from db.errors import InvalidTransition, LeaseLost
from db.records import EventRow
from db.schema import events_table as events
from db.schema import results_table as results
from db.schema import studies_table as studies

log = logging.getLogger(__name__)


class StudyState(StrEnum):
    """Where a study stands (``studies.state``)."""

    RECEIVING = "receiving"
    READY = "ready"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    IGNORED = "ignored"


S = StudyState
#: Every allowed (from, to). ``None`` as "from" is the creation of the study.
TRANSITIONS: frozenset[tuple[StudyState | None, StudyState]] = frozenset(
    {
        (None, S.RECEIVING),  # first instance of a new study
        (S.RECEIVING, S.READY),  # completion sweep: quiet / max wait
        (S.RECEIVING, S.IGNORED),  # completion sweep: nothing eligible
        (S.READY, S.RECEIVING),  # another instance arrived: wait for quiet again
        (S.READY, S.PROCESSING),  # claimed
        (S.PROCESSING, S.DONE),  # result stored
        (S.PROCESSING, S.RECEIVING),  # result stored, but instances arrived meanwhile
        (S.PROCESSING, S.READY),  # retryable failure, release, expired lease
        (S.PROCESSING, S.FAILED),  # permanent failure or attempts exhausted
        (S.PROCESSING, S.IGNORED),  # the worker found nothing to analyse (e.g. no frontal view)
        (S.DONE, S.RECEIVING),  # late instance: reopen, the next report replaces the last
        (S.FAILED, S.RECEIVING),  # new data, new chance
        (S.IGNORED, S.RECEIVING),  # an eligible instance arrived
        (S.DONE, S.READY),  # operator requeue
        (S.FAILED, S.READY),  # operator requeue
        (S.IGNORED, S.READY),  # operator requeue
    }
)
REQUEUEABLE = (S.DONE, S.FAILED, S.IGNORED)
FINISHED = (S.DONE, S.FAILED, S.IGNORED)

#: The values that hand a study back: no owner, no lease.
CLEAR_LEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "heartbeat_at": None}

Reason = str | Callable[[sa.Row[Any]], str]


def utcnow(now: datetime | None, name: str = "now") -> datetime:
    """``now`` as aware UTC (default: the current time); a naive datetime is refused (``name``
    says which argument it was)."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{name}={now.isoformat()} is naive: pass an aware datetime (UTC)")
    return now.astimezone(UTC)


def write_event(conn: Connection, study_id: int, event: EventRow) -> None:
    """One audit row: a study's change, or (``event.delivery_id`` set) one of its deliveries'."""
    conn.execute(sa.insert(events).values(study_id=study_id, **asdict(event)))


def transition(
    conn: Connection,
    study_id: int,
    expected: StudyState,
    new: StudyState,
    *,
    actor: str,
    reason: Reason,
    now: datetime,
    values: dict[str, Any] | None = None,
    where: Iterable[sa.ColumnElement[bool]] = (),
) -> sa.Row[Any] | None:
    """Compare-and-set ``expected -> new`` plus an event row. Returns the changed row
    (id, study_uid, attempts, previous_report_uid, lease_expires_at) or None if another
    transaction got there first. ``reason`` may be a function of that row."""
    check_allowed(TRANSITIONS, f"study {study_id}", expected, new)
    c = studies.c
    row = compare_and_set(
        conn,
        studies,
        study_id,
        expected,
        new,
        now=now,
        values={**(values or {}), **({} if callable(reason) else {"state_reason": reason})},
        where=where,
        returning=(c.id, c.study_uid, c.attempts, c.previous_report_uid, c.lease_expires_at),
    )
    if row is None:
        return None
    text = reason(row) if callable(reason) else reason
    if callable(reason):
        touch(conn, studies.c.id == study_id, state_reason=text)
    write_event(conn, study_id, EventRow(now, expected.value, new.value, text, actor))
    log.info(
        "study %s (%s): %s -> %s by %s: %s", study_id, row.study_uid, expected, new, actor, text
    )
    return row


def check_allowed(
    table: frozenset[tuple[Any, Any]], what: str, expected: StrEnum | None, new: StrEnum
) -> None:
    """InvalidTransition unless ``(expected, new)`` is in the transition ``table``."""
    if (expected, new) not in table:
        raise InvalidTransition(f"{what}: {expected} -> {new} is not an allowed transition")


def compare_and_set(
    conn: Connection,
    table: sa.Table,
    row_id: int,
    expected: StrEnum,
    new: StrEnum,
    *,
    now: datetime,
    values: dict[str, Any],
    returning: Iterable[sa.ColumnElement[Any]],
    where: Iterable[sa.ColumnElement[bool]] = (),
) -> sa.Row[Any] | None:
    """``UPDATE table SET state = :new, updated_at = :now, ... WHERE id = :id AND state =
    :expected [AND where] RETURNING ...``: the changed row, or None when another transaction
    changed (or deleted) it first. Callers check the transition table and write the event."""
    stmt = (
        sa.update(table)
        .where(table.c.id == row_id, table.c.state == expected.value, *where)
        .values(state=new.value, updated_at=now, **values)
        .returning(*returning)
    )
    return conn.execute(stmt).first()


def touch(conn: Connection, *where: sa.ColumnElement[bool], **values: Any) -> list[int]:
    """Update columns other than the state of the studies matching ``where``; returns their ids."""
    if "state" in values:
        raise InvalidTransition("a study's state changes only through db.states.transition")
    stmt = sa.update(studies).where(*where).values(**values).returning(studies.c.id)
    return list(conn.execute(stmt).scalars().all())


def held(conn: Connection, study_id: int, worker_id: str) -> sa.Row[Any]:
    """The (locked) study row if ``worker_id`` holds it (state processing, lease_owner), else
    LeaseLost. An expired lease that no sweep has taken back yet is still held: no one else can
    have it."""
    row = conn.execute(lock_rows(conn, sa.select(studies).where(studies.c.id == study_id))).first()
    if row is None:
        raise LeaseLost(
            f"study {study_id} does not exist (purged?); worker {worker_id} must drop it"
        )
    if row.state != S.PROCESSING or row.lease_owner != worker_id:
        raise LeaseLost(
            f"worker {worker_id} no longer holds study {study_id} ({row.study_uid}): it is "
            f"{row.state}"
            + (f", held by {row.lease_owner}" if row.lease_owner else "")
            + "; discard this work (the lease expired or the study was requeued)"
        )
    return row


def hand_back(
    conn: Connection,
    study_id: int,
    worker_id: str,
    new: StudyState,
    *,
    at: datetime,
    reason: str,
    values: dict[str, Any],
    doing: str,
) -> None:
    """``processing -> new`` for the worker holding the study, lease cleared (plus ``values``);
    LeaseLost if the worker no longer holds it. ``doing`` names the action for that message."""
    held(conn, study_id, worker_id)
    moved = transition(
        conn,
        study_id,
        S.PROCESSING,
        new,
        actor=worker_id,
        now=at,
        reason=reason,
        where=[studies.c.lease_owner == worker_id],
        values={**CLEAR_LEASE, **values},
    )
    if moved is None:  # cannot happen while we hold the row lock / write lock
        raise LeaseLost(f"worker {worker_id} lost study {study_id} while {doing} it")


def latest_report_uid(conn: Connection, study_id: int) -> str | None:
    """The SOP Instance UID of the study's newest stored report, if any."""
    uid: str | None = conn.execute(
        sa.select(results.c.report_sop_instance_uid)
        .where(results.c.study_id == study_id, results.c.report_sop_instance_uid.is_not(None))
        .order_by(results.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return uid
