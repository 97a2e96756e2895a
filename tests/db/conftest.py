"""Queue fixtures: a migrated database on SQLite and PostgreSQL (``database_url`` from
tests/conftest.py), and received instances to record."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

from db.migrate import upgrade
from db.queue import Queue
from dicom_node.sink import StoredInstance

T0 = datetime(2026, 1, 5, 8, 0, 0, tzinfo=UTC)
CHEST = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
LEASE = 60.0
MAX_ATTEMPTS = 3


def at(seconds: float) -> datetime:
    """T0 + seconds: tests move time explicitly."""
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def migrated_url(database_url: str) -> str:
    upgrade(database_url)
    return database_url


@pytest.fixture
def queue(migrated_url: str) -> Iterator[Queue]:
    q = Queue.from_url(
        migrated_url, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS, retry_base_seconds=10
    )
    try:
        yield q
    finally:
        q.close()


_counter = iter(range(1, 10**9))


def uid(prefix: str = "1.2.826.0.1.3680043.10.1") -> str:
    return f"{prefix}.{next(_counter)}"


def make_instance(study_uid: str | None = None, **overrides: Any) -> StoredInstance:
    """An eligible chest DX instance of ``study_uid`` (a new study by default); any field may be
    overridden."""
    study = study_uid or uid()
    sop = overrides.pop("sop_instance_uid", None) or uid()
    fields: dict[str, Any] = {
        "study_uid": study,
        "series_uid": study + ".1",
        "sop_instance_uid": sop,
        "sop_class_uid": CHEST,
        "transfer_syntax_uid": EXPLICIT_LE,
        "modality": "DX",
        "body_part": "CHEST",
        "view_position": "PA",
        "eligible": True,
        "ineligible_reason": None,
        "rel_path": f"{study}/{sop}.dcm",
        "size_bytes": 1234,
        "calling_ae": "ORTHANC",
    }
    return StoredInstance(**{**fields, **overrides})


def add_instance(
    q: Queue,
    study_uid: str,
    *,
    sop_uid: str | None = None,
    eligible: bool = True,
    body_part: str | None = "CHEST",
    modality: str = "DX",
    view_position: str | None = "PA",
    view: str | None | Literal["auto"] = "auto",
    sop_class_uid: str | None = None,
    series_uid: str | None = None,
    ineligible_reason: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Record one instance; ``view`` defaults to what the SCP derives from ``view_position``
    (PA/AP frontal, LL/RL lateral, else unknown)."""
    if view == "auto":
        view = {"PA": "frontal", "AP": "frontal", "LL": "lateral", "RL": "lateral"}.get(
            view_position or ""
        )
    return q.record_instance(
        make_instance(
            study_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid or (CHEST if modality == "DX" else CR),
            **({"series_uid": series_uid} if series_uid else {}),
            modality=modality,
            body_part=body_part,
            view_position=view_position,
            view=view,
            eligible=eligible,
            ineligible_reason=ineligible_reason,
            received_at=now,
        )
    )


@pytest.fixture
def ready_study(queue: Queue) -> Callable[..., str]:
    """Create a study with one eligible instance and sweep it to ``ready`` at time ``t``."""

    def make(t: float = 0.0, **kw: Any) -> str:
        s = uid()
        assert add_instance(queue, s, now=at(t), **kw)
        assert queue.sweep_completion(quiet_seconds=30, max_wait_seconds=600, now=at(t + 31)) >= 1
        assert queue.study(s).state == "ready"  # type: ignore[union-attr]
        return s

    return make
