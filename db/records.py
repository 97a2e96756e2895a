"""Plain, immutable rows the queue hands out (no ORM sessions leak out of :mod:`db.queue`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class InstanceRow:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    view: str | None  # "frontal" | "lateral" | None: what the header said when it arrived
    rel_path: str  # relative to dicom.storage_dir
    size_bytes: int
    eligible: bool
    ineligible_reason: str | None
    calling_ae: str | None
    received_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimedStudy:
    """A study a worker now holds (until ``lease_expires_at``, extended by heartbeats)."""

    id: int
    study_uid: str
    attempts: int  # including this one
    previous_report_uid: str | None  # the report the next one replaces, if any
    lease_expires_at: datetime
    instances: list[InstanceRow] = field(default_factory=list)
    #: SOP Instance UIDs of the study's earlier reports, oldest first (each once): the next
    #: report is number ``len(earlier_reports) + 1`` unless it is one of them again
    earlier_reports: tuple[str, ...] = ()
    #: why the study is analysed again (e.g. "a late lateral (LL) arrived after report 1");
    #: empty on a first analysis
    reanalysis_reason: str = ""


@dataclass(frozen=True, slots=True)
class EventRow:
    at: datetime
    from_state: str | None
    to_state: str
    reason: str | None
    actor: str
    delivery_id: int | None = None  # set on a delivery's event, None on the study's own


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """One result object to send to one destination (queued by :meth:`Queue.complete`)."""

    destination: str  # a destination name from config.yaml
    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True, slots=True)
class DestinationState:
    """Where the deliveries of a study's latest result to one destination stand."""

    destination: str
    states: dict[str, int]  # delivery state -> count
    attempts: int  # send attempts so far, all objects together
    next_attempt_at: datetime | None  # the earliest retry still to come, if any
    last_status: str | None  # the latest status of an undelivered object (or the latest one)


@dataclass(frozen=True, slots=True)
class StudySummary:
    study_uid: str
    state: str
    reason: str | None
    updated_at: datetime
    instance_count: int
    deliveries: dict[str, int]  # delivery state -> count, for the study's latest result
    attempts: int = 0  # analysis attempts in the current episode
    ready_at: datetime | None = None  # when a ready study may be claimed (after a back-off)
    last_error: str | None = None  # the last failed attempt's error (sanitised)
    last_error_at: datetime | None = None
    destinations: list[DestinationState] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """The queue as the metrics endpoint sees it (every worker's work, from the database)."""

    studies: dict[str, int]  # state -> number of studies (states with none are absent)
    oldest_ready_age_seconds: float  # how long the oldest claimable study has waited; 0 if none
    deliveries: dict[tuple[str, str], int]  # (destination, state) -> deliveries
    delivery_attempts: dict[tuple[str, str], int]  # (destination, state) -> send attempts


@dataclass(frozen=True, slots=True)
class ResultRow:
    id: int
    created_at: datetime
    payload: dict[str, Any]
    report_sop_instance_uid: str | None
    report_path: str | None
    superseded: bool


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    study_id: int
    study_uid: str
    result_id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_status: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class StudyDetail:
    id: int
    study_uid: str
    state: str
    state_reason: str | None
    attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    first_instance_at: datetime | None
    last_instance_at: datetime | None
    ready_at: datetime | None
    claimed_at: datetime | None
    finished_at: datetime | None
    reopened_count: int
    needs_reanalysis: bool
    previous_report_uid: str | None
    created_at: datetime
    updated_at: datetime
    last_error: str | None
    last_error_at: datetime | None
    instances: list[InstanceRow]
    results: list[ResultRow]
    deliveries: list[DeliveryRow]
    events: list[EventRow]
