"""The study queue: the ONLY module that writes ``studies.state``.

Every state change goes through :meth:`Queue._transition`, a compare-and-set
(``UPDATE studies SET state = :new ... WHERE id = :id AND state = :expected``) that checks the row it
changed and writes an ``events`` row in the same transaction. Two workers can therefore never both win a
study, on either backend:

- PostgreSQL: candidates are selected ``FOR UPDATE SKIP LOCKED`` (workers do not even wait on each
  other), and the compare-and-set is the final word.
- SQLite: SQLAlchemy silently drops ``SKIP LOCKED``; write transactions start with ``BEGIN IMMEDIATE``
  (see :mod:`db.engine`) so they are serialised, and the compare-and-set is what makes claiming correct.

Times come from the caller's clock (``now=``, default the current UTC time) so tests can move time;
with several machines, keep their clocks in sync (NTP) — a lease is only as good as the clocks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from db import deliveries as delivery_ops
from db import reads, retry
from db.config import QueueConfig
from db.deliveries import DeliveryState
from db.engine import is_retryable, lock_rows, make_engine, safe_url, translate_errors, unavailable
from db.errors import InvalidTransition, LeaseLost, QueueUnavailable
from db.records import (
    ClaimedStudy,
    DeliveryRow,
    EventRow,
    InstanceRow,
    StudyDetail,
    StudySummary,
)
from db.schema import deliveries_table
from db.schema import events_table as events
from db.schema import instances_table as instances
from db.schema import results_table as results
from db.schema import studies_table as studies

__all__ = [
    "ClaimedStudy",
    "DeliveryRow",
    "DeliveryState",
    "EventRow",
    "InstanceRow",
    "InvalidTransition",
    "LeaseLost",
    "Queue",
    "QueueUnavailable",
    "StudyDetail",
    "StudyState",
    "StudySummary",
    "TRANSITIONS",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class StudyState(StrEnum):
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

_CLEAR_LEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "heartbeat_at": None}


class _Duplicate(Exception):
    """The SOP Instance UID is already stored: roll the transaction back, answer False."""


class _Conflict(Exception):
    """A concurrent change won (row vanished, compare-and-set missed): run the transaction again."""


def _utcnow(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now={now.isoformat()} is naive: pass an aware datetime (UTC)")
    return now.astimezone(UTC)


def ignored_reason(rows: Sequence[Any]) -> str:
    """Why a study with no eligible instance is ignored, built from its instances, e.g.
    ``no chest radiograph: 1 instance(s), BodyPartExamined EXTREMITY``."""
    if not rows:
        return "no instances stored for this study"
    parts = sorted({(r.body_part or "(empty)") for r in rows})
    modalities = sorted({(r.modality or "(empty)") for r in rows})
    reasons = sorted({r.ineligible_reason for r in rows if r.ineligible_reason})
    text = (
        f"no chest radiograph: {len(rows)} instance(s), BodyPartExamined {', '.join(parts)}, "
        f"Modality {', '.join(modalities)}"
    )
    if reasons:
        text += f" ({'; '.join(reasons)})"
    return text if len(text) <= 1000 else text[:997] + "..."


class Queue:
    """The durable study queue. Thread-safe (one engine, pooled connections); one per process."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: float,
        max_attempts: int,
        retry_base_seconds: float = 30.0,
        retry_cap_seconds: float = 3600.0,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.engine = engine
        self.url = engine.url
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds
        self.retry_cap_seconds = retry_cap_seconds
        self._pg = engine.dialect.name == "postgresql"

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        lease_seconds: float,
        max_attempts: int,
        retry_base_seconds: float = 30.0,
        retry_cap_seconds: float = 3600.0,
    ) -> Queue:
        """A queue on ``sqlite:///PATH`` or ``postgresql+psycopg://...``. The schema must exist
        (:func:`db.migrate.upgrade`). ``retry_base_seconds``: the first delay after a retryable
        analysis failure (doubled each attempt, capped at ``retry_cap_seconds``)."""
        return cls(
            make_engine(url),
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            retry_base_seconds=retry_base_seconds,
            retry_cap_seconds=retry_cap_seconds,
        )

    @classmethod
    def from_config(cls, cfg: QueueConfig, *, retry_base_seconds: float = 30.0) -> Queue:
        """A queue for the ``queue:`` section of config.yaml (the caller applies CXR_DATABASE_URL)."""
        return cls.from_url(
            cfg.database_url,
            lease_seconds=cfg.lease_seconds,
            max_attempts=cfg.max_attempts,
            retry_base_seconds=retry_base_seconds,
        )

    def check_schema(self) -> str:
        """The database's schema revision; raises :class:`QueueUnavailable` saying what to run when
        it is missing or not the one this code expects (call it once at start-up)."""
        from alembic.runtime.migration import MigrationContext

        from db.migrate import head_revision

        have = self._read(lambda c: MigrationContext.configure(c).get_current_revision())
        want = head_revision()
        if have != want:
            raise QueueUnavailable(
                f"study queue database {safe_url(self.url)} is at schema revision {have or 'none (empty)'} "
                f"but this version needs {want}: run `cxr-worker db upgrade` (back up the database first)"
            )
        return have

    def close(self) -> None:
        """Close pooled connections (the queue can still be used; it reconnects)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Queue({safe_url(self.url)!r})"

    # ------------------------------------------------------------------ plumbing

    def _write(self, fn: Callable[[Connection], T], *, tries: int = 3) -> T:
        """Run ``fn`` in one write transaction; retried on PostgreSQL deadlock/serialization
        failure and on :class:`_Conflict`; connection failures become :class:`QueueUnavailable`."""
        for attempt in range(1, tries + 1):
            try:
                with translate_errors(self.url), self.engine.begin() as conn:
                    return fn(conn)
            except (exc.OperationalError, _Conflict) as e:
                if isinstance(e, exc.OperationalError) and not is_retryable(e):
                    raise unavailable(e, self.url) from e
                if attempt == tries:
                    if isinstance(e, _Conflict):
                        raise QueueUnavailable(
                            f"study queue {safe_url(self.url)}: {e}; gave up after {tries} tries, retry later"
                        ) from e
                    raise unavailable(e, self.url) from e
                log.debug("transaction conflict (%s), retrying (%d/%d)", e, attempt, tries)
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with translate_errors(self.url), self.engine.connect() as conn:
            conn = conn.execution_options(cxr_readonly=True)
            with conn.begin():
                return fn(conn)

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table) if self._pg else sqlite.insert(table)

    def _transition(
        self,
        conn: Connection,
        study_id: int,
        expected: StudyState,
        new: StudyState,
        *,
        actor: str,
        reason: str | Callable[[Any], str],
        now: datetime,
        values: dict[str, Any] | None = None,
        where: Iterable[sa.ColumnElement[bool]] = (),
    ) -> Any | None:
        """Compare-and-set ``expected -> new`` plus an event row. Returns the changed row
        (id, study_uid, attempts, previous_report_uid, lease_expires_at) or None if another
        transaction got there first. ``reason`` may be a function of that row."""
        if (expected, new) not in TRANSITIONS:
            raise InvalidTransition(
                f"study {study_id}: {expected} -> {new} is not an allowed transition"
            )
        stmt = (
            sa.update(studies)
            .where(studies.c.id == study_id, studies.c.state == expected.value, *where)
            .values(state=new.value, updated_at=now, **(values or {}))
            .returning(
                studies.c.id,
                studies.c.study_uid,
                studies.c.attempts,
                studies.c.previous_report_uid,
                studies.c.lease_expires_at,
            )
        )
        if not callable(reason):
            stmt = stmt.values(state_reason=reason)
        row = conn.execute(stmt).first()
        if row is None:
            return None
        text = reason(row) if callable(reason) else reason
        if callable(reason):
            conn.execute(
                sa.update(studies).where(studies.c.id == study_id).values(state_reason=text)
            )
        conn.execute(
            sa.insert(events).values(
                study_id=study_id,
                at=now,
                from_state=expected.value,
                to_state=new.value,
                reason=text,
                actor=actor,
            )
        )
        log.info(
            "study %s (%s): %s -> %s by %s: %s", study_id, row.study_uid, expected, new, actor, text
        )
        return row

    def _held(self, conn: Connection, study_id: int, worker_id: str, *, lock: bool = True) -> Any:
        """The study row if ``worker_id`` holds it (state processing, lease_owner), else LeaseLost.
        An expired lease that no sweep has taken back yet is still held: no one else can have it."""
        stmt = sa.select(studies).where(studies.c.id == study_id)
        row = conn.execute(lock_rows(conn, stmt) if lock else stmt).first()
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

    def _latest_report_uid(self, conn: Connection, study_id: int) -> str | None:
        return conn.execute(
            sa.select(results.c.report_sop_instance_uid)
            .where(results.c.study_id == study_id, results.c.report_sop_instance_uid.is_not(None))
            .order_by(results.c.id.desc())
            .limit(1)
        ).scalar_one_or_none()

    # ------------------------------------------------------------------ receiving

    def record_instance(
        self,
        *,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        transfer_syntax_uid: str,
        modality: str | None,
        body_part: str | None,
        view_position: str | None,
        eligible: bool,
        ineligible_reason: str | None,
        rel_path: str,
        size_bytes: int,
        calling_ae: str | None,
        now: datetime | None = None,
    ) -> bool:
        """Store one received instance. True if it is new, False if this SOP Instance UID was already
        stored (nothing is changed then). Creates the study (``receiving``) if needed and reacts to
        its state: ready -> receiving; done/failed -> receiving (reopened; a done study remembers its
        last report as ``previous_report_uid``); ignored -> receiving if this instance is eligible;
        processing -> ``needs_reanalysis``. Safe under concurrent calls from many processes."""
        at = _utcnow(now)
        inst = {
            "sop_instance_uid": sop_instance_uid,
            "sop_class_uid": sop_class_uid,
            "series_uid": series_uid,
            "transfer_syntax_uid": transfer_syntax_uid,
            "modality": modality,
            "body_part": body_part,
            "view_position": view_position,
            "rel_path": rel_path,
            "size_bytes": size_bytes,
            "eligible": eligible,
            "ineligible_reason": ineligible_reason,
            "calling_ae": calling_ae,
            "received_at": at,
        }
        for attempt in range(1, 4):
            try:
                return self._write(lambda conn: self._record(conn, study_uid, inst, at))
            except _Duplicate:
                log.info("instance %s already stored: not recorded twice", sop_instance_uid)
                return False
            except exc.IntegrityError as e:
                # A concurrent insert of the same study or instance won a race the ON CONFLICT clauses
                # did not cover: the next try sees the committed row.
                if attempt == 3:
                    raise QueueUnavailable(
                        f"could not record instance {sop_instance_uid} of study {study_uid}: {e.orig}"
                    ) from e
                log.debug("integrity race recording %s, retrying: %s", sop_instance_uid, e.orig)
        raise AssertionError("unreachable")

    def _record(self, conn: Connection, study_uid: str, inst: dict[str, Any], at: datetime) -> bool:
        created_id = conn.execute(
            self._insert(studies)
            .values(
                study_uid=study_uid,
                state=S.RECEIVING.value,
                state_reason="receiving instances",
                attempts=0,
                reopened_count=0,
                needs_reanalysis=False,
                first_instance_at=at,
                last_instance_at=at,
                created_at=at,
                updated_at=at,
            )
            .on_conflict_do_nothing(index_elements=["study_uid"])
            .returning(studies.c.id)
        ).scalar_one_or_none()
        if created_id is not None:
            study_id, state = created_id, None
        else:
            row = conn.execute(
                lock_rows(
                    conn,
                    sa.select(studies.c.id, studies.c.state).where(
                        studies.c.study_uid == study_uid
                    ),
                )
            ).first()
            if row is None:
                raise _Conflict(f"study {study_uid} vanished while recording an instance (purged)")
            study_id, state = row.id, S(row.state)

        inserted = conn.execute(
            self._insert(instances)
            .values(study_id=study_id, **inst)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(instances.c.id)
        ).scalar_one_or_none()
        if inserted is None:
            raise _Duplicate()

        if state is None:
            conn.execute(
                sa.insert(events).values(
                    study_id=study_id,
                    at=at,
                    from_state=None,
                    to_state=S.RECEIVING.value,
                    reason="first instance received",
                    actor="scp",
                )
            )
            log.info("study %s (%s): new, receiving", study_id, study_uid)
            return True

        bump: dict[str, Any] = {"last_instance_at": at}
        new_episode = {**bump, "first_instance_at": at, "ready_at": None, "finished_at": None}
        new_episode["reopened_count"] = studies.c.reopened_count + 1
        ok: Any = True
        if state == S.RECEIVING:
            conn.execute(
                sa.update(studies).where(studies.c.id == study_id).values(updated_at=at, **bump)
            )
        elif state == S.PROCESSING:
            conn.execute(
                sa.update(studies)
                .where(studies.c.id == study_id)
                .values(needs_reanalysis=True, updated_at=at, **bump)
            )
            log.info(
                "study %s (%s): instance arrived during analysis; will re-analyse",
                study_id,
                study_uid,
            )
        elif state == S.READY:
            ok = self._transition(
                conn,
                study_id,
                S.READY,
                S.RECEIVING,
                actor="scp",
                now=at,
                reason="another instance arrived: waiting for the study to be quiet again",
                values={**bump, "ready_at": None},
            )
        elif state == S.DONE:
            ok = self._transition(
                conn,
                study_id,
                S.DONE,
                S.RECEIVING,
                actor="scp",
                now=at,
                reason="reopened: an instance arrived after the report; the next report replaces it",
                values={
                    **new_episode,
                    "attempts": 0,
                    "previous_report_uid": self._latest_report_uid(conn, study_id),
                },
            )
        elif state == S.FAILED:
            ok = self._transition(
                conn,
                study_id,
                S.FAILED,
                S.RECEIVING,
                actor="scp",
                now=at,
                reason="reopened: new instance after failure (attempts reset)",
                values={**new_episode, "attempts": 0},
            )
        elif state == S.IGNORED and inst["eligible"]:
            ok = self._transition(
                conn,
                study_id,
                S.IGNORED,
                S.RECEIVING,
                actor="scp",
                now=at,
                reason="reopened: an eligible instance arrived",
                values={**new_episode, "attempts": 0},
            )
        else:  # ignored, and this instance changes nothing
            conn.execute(
                sa.update(studies).where(studies.c.id == study_id).values(updated_at=at, **bump)
            )
        if ok is None:
            raise _Conflict(f"study {study_uid} changed state while recording an instance")
        return True

    def instance_exists(self, sop_instance_uid: str) -> bool:
        """True if this SOP Instance UID is already stored."""
        return self._read(
            lambda c: (
                c.execute(
                    sa.select(instances.c.id).where(
                        instances.c.sop_instance_uid == sop_instance_uid
                    )
                ).first()
                is not None
            )
        )

    def sweep_completion(
        self,
        *,
        quiet_seconds: float,
        max_wait_seconds: float,
        now: datetime | None = None,
        limit: int = 500,
    ) -> int:
        """Receiving studies with no instance for ``quiet_seconds``, or whose first instance is older
        than ``max_wait_seconds``, become ``ready`` (or ``ignored`` with a reason when none of their
        instances is eligible). Returns how many studies changed."""
        at = _utcnow(now)
        quiet_before = at - timedelta(seconds=quiet_seconds)
        wait_before = at - timedelta(seconds=max_wait_seconds)

        def run(conn: Connection) -> int:
            rows = conn.execute(
                lock_rows(
                    conn,
                    sa.select(studies.c.id, studies.c.last_instance_at, studies.c.first_instance_at)
                    .where(
                        studies.c.state == S.RECEIVING.value,
                        sa.or_(
                            studies.c.last_instance_at <= quiet_before,
                            studies.c.first_instance_at <= wait_before,
                        ),
                    )
                    .order_by(studies.c.id)
                    .limit(limit),
                    skip_locked=True,
                )
            ).all()
            changed = 0
            for r in rows:
                insts = conn.execute(
                    sa.select(
                        instances.c.eligible,
                        instances.c.body_part,
                        instances.c.modality,
                        instances.c.ineligible_reason,
                    ).where(instances.c.study_id == r.id)
                ).all()
                if any(i.eligible for i in insts):
                    why = (
                        f"complete: no new instance for {quiet_seconds:g}s ({len(insts)} instance(s))"
                        if r.last_instance_at <= quiet_before
                        else f"complete: {max_wait_seconds:g}s since the first instance ({len(insts)} instance(s))"
                    )
                    done = self._transition(
                        conn,
                        r.id,
                        S.RECEIVING,
                        S.READY,
                        actor="scheduler",
                        now=at,
                        reason=why,
                        values={"ready_at": at},
                    )
                else:
                    done = self._transition(
                        conn,
                        r.id,
                        S.RECEIVING,
                        S.IGNORED,
                        actor="scheduler",
                        now=at,
                        reason=ignored_reason(insts),
                        values={"finished_at": at},
                    )
                changed += done is not None
            return changed

        return self._write(run)

    # ------------------------------------------------------------------ working

    def claim(
        self, worker_id: str, *, limit: int = 1, now: datetime | None = None
    ) -> list[ClaimedStudy]:
        """Take up to ``limit`` ready studies (oldest first) for ``worker_id``; each is held until
        ``now + lease_seconds`` unless heartbeats extend it. Counts an attempt."""
        if limit < 1:
            return []
        at = _utcnow(now)
        until = at + self.lease

        def run(conn: Connection) -> list[ClaimedStudy]:
            ids = (
                conn.execute(
                    lock_rows(
                        conn,
                        sa.select(studies.c.id)
                        .where(
                            studies.c.state == S.READY.value,
                            sa.or_(studies.c.ready_at.is_(None), studies.c.ready_at <= at),
                        )
                        .order_by(studies.c.ready_at, studies.c.id)
                        .limit(limit),
                        skip_locked=True,
                    )
                )
                .scalars()
                .all()
            )
            won = []
            for sid in ids:
                row = self._transition(
                    conn,
                    sid,
                    S.READY,
                    S.PROCESSING,
                    actor=worker_id,
                    now=at,
                    reason=lambda r: (
                        f"claimed by {worker_id} (attempt {r.attempts} of {self.max_attempts})"
                    ),
                    values={
                        "lease_owner": worker_id,
                        "lease_expires_at": until,
                        "heartbeat_at": at,
                        "claimed_at": at,
                        "attempts": studies.c.attempts + 1,
                        "needs_reanalysis": False,
                    },
                )
                if row is not None:
                    won.append(row)
            if not won:
                return []
            insts = conn.execute(
                sa.select(instances)
                .where(instances.c.study_id.in_([r.id for r in won]))
                .order_by(instances.c.study_id, instances.c.id)
            ).all()
            by_study: dict[int, list[InstanceRow]] = {}
            for i in insts:
                by_study.setdefault(i.study_id, []).append(reads.instance_row(i))
            return [
                ClaimedStudy(
                    id=r.id,
                    study_uid=r.study_uid,
                    attempts=r.attempts,
                    previous_report_uid=r.previous_report_uid,
                    lease_expires_at=r.lease_expires_at,
                    instances=by_study.get(r.id, []),
                )
                for r in won
            ]

        return self._write(run)

    def heartbeat(
        self, worker_id: str, study_ids: Sequence[int], now: datetime | None = None
    ) -> list[int]:
        """Extend the leases ``worker_id`` still holds; returns those ids (others were lost)."""
        if not study_ids:
            return []
        at = _utcnow(now)

        def run(conn: Connection) -> list[int]:
            held = (
                conn.execute(
                    sa.update(studies)
                    .where(
                        studies.c.id.in_(sorted(set(study_ids))),
                        studies.c.state == S.PROCESSING.value,
                        studies.c.lease_owner == worker_id,
                    )
                    .values(heartbeat_at=at, lease_expires_at=at + self.lease, updated_at=at)
                    .returning(studies.c.id)
                )
                .scalars()
                .all()
            )
            return sorted(held)

        held = self._write(run)
        lost = set(study_ids) - set(held)
        if lost:
            log.warning("worker %s lost the lease on studies %s", worker_id, sorted(lost))
        return held

    def complete(
        self,
        study_id: int,
        worker_id: str,
        *,
        result_payload: dict[str, Any],
        report_sop_instance_uid: str | None = None,
        report_path: str | None = None,
        deliveries: Sequence[tuple[str, str, str, str]] = (),
        now: datetime | None = None,
    ) -> int:
        """Store the result, supersede earlier ones, queue one pending delivery per
        ``(destination, sop_instance_uid, sop_class_uid, path)``, and move the study to ``done``
        (or back to ``receiving`` if instances arrived during the analysis; the stored report then
        becomes the predecessor of the next). One transaction. Returns the result id.
        Raises :class:`LeaseLost` if ``worker_id`` no longer holds the study."""
        at = _utcnow(now)
        try:
            json.dumps(result_payload, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"study {study_id}: result_payload is not plain JSON ({e}); nothing was stored"
            ) from e

        def run(conn: Connection) -> int:
            row = self._held(conn, study_id, worker_id)
            conn.execute(
                sa.update(results)
                .where(results.c.study_id == study_id, results.c.superseded.is_(False))
                .values(superseded=True)
            )
            result_id = conn.execute(
                sa.insert(results)
                .values(
                    study_id=study_id,
                    created_at=at,
                    payload=result_payload,
                    report_sop_instance_uid=report_sop_instance_uid,
                    report_path=report_path,
                    superseded=False,
                )
                .returning(results.c.id)
            ).scalar_one()
            if deliveries:
                conn.execute(
                    sa.insert(deliveries_table),
                    [
                        {
                            "study_id": study_id,
                            "result_id": result_id,
                            "destination": dest,
                            "sop_instance_uid": uid,
                            "sop_class_uid": cls_uid,
                            "path": path,
                            "state": DeliveryState.PENDING.value,
                            "attempts": 0,
                            "next_attempt_at": None,
                            "last_status": None,
                            "updated_at": at,
                        }
                        for dest, uid, cls_uid, path in deliveries
                    ],
                )
            held = [studies.c.lease_owner == worker_id]
            if row.needs_reanalysis:
                moved = self._transition(
                    conn,
                    study_id,
                    S.PROCESSING,
                    S.RECEIVING,
                    actor=worker_id,
                    now=at,
                    where=held,
                    reason=f"result {result_id} stored, but instances arrived during the analysis: re-analysing",
                    values={
                        **_CLEAR_LEASE,
                        "needs_reanalysis": False,
                        "first_instance_at": at,
                        "attempts": 0,
                        "previous_report_uid": report_sop_instance_uid or row.previous_report_uid,
                    },
                )
            else:
                moved = self._transition(
                    conn,
                    study_id,
                    S.PROCESSING,
                    S.DONE,
                    actor=worker_id,
                    now=at,
                    where=held,
                    reason=f"result {result_id} stored"
                    + (f", report {report_sop_instance_uid}" if report_sop_instance_uid else "")
                    + f", {len(deliveries)} delivery(ies) queued",
                    values={**_CLEAR_LEASE, "finished_at": at},
                )
            if moved is None:  # cannot happen while we hold the row lock / write lock
                raise LeaseLost(f"worker {worker_id} lost study {study_id} while completing it")
            return int(result_id)

        return self._write(run)

    def fail(
        self,
        study_id: int,
        worker_id: str,
        *,
        error: str,
        retryable: bool,
        now: datetime | None = None,
    ) -> StudyState:
        """Record a failed attempt: back to ``ready`` after a back-off delay if ``retryable`` and
        attempts remain, else ``failed`` with the error as reason. Returns the new state."""
        at = _utcnow(now)

        def run(conn: Connection) -> StudyState:
            row = self._held(conn, study_id, worker_id)
            delay = retry.decide(
                "transient" if retryable else "permanent",
                row.attempts,
                max_attempts=self.max_attempts,
                base_seconds=self.retry_base_seconds,
                cap_seconds=self.retry_cap_seconds,
            )
            held = [studies.c.lease_owner == worker_id]
            if delay is not None:
                new = S.READY
                moved = self._transition(
                    conn,
                    study_id,
                    S.PROCESSING,
                    S.READY,
                    actor=worker_id,
                    now=at,
                    where=held,
                    reason=f"attempt {row.attempts} of {self.max_attempts} failed: {error}; retry in {delay:g}s",
                    values={**_CLEAR_LEASE, "ready_at": at + timedelta(seconds=delay)},
                )
            else:
                new = S.FAILED
                why = (
                    f"failed after {row.attempts} attempt(s): {error}"
                    if retryable
                    else f"failed (not retryable): {error}"
                )
                moved = self._transition(
                    conn,
                    study_id,
                    S.PROCESSING,
                    S.FAILED,
                    actor=worker_id,
                    now=at,
                    where=held,
                    reason=why,
                    values={**_CLEAR_LEASE, "finished_at": at},
                )
            if moved is None:
                raise LeaseLost(f"worker {worker_id} lost study {study_id} while failing it")
            return new

        return self._write(run)

    def ignore(
        self, study_id: int, worker_id: str, reason: str, now: datetime | None = None
    ) -> None:
        """The worker found nothing it can analyse (e.g. no frontal view): processing -> ignored."""
        at = _utcnow(now)

        def run(conn: Connection) -> None:
            self._held(conn, study_id, worker_id)
            moved = self._transition(
                conn,
                study_id,
                S.PROCESSING,
                S.IGNORED,
                actor=worker_id,
                now=at,
                reason=reason,
                where=[studies.c.lease_owner == worker_id],
                values={**_CLEAR_LEASE, "finished_at": at},
            )
            if moved is None:
                raise LeaseLost(f"worker {worker_id} lost study {study_id} while ignoring it")

        self._write(run)

    def release(
        self,
        study_id: int,
        worker_id: str,
        reason: str = "released by the worker",
        now: datetime | None = None,
    ) -> None:
        """Give the study back to ``ready`` without counting the attempt (e.g. on shutdown)."""
        at = _utcnow(now)

        def run(conn: Connection) -> None:
            self._held(conn, study_id, worker_id)
            moved = self._transition(
                conn,
                study_id,
                S.PROCESSING,
                S.READY,
                actor=worker_id,
                now=at,
                reason=reason,
                where=[studies.c.lease_owner == worker_id],
                values={
                    **_CLEAR_LEASE,
                    "ready_at": at,
                    "attempts": sa.case((studies.c.attempts > 0, studies.c.attempts - 1), else_=0),
                },
            )
            if moved is None:
                raise LeaseLost(f"worker {worker_id} lost study {study_id} while releasing it")

        self._write(run)

    def sweep_leases(self, now: datetime | None = None, limit: int = 500) -> int:
        """Processing studies whose lease expired go back to ``ready`` (or ``failed`` once their
        attempts are used up). Returns how many were taken back."""
        at = _utcnow(now)

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
            n = 0
            for r in rows:
                expired = [studies.c.lease_expires_at < at]
                if r.attempts >= self.max_attempts:
                    moved = self._transition(
                        conn,
                        r.id,
                        S.PROCESSING,
                        S.FAILED,
                        actor="scheduler",
                        now=at,
                        where=expired,
                        reason=f"lease expired (worker {r.lease_owner}) after {r.attempts} attempt(s); giving up",
                        values={**_CLEAR_LEASE, "finished_at": at},
                    )
                else:
                    moved = self._transition(
                        conn,
                        r.id,
                        S.PROCESSING,
                        S.READY,
                        actor="scheduler",
                        now=at,
                        where=expired,
                        reason=f"lease expired (worker {r.lease_owner})",
                        values={**_CLEAR_LEASE, "ready_at": at},
                    )
                n += moved is not None
            return n

        return self._write(run)

    # ------------------------------------------------------------------ operator

    def requeue(self, study_uid: str, *, actor: str = "cli", now: datetime | None = None) -> bool:
        """A done/failed/ignored study goes back to ``ready`` with its attempts reset. False if the
        study does not exist or is not finished (receiving, ready and processing are left alone)."""
        at = _utcnow(now)

        def run(conn: Connection) -> bool:
            row = conn.execute(
                lock_rows(
                    conn,
                    sa.select(studies.c.id, studies.c.state).where(
                        studies.c.study_uid == study_uid
                    ),
                )
            ).first()
            if row is None or row.state not in REQUEUEABLE:
                return False
            return self._requeue(conn, row.id, S(row.state), actor, at)

        return self._write(run)

    def _requeue(
        self, conn: Connection, study_id: int, state: StudyState, actor: str, at: datetime
    ) -> bool:
        values: dict[str, Any] = {
            **_CLEAR_LEASE,
            "attempts": 0,
            "ready_at": at,
            "finished_at": None,
        }
        report = self._latest_report_uid(conn, study_id)
        if report is not None:
            values["previous_report_uid"] = report
        return (
            self._transition(
                conn,
                study_id,
                state,
                S.READY,
                actor=actor,
                now=at,
                values=values,
                reason=f"requeued by {actor} (was {state}; attempts reset)",
            )
            is not None
        )

    def requeue_failed(self, *, actor: str = "cli", now: datetime | None = None) -> int:
        """Every failed study goes back to ``ready`` with its attempts reset. Returns the count."""
        at = _utcnow(now)

        def run(conn: Connection) -> int:
            ids = (
                conn.execute(
                    lock_rows(
                        conn,
                        sa.select(studies.c.id)
                        .where(studies.c.state == S.FAILED.value)
                        .order_by(studies.c.id),
                    )
                )
                .scalars()
                .all()
            )
            return sum(self._requeue(conn, sid, S.FAILED, actor, at) for sid in ids)

        return self._write(run)

    # ------------------------------------------------------------------ reading (db/reads.py)

    def counts(self) -> dict[StudyState, int]:
        """Number of studies per state (every state present, zero included)."""
        raw = self._read(reads.counts)
        return {st: raw.get(st.value, 0) for st in StudyState}

    def latest(self, n: int = 10) -> list[StudySummary]:
        """The ``n`` most recently changed studies, newest first."""
        return self._read(lambda c: reads.latest(c, n))

    def study(self, study_uid: str) -> StudyDetail | None:
        """Everything known about one study (instances, results, deliveries, events), or None."""
        return self._read(lambda c: reads.study(c, study_uid))

    def events(self, study_uid: str) -> list[EventRow]:
        """The study's audit trail, oldest first (empty if the study is unknown)."""
        return self._read(lambda c: reads.study_events(c, study_uid))

    # ------------------------------------------------------------------ deliveries (db/deliveries.py)

    def due_deliveries(self, now: datetime | None = None, limit: int = 50) -> list[DeliveryRow]:
        """Pending or retry deliveries whose time has come, oldest first. They are handed out for
        ``lease_seconds`` (their ``next_attempt_at`` moves forward) so two senders never send the
        same object at once; :meth:`mark_delivery` records the outcome."""
        at = _utcnow(now)
        return self._write(lambda c: delivery_ops.due(c, at=at, limit=limit, hold=self.lease))

    def mark_delivery(
        self,
        delivery_id: int,
        *,
        delivered: bool,
        status: str,
        retry_at: datetime | None,
        now: datetime | None = None,
    ) -> None:
        """Record one send attempt: delivered; or not, to retry at ``retry_at``; or (``retry_at``
        None) failed for good. ``status`` is what the peer or the network said (``0x0000``,
        ``network: connection refused``). Raises LookupError for an unknown delivery id."""
        at = _utcnow(now)
        retry_at = None if retry_at is None else _utcnow(retry_at)
        state = self._write(
            lambda c: delivery_ops.mark(
                c, delivery_id, delivered=delivered, status=status, retry_at=retry_at, at=at
            )
        )
        log.info("delivery %s: %s (%s)", delivery_id, state, status)

    def resend(self, study_uid: str, now: datetime | None = None) -> int:
        """Put every delivery of the study's latest result back to pending. Returns how many."""
        at = _utcnow(now)
        return self._write(lambda c: delivery_ops.resend(c, study_uid, at=at))

    # ------------------------------------------------------------------ retention

    def purge(self, older_than: datetime, *, limit: int = 1000) -> list[str]:
        """Delete the rows of finished studies (done, ignored, failed) not changed since
        ``older_than`` and with no delivery still pending or retrying. Never touches receiving,
        ready or processing studies. Returns the purged study UIDs; the caller deletes their files."""
        cutoff = _utcnow(older_than)
        d = deliveries_table

        def run(conn: Connection) -> list[str]:
            open_delivery = (
                sa.select(d.c.id)
                .where(
                    d.c.study_id == studies.c.id,
                    d.c.state.in_([DeliveryState.PENDING.value, DeliveryState.RETRY.value]),
                )
                .exists()
            )
            rows = conn.execute(
                lock_rows(
                    conn,
                    sa.select(studies.c.id, studies.c.study_uid, studies.c.state)
                    .where(
                        studies.c.state.in_([s.value for s in FINISHED]),
                        studies.c.updated_at < cutoff,
                        ~open_delivery,
                    )
                    .order_by(studies.c.id)
                    .limit(limit),
                    skip_locked=True,
                )
            ).all()
            gone: list[str] = []
            for r in rows:
                for table in (deliveries_table, results, events, instances):
                    conn.execute(sa.delete(table).where(table.c.study_id == r.id))
                n = conn.execute(
                    sa.delete(studies).where(studies.c.id == r.id, studies.c.state == r.state)
                ).rowcount
                if n != 1:
                    raise _Conflict(f"study {r.study_uid} changed while purging it")
                gone.append(r.study_uid)
            if gone:
                log.info(
                    "purged %d finished study(ies) older than %s", len(gone), cutoff.isoformat()
                )
            return gone

        return self._write(run)
