"""Receiving: record each stored instance against its study, and the completion sweep that turns a
quiet study ``ready`` (or ``ignored`` when nothing in it is eligible).

The queue does not import :mod:`dicom_node`: it reads the received instance through the structural
:class:`IncomingInstance` protocol, which ``dicom_node.sink.StoredInstance`` satisfies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from db.engine import Conflict, Database, insert_or_skip, lock_rows
from db.errors import QueueUnavailable
from db.records import EventRow
from db.schema import deliveries_table as deliveries
from db.schema import instances_table as instances
from db.schema import results_table as results
from db.schema import studies_table as studies
from db.states import StudyState, latest_report_uid, touch, transition, utcnow, write_event

log = logging.getLogger(__name__)
S = StudyState


class IncomingInstance(Protocol):
    """One received instance as stored on disk (``dicom_node.sink.StoredInstance``)."""

    @property
    def study_uid(self) -> str: ...
    @property
    def series_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def transfer_syntax_uid(self) -> str: ...
    @property
    def modality(self) -> str | None: ...
    @property
    def body_part(self) -> str | None: ...
    @property
    def view_position(self) -> str | None: ...
    @property
    def view(self) -> str | None: ...  # "frontal" | "lateral" | None, from the header
    @property
    def eligible(self) -> bool: ...
    @property
    def ineligible_reason(self) -> str | None: ...
    @property
    def rel_path(self) -> str: ...  # relative to dicom.storage_dir
    @property
    def size_bytes(self) -> int: ...
    @property
    def calling_ae(self) -> str: ...
    @property
    def received_at(self) -> datetime | None: ...  # None: now (the queue's clock)


#: The ``instances`` columns copied from the incoming record as they are.
_COPIED = (
    "sop_instance_uid",
    "sop_class_uid",
    "series_uid",
    "transfer_syntax_uid",
    "modality",
    "body_part",
    "view_position",
    "view",
    "rel_path",
    "size_bytes",
    "eligible",
    "ineligible_reason",
    "calling_ae",
)

#: Why a study that is not receiving goes back to ``receiving`` when an eligible image arrives.
_REOPEN_REASON = {
    S.READY: "another image arrived: waiting for the study to be quiet again",
    S.DONE: "reopened: an image arrived after the report; the next report replaces it",
    S.FAILED: "reopened: new image after failure (attempts reset)",
    S.IGNORED: "reopened: an eligible image arrived",
}
#: The ``ineligible_reason`` of an instance the queue recognises as one of its own results.
OWN_OUTPUT_REASON = "this worker's own output (a report or key image it sent), stored only"


class _Duplicate(Exception):
    """The SOP Instance UID is already stored: roll the transaction back, answer False."""


def record_instance(db: Database, inst: IncomingInstance) -> bool:
    """Store one received instance. True if it is new, False if this SOP Instance UID was already
    stored (nothing is changed then). Creates the study (``receiving``) if needed and reacts to
    its state (see :func:`_react`). Safe under concurrent calls from many processes."""
    at = utcnow(inst.received_at, "received_at")
    for attempt in range(1, 4):
        try:
            return db.write(lambda conn: _record(conn, inst, at))
        except _Duplicate:
            log.info("instance %s already stored: not recorded twice", inst.sop_instance_uid)
            return False
        except exc.IntegrityError as e:
            # A concurrent insert of the same study or instance won a race the ON CONFLICT
            # clauses did not cover: the next try sees the committed row.
            if attempt == 3:
                raise QueueUnavailable(
                    f"could not record instance {inst.sop_instance_uid} of study "
                    f"{inst.study_uid}: {e.orig}"
                ) from e
            log.debug("integrity race recording %s, retrying: %s", inst.sop_instance_uid, e.orig)
    raise AssertionError("unreachable")


def _record(conn: Connection, inst: IncomingInstance, at: datetime) -> bool:
    study_id, state = _study_for(conn, inst.study_uid, at)
    values = {c: getattr(inst, c) for c in _COPIED}
    own = state is not None and _is_own_output(conn, study_id, inst.sop_instance_uid)
    if own:
        values.update(eligible=False, ineligible_reason=OWN_OUTPUT_REASON)
    inserted = conn.execute(
        insert_or_skip(conn, instances)
        .values(study_id=study_id, received_at=at, **values)
        .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        .returning(instances.c.id)
    ).scalar_one_or_none()
    if inserted is None:
        raise _Duplicate()
    if state is None:
        created = EventRow(at, None, S.RECEIVING.value, "first instance received", "scp")
        write_event(conn, study_id, created)
        log.info("study %s (%s): new, receiving", study_id, inst.study_uid)
    elif own:
        log.info(
            "study %s (%s): own output %s came back; recorded, nothing reopened",
            study_id,
            inst.study_uid,
            inst.sop_instance_uid,
        )
    else:
        _react(conn, study_id, inst, state, at)
    return True


def _is_own_output(conn: Connection, study_id: int, sop_instance_uid: str) -> bool:
    """True when the SOP Instance UID is one of the study's own reports or delivered objects
    (the SCP recognises its outputs by their series; this catches those it cannot, e.g. after
    the AE title changed)."""
    report = sa.select(results.c.id).where(
        results.c.study_id == study_id, results.c.report_sop_instance_uid == sop_instance_uid
    )
    sent = sa.select(deliveries.c.id).where(
        deliveries.c.study_id == study_id, deliveries.c.sop_instance_uid == sop_instance_uid
    )
    return conn.execute(sa.union_all(report, sent).limit(1)).first() is not None


def _study_for(conn: Connection, study_uid: str, at: datetime) -> tuple[int, StudyState | None]:
    """The study's id and state, creating it (state None: just created) if it is new."""
    created_id = conn.execute(
        insert_or_skip(conn, studies)
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
        return created_id, None
    row = conn.execute(
        lock_rows(
            conn,
            sa.select(studies.c.id, studies.c.state).where(studies.c.study_uid == study_uid),
        )
    ).first()
    if row is None:
        raise Conflict(f"study {study_uid} vanished while recording an instance (purged)")
    return row.id, S(row.state)


def _react(
    conn: Connection, study_id: int, inst: IncomingInstance, state: StudyState, at: datetime
) -> None:
    """An instance arrived for an existing study. Receiving: activity noted (the study is still
    arriving, whatever the instance). Otherwise only an eligible image changes anything:
    processing -> ``needs_reanalysis``; ready -> receiving; done/failed/ignored -> receiving
    (reopened; a done study remembers its last report as ``previous_report_uid``). An instance
    that is not analysed (an SR, a presentation state, a PDF, a non-chest image...) is recorded
    and changes nothing: PACS that route whole studies send those after every change."""
    this_study = studies.c.id == study_id
    if state == S.RECEIVING:
        touch(conn, this_study, updated_at=at, last_instance_at=at)
        return
    if not inst.eligible:
        log.info(
            "study %s (%s) is %s: instance %s is not analysed (%s); nothing reopened",
            study_id,
            inst.study_uid,
            state,
            inst.sop_instance_uid,
            inst.ineligible_reason or "not eligible",
        )
        return
    if state == S.PROCESSING:
        touch(conn, this_study, needs_reanalysis=True, updated_at=at, last_instance_at=at)
        log.info(
            "study %s (%s): image arrived during analysis; will re-analyse",
            study_id,
            inst.study_uid,
        )
        return
    moved = transition(
        conn,
        study_id,
        state,
        S.RECEIVING,
        actor="scp",
        now=at,
        reason=_REOPEN_REASON[state],
        values=_reopen_values(conn, study_id, state, at),
    )
    if moved is None:
        raise Conflict(f"study {inst.study_uid} changed state while recording an instance")


def _reopen_values(
    conn: Connection, study_id: int, state: StudyState, at: datetime
) -> dict[str, Any]:
    """A ready study waits for quiet again; a finished one starts a new receiving episode
    (new max-wait clock, attempts reset)."""
    if state == S.READY:
        return {"last_instance_at": at, "ready_at": None}
    values: dict[str, Any] = {
        "last_instance_at": at,
        "first_instance_at": at,
        "ready_at": None,
        "finished_at": None,
        "reopened_count": studies.c.reopened_count + 1,
        "attempts": 0,
    }
    if state == S.DONE:
        values["previous_report_uid"] = latest_report_uid(conn, study_id)
    return values


def instance_exists(db: Database, sop_instance_uid: str) -> bool:
    """True if this SOP Instance UID is already stored."""
    stmt = sa.select(instances.c.id).where(instances.c.sop_instance_uid == sop_instance_uid)
    return db.read(lambda c: c.execute(stmt).first() is not None)


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


def _waiting_for_lateral() -> sa.ColumnElement[bool]:
    """The study has an eligible image its header calls frontal, and no eligible image that is,
    or may be, its lateral (a lateral, or an image whose header names no view: the pipeline's
    view classifier decides those)."""
    i = instances.c
    mine = sa.and_(i.study_id == studies.c.id, i.eligible.is_(True))
    frontal = sa.select(i.id).where(mine, i.view == "frontal").exists()
    partner = sa.select(i.id).where(mine, sa.or_(i.view == "lateral", i.view.is_(None))).exists()
    return sa.and_(frontal, ~partner)


def sweep_completion(
    db: Database,
    *,
    quiet_seconds: float,
    max_wait_seconds: float,
    lateral_grace_seconds: float = 0.0,
    now: datetime | None = None,
    limit: int = 500,
) -> int:
    """Receiving studies become ``ready`` (or ``ignored`` with a reason when none of their
    instances is eligible) when one of these holds:

    - no instance arrived for ``quiet_seconds``, and the study is not waiting for a lateral;
    - it is waiting for a lateral (a frontal and no lateral, see :func:`_waiting_for_lateral`)
      and no instance arrived for ``max(quiet_seconds, lateral_grace_seconds)``;
    - its first instance (of this receiving episode) is ``max_wait_seconds`` old, whatever else.

    Returns how many studies changed."""
    at = utcnow(now)
    quiet_before = at - timedelta(seconds=quiet_seconds)
    grace_before = at - timedelta(seconds=max(quiet_seconds, lateral_grace_seconds))
    wait_before = at - timedelta(seconds=max_wait_seconds)
    waiting = _waiting_for_lateral() if lateral_grace_seconds > quiet_seconds else sa.false()
    c = studies.c

    def run(conn: Connection) -> int:
        rows = conn.execute(
            lock_rows(
                conn,
                sa.select(c.id, c.last_instance_at, c.first_instance_at, waiting.label("waiting"))
                .where(
                    c.state == S.RECEIVING.value,
                    sa.or_(
                        c.first_instance_at <= wait_before,
                        c.last_instance_at <= grace_before,
                        sa.and_(c.last_instance_at <= quiet_before, ~waiting),
                    ),
                )
                .order_by(c.id)
                .limit(limit),
                skip_locked=True,
            )
        ).all()
        return sum(
            _complete_one(
                conn,
                r.id,
                at,
                _why_complete(r, at, quiet_seconds, lateral_grace_seconds, max_wait_seconds),
            )
            for r in rows
        )

    return db.write(run)


def _why_complete(r: sa.Row[Any], at: datetime, quiet: float, grace: float, max_wait: float) -> str:
    """The completion rule that applied to the row, in words (the event's reason)."""
    idle = (at - r.last_instance_at).total_seconds()
    if r.waiting and idle >= max(quiet, grace):
        return f"complete: a frontal and no lateral after the {grace:g}s lateral grace"
    if not r.waiting and idle >= quiet:
        return f"complete: no new instance for {quiet:g}s"
    return f"complete: {max_wait:g}s since the first instance"


def _complete_one(conn: Connection, study_id: int, at: datetime, why_ready: str) -> bool:
    """One receiving study found complete: ready, or ignored if nothing in it is eligible."""
    insts = conn.execute(
        sa.select(
            instances.c.eligible,
            instances.c.body_part,
            instances.c.modality,
            instances.c.ineligible_reason,
        ).where(instances.c.study_id == study_id)
    ).all()
    if any(i.eligible for i in insts):
        new, values = S.READY, {"ready_at": at}
        why = f"{why_ready} ({len(insts)} instance(s))"
    else:
        new, why, values = S.IGNORED, ignored_reason(insts), {"finished_at": at}
    moved = transition(
        conn, study_id, S.RECEIVING, new, actor="scheduler", now=at, reason=why, values=values
    )
    return moved is not None


def stored_rel_path(db: Database, sop_instance_uid: str) -> str | None:
    """Where the stored instance with this SOP Instance UID lies (relative to the storage
    folder), or None when it is not stored."""
    stmt = sa.select(instances.c.rel_path).where(instances.c.sop_instance_uid == sop_instance_uid)
    return db.read(lambda c: c.execute(stmt).scalar_one_or_none())


def stored_rel_paths(db: Database, sop_instance_uids: Sequence[str]) -> dict[str, str]:
    """``{SOP Instance UID: rel_path}`` for those of ``sop_instance_uids`` that have a row
    (the storage sweep's question, one folder at a time); asked in chunks of 500 on the unique
    index, so a large folder costs a few queries, not one per file."""
    uids = list(dict.fromkeys(sop_instance_uids))

    def run(conn: Connection) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(uids), 500):
            rows = conn.execute(
                sa.select(instances.c.sop_instance_uid, instances.c.rel_path).where(
                    instances.c.sop_instance_uid.in_(uids[start : start + 500])
                )
            )
            found.update((r.sop_instance_uid, r.rel_path) for r in rows)
        return found

    return db.read(run) if uids else {}


def record_conflict(db: Database, sop_instance_uid: str, detail: str) -> bool:
    """Flag the study holding ``sop_instance_uid``: an object with that SOP Instance UID and
    other content arrived (kept aside by the SCP; ``detail`` says where, never patient data).
    The flag is an event row (``history``) and the study's ``last_error`` (``status``); the
    state does not change. False when no stored instance has that UID."""

    def run(conn: Connection) -> bool:
        row = conn.execute(
            sa.select(studies.c.id, studies.c.state)
            .join(instances, instances.c.study_id == studies.c.id)
            .where(instances.c.sop_instance_uid == sop_instance_uid)
        ).first()
        if row is None:
            return False
        at = utcnow(None)
        reason = f"flagged: {detail}"
        write_event(conn, row.id, EventRow(at, row.state, row.state, reason, "scp"))
        touch(conn, studies.c.id == row.id, last_error=reason, last_error_at=at, updated_at=at)
        return True

    return db.write(run)
