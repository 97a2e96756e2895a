"""Working on a study: claim it (a lease), heartbeat to keep it, release it, and the sweep that
takes back studies whose worker stopped heartbeating.

Times come from the caller's clock (``now=``, default the current UTC time) so tests can move
time; with several machines, keep their clocks in sync (NTP): a lease is only as good as the
clocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.engine import Database, due_by, lock_rows, locked_ids
from db.reads import from_row, instance_row
from db.records import ClaimedStudy, InstanceRow
from db.sanitise import escape_control
from db.schema import events_table as events
from db.schema import instances_table as instances
from db.schema import results_table as results
from db.schema import studies_table as studies
from db.states import CLEAR_LEASE, FINISHED, StudyState, hand_back, touch, transition, utcnow

log = logging.getLogger(__name__)
S = StudyState


def claim(
    db: Database,
    worker_id: str,
    *,
    lease: timedelta,
    max_attempts: int,
    limit: int = 1,
    now: datetime | None = None,
) -> list[ClaimedStudy]:
    """Take up to ``limit`` ready studies (oldest first) for ``worker_id``; each is held until
    ``now + lease`` unless heartbeats extend it. Counts an attempt."""
    if limit < 1:
        return []
    at = utcnow(now)

    def run(conn: Connection) -> list[ClaimedStudy]:
        ids = locked_ids(
            conn,
            sa.select(studies.c.id)
            .where(studies.c.state == S.READY.value, due_by(studies.c.ready_at, at))
            .order_by(studies.c.ready_at, studies.c.id)
            .limit(limit),
        )
        values = {
            "lease_owner": worker_id,
            "lease_expires_at": at + lease,
            "heartbeat_at": at,
            "claimed_at": at,
            "attempts": studies.c.attempts + 1,
            "needs_reanalysis": False,
        }
        won = []
        for sid in ids:
            row = transition(
                conn,
                sid,
                S.READY,
                S.PROCESSING,
                actor=worker_id,
                now=at,
                reason=lambda r: f"claimed by {worker_id} (attempt {r.attempts} of {max_attempts})",
                values=values,
            )
            if row is not None:
                won.append(row)
        by_study = _instances_of(conn, [r.id for r in won])
        claimed = []
        for r in won:
            insts = by_study.get(r.id, [])
            earlier = _earlier_reports(conn, r.id)
            why = _reanalysis_reason(conn, r.id, insts, earlier) if earlier else ""
            claimed.append(
                from_row(
                    ClaimedStudy, r, instances=insts, earlier_reports=earlier, reanalysis_reason=why
                )
            )
        return claimed

    return db.write(run)


def _earlier_reports(conn: Connection, study_id: int) -> tuple[str, ...]:
    """The study's report SOP Instance UIDs, oldest first, each once."""
    uids = conn.execute(
        sa.select(results.c.report_sop_instance_uid)
        .where(results.c.study_id == study_id, results.c.report_sop_instance_uid.is_not(None))
        .order_by(results.c.id)
    ).scalars()
    return tuple(dict.fromkeys(u for u in uids if u))


