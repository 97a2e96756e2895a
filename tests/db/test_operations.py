"""What an admin reads: the last error (sanitised), next retry, per-destination delivery state, the
whole audit trail, the metrics snapshot, and database URLs. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from db.config import QueueConfig
from db.queue import DeliveryOutcome, NewDelivery, Queue
from db.retry import ErrorKind
from db.sanitise import clean_error, escape_control
from tests.db.conftest import at

SR = "1.2.840.10008.5.1.4.1.1.88.34"


def test_a_failed_attempt_is_kept_as_last_error_sanitised(
    queue: Queue, ready_study: Callable[..., str]
) -> None:
    s = ready_study(0)
    [c] = queue.claim("w1", now=at(40))
    raw = "cannot read PatientName 'DOE^JOHN':\nforged line\x1b[31m"
    queue.fail(c.id, "w1", error=raw, kind=ErrorKind.TRANSIENT, now=at(41))
    [summary] = queue.latest(1)
    assert summary.state == "ready" and summary.attempts == 1
    assert summary.ready_at == at(51)  # retry_base_seconds=10 in the test queue
    assert summary.last_error == "cannot read PatientName '…':\\nforged line\\x1b[31m"
    assert summary.last_error_at == at(41)
    assert "DOE" not in (summary.reason or "") and "\n" not in (summary.reason or "")
    d = queue.study(s)
    assert d is not None and d.last_error == summary.last_error


def test_clean_error_keeps_the_shape_and_drops_quoted_values() -> None:
    assert clean_error('invalid value for VR PN: "Smith^Jane"') == 'invalid value for VR PN: "…"'
    assert clean_error("x" * 600).endswith("…") and len(clean_error("x" * 600)) == 500
    assert escape_control("CALLING\r\nAE\x00") == "CALLING\\r\\nAE\\x00"


def test_status_shows_each_destination(queue: Queue, ready_study: Callable[..., str]) -> None:
    s = ready_study(0)
    [c] = queue.claim("w", now=at(40))
    queue.complete(
        c.id,
        "w",
        result_payload={},
        report_sop_instance_uid="2.25.10",
        deliveries=[
            NewDelivery("pacs", "2.25.10", SR, "r/a.dcm"),
            NewDelivery("archive", "2.25.10", SR, "r/a.dcm"),
        ],
        now=at(41),
    )
    [summary] = queue.latest(1)
    assert summary.reason == "result 1 stored, report 2.25.10, for archive, pacs"
    by = {d.destination: d for d in summary.destinations}
    assert by["pacs"].states == {"pending": 1} and by["pacs"].attempts == 0
    rows = {r.destination: r for r in queue.due_deliveries(now=at(42))}
    queue.record_delivery(
        rows["pacs"].id, DeliveryOutcome(True, "0x0000 Success"), attempts_so_far=0, now=at(43)
    )
    queue.record_delivery(
        rows["archive"].id,
        DeliveryOutcome(False, "0xA700 Refused: Out of Resources", ErrorKind.RESOURCES),
        attempts_so_far=0,
        now=at(43),
    )
    [summary] = queue.latest(1)
    by = {d.destination: d for d in summary.destinations}
    assert (by["pacs"].states, by["pacs"].last_status) == ({"delivered": 1}, "0x0000 Success")
    assert by["archive"].states == {"retry": 1} and by["archive"].attempts == 1
    assert by["archive"].next_attempt_at is not None and by["archive"].next_attempt_at > at(43)
    assert by["archive"].last_status == "0xA700 Refused: Out of Resources"
    assert summary.deliveries == {"delivered": 1, "retry": 1}

    trail = queue.history(s)
    assert trail is not None
    assert [(e.from_state, e.to_state) for e in trail if e.delivery_id is not None] == [
        (None, "pending"),
        (None, "pending"),
        ("pending", "delivered"),
        ("pending", "retry"),
    ]
    assert [e.to_state for e in trail if e.delivery_id is None] == [
        "receiving",
        "ready",
        "processing",
        "done",
    ]
    assert queue.history("9.9.9") is None

    snap = queue.snapshot(now=at(50))
    assert snap.studies == {"done": 1}
    assert snap.oldest_ready_age_seconds == 0.0
    assert snap.deliveries == {("pacs", "delivered"): 1, ("archive", "retry"): 1}
    assert snap.delivery_attempts == {("pacs", "delivered"): 1, ("archive", "retry"): 1}


def test_snapshot_oldest_ready_age(queue: Queue, ready_study: Callable[..., str]) -> None:
    ready_study(0)  # ready at 31
    ready_study(100)  # ready at 131
    snap = queue.snapshot(now=at(200))
    assert snap.studies == {"ready": 2}
    assert snap.oldest_ready_age_seconds == pytest.approx(169.0)
    assert queue.ping() == "0003_views_and_errors"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            "postgresql://postgres@127.0.0.1:5432/cxr",
            "postgresql+psycopg://postgres@127.0.0.1:5432/cxr",
        ),
        ("postgres://u:pw@db/cxr", "postgresql+psycopg://u:pw@db/cxr"),
        ("postgresql+psycopg://u@db/cxr", "postgresql+psycopg://u@db/cxr"),
        ("sqlite:///var/q.sqlite3", "sqlite:///var/q.sqlite3"),
    ],
)
def test_database_urls_are_normalised(given: str, expected: str) -> None:
    assert QueueConfig(database_url=given).database_url == expected


def test_another_postgres_driver_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError) as exc:
        QueueConfig(database_url="postgresql+psycopg2://u:secret@db/cxr")
    text = str(exc.value)
    assert (
        "use postgresql+psycopg://USER@HOST/DB" in text and "secret" not in text.split("input")[0]
    )
