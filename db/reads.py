"""Read-only queries behind :meth:`Queue.counts`, ``latest``, ``study`` and ``events``.

Functions of an open connection; :class:`db.queue.Queue` supplies the (deferred, non-blocking)
read transaction and turns connection failures into ``QueueUnavailable``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.records import DeliveryRow, EventRow, InstanceRow, ResultRow, StudyDetail, StudySummary
from db.schema import deliveries_table as deliveries
from db.schema import events_table
from db.schema import instances_table as instances
from db.schema import results_table as results
from db.schema import studies_table as studies


def instance_row(r: Any) -> InstanceRow:
    return InstanceRow(
        id=r.id,
        sop_instance_uid=r.sop_instance_uid,
        sop_class_uid=r.sop_class_uid,
        series_uid=r.series_uid,
        transfer_syntax_uid=r.transfer_syntax_uid,
        modality=r.modality,
        body_part=r.body_part,
        view_position=r.view_position,
        rel_path=r.rel_path,
        size_bytes=r.size_bytes,
        eligible=bool(r.eligible),
        ineligible_reason=r.ineligible_reason,
        calling_ae=r.calling_ae,
        received_at=r.received_at,
    )


def delivery_row(r: Any) -> DeliveryRow:
    """From a deliveries row joined with ``studies.study_uid``."""
    return DeliveryRow(
        id=r.id,
        study_id=r.study_id,
        study_uid=r.study_uid,
        result_id=r.result_id,
        destination=r.destination,
        sop_instance_uid=r.sop_instance_uid,
        sop_class_uid=r.sop_class_uid,
        path=r.path,
        state=r.state,
        attempts=r.attempts,
        next_attempt_at=r.next_attempt_at,
        last_status=r.last_status,
        updated_at=r.updated_at,
    )


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
    for sid, state, cnt in conn.execute(
        sa.select(deliveries.c.study_id, deliveries.c.state, sa.func.count())
        .where(deliveries.c.study_id.in_(ids), deliveries.c.result_id == latest_result)
        .group_by(deliveries.c.study_id, deliveries.c.state)
    ):
        dstates.setdefault(sid, {})[state] = int(cnt)
    return [
        StudySummary(
            study_uid=r.study_uid,
            state=r.state,
            reason=r.state_reason,
            updated_at=r.updated_at,
            instance_count=n_instances.get(r.id, 0),
            deliveries=dstates.get(r.id, {}),
        )
        for r in rows
    ]


def _events_of(conn: Connection, study_id: int) -> list[EventRow]:
    return [
        EventRow(
            at=e.at, from_state=e.from_state, to_state=e.to_state, reason=e.reason, actor=e.actor
        )
        for e in conn.execute(
            sa.select(events_table)
            .where(events_table.c.study_id == study_id)
            .order_by(events_table.c.id)
        )
    ]


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
    return StudyDetail(
        id=r.id,
        study_uid=r.study_uid,
        state=r.state,
        state_reason=r.state_reason,
        attempts=r.attempts,
        lease_owner=r.lease_owner,
        lease_expires_at=r.lease_expires_at,
        heartbeat_at=r.heartbeat_at,
        first_instance_at=r.first_instance_at,
        last_instance_at=r.last_instance_at,
        ready_at=r.ready_at,
        claimed_at=r.claimed_at,
        finished_at=r.finished_at,
        reopened_count=r.reopened_count,
        needs_reanalysis=bool(r.needs_reanalysis),
        previous_report_uid=r.previous_report_uid,
        created_at=r.created_at,
        updated_at=r.updated_at,
        instances=[instance_row(i) for i in insts],
        results=[
            ResultRow(
                id=x.id,
                created_at=x.created_at,
                payload=x.payload,
                report_sop_instance_uid=x.report_sop_instance_uid,
                report_path=x.report_path,
                superseded=bool(x.superseded),
            )
            for x in res
        ],
        deliveries=[delivery_row(d) for d in dels],
        events=_events_of(conn, r.id),
    )
