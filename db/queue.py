"""The study queue: one object the rest of the application talks to.

:class:`Queue` holds the engine and the policy (lease, attempts, back-off) and delegates every
operation to the module that owns it:

- :mod:`db.states`: the study state machine (transition table, compare-and-set + event row);
- :mod:`db.intake`: record received instances, the completion sweep;
- :mod:`db.leases`: claim, heartbeat, release, the lease sweep;
- :mod:`db.outcomes`: complete, fail, ignore;
- :mod:`db.deliveries`: the delivery state machine (hand-out, outcomes, resend);
- :mod:`db.operator`: requeue, resend, purge;
- :mod:`db.reads`: counts, latest, study, events.

Times come from the caller's clock (``now=``, default the current UTC time) so tests can move time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NotRequired, TypedDict, Unpack

from sqlalchemy.engine import Engine

from db import deliveries, intake, leases, migrate, operator, outcomes, reads
from db.config import QueueConfig
from db.deliveries import DELIVERY_TRANSITIONS, DeliveryOutcome, DeliveryState
from db.engine import Database, make_engine, safe_url
from db.errors import DatabaseNotReady, InvalidTransition, LeaseLost, QueueUnavailable
from db.intake import IncomingInstance
from db.records import (
    ClaimedStudy,
    DeliveryRow,
    DestinationState,
    EventRow,
    InstanceRow,
    NewDelivery,
    QueueSnapshot,
    StudyDetail,
    StudySummary,
)
from db.retry import ErrorKind
from db.states import TRANSITIONS, StudyState, utcnow

__all__ = [
    "DELIVERY_TRANSITIONS",
    "ClaimedStudy",
    "DatabaseNotReady",
    "DeliveryOutcome",
    "DeliveryRow",
    "DeliveryState",
    "DestinationState",
    "ErrorKind",
    "EventRow",
    "IncomingInstance",
    "InstanceRow",
    "InvalidTransition",
    "LeaseLost",
    "NewDelivery",
    "Queue",
    "QueueSnapshot",
    "QueueUnavailable",
    "StudyDetail",
    "StudyState",
    "StudySummary",
    "TRANSITIONS",
]


class QueueOptions(TypedDict):
    """The policy of a :class:`Queue` (its constructor's keyword arguments)."""

    lease_seconds: float
    max_attempts: int
    retry_base_seconds: NotRequired[float]
    retry_cap_seconds: NotRequired[float]
    delivery_max_attempts: NotRequired[int]


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
        delivery_max_attempts: int = 5,
    ) -> None:
        """``retry_base_seconds``: the first delay after a retryable analysis failure (doubled
        each attempt, capped at ``retry_cap_seconds``). ``delivery_max_attempts``: sends of one
        object to one destination before the delivery is failed."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        for name, n in (
            ("max_attempts", max_attempts),
            ("delivery_max_attempts", delivery_max_attempts),
        ):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        self._db = Database(engine)
        self.engine = engine
        self.url = engine.url
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds
        self.retry_cap_seconds = retry_cap_seconds
        self.delivery_max_attempts = delivery_max_attempts

    @classmethod
    def from_url(cls, url: str, **options: Unpack[QueueOptions]) -> Queue:
        """A queue on ``sqlite:///PATH`` or ``postgresql+psycopg://...``. The schema must exist
        (:func:`db.migrate.upgrade`; :meth:`from_config` checks it)."""
        return cls(make_engine(url), **options)

    @classmethod
    def from_config(
        cls,
        cfg: QueueConfig,
        *,
        upgrade_empty: bool = False,
        delivery_max_attempts: int = 5,
        retry_base_seconds: float = 30.0,
    ) -> Queue:
        """A queue for the ``queue:`` section of config.yaml (the caller applies
        CXR_DATABASE_URL), on a database at the newest schema: an empty one is migrated when
        ``upgrade_empty``, else :class:`DatabaseNotReady`; an out-of-date one is refused."""
        migrate.ensure_ready(cfg.database_url, upgrade_empty=upgrade_empty)
        return cls.from_url(
            cfg.database_url,
            lease_seconds=cfg.lease_seconds,
            max_attempts=cfg.max_attempts,
            retry_base_seconds=retry_base_seconds,
            delivery_max_attempts=delivery_max_attempts,
        )

    def check_schema(self) -> str:
        """The database's schema revision; raises :class:`QueueUnavailable` saying what to run
        when it is missing or not the one this code expects."""
        from alembic.runtime.migration import MigrationContext

        have = self._db.read(lambda c: MigrationContext.configure(c).get_current_revision())
        want = migrate.head_revision()
        if have != want:
            raise QueueUnavailable(
                f"study queue database {safe_url(self.url)} is at schema revision "
                f"{have or 'none (empty)'} but this version needs {want}: "
                "run `cxr-worker db upgrade` (back up the database first)"
            )
        return want

    def close(self) -> None:
        """Close pooled connections (the queue can still be used; it reconnects)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Queue({safe_url(self.url)!r})"

    # ------------------------------------------------------------------ receiving (db/intake.py)

    def record_instance(self, inst: IncomingInstance) -> bool:
        """Store one received instance; False if its SOP Instance UID was already stored."""
        return intake.record_instance(self._db, inst)

    def instance_exists(self, sop_instance_uid: str) -> bool:
        """True if this SOP Instance UID is already stored."""
        return intake.instance_exists(self._db, sop_instance_uid)

    def stored_rel_path(self, sop_instance_uid: str) -> str | None:
        """The stored file of this SOP Instance UID (relative to the storage folder), or None."""
        return intake.stored_rel_path(self._db, sop_instance_uid)

    def stored_rel_paths(self, sop_instance_uids: Sequence[str]) -> dict[str, str]:
        """``{SOP Instance UID: rel_path}`` of those UIDs that have a row (batched)."""
        return intake.stored_rel_paths(self._db, sop_instance_uids)

    def record_conflict(self, sop_instance_uid: str, detail: str) -> bool:
        """Flag the study holding this SOP Instance UID (see :func:`db.intake.record_conflict`)."""
        return intake.record_conflict(self._db, sop_instance_uid, detail)

    def sweep_completion(
        self,
        *,
        quiet_seconds: float,
        max_wait_seconds: float,
        lateral_grace_seconds: float = 0.0,
        now: datetime | None = None,
        limit: int = 500,
    ) -> int:
        """Complete receiving studies become ready or ignored (quiet, a frontal whose lateral
        grace ran out, or max wait: :func:`db.intake.sweep_completion`); returns how many."""
        return intake.sweep_completion(
            self._db,
            quiet_seconds=quiet_seconds,
            max_wait_seconds=max_wait_seconds,
            lateral_grace_seconds=lateral_grace_seconds,
            now=now,
            limit=limit,
        )

    # ------------------------------------------------------------------ working (db/leases.py)

    def claim(
        self, worker_id: str, *, limit: int = 1, now: datetime | None = None
    ) -> list[ClaimedStudy]:
        """Take up to ``limit`` ready studies for ``worker_id`` (leased; counts an attempt)."""
        return leases.claim(
            self._db,
            worker_id,
            lease=self.lease,
            max_attempts=self.max_attempts,
            limit=limit,
            now=now,
        )

    def heartbeat(
        self, worker_id: str, study_ids: Sequence[int], now: datetime | None = None
    ) -> list[int]:
        """Extend the leases ``worker_id`` still holds; returns those ids (others were lost)."""
        return leases.heartbeat(self._db, worker_id, study_ids, lease=self.lease, now=now)

    def release(
        self,
        study_id: int,
        worker_id: str,
        reason: str = "released by the worker",
        now: datetime | None = None,
    ) -> None:
        """Give the study back to ``ready`` without counting the attempt (e.g. on shutdown)."""
        leases.release(self._db, study_id, worker_id, reason, now)

    def sweep_leases(self, now: datetime | None = None, limit: int = 500) -> int:
        """Studies whose lease expired go back to ready (or failed); returns how many."""
        return leases.sweep_leases(self._db, max_attempts=self.max_attempts, now=now, limit=limit)

    # ------------------------------------------------------------------ outcomes (db/outcomes.py)

    def complete(
        self,
        study_id: int,
        worker_id: str,
        *,
        result_payload: dict[str, Any],
        report_sop_instance_uid: str | None = None,
        report_path: str | None = None,
        deliveries: Sequence[NewDelivery] = (),
        now: datetime | None = None,
    ) -> int:
        """Store the result, queue its deliveries, and finish the study. Returns the result id."""
        return outcomes.complete(
            self._db,
            study_id,
            worker_id,
            result_payload=result_payload,
            report_sop_instance_uid=report_sop_instance_uid,
            report_path=report_path,
            new_deliveries=deliveries,
            now=now,
        )

    def fail(
        self,
        study_id: int,
        worker_id: str,
        *,
        error: str,
        kind: ErrorKind,
        now: datetime | None = None,
    ) -> StudyState:
        """Record a failed attempt (retried after a back-off if ``kind`` is retryable and
        attempts remain, else failed). Returns the new state."""
        return outcomes.fail(
            self._db,
            study_id,
            worker_id,
            error=error,
            kind=kind,
            max_attempts=self.max_attempts,
            retry_base_seconds=self.retry_base_seconds,
            retry_cap_seconds=self.retry_cap_seconds,
            now=now,
        )

    def ignore(
        self, study_id: int, worker_id: str, reason: str, now: datetime | None = None
    ) -> None:
        """The worker found nothing it can analyse (e.g. no frontal view): processing -> ignored."""
        outcomes.ignore(self._db, study_id, worker_id, reason, now)

    # ------------------------------------------------------------------ operator (db/operator.py)

    def requeue(self, study_uid: str, *, actor: str = "cli", now: datetime | None = None) -> bool:
        """A done/failed/ignored study goes back to ``ready``, attempts reset; False otherwise."""
        return operator.requeue(self._db, study_uid, actor=actor, now=now)

    def requeue_failed(self, *, actor: str = "cli", now: datetime | None = None) -> int:
        """Every failed study goes back to ``ready`` with its attempts reset. Returns the count."""
        return operator.requeue_failed(self._db, actor=actor, now=now)

    def resend(self, study_uid: str, now: datetime | None = None, *, actor: str = "cli") -> int:
        """Put every delivery of the study's latest result back to pending. Returns how many."""
        return operator.resend(self._db, study_uid, actor=actor, now=now)

    def purge(self, older_than: datetime, *, limit: int = 1000) -> list[str]:
        """Delete the rows of finished studies not changed since ``older_than`` (and with no open
        delivery). Returns the purged study UIDs; the caller deletes their files."""
        return operator.purge(self._db, older_than, limit=limit)

    # ------------------------------------------------------------------ reading (db/reads.py)

    def counts(self) -> dict[StudyState, int]:
        """Number of studies per state (every state present, zero included)."""
        raw = self._db.read(reads.counts)
        return {st: raw.get(st.value, 0) for st in StudyState}

    def latest(self, n: int = 10) -> list[StudySummary]:
        """The ``n`` most recently changed studies, newest first."""
        return self._db.read(lambda c: reads.latest(c, n))

    def study(self, study_uid: str) -> StudyDetail | None:
        """Everything known about one study (instances, results, deliveries, events), or None."""
        return self._db.read(lambda c: reads.study(c, study_uid))

    def history(self, study_uid: str) -> list[EventRow] | None:
        """The study's whole audit trail, its deliveries' events included, oldest first; None
        if the study is unknown."""
        return self._db.read(lambda c: reads.history(c, study_uid))

    def snapshot(self, now: datetime | None = None) -> QueueSnapshot:
        """Studies per state, the oldest ready study's age, deliveries per destination."""
        at = utcnow(now)
        return self._db.read(lambda c: reads.snapshot(c, at))

    def ping(self) -> str:
        """The schema revision, read from the database: proves it is reachable and current
        (:class:`QueueUnavailable` otherwise; see :meth:`check_schema`)."""
        return self.check_schema()

    def events(self, study_uid: str) -> list[EventRow]:
        """The study's audit trail, oldest first (empty if the study is unknown)."""
        return self._db.read(lambda c: reads.study_events(c, study_uid))

    def delivery_events(self, delivery_id: int) -> list[EventRow]:
        """One delivery's audit trail, oldest first (empty if the delivery is unknown)."""
        return self._db.read(lambda c: reads.delivery_events(c, delivery_id))

    # ------------------------------------------------------------------ deliveries

    def due_deliveries(self, now: datetime | None = None, limit: int = 50) -> list[DeliveryRow]:
        """Pending or retry deliveries whose time has come, oldest first, each handed out for
        ``lease_seconds``; :meth:`record_delivery` records the outcome."""
        return deliveries.due(self._db, now=now, limit=limit, hold=self.lease)

    def record_delivery(
        self,
        delivery_id: int,
        outcome: DeliveryOutcome,
        *,
        attempts_so_far: int,
        now: datetime | None = None,
    ) -> DeliveryState:
        """Record one send attempt; the queue decides retry or give-up (:func:`db.retry.decide`
        with ``delivery_max_attempts``). Returns the delivery's new state; LookupError for an
        unknown delivery id."""
        return deliveries.record(
            self._db,
            delivery_id,
            outcome,
            attempts_so_far=attempts_so_far,
            max_attempts=self.delivery_max_attempts,
            now=now,
        )
