"""Results, deliveries and retention."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from db.queue import DeliveryOutcome, DeliveryState, NewDelivery, Queue
from db.retry import ErrorKind
from tests.db.conftest import add_instance, at, uid

SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
PAYLOAD = {"model1": {"abnormal": 0.83, "threshold": 0.5}, "versions": {"model1": "1.0"}, "qc": []}


def _done(q: Queue, s: str, t: float, report: str, dests: tuple[str, ...] = ("pacs",)) -> int:
    [c] = [c for c in q.claim("w", limit=10, now=at(t)) if c.study_uid == s]
    return q.complete(
        c.id,
        "w",
        result_payload=PAYLOAD,
        report_sop_instance_uid=report,
        report_path=f"results/{s}/{report}.dcm",
        deliveries=[NewDelivery(d, report, SR, f"results/{s}/{report}.dcm") for d in dests],
        now=at(t + 1),
    )


def test_complete_stores_result_and_pending_deliveries(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    rid = _done(queue, s, 40, "2.25.100", ("pacs", "archive"))
    d = queue.study(s)
    assert d is not None and d.state == "done" and d.finished_at == at(41) and d.lease_owner is None
    [r] = d.results
    assert (
        r.id == rid
        and r.payload == PAYLOAD
        and not r.superseded
        and r.report_sop_instance_uid == "2.25.100"
    )
    assert sorted((x.destination, x.state, x.attempts) for x in d.deliveries) == [
        ("archive", "pending", 0),
        ("pacs", "pending", 0),
    ]
    assert queue.latest(1)[0].deliveries == {"pending": 2}


def test_a_new_result_supersedes_the_old(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    first = _done(queue, s, 40, "2.25.1")
    add_instance(queue, s, now=at(100))
    queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(131))
    second = _done(queue, s, 140, "2.25.2")
    d = queue.study(s)
    assert d is not None
    assert [(r.id, r.superseded) for r in d.results] == [(first, True), (second, False)]
    assert d.previous_report_uid == "2.25.1"


def test_payload_must_be_json(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [c] = queue.claim("w", now=at(40))
    with pytest.raises(ValueError, match="not plain JSON"):
        queue.complete(c.id, "w", result_payload={"p": float("nan")}, now=at(41))
    assert queue.study(s).state == "processing"  # type: ignore[union-attr]


def test_delivery_lifecycle(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    _done(queue, s, 40, "2.25.9", ("pacs", "archive"))
    due = queue.due_deliveries(now=at(50), limit=10)
    assert sorted(x.destination for x in due) == ["archive", "pacs"] and due[0].study_uid == s
    assert queue.due_deliveries(now=at(51)) == [], "handed-out deliveries are not handed out twice"
    by = {x.destination: x for x in due}
    sent = DeliveryOutcome(True, "0x0000")
    refused = DeliveryOutcome(False, "network: connection refused", ErrorKind.NETWORK)
    assert (
        queue.record_delivery(by["pacs"].id, sent, attempts_so_far=0, now=at(52))
        == DeliveryState.DELIVERED
    )
    # The queue decides the retry: first failure of a network kind, 30 s back-off.
    assert (
        queue.record_delivery(by["archive"].id, refused, attempts_so_far=0, now=at(52))
        == DeliveryState.RETRY
    )
    assert queue.due_deliveries(now=at(81)) == []
    [again] = queue.due_deliveries(now=at(82))
    assert (again.destination, again.state, again.attempts, again.last_status) == (
        "archive",
        "retry",
        1,
        "network: connection refused",
    )
    rejected = DeliveryOutcome(False, "0xA900", ErrorKind.REJECTED)
    assert (
        queue.record_delivery(again.id, rejected, attempts_so_far=again.attempts, now=at(83))
        == DeliveryState.FAILED
    )
    assert queue.latest(1)[0].deliveries == {"delivered": 1, "failed": 1}
    assert queue.resend(s, now=at(200)) == 2
    assert {x.state for x in queue.study(s).deliveries} == {"pending"}  # type: ignore[union-attr]
    assert len(queue.due_deliveries(now=at(201))) == 2
    assert queue.resend("9.9.9") == 0
    with pytest.raises(LookupError, match="delivery 999999 does not exist"):
        queue.record_delivery(999999, sent, attempts_so_far=0)


def test_expired_delivery_handout_comes_back(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    _done(queue, s, 40, "2.25.10")
    assert len(queue.due_deliveries(now=at(50))) == 1
    # The sender died without marking it: after the lease it is due again.
    assert len(queue.due_deliveries(now=at(50 + 61))) == 1


def test_purge_keeps_active_studies(queue: Queue, ready_study: Callable[..., str]) -> None:
    ready, processing, done, undelivered = (ready_study(t) for t in (0, 1, 2, 3))
    claimed = {c.study_uid: c for c in queue.claim("w", limit=10, now=at(40))}
    assert len(claimed) == 4
    queue.release(claimed[ready].id, "w", now=at(41))
    queue.complete(claimed[done].id, "w", result_payload={}, now=at(41))
    queue.complete(
        claimed[undelivered].id,
        "w",
        result_payload={},
        deliveries=[NewDelivery("pacs", "2.25.11", SR, "x.dcm")],
        now=at(41),
    )
    ignored = uid()
    add_instance(queue, ignored, eligible=False, body_part="KNEE", now=at(100))
    queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(131))
    receiving = uid()
    add_instance(queue, receiving, now=at(200))
    expected = {
        ready: "ready",
        processing: "processing",
        done: "done",
        undelivered: "done",
        ignored: "ignored",
        receiving: "receiving",
    }
    assert {s: queue.study(s).state for s in expected} == expected  # type: ignore[union-attr]

    far_future = at(10**7)
    gone = queue.purge(far_future)
    assert sorted(gone) == sorted([done, ignored]), "active studies and undelivered reports stay"
    for s in (done, ignored):
        assert queue.study(s) is None and queue.events(s) == []
    for s in (ready, processing, undelivered, receiving):
        d = queue.study(s)
        assert d is not None and d.state == expected[s], s
    assert queue.purge(far_future) == []
    # Once its report is delivered, the study can go too.
    [dl] = queue.due_deliveries(now=at(300))
    queue.record_delivery(dl.id, DeliveryOutcome(True, "0x0000"), attempts_so_far=0, now=at(301))
    assert queue.purge(far_future) == [undelivered]


def test_purge_respects_the_cutoff(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [c] = queue.claim("w", now=at(40))
    queue.complete(c.id, "w", result_payload={}, now=at(41))
    assert queue.purge(at(41)) == []
    assert queue.purge(at(42)) == [s]
    # A purged study that arrives again starts from scratch.
    assert add_instance(queue, s, now=at(50))
    assert queue.study(s).state == "receiving"  # type: ignore[union-attr]
