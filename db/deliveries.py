"""Delivery rows (one per result object x destination): ``pending -> delivered | retry | failed``.

Functions of an open write transaction, wrapped by :class:`db.queue.Queue` (``due_deliveries``,
``mark_delivery``, ``resend``; ``complete`` creates the rows). They never touch a study's state.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.engine import lock_rows
from db.reads import delivery_row
from db.records import DeliveryRow
from db.schema import deliveries_table as deliveries
from db.schema import results_table as results
from db.schema import studies_table as studies


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


OPEN = (DeliveryState.PENDING.value, DeliveryState.RETRY.value)


def due(conn: Connection, *, at: datetime, limit: int, hold: timedelta) -> list[DeliveryRow]:
    """Open deliveries due at ``at``; each is held for ``hold`` (``next_attempt_at`` moves on) so a
    second sender skips it, and comes back by itself if the sender dies before marking it."""
    ids = (
        conn.execute(
            lock_rows(
                conn,
                sa.select(deliveries.c.id)
                .where(
                    deliveries.c.state.in_(OPEN),
                    sa.or_(
                        deliveries.c.next_attempt_at.is_(None), deliveries.c.next_attempt_at <= at
                    ),
                )
                .order_by(
                    deliveries.c.next_attempt_at.is_not(None),
                    deliveries.c.next_attempt_at,
                    deliveries.c.id,
                )
                .limit(limit),
                skip_locked=True,
            )
        )
        .scalars()
        .all()
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


def mark(
    conn: Connection,
    delivery_id: int,
    *,
    delivered: bool,
    status: str,
    retry_at: datetime | None,
    at: datetime,
) -> DeliveryState:
    if delivered:
        state, next_at = DeliveryState.DELIVERED, None
    elif retry_at is not None:
        state, next_at = DeliveryState.RETRY, retry_at
    else:
        state, next_at = DeliveryState.FAILED, None
    n = conn.execute(
        sa.update(deliveries)
        .where(deliveries.c.id == delivery_id)
        .values(
            state=state.value,
            attempts=deliveries.c.attempts + 1,
            next_attempt_at=next_at,
            last_status=status,
            updated_at=at,
        )
    ).rowcount
    if n != 1:
        raise LookupError(f"delivery {delivery_id} does not exist (purged?); nothing recorded")
    return state


def resend(conn: Connection, study_uid: str, *, at: datetime) -> int:
    """Every delivery of the study's latest result back to pending, attempts reset."""
    sid = conn.execute(
        sa.select(studies.c.id).where(studies.c.study_uid == study_uid)
    ).scalar_one_or_none()
    if sid is None:
        return 0
    rid = conn.execute(
        sa.select(sa.func.max(results.c.id)).where(results.c.study_id == sid)
    ).scalar()
    if rid is None:
        return 0
    return int(
        conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.result_id == rid)
            .values(
                state=DeliveryState.PENDING.value,
                attempts=0,
                next_attempt_at=None,
                last_status="resend requested",
                updated_at=at,
            )
        ).rowcount
    )