def _reanalysis_reason(
    conn: Connection, study_id: int, insts: Sequence[InstanceRow], earlier: tuple[str, ...]
) -> str:
    """Why a study with a report is analysed again: the images that arrived after the analysis
    that made its latest report started (e.g. "a late lateral (LL) arrived after report 1"), or,
    when none did, the reason it was sent back (an operator's requeue...)."""
    last = conn.execute(
        sa.select(results.c.created_at)
        .where(results.c.study_id == study_id, results.c.report_sop_instance_uid.is_not(None))
        .order_by(results.c.id.desc())
        .limit(1)
    ).scalar_one()
    started = conn.execute(  # the claim of the analysis that produced that report
        sa.select(sa.func.max(events.c.at)).where(
            events.c.study_id == study_id,
            events.c.delivery_id.is_(None),
            events.c.to_state == S.PROCESSING.value,
            events.c.at <= last,
        )
    ).scalar_one_or_none()
    late = [i for i in insts if i.eligible and (started is None or i.received_at > started)]
    n = len(earlier)
    if late:
        return f"{describe_images(late)} after report {n}"
    why = conn.execute(
        sa.select(events.c.reason)
        .where(
            events.c.study_id == study_id,
            events.c.delivery_id.is_(None),
            events.c.from_state.in_([s.value for s in FINISHED]),
        )
        .order_by(events.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return f"re-analysis of report {n}: {why}" if why else f"re-analysis of report {n}"


def describe_images(insts: Sequence[InstanceRow]) -> str:
    """``a late lateral (LL) arrived`` / ``2 late images arrived: frontal (PA), lateral (LL)``."""
    views = [
        f"{i.view or 'image of unknown view'}"
        + (f" ({escape_control(i.view_position)})" if i.view_position and i.view else "")
        for i in insts
    ]
    if len(views) == 1:
        return f"a late {views[0]} arrived"
    return f"{len(views)} late images arrived: {', '.join(views)}"


def _instances_of(conn: Connection, study_ids: list[int]) -> dict[int, list[InstanceRow]]:
    if not study_ids:
        return {}
    rows = conn.execute(
        sa.select(instances)
        .where(instances.c.study_id.in_(study_ids))
        .order_by(instances.c.study_id, instances.c.id)
    ).all()
    by_study: dict[int, list[InstanceRow]] = {}
    for i in rows:
        by_study.setdefault(i.study_id, []).append(instance_row(i))
    return by_study


def heartbeat(
    db: Database,
    worker_id: str,
    study_ids: Sequence[int],
    *,
    lease: timedelta,
    now: datetime | None = None,
) -> list[int]:
    """Extend the leases ``worker_id`` still holds; returns those ids (others were lost)."""
    if not study_ids:
        return []
    at = utcnow(now)
    still_held = db.write(
        lambda conn: touch(
            conn,
            studies.c.id.in_(sorted(set(study_ids))),
            studies.c.state == S.PROCESSING.value,
            studies.c.lease_owner == worker_id,
            heartbeat_at=at,
            lease_expires_at=at + lease,
            updated_at=at,
        )
    )
    lost = set(study_ids) - set(still_held)
    if lost:
        log.warning("worker %s lost the lease on studies %s", worker_id, sorted(lost))
    return sorted(still_held)


def release(
    db: Database,
    study_id: int,
    worker_id: str,
    reason: str = "released by the worker",
    now: datetime | None = None,
) -> None:
    """Give the study back to ``ready`` without counting the attempt (e.g. on shutdown)."""
    at = utcnow(now)
    uncount = sa.case((studies.c.attempts > 0, studies.c.attempts - 1), else_=0)

    values = {"ready_at": at, "attempts": uncount}
    db.write(
        lambda conn: hand_back(
            conn,
            study_id,
            worker_id,
            S.READY,
            at=at,
            reason=reason,
            values=values,
            doing="releasing",
        )
    )


def sweep_leases(
    db: Database, *, max_attempts: int, now: datetime | None = None, limit: int = 500
) -> int:
    """Processing studies whose lease expired go back to ``ready`` (or ``failed`` once their
    attempts are used up). Returns how many were taken back."""
    at = utcnow(now)

    def run(conn: Connection) -> int:
        rows = conn.execute(
            lock_rows(
                conn,
                sa.select(studies.c.id, studies.c.lease_owner, studies.c.attempts)
                .where(studies.c.state == S.PROCESSING.value, studies.c.lease_expires_at < at)
                .order_by(studies.c.id)
                .limit(limit),
                skip_locked=True,
            )
        ).all()
        return sum(_take_back(conn, r, at, max_attempts) for r in rows)

    return db.write(run)


def _take_back(conn: Connection, r: sa.Row[tuple[int, str, int]], at: datetime, max_: int) -> bool:
    """One expired lease: back to ready, or failed when its attempts are used up."""
    why = f"lease expired (worker {r.lease_owner})"
    if r.attempts >= max_:
        new, values = S.FAILED, {**CLEAR_LEASE, "finished_at": at}
        why += f" after {r.attempts} attempt(s); giving up"
    else:
        new, values = S.READY, {**CLEAR_LEASE, "ready_at": at}
    moved = transition(
        conn,
        r.id,
        S.PROCESSING,
        new,
        actor="scheduler",
        now=at,
        where=[studies.c.lease_expires_at < at],
        reason=why,
        values=values,
    )
    return moved is not None
