"""How a claimed study ends: a stored result (``complete``), a failed attempt (``fail``, retried
after :func:`db.retry.decide`'s delay or failed for good) or nothing to analyse (``ignore``).

Each is one transaction by the worker that holds the study (else :class:`~db.errors.LeaseLost`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db import deliveries
from db.engine import Database
from db.records import NewDelivery
from db.retry import ErrorKind, decide
from db.sanitise import clean_error
from db.schema import results_table as results
from db.states import StudyState, hand_back, held, utcnow

S = StudyState


def complete(
    db: Database,
    study_id: int,
    worker_id: str,
    *,
    result_payload: dict[str, Any],
    report_sop_instance_uid: str | None = None,
    report_path: str | None = None,
    new_deliveries: Sequence[NewDelivery] = (),
    now: datetime | None = None,
) -> int:
    """Store the result, supersede earlier ones, queue one pending delivery per entry of
    ``new_deliveries``, and move the study to ``done`` (or back to ``receiving`` if instances
    arrived during the analysis; the stored report then becomes the predecessor of the next).
    One transaction. Returns the result id. Raises LeaseLost if ``worker_id`` no longer holds
    the study, ValueError (nothing stored) if the payload is not plain JSON."""
    at = utcnow(now)
    try:
        json.dumps(result_payload, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"study {study_id}: result_payload is not plain JSON ({e}); nothing was stored"
        ) from e

    def run(conn: Connection) -> int:
        row = held(conn, study_id, worker_id)
        result_id = _store_result(
            conn, study_id, result_payload, report_sop_instance_uid, report_path, at
        )
        deliveries.create(conn, study_id, result_id, new_deliveries, actor=worker_id, at=at)
        stored = f"result {result_id} stored"
        if row.needs_reanalysis:
            new = S.RECEIVING
            reason = f"{stored}, but instances arrived during the analysis: re-analysing"
            values = {
                "needs_reanalysis": False,
                "first_instance_at": at,
                "attempts": 0,
                "previous_report_uid": report_sop_instance_uid or row.previous_report_uid,
            }
        else:
            new, values = S.DONE, {"finished_at": at}
            report = f", report {report_sop_instance_uid}" if report_sop_instance_uid else ""
            # where it goes, not how far it got: `status` shows each destination's live state
            to = sorted({d.destination for d in new_deliveries})
            reason = f"{stored}{report}" + (f", for {', '.join(to)}" if to else "")
        hand_back(
            conn,
            study_id,
            worker_id,
            new,
            at=at,
            reason=reason,
            values=values,
            doing="completing",
        )
        return result_id

    return db.write(run)


def _store_result(
    conn: Connection,
    study_id: int,
    payload: dict[str, Any],
    report_sop_instance_uid: str | None,
    report_path: str | None,
    at: datetime,
) -> int:
    """Insert the study's new result; every earlier one becomes superseded."""
    conn.execute(
        sa.update(results)
        .where(results.c.study_id == study_id, results.c.superseded.is_(False))
        .values(superseded=True)
    )
    result_id: int = conn.execute(
        sa.insert(results)
        .values(
            study_id=study_id,
            created_at=at,
            payload=payload,
            report_sop_instance_uid=report_sop_instance_uid,
            report_path=report_path,
            superseded=False,
        )
        .returning(results.c.id)
    ).scalar_one()
    return result_id


def fail(
    db: Database,
    study_id: int,
    worker_id: str,
    *,
    error: str,
    kind: ErrorKind,
    max_attempts: int,
    retry_base_seconds: float,
    retry_cap_seconds: float,
    now: datetime | None = None,
) -> StudyState:
    """Record a failed attempt: back to ``ready`` after a back-off delay if ``kind`` is retryable
    and attempts remain, else ``failed`` with the error as reason. The error (cleaned by
    :func:`db.sanitise.clean_error`) is also kept as the study's ``last_error``. Returns the new
    state."""
    at = utcnow(now)
    error = clean_error(error)

    def run(conn: Connection) -> StudyState:
        row = held(conn, study_id, worker_id)
        delay = decide(
            kind,
            row.attempts,
            max_attempts=max_attempts,
            base_seconds=retry_base_seconds,
            cap_seconds=retry_cap_seconds,
        )
        if delay is not None:
            new, values = S.READY, {"ready_at": at + timedelta(seconds=delay)}
            why = f"attempt {row.attempts} of {max_attempts} failed: {error}; retry in {delay:g}s"
        elif kind.retryable:
            new, values = S.FAILED, {"finished_at": at}
            why = f"failed after {row.attempts} attempt(s): {error}"
        else:
            new, values = S.FAILED, {"finished_at": at}
            why = f"failed (not retryable): {error}"
        last: dict[str, Any] = {**values, "last_error": error, "last_error_at": at}
        hand_back(conn, study_id, worker_id, new, at=at, reason=why, values=last, doing="failing")
        return new

    return db.write(run)


def ignore(
    db: Database, study_id: int, worker_id: str, reason: str, now: datetime | None = None
) -> None:
    """The worker found nothing it can analyse (e.g. no frontal view): processing -> ignored."""
    at = utcnow(now)

    values = {"finished_at": at}
    db.write(
        lambda conn: hand_back(
            conn,
            study_id,
            worker_id,
            S.IGNORED,
            at=at,
            reason=reason,
            values=values,
            doing="ignoring",
        )
    )
