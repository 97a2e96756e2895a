"""The state machine: transitions allowed and refused, events, duplicates, reopen rules,
completion."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from db.queue import TRANSITIONS, InvalidTransition, Queue, StudyState
from db.retry import ErrorKind
from db.states import transition
from tests.db.conftest import add_instance, at, uid

S = StudyState


def state(q: Queue, study_uid: str) -> str:
    d = q.study(study_uid)
    assert d is not None
    return d.state


def test_new_study_is_receiving_with_a_creation_event(queue: Queue) -> None:
    s = uid()
    assert add_instance(queue, s, now=at(0)) is True
    d = queue.study(s)
    assert d is not None
    assert d.state == "receiving" and d.first_instance_at == at(0) == d.last_instance_at
    assert len(d.instances) == 1 and d.instances[0].calling_ae == "ORTHANC"
    ev = queue.events(s)
    assert [(e.from_state, e.to_state, e.actor) for e in ev] == [(None, "receiving", "scp")]
    assert ev[0].at == at(0) and ev[0].at.tzinfo is not None


def test_duplicate_instance_is_stored_once(queue: Queue) -> None:
    s, sop = uid(), uid()
    assert add_instance(queue, s, sop_uid=sop, now=at(0)) is True
    assert queue.instance_exists(sop)
    assert add_instance(queue, s, sop_uid=sop, now=at(5)) is False
    d = queue.study(s)
    assert d is not None and len(d.instances) == 1
    assert d.last_instance_at == at(0), "a duplicate must not count as activity"
    assert not queue.instance_exists(uid())


def test_duplicate_sop_uid_under_another_study_creates_nothing(queue: Queue) -> None:
    sop = uid()
    assert add_instance(queue, uid(), sop_uid=sop)
    other = uid()
    assert add_instance(queue, other, sop_uid=sop) is False
    assert queue.study(other) is None, "the study row of a refused duplicate must be rolled back"


def test_quiet_period_makes_a_study_ready(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, now=at(0))
    add_instance(queue, s, now=at(20))
    assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(45)) == 0
    assert state(queue, s) == "receiving"
    assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(50)) == 1
    d = queue.study(s)
    assert d is not None and d.state == "ready" and d.ready_at == at(50)
    assert "no new instance for 30s" in (d.state_reason or "")
    assert [e.to_state for e in d.events] == ["receiving", "ready"]
    assert d.events[-1].actor == "scheduler"


def test_max_wait_makes_a_trickling_study_ready(queue: Queue) -> None:
    s = uid()
    for t in range(0, 700, 20):  # never quiet for 30 s
        add_instance(queue, s, now=at(t))
        if t >= 600:
            break
        assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(t + 1)) == 0
    assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(601)) == 1
    d = queue.study(s)
    assert (
        d is not None
        and d.state == "ready"
        and "600s since the first instance" in (d.state_reason or "")
    )


def test_study_without_eligible_instance_is_ignored_with_reason(queue: Queue) -> None:
    s = uid()
    add_instance(
        queue,
        s,
        eligible=False,
        body_part="EXTREMITY",
        modality="CR",
        ineligible_reason="BodyPartExamined EXTREMITY is not a chest",
        now=at(0),
    )
    assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(31)) == 1
    d = queue.study(s)
    assert d is not None and d.state == "ignored" and d.finished_at == at(31)
    assert d.state_reason is not None
    assert d.state_reason.startswith(
        "no chest radiograph: 1 instance(s), BodyPartExamined EXTREMITY"
    )
    assert "Modality CR" in d.state_reason


def test_mixed_study_with_one_eligible_instance_is_ready(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, eligible=False, body_part="ABDOMEN", now=at(0))
    add_instance(queue, s, eligible=True, now=at(1))
    queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(40))
    assert state(queue, s) == "ready"


def test_instance_for_ready_study_waits_for_quiet_again(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    add_instance(queue, s, now=at(35))
    d = queue.study(s)
    assert d is not None and d.state == "receiving" and d.ready_at is None
    assert queue.claim("w1", now=at(36)) == []
    assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(66)) == 1
    assert [e.to_state for e in queue.events(s)] == ["receiving", "ready", "receiving", "ready"]


def test_instance_during_processing_sets_needs_reanalysis(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [c] = queue.claim("w1", now=at(40))
    add_instance(queue, s, now=at(45))
    d = queue.study(s)
    assert d is not None and d.state == "processing" and d.needs_reanalysis
    queue.complete(
        c.id, "w1", result_payload={"p": 0.1}, report_sop_instance_uid="2.25.1", now=at(50)
    )
    d = queue.study(s)
    assert d is not None and d.state == "receiving" and not d.needs_reanalysis
    assert d.previous_report_uid == "2.25.1"
    assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(81)) == 1
    [again] = queue.claim("w2", now=at(82))
    assert again.previous_report_uid == "2.25.1" and len(again.instances) == 2


def test_done_study_reopens_and_remembers_its_report(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [c] = queue.claim("w1", now=at(40))
    queue.complete(c.id, "w1", result_payload={}, report_sop_instance_uid="2.25.77", now=at(50))
    assert state(queue, s) == "done"
    add_instance(queue, s, now=at(1000))
    d = queue.study(s)
    assert d is not None
    assert (d.state, d.previous_report_uid, d.reopened_count, d.attempts) == (
        "receiving",
        "2.25.77",
        1,
        0,
    )
    assert d.first_instance_at == at(1000), "a reopened study starts a new max-wait clock"
    assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(1001)) == 0
    assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(1031)) == 1
    [c2] = queue.claim("w1", now=at(1032))
    assert c2.previous_report_uid == "2.25.77"


def test_failed_study_reopens_with_attempts_reset(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [c] = queue.claim("w1", now=at(40))
    queue.fail(c.id, "w1", error="cannot decode pixel data", kind=ErrorKind.INVALID, now=at(41))
    assert state(queue, s) == "failed"
    add_instance(queue, s, now=at(100))
    d = queue.study(s)
    assert d is not None and d.state == "receiving" and d.attempts == 0 and d.finished_at is None


def test_ignored_study_reopens_only_for_an_eligible_instance(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, eligible=False, body_part="SKULL", now=at(0))
    queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(31))
    assert state(queue, s) == "ignored"
    add_instance(queue, s, eligible=False, body_part="SKULL", now=at(40))
    assert state(queue, s) == "ignored"
    add_instance(queue, s, eligible=True, now=at(50))
    assert state(queue, s) == "receiving"


def test_every_transition_writes_one_event(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [c] = queue.claim("w1", now=at(40))
    queue.fail(c.id, "w1", error="GPU out of memory", kind=ErrorKind.TRANSIENT, now=at(41))
    [c] = queue.claim("w1", now=at(100))
    queue.release(c.id, "w1", now=at(101))
    [c] = queue.claim("w2", now=at(102))
    queue.ignore(c.id, "w2", "no frontal view", now=at(103))
    assert queue.requeue(s, now=at(104))
    ev = queue.events(s)
    assert [(e.from_state, e.to_state) for e in ev] == [
        (None, "receiving"),
        ("receiving", "ready"),
        ("ready", "processing"),
        ("processing", "ready"),
        ("ready", "processing"),
        ("processing", "ready"),
        ("ready", "processing"),
        ("processing", "ignored"),
        ("ignored", "ready"),
    ]
    assert [e.actor for e in ev][2:] == ["w1", "w1", "w1", "w1", "w2", "w2", "cli"]
    assert "GPU out of memory" in (ev[3].reason or "") and "retry in 10s" in (ev[3].reason or "")
    assert ev[7].reason == "no frontal view"
    assert all(
        (e.from_state, e.to_state)
        in {(None if f is None else f.value, t.value) for f, t in TRANSITIONS}
        for e in ev
    )


def test_refused_transitions_raise_and_change_nothing(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, now=at(0))
    sid = queue.study(s).id  # type: ignore[union-attr]
    with queue.engine.begin() as conn:
        for frm, to in [
            (S.RECEIVING, S.DONE),
            (S.RECEIVING, S.PROCESSING),
            (S.DONE, S.FAILED),
            (S.READY, S.DONE),
        ]:
            with pytest.raises(InvalidTransition, match=f"{frm} -> {to}"):
                transition(conn, sid, frm, to, actor="test", reason="x", now=at(1))
    assert state(queue, s) == "receiving" and len(queue.events(s)) == 1


def test_compare_and_set_misses_when_the_state_moved(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    sid = queue.study(s).id  # type: ignore[union-attr]
    with queue.engine.begin() as conn:
        # Allowed in the table, but the study is ready, not receiving: nothing changes, no event.
        assert (
            transition(conn, sid, S.RECEIVING, S.READY, actor="t", reason="x", now=at(99)) is None
        )
    assert len(queue.events(s)) == 2


def test_only_queue_module_writes_state() -> None:
    """Guard the rule: no module but db/states.py issues a study UPDATE (states.touch refuses to
    write the state, db.states.transition is the only state writer)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = []
    files = [
        p
        for d in ("worker", "dicom_node", "models", "db", "bench")
        for p in (root / d).rglob("*.py")
    ]
    assert any(p.parts[-2:] == ("db", "states.py") for p in files)
    for p in files:
        if p.parts[-2:] == ("db", "states.py"):
            continue
        text = p.read_text(errors="ignore")
        low = text.lower()
        if "update studies" in low or "update(studies)" in low or "update(study)" in low:
            offenders.append(str(p.relative_to(root)))
    assert offenders == []


