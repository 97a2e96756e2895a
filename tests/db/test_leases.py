"""Claiming, leases, heartbeats, attempts and failure handling."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from db.queue import LeaseLost, Queue, StudyState
from db.retry import ErrorKind
from tests.db.conftest import LEASE, MAX_ATTEMPTS, add_instance, at, uid


def test_claim_sets_lease_and_counts_the_attempt(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [c] = queue.claim("worker-a", now=at(40))
    assert c.study_uid == s and c.attempts == 1 and c.previous_report_uid is None
    assert c.lease_expires_at == at(40 + LEASE)
    assert [i.view_position for i in c.instances] == ["PA"] and c.instances[0].rel_path.startswith(
        s
    )
    d = queue.study(s)
    assert d is not None
    assert (d.state, d.lease_owner, d.claimed_at, d.attempts) == (
        "processing",
        "worker-a",
        at(40),
        1,
    )
    assert queue.claim("worker-b", now=at(41)) == []


def test_claim_oldest_first_and_limit(queue: Queue, ready_study: Callable[..., str]) -> None:
    uids = [ready_study(t) for t in (0, 10, 20)]
    got = queue.claim("w", limit=2, now=at(100))
    assert [c.study_uid for c in got] == uids[:2]
    assert [c.study_uid for c in queue.claim("w", limit=5, now=at(100))] == uids[2:]
    assert queue.claim("w", limit=0, now=at(100)) == []


def test_two_queues_cannot_both_win(migrated_url: str, ready_study: Callable[..., str]) -> None:
    """Two independent engines (as two processes would have) race for one study."""
    ready_study(0)
    q1 = Queue.from_url(migrated_url, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS)
    q2 = Queue.from_url(migrated_url, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS)
    try:
        first = q1.claim("w1", now=at(40))
        second = q2.claim("w2", now=at(40))
        assert len(first) + len(second) == 1
    finally:
        q1.close()
        q2.close()


def test_heartbeat_extends_only_held_leases(queue: Queue, ready_study: Callable[..., str]) -> None:
    a, b = ready_study(0), ready_study(1)
    ca, cb = queue.claim("w1", limit=2, now=at(40))
    assert queue.heartbeat("w1", [ca.id, cb.id, 9999], now=at(70)) == sorted([ca.id, cb.id])
    assert queue.study(a).lease_expires_at == at(70 + LEASE)  # type: ignore[union-attr]
    assert queue.heartbeat("intruder", [ca.id], now=at(71)) == []
    assert queue.heartbeat("w1", [], now=at(71)) == []
    # A heartbeat keeps the sweep away.
    assert queue.sweep_leases(now=at(40 + LEASE + 1)) == 0
    assert queue.study(b).state == "processing"  # type: ignore[union-attr]


def test_expired_lease_returns_to_ready_then_fails_when_attempts_are_used(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    t = 40.0
    for attempt in range(1, MAX_ATTEMPTS + 1):
        [c] = queue.claim(f"w{attempt}", now=at(t))
        assert c.attempts == attempt
        assert queue.sweep_leases(now=at(t + LEASE - 1)) == 0, "not expired yet"
        assert queue.sweep_leases(now=at(t + LEASE + 1)) == 1
        t += LEASE + 2
    d = queue.study(s)
    assert d is not None and d.state == "failed" and d.lease_owner is None
    assert (
        d.state_reason
        == f"lease expired (worker w{MAX_ATTEMPTS}) after {MAX_ATTEMPTS} attempt(s); giving up"
    )
    reasons = [
        e.reason for e in d.events if e.actor == "scheduler" and e.from_state == "processing"
    ]
    assert reasons[0] == "lease expired (worker w1)"
    # The worker whose lease expired cannot complete any more.
    with pytest.raises(LeaseLost, match="no longer holds"):
        queue.complete(c.id, f"w{MAX_ATTEMPTS}", result_payload={}, now=at(t))


def test_expired_but_unswept_lease_may_still_complete(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [c] = queue.claim("w1", now=at(40))
    queue.complete(c.id, "w1", result_payload={"ok": True}, now=at(40 + LEASE + 5))
    assert queue.study(s).state == "done"  # type: ignore[union-attr]


def test_lease_lost_after_sweep_and_reclaim(queue: Queue, ready_study: Callable[..., str]) -> None:
    ready_study(0)
    [c] = queue.claim("slow", now=at(40))
    queue.sweep_leases(now=at(40 + LEASE + 1))
    [c2] = queue.claim("fast", now=at(40 + LEASE + 2))
    assert c2.id == c.id and c2.attempts == 2
    for call in (
        lambda: queue.complete(c.id, "slow", result_payload={}),
        lambda: queue.fail(c.id, "slow", error="x", kind=ErrorKind.TRANSIENT),
        lambda: queue.ignore(c.id, "slow", "x"),
        lambda: queue.release(c.id, "slow"),
    ):
        with pytest.raises(LeaseLost, match="held by fast"):
            call()
    assert queue.heartbeat("slow", [c.id]) == []


def test_retryable_failure_backs_off_then_gives_up(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [c] = queue.claim("w", now=at(40))
    assert (
        queue.fail(c.id, "w", error="CUDA error", kind=ErrorKind.TRANSIENT, now=at(41))
        == StudyState.READY
    )
    assert queue.study(s).ready_at == at(51)  # type: ignore[union-attr]  # base 10 s
    assert queue.claim("w", now=at(50)) == [], "not before the back-off delay"
    [c] = queue.claim("w", now=at(51))
    assert (
        queue.fail(c.id, "w", error="CUDA error", kind=ErrorKind.TRANSIENT, now=at(52))
        == StudyState.READY
    )
    assert queue.study(s).ready_at == at(72)  # type: ignore[union-attr]  # doubled
    [c] = queue.claim("w", now=at(72))
    assert c.attempts == MAX_ATTEMPTS
    assert (
        queue.fail(c.id, "w", error="CUDA error", kind=ErrorKind.TRANSIENT, now=at(73))
        == StudyState.FAILED
    )
    d = queue.study(s)
    assert (
        d is not None
        and d.state == "failed"
        and d.state_reason == "failed after 3 attempt(s): CUDA error"
    )


def test_permanent_failure_fails_at_once(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [c] = queue.claim("w", now=at(40))
    assert (
        queue.fail(c.id, "w", error="pixel data truncated", kind=ErrorKind.INVALID, now=at(41))
        == StudyState.FAILED
    )
    assert queue.study(s).state_reason == "failed (not retryable): pixel data truncated"  # type: ignore[union-attr]


def test_release_does_not_count_the_attempt(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [c] = queue.claim("w", now=at(40))
    queue.release(c.id, "w", reason="shutting down", now=at(41))
    d = queue.study(s)
    assert d is not None and (d.state, d.attempts, d.lease_owner) == ("ready", 0, None)
    [c] = queue.claim("w", now=at(42))
    assert c.attempts == 1


def test_requeue_rules(queue: Queue, ready_study: Callable[..., str]) -> None:
    done, failed, busy = ready_study(0), ready_study(1), ready_study(2)
    receiving = uid()
    add_instance(queue, receiving, now=at(3))
    claimed = {c.study_uid: c for c in queue.claim("w", limit=3, now=at(40))}
    queue.complete(
        claimed[done].id, "w", result_payload={}, report_sop_instance_uid="2.25.5", now=at(41)
    )
    queue.fail(claimed[failed].id, "w", error="boom", kind=ErrorKind.INVALID, now=at(42))
    assert not queue.requeue(busy), "processing studies are not requeued"
    assert not queue.requeue(receiving)
    assert not queue.requeue("1.2.3.4.404")
    assert queue.requeue(done, now=at(50))
    d = queue.study(done)
    assert d is not None and (d.state, d.attempts, d.previous_report_uid) == ("ready", 0, "2.25.5")
    assert d.events[-1].actor == "cli"
    assert queue.requeue_failed(now=at(51)) == 1
    assert queue.study(failed).state == "ready"  # type: ignore[union-attr]
    assert queue.requeue_failed(now=at(52)) == 0
