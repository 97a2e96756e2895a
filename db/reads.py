"""Read-only queries behind :meth:`Queue.counts`, ``latest``, ``study`` and ``events``.

Functions of an open connection; :class:`db.queue.Queue` supplies the (deferred, non-blocking)
read transaction and turns connection failures into ``QueueUnavailable``.
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.records import (
    DeliveryRow,
    DestinationState,
    EventRow,
    InstanceRow,
    QueueSnapshot,
    ResultRow,
    StudyDetail,
    StudySummary,
)
from db.schema import deliveries_table as deliveries
from db.schema import events_table
from db.schema import instances_table as instances
from db.schema import results_table as results
from db.schema import studies_table as studies

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")


def from_row(cls: type[R], r: Any, **given: Any) -> R:
    """A record dataclass from a result row: every field read by name, except those ``given``."""
    names = [f.name for f in fields(cls) if f.name not in given]
    return cls(**{n: getattr(r, n) for n in names}, **given)


def instance_row(r: Any) -> InstanceRow:
    return from_row(InstanceRow, r, eligible=bool(r.eligible))


def delivery_row(r: Any) -> DeliveryRow:
    """From a deliveries row joined with ``studies.study_uid``."""
    return from_row(DeliveryRow, r)


def counts(conn: Connection) -> dict[str, int]:
    """Studies per state (states with no study are absent)."""
    rows = conn.execute(sa.select(studies.c.state, sa.func.count()).group_by(studies.c.state)).all()
    return {state: int(n) for state, n in rows}


def latest(conn: Connection, n: int) -> list[StudySummary]:
    rows = conn.execute(
        sa.select(studies).order_by(studies.c.updated_at.desc(), studies.c.id.desc()).limit(n)
    ).all()
    ids = [r.id for r in rows]
    if not ids:
        return []
    n_instances: dict[int, int] = {
        sid: int(cnt)
        for sid, cnt in conn.execute(
            sa.select(instances.c.study_id, sa.func.count())
            .where(instances.c.study_id.in_(ids))
            .group_by(instances.c.study_id)
        )
    }
    latest_result = (
        sa.select(sa.func.max(results.c.id)).where(results.c.study_id == deliveries.c.study_id)
    ).scalar_subquery()
    dstates: dict[int, dict[str, int]] = {}
    by_dest: dict[int, dict[str, list[DeliveryRow]]] = {}
    for d in conn.execute(
        sa.select(deliveries, studies.c.study_uid)
        .join(studies, studies.c.id == deliveries.c.study_id)
        .where(deliveries.c.study_id.in_(ids), deliveries.c.result_id == latest_result)
        .order_by(deliveries.c.id)
    ):
        row = delivery_row(d)
        counts = dstates.setdefault(row.study_id, {})
        counts[row.state] = counts.get(row.state, 0) + 1
        by_dest.setdefault(row.study_id, {}).setdefault(row.destination, []).append(row)
    return [
        from_row(
            StudySummary,
            r,
            reason=r.state_reason,
            instance_count=n_instances.get(r.id, 0),
            deliveries=dstates.get(r.id, {}),
            destinations=[
                destination_state(name, rows) for name, rows in by_dest.get(r.id, {}).items()
            ],
        )
        for r in rows
    ]


def destination_state(name: str, rows: list[DeliveryRow]) -> DestinationState:
    """One destination's deliveries summed up: counts per state, attempts, the next retry, and
    the status of the latest undelivered object (else of the latest one)."""
    states: dict[str, int] = {}
    for d in rows:
        states[d.state] = states.get(d.state, 0) + 1
    retries = [d.next_attempt_at for d in rows if d.state == "retry" and d.next_attempt_at]
    open_or_failed = [d for d in rows if d.state != "delivered"] or rows
    latest = max(open_or_failed, key=lambda d: (d.updated_at, d.id))
    return DestinationState(
        destination=name,
        states=states,
        attempts=sum(d.attempts for d in rows),
        next_attempt_at=min(retries) if retries else None,
        last_status=latest.last_status,
    )


def _events(conn: Connection, *where: sa.ColumnElement[bool]) -> list[EventRow]:
    rows = conn.execute(sa.select(events_table).where(*where).order_by(events_table.c.id))
    return [from_row(EventRow, e) for e in rows]


def _events_of(conn: Connection, study_id: int) -> list[EventRow]:
    """The study's own trail (its deliveries' events are read with :func:`delivery_events`)."""
    return _events(conn, events_table.c.study_id == study_id, events_table.c.delivery_id.is_(None))


def delivery_events(conn: Connection, delivery_id: int) -> list[EventRow]:
    return _events(conn, events_table.c.delivery_id == delivery_id)


def history(conn: Connection, study_uid: str) -> list[EventRow] | None:
    """Every event of the study and of its deliveries, in the order written; None if the study
    is unknown."""
    sid = conn.execute(
        sa.select(studies.c.id).where(studies.c.study_uid == study_uid)
    ).scalar_one_or_none()
    return None if sid is None else _events(conn, events_table.c.study_id == sid)


def snapshot(conn: Connection, now: datetime) -> QueueSnapshot:
    """What the metrics endpoint reports about the queue (one read transaction)."""
    oldest = conn.execute(
        sa.select(sa.func.min(studies.c.ready_at)).where(
            studies.c.state == "ready", studies.c.ready_at <= now
        )
    ).scalar_one_or_none()
    dels = conn.execute(
        sa.select(
            deliveries.c.destination,
            deliveries.c.state,
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(deliveries.c.attempts), 0),
        ).group_by(deliveries.c.destination, deliveries.c.state)
    ).all()
    return QueueSnapshot(
        studies=counts(conn),
        oldest_ready_age_seconds=(
            max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        ),
        deliveries={(d, st): int(n) for d, st, n, _ in dels},
        delivery_attempts={(d, st): int(a) for d, st, _, a in dels},
    )


def study_events(conn: Connection, study_uid: str) -> list[EventRow]:
    sid = conn.execute(
        sa.select(studies.c.id).where(studies.c.study_uid == study_uid)
    ).scalar_one_or_none()
    return [] if sid is None else _events_of(conn, sid)


def study(conn: Connection, study_uid: str) -> StudyDetail | None:
    r = conn.execute(sa.select(studies).where(studies.c.study_uid == study_uid)).first()
    if r is None:
        return None
    insts = conn.execute(
        sa.select(instances).where(instances.c.study_id == r.id).order_by(instances.c.id)
    )
    res = conn.execute(sa.select(results).where(results.c.study_id == r.id).order_by(results.c.id))
    dels = conn.execute(
        sa.select(deliveries, studies.c.study_uid)
        .join(studies, studies.c.id == deliveries.c.study_id)
        .where(deliveries.c.study_id == r.id)
        .order_by(deliveries.c.id)
    )
    return from_row(
        StudyDetail,
        r,
        needs_reanalysis=bool(r.needs_reanalysis),
        instances=[instance_row(i) for i in insts],
        results=[from_row(ResultRow, x, superseded=bool(x.superseded)) for x in res],
        deliveries=[delivery_row(d) for d in dels],
        events=_events_of(conn, r.id),
    )
