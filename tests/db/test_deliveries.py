"""The delivery state machine: transition table, compare-and-set, one event row per change, and
the retry decided in the queue (db.retry.decide on a typed ErrorKind)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

from db import deliveries
from db.deliveries import DELIVERY_TRANSITIONS, DeliveryOutcome
from db.deliveries import DeliveryState as D
from db.errors import InvalidTransition
from db.queue import NewDelivery, Queue
from db.records import DeliveryRow
from db.retry import ErrorKind
from tests.db.conftest import LEASE, MAX_ATTEMPTS, at

SR = "1.2.840.10008.5.1.4.1.1.88.34"
SENT = DeliveryOutcome(True, "0x0000")


def _queued(queue: Queue, study_uid: str, dests: tuple[str, ...] = ("pacs",)) -> list[DeliveryRow]:
    """Claim and complete ``study_uid`` with one report delivery per destination."""
    [c] = queue.claim("w", now=at(40))
    queue.complete(
        c.id,
        "w",
        result_payload={},
        report_sop_instance_uid="2.25.42",
        deliveries=[NewDelivery(d, "2.25.42", SR, f"r/{d}.dcm") for d in dests],
        now=at(41),
    )
    d = queue.study(study_uid)
    assert d is not None
    return d.deliveries


def _trail(queue: Queue, delivery_id: int) -> list[tuple[str | None, str, str]]:
    return [(e.from_state, e.to_state, e.actor) for e in queue.delivery_events(delivery_id)]


def test_the_table() -> None:
    assert (None, D.PENDING) in DELIVERY_TRANSITIONS
    assert {t for f, t in DELIVERY_TRANSITIONS if f is None} == {D.PENDING}
    # Delivered and failed are final, except for an operator's resend.
    for final in (D.DELIVERED, D.FAILED):
        assert {t for f, t in DELIVERY_TRANSITIONS if f == final} == {D.PENDING}
    # Every state can be resent; every open state can end each way.
    assert all((s, D.PENDING) in DELIVERY_TRANSITIONS for s in D)
    for open_state in (D.PENDING, D.RETRY):
        for end in (D.DELIVERED, D.RETRY, D.FAILED):
            assert (open_state, end) in DELIVERY_TRANSITIONS
    assert deliveries.OPEN == ("pending", "retry")


def test_each_change_writes_one_event(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [row] = _queued(queue, s)
    assert _trail(queue, row.id) == [(None, "pending", "w")]
    [due] = queue.due_deliveries(now=at(50))
    assert _trail(queue, row.id) == [(None, "pending", "w")], "a hand-out is not a state change"
    refused = DeliveryOutcome(False, "network: connection refused", ErrorKind.NETWORK)
    assert queue.record_delivery(due.id, refused, attempts_so_far=0, now=at(51)) == D.RETRY
    [due] = queue.due_deliveries(now=at(81))
    assert queue.record_delivery(due.id, SENT, attempts_so_far=due.attempts, now=at(82)) == (
        D.DELIVERED
    )
    assert queue.resend(s, now=at(90)) == 1
    events = queue.delivery_events(row.id)
    assert [(e.from_state, e.to_state, e.actor) for e in events] == [
        (None, "pending", "w"),
        ("pending", "retry", "scheduler"),
        ("retry", "delivered", "scheduler"),
        ("delivered", "pending", "cli"),
    ]
    assert all(e.delivery_id == row.id for e in events)
    assert [e.at for e in events] == [at(41), at(51), at(82), at(90)]
    assert events[0].reason == "queued for pacs"
    assert events[1].reason == "not sent to pacs: network: connection refused; retry in 30s"
    assert events[2].reason == "sent to pacs: 0x0000"
    assert events[3].reason == "resend requested by cli"
    assert all(
        (None if e.from_state is None else D(e.from_state), D(e.to_state)) in DELIVERY_TRANSITIONS
        for e in events
    )
    # The study's own trail stays the study's: no delivery rows in it.
    assert [e.to_state for e in queue.events(s)] == ["receiving", "ready", "processing", "done"]
    assert queue.delivery_events(999999) == []


def test_illegal_transitions_raise_and_change_nothing(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [row] = _queued(queue, s)
    with queue.engine.begin() as conn:
        for frm, to in [(D.DELIVERED, D.RETRY), (D.FAILED, D.DELIVERED), (D.DELIVERED, D.FAILED)]:
            with pytest.raises(InvalidTransition, match=f"delivery {row.id}: {frm} -> {to}"):
                deliveries.transition(conn, row.id, frm, to, actor="t", reason="x", now=at(60))
    d = queue.study(s)
    assert d is not None and [x.state for x in d.deliveries] == ["pending"]
    assert len(queue.delivery_events(row.id)) == 1


def test_compare_and_set_loses_cleanly(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [row] = _queued(queue, s)
    with queue.engine.begin() as conn:
        # Allowed in the table, but the delivery is pending, not retry: nothing changes, no event.
        moved = deliveries.transition(
            conn, row.id, D.RETRY, D.DELIVERED, actor="t", reason="x", now=at(60)
        )
        assert moved is None
        # A delivery that does not exist loses the same way.
        assert (
            deliveries.transition(
                conn, 999999, D.PENDING, D.DELIVERED, actor="t", reason="x", now=at(60)
            )
            is None
        )
    d = queue.study(s)
    assert d is not None and [(x.state, x.attempts) for x in d.deliveries] == [("pending", 0)]
    assert len(queue.delivery_events(row.id)) == 1


def test_an_outcome_for_a_closed_delivery_changes_nothing(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    """Two senders (the first outlived its hand-out): the second outcome loses, no event."""
    s = ready_study(0)
    [row] = _queued(queue, s)
    assert queue.record_delivery(row.id, SENT, attempts_so_far=0, now=at(50)) == D.DELIVERED
    late = DeliveryOutcome(False, "0xA700", ErrorKind.RESOURCES)
    assert queue.record_delivery(row.id, late, attempts_so_far=0, now=at(51)) == D.DELIVERED
    d = queue.study(s)
    assert d is not None
    assert [(x.state, x.attempts, x.last_status) for x in d.deliveries] == [
        ("delivered", 1, "0x0000")
    ]
    assert len(queue.delivery_events(row.id)) == 2


@pytest.mark.parametrize("kind", [ErrorKind.REJECTED, ErrorKind.CONFIG, ErrorKind.INVALID])
def test_a_permanent_error_fails_at_once(
    queue: Queue, ready_study: Callable[..., str], kind: ErrorKind
) -> None:
    s = ready_study(0)
    [row] = _queued(queue, s)
    outcome = DeliveryOutcome(False, "destination 'x' is no longer in config.yaml", kind)
    assert queue.record_delivery(row.id, outcome, attempts_so_far=0, now=at(50)) == D.FAILED
    d = queue.study(s)
    assert d is not None and [(x.state, x.next_attempt_at) for x in d.deliveries] == [
        ("failed", None)
    ]
    assert queue.due_deliveries(now=at(10**6)) == []
    assert (queue.delivery_events(row.id)[-1].reason or "").endswith(f"giving up ({kind})")


def test_retries_back_off_then_give_up(migrated_url: str, ready_study: Callable[..., str]) -> None:
    q = Queue.from_url(
        migrated_url, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS, delivery_max_attempts=3
    )
    try:
        s = ready_study(0)
        [row] = _queued(q, s)
        busy = DeliveryOutcome(False, "association rejected: busy", ErrorKind.BUSY)
        states, next_at = [], []
        for attempts in range(3):
            states.append(q.record_delivery(row.id, busy, attempts_so_far=attempts, now=at(100)))
            d = q.study(s)
            assert d is not None
            next_at.append(d.deliveries[0].next_attempt_at)
        assert states == [D.RETRY, D.RETRY, D.FAILED]
        assert next_at == [at(130), at(160), None], "30 s, then 60 s, then give up"
        d = q.study(s)
        assert d is not None and d.deliveries[0].attempts == 3
    finally:
        q.close()


def test_a_failure_needs_a_kind() -> None:
    with pytest.raises(ValueError, match="needs a kind"):
        DeliveryOutcome(False, "network: connection refused")
    assert DeliveryOutcome(True, "0x0000").kind is None


def test_purge_removes_delivery_events(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [row] = _queued(queue, s)
    queue.record_delivery(row.id, SENT, attempts_so_far=0, now=at(50))
    assert queue.purge(at(10**7)) == [s]
    assert queue.delivery_events(row.id) == [] and queue.study(s) is None


def test_only_deliveries_module_writes_delivery_rows() -> None:
    """Guard the rule: no module but db/deliveries.py issues a deliveries UPDATE."""
    root = pathlib.Path(__file__).resolve().parents[2]
    files = [
        p
        for d in ("worker", "dicom_node", "models", "db", "bench")
        for p in (root / d).rglob("*.py")
    ]
    offenders = [
        str(p.relative_to(root))
        for p in files
        if p.parts[-2:] != ("db", "deliveries.py")
        and any(
            w in p.read_text(errors="ignore").lower()
            for w in ("update deliveries", "update(deliveries", "update(delivery")
        )
    ]
    assert offenders == []


def test_schema_check_constraints_match_the_enums() -> None:
    from db.schema import DELIVERY_STATES, STUDY_STATES
    from db.states import StudyState

    assert set(DELIVERY_STATES) == {s.value for s in D}
    assert set(STUDY_STATES) == {s.value for s in StudyState}
