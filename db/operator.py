"""What a person does to the queue (``cxr-worker requeue``, ``resend``), and retention
(``purge``)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db import deliveries
from db.engine import Conflict, Database, lock_rows
from db.schema import deliveries_table, events_table, instances_table, results_table
from db.schema import studies_table as studies
from db.states import (
    CLEAR_LEASE,
    FINISHED,
    REQUEUEABLE,
    StudyState,
    latest_report_uid,
    transition,
    utcnow,
)

log = logging.getLogger(__name__)
S = StudyState

#: Rows that belong to a study, in an order that deletes them without breaking a foreign key.
_OWNED_BY_STUDY = (events_table, deliveries_table, results_table, instances_table)


def requeue(
    db: Database, study_uid: str, *, actor: str = "cli", now: datetime | None = None
) -> bool:
    """A done/failed/ignored study goes back to ``ready`` with its attempts reset. False if the
    study does not exist or is not finished (receiving, ready and processing are left alone)."""
    at = utcnow(now)

    def run(conn: Connection) -> bool:
        row = conn.execute(
            lock_rows(
                conn,
                sa.select(studies.c.id, studies.c.state).where(studies.c.study_uid == study_uid),
            )
        ).first()
        if row is None or row.state not in REQUEUEABLE:
            return False
        return _requeue(conn, row.id, S(row.state), actor, at)

    return db.write(run)


def requeue_failed(db: Database, *, actor: str = "cli", now: datetime | None = None) -> int:
    """Every failed study goes back to ``ready`` with its attempts reset. Returns the count."""
    at = utcnow(now)

    def run(conn: Connection) -> int:
        stmt = sa.select(studies.c.id).where(studies.c.state == S.FAILED.value)
        ids = conn.execute(lock_rows(conn, stmt.order_by(studies.c.id))).scalars().all()
        return sum(_requeue(conn, sid, S.FAILED, actor, at) for sid in ids)

    return db.write(run)


def _requeue(conn: Connection, study_id: int, state: StudyState, actor: str, at: datetime) -> bool:
    values: dict[str, Any] = {**CLEAR_LEASE, "attempts": 0, "ready_at": at, "finished_at": None}
    report = latest_report_uid(conn, study_id)
    if report is not None:
        values["previous_report_uid"] = report
    moved = transition(
        conn,
        study_id,
        state,
        S.READY,
        actor=actor,
        now=at,
        values=values,
        reason=f"requeued by {actor} (was {state}; attempts reset)",
    )
    return moved is not None


def resend(db: Database, study_uid: str, *, actor: str = "cli", now: datetime | None = None) -> int:
    """Put every delivery of the study's latest result back to pending. Returns how many."""
    at = utcnow(now)
    return db.write(lambda c: deliveries.resend(c, study_uid, actor=actor, at=at))


def purge(db: Database, older_than: datetime, *, limit: int = 1000) -> list[str]:
    """Delete the rows of finished studies (done, ignored, failed) not changed since
    ``older_than`` and with no delivery still pending or retrying. Never touches receiving,
    ready or processing studies. Returns the purged study UIDs; the caller deletes their files."""
    cutoff = utcnow(older_than, "older_than")
    d = deliveries_table
    open_delivery = (
        sa.select(d.c.id)
        .where(d.c.study_id == studies.c.id, d.c.state.in_(deliveries.OPEN))
        .exists()
    )
    candidates = (
        sa.select(studies.c.id, studies.c.study_uid, studies.c.state)
        .where(
            studies.c.state.in_([s.value for s in FINISHED]),
            studies.c.updated_at < cutoff,
            ~open_delivery,
        )
        .order_by(studies.c.id)
        .limit(limit)
    )

    def run(conn: Connection) -> list[str]:
        rows = conn.execute(lock_rows(conn, candidates, skip_locked=True)).all()
        gone = [_delete_study(conn, r.id, r.study_uid, r.state) for r in rows]
        if gone:
            log.info("purged %d finished study(ies) older than %s", len(gone), cutoff.isoformat())
        return gone

    return db.write(run)


def _delete_study(conn: Connection, study_id: int, study_uid: str, state: str) -> str:
    for table in _OWNED_BY_STUDY:
        conn.execute(sa.delete(table).where(table.c.study_id == study_id))
    n = conn.execute(
        sa.delete(studies).where(studies.c.id == study_id, studies.c.state == state)
    ).rowcount
    if n != 1:
        raise Conflict(f"study {study_uid} changed while purging it")
    return study_uid
