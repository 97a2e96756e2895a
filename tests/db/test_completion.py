"""Completion rules an admin sets (quiet period, lateral grace, max wait), what a whole-study route
sends that must change nothing (SRs, presentation states, the worker's own outputs), and what a
re-analysis is told (its report number, why it replaces the last one). SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

from db.intake import OWN_OUTPUT_REASON
from db.queue import NewDelivery, Queue
from tests.db.conftest import add_instance, at, uid

SR = "1.2.840.10008.5.1.4.1.1.88.34"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SC = "1.2.840.10008.5.1.4.1.1.7"
QUIET, GRACE, MAX_WAIT = 30.0, 120.0, 600.0


def sweep(q: Queue, t: float, grace: float = GRACE, max_wait: float = MAX_WAIT) -> int:
    return q.sweep_completion(
        quiet_seconds=QUIET, max_wait_seconds=max_wait, lateral_grace_seconds=grace, now=at(t)
    )


def state(q: Queue, s: str) -> str:
    d = q.study(s)
    assert d is not None
    return d.state


def ready_reason(q: Queue, s: str) -> str:
    [e] = [e for e in q.events(s) if e.to_state == "ready"]
    return e.reason or ""


# --------------------------------------------------------------------------- lateral grace


def test_a_frontal_alone_waits_the_lateral_grace(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, view_position="PA", now=at(0))
    assert sweep(queue, 31) == 0 and state(queue, s) == "receiving"  # quiet, but no lateral
    assert sweep(queue, 119) == 0
    assert sweep(queue, 120) == 1 and state(queue, s) == "ready"
    assert ready_reason(queue, s).startswith(
        "complete: a frontal and no lateral after the 120s lateral grace"
    )


def test_the_lateral_arriving_in_the_grace_ends_the_wait_at_quiet(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, view_position="PA", now=at(0))
    assert sweep(queue, 50) == 0
    add_instance(queue, s, view_position="LL", now=at(60))
    assert sweep(queue, 89) == 0  # quiet counts from the lateral
    assert sweep(queue, 90) == 1 and state(queue, s) == "ready"
    assert ready_reason(queue, s).startswith("complete: no new instance for 30s (2 instance(s))")


def test_an_image_of_unknown_view_may_be_the_lateral(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, view_position="PA", now=at(0))
    add_instance(queue, s, view_position=None, now=at(1))  # the view classifier decides later
    assert sweep(queue, 31) == 1 and state(queue, s) == "ready"


def test_only_eligible_images_count_for_the_grace(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, view_position="PA", now=at(0))
    # an SR and a lateral of the knee neither hold the study back nor end its wait
    add_instance(queue, s, eligible=False, view_position=None, sop_class_uid=SR, now=at(1))
    add_instance(queue, s, eligible=False, view_position="LL", body_part="KNEE", now=at(2))
    assert sweep(queue, 40) == 0
    assert sweep(queue, 122) == 1


def test_max_wait_bounds_the_grace(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, view_position="PA", now=at(0))
    assert sweep(queue, 59, grace=300, max_wait=60) == 0
    assert sweep(queue, 60, grace=300, max_wait=60) == 1
    assert ready_reason(queue, s).startswith("complete: 60s since the first instance")


def test_grace_zero_turns_it_off(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, view_position="PA", now=at(0))
    assert sweep(queue, 30, grace=0) == 1 and state(queue, s) == "ready"


def test_a_lateral_alone_does_not_wait(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, view_position="LL", now=at(0))
    assert sweep(queue, 30) == 1


# ------------------------------------------------------------ what must not reopen a study


def _done(q: Queue, s: str, t: float, report: str, *, key: str | None = None) -> None:
    [c] = [c for c in q.claim("w", limit=10, now=at(t)) if c.study_uid == s]
    objs = [NewDelivery("pacs", report, SR, f"r/{report}.dcm")]
    if key:
        objs.append(NewDelivery("pacs", key, SC, f"r/{key}.dcm"))
    q.complete(
        c.id,
        "w",
        result_payload={},
        report_sop_instance_uid=report,
        deliveries=objs,
        now=at(t + 1),
    )


def test_non_image_instances_never_reopen_or_restart(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    """A PACS routing the whole study sends its SRs and presentation states after every change:
    stored, but a ready study stays ready, a processing one is not re-analysed, a done one stays
    done."""
    ready = ready_study(0)
    add_instance(queue, ready, eligible=False, sop_class_uid=KOS, view_position=None, now=at(40))
    assert state(queue, ready) == "ready"

    busy = ready_study(0)
    [c] = [c for c in queue.claim("w", limit=10, now=at(50)) if c.study_uid == busy]
    add_instance(queue, busy, eligible=False, sop_class_uid=SR, view_position=None, now=at(51))
    d = queue.study(busy)
    assert d is not None and d.state == "processing" and not d.needs_reanalysis
    queue.complete(c.id, "w", result_payload={}, report_sop_instance_uid="2.25.9", now=at(52))
    assert state(queue, busy) == "done"

    add_instance(queue, busy, eligible=False, sop_class_uid=SR, view_position=None, now=at(60))
    d = queue.study(busy)
    assert d is not None and d.state == "done" and d.reopened_count == 0
    assert len(d.instances) == 3
    assert [e.to_state for e in queue.events(busy)][-1] == "done"


def test_own_outputs_coming_back_are_recognised_by_uid(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    """The SCP recognises outputs by series; the queue also knows the SOP Instance UIDs it sent
    (a key image is an SC chest image: without this it would look eligible)."""
    s = ready_study(0)
    _done(queue, s, 40, "2.25.500", key="2.25.501")
    add_instance(queue, s, sop_uid="2.25.501", sop_class_uid=SC, eligible=True, now=at(100))
    add_instance(queue, s, sop_uid="2.25.500", sop_class_uid=SR, eligible=False, now=at(101))
    d = queue.study(s)
    assert d is not None and d.state == "done" and d.reopened_count == 0
    own = {i.sop_instance_uid: i for i in d.instances if i.sop_instance_uid.startswith("2.25.5")}
    assert {u: (i.eligible, i.ineligible_reason) for u, i in own.items()} == {
        "2.25.500": (False, OWN_OUTPUT_REASON),
        "2.25.501": (False, OWN_OUTPUT_REASON),
    }


# ------------------------------------------------------------- what a re-analysis is told


def test_a_late_lateral_reopens_and_the_claim_says_why(queue: Queue) -> None:
    s = uid()
    add_instance(queue, s, view_position="PA", now=at(0))
    assert sweep(queue, 120) == 1
    [first] = queue.claim("w", now=at(121))
    assert (first.earlier_reports, first.reanalysis_reason) == ((), "")
    _done_claimed(queue, first.id, 122, "2.25.1")
    add_instance(queue, s, view_position="LL", now=at(180))
    assert state(queue, s) == "receiving"
    assert sweep(queue, 210) == 1
    [again] = queue.claim("w", now=at(211))
    assert again.previous_report_uid == "2.25.1"
    assert again.earlier_reports == ("2.25.1",)
    assert again.reanalysis_reason == "a late lateral (LL) arrived after report 1"
    _done_claimed(queue, again.id, 212, "2.25.2")
    assert queue.requeue(s, now=at(300))
    [third] = queue.claim("w", now=at(301))
    assert third.earlier_reports == ("2.25.1", "2.25.2")
    assert third.reanalysis_reason.startswith("re-analysis of report 2: requeued by cli")


def test_images_arriving_during_the_analysis_are_named(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [c] = queue.claim("w", now=at(40))
    add_instance(queue, s, view_position="LL", now=at(45))
    add_instance(queue, s, view_position=None, now=at(46))
    _done_claimed(queue, c.id, 50, "2.25.7")
    assert sweep(queue, 100) == 1
    [again] = queue.claim("w", now=at(101))
    assert again.reanalysis_reason == (
        "2 late images arrived: lateral (LL), image of unknown view after report 1"
    )


def _done_claimed(q: Queue, study_id: int, t: float, report: str) -> None:
    q.complete(study_id, "w", result_payload={}, report_sop_instance_uid=report, now=at(t))
