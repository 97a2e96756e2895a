"""SQLAlchemy 2 typed ORM models of the queue tables.

Only :mod:`db.states` writes ``studies.state``; only :mod:`db.deliveries` writes
``deliveries.state``. Every timestamp is timezone-aware UTC
(:class:`UTCDateTime` makes SQLite, which has no time zones, round-trip aware datetimes).
A change here needs an Alembic revision in ``db/migrations/versions`` (a test compares the two).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

UID_LENGTH = 64  # DICOM UIDs are at most 64 characters (PS3.5 9.1)

STUDY_STATES = ("receiving", "ready", "processing", "done", "failed", "ignored")
DELIVERY_STATES = ("pending", "delivered", "retry", "failed")

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    Refuses naive datetimes on the way in (their zone is unknown, so they would be silently wrong);
    stores naive UTC on SQLite and ``timestamptz`` on PostgreSQL; always returns aware UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given: pass an aware datetime (UTC)"
            )
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        sa.CheckConstraint(f"state IN ({_in(STUDY_STATES)})", name="state"),
        sa.Index("ix_studies_state", "state"),
        sa.Index("ix_studies_state_last_instance_at", "state", "last_instance_at"),
        sa.Index("ix_studies_state_lease_expires_at", "state", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH), unique=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    state_reason: Mapped[str | None] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(sa.String(255))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    first_instance_at: Mapped[datetime | None]  # first instance of the current receiving episode
    last_instance_at: Mapped[datetime | None]
    ready_at: Mapped[
        datetime | None
    ]  # when it becomes claimable (later than now after a retryable failure)
    claimed_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    reopened_count: Mapped[int] = mapped_column(default=0, server_default="0")
    needs_reanalysis: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    previous_report_uid: Mapped[str | None] = mapped_column(sa.String(UID_LENGTH))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    last_error: Mapped[str | None] = mapped_column(sa.Text)  # the last failed attempt (sanitised)
    last_error_at: Mapped[datetime | None]


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    series_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    modality: Mapped[str | None] = mapped_column(sa.String(16))
    body_part: Mapped[str | None] = mapped_column(sa.String(64))
    view_position: Mapped[str | None] = mapped_column(sa.String(16))
    view: Mapped[str | None] = mapped_column(sa.String(16))  # frontal | lateral | None (header)
    rel_path: Mapped[str] = mapped_column(sa.String(1024))  # relative to dicom.storage_dir
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    eligible: Mapped[bool]
    ineligible_reason: Mapped[str | None] = mapped_column(sa.Text)
    calling_ae: Mapped[str | None] = mapped_column(sa.String(16))
    received_at: Mapped[datetime]


class Event(Base):
    """One state change of a study, or (``delivery_id`` set) of one of its deliveries."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    delivery_id: Mapped[int | None] = mapped_column(sa.ForeignKey("deliveries.id"), index=True)
    at: Mapped[datetime]
    from_state: Mapped[str | None] = mapped_column(sa.String(16))  # None: the study was created
    to_state: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    actor: Mapped[str] = mapped_column(sa.String(255))  # worker id, "scp", "scheduler", "cli"


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    created_at: Mapped[datetime]
    payload: Mapped[dict[str, Any]]
    report_sop_instance_uid: Mapped[str | None] = mapped_column(sa.String(UID_LENGTH))
    report_path: Mapped[str | None] = mapped_column(sa.String(1024))
    superseded: Mapped[bool] = mapped_column(default=False, server_default=sa.false())


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        sa.CheckConstraint(f"state IN ({_in(DELIVERY_STATES)})", name="state"),
        sa.UniqueConstraint(
            "result_id",
            "destination",
            "sop_instance_uid",
            name="uq_deliveries_result_destination_sop",
        ),
        sa.Index("ix_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    result_id: Mapped[int] = mapped_column(sa.ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(sa.String(64))
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    path: Mapped[str] = mapped_column(sa.String(1024))
    state: Mapped[str] = mapped_column(sa.String(16))
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None]
    last_status: Mapped[str | None] = mapped_column(sa.Text)
    updated_at: Mapped[datetime]


# Core views of the tables, for the queue's explicit statements (compare-and-set, bulk updates).
studies_table = cast(sa.Table, Study.__table__)
instances_table = cast(sa.Table, Instance.__table__)
events_table = cast(sa.Table, Event.__table__)
results_table = cast(sa.Table, Result.__table__)
deliveries_table = cast(sa.Table, Delivery.__table__)