def test_counts_and_latest(queue: Queue, ready_study: Callable[..., str]) -> None:
    a = ready_study(0)
    b = uid()
    add_instance(queue, b, now=at(100))
    add_instance(queue, b, now=at(101))
    counts = queue.counts()
    assert counts[S.READY] == 1 and counts[S.RECEIVING] == 1 and counts[S.DONE] == 0
    assert set(counts) == set(StudyState)
    latest = queue.latest(5)
    assert [x.study_uid for x in latest] == [b, a]
    assert (
        latest[0].instance_count == 2
        and latest[0].state == "receiving"
        and latest[0].deliveries == {}
    )
    assert queue.latest(1)[0].study_uid == b
    assert queue.study("9.9.9") is None and queue.events("9.9.9") == []


def test_naive_now_is_refused(queue: Queue) -> None:
    from datetime import datetime

    with pytest.raises(ValueError, match="naive"):
        queue.claim("w", now=datetime(2026, 1, 1))


def test_touch_refuses_to_write_the_state(queue: Queue) -> None:
    from db.schema import studies_table
    from db.states import touch

    s = uid()
    add_instance(queue, s, now=at(0))
    with queue.engine.begin() as conn, pytest.raises(InvalidTransition, match="only through"):
        touch(conn, studies_table.c.study_uid == s, state="done")
    assert state(queue, s) == "receiving"
