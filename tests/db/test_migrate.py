"""Migrations: upgrade an empty database, repeat harmlessly, match the ORM models exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db.engine import make_engine
from db.migrate import current_revision, head_revision, is_empty, upgrade
from db.schema import Base, UTCDateTime


def test_upgrade_empty_then_again(database_url: str) -> None:
    assert is_empty(database_url)
    assert current_revision(database_url) is None
    upgrade(database_url)
    assert not is_empty(database_url)
    assert current_revision(database_url) == head_revision() == "0003_views_and_errors"
    upgrade(database_url)  # idempotent
    assert current_revision(database_url) == head_revision()

    eng = make_engine(database_url)
    try:
        insp = sa.inspect(eng)
        assert set(insp.get_table_names()) >= {
            "studies",
            "instances",
            "events",
            "results",
            "deliveries",
        }
        study_ix = {ix["name"]: ix["column_names"] for ix in insp.get_indexes("studies")}
        assert study_ix["ix_studies_state"] == ["state"]
        assert study_ix["ix_studies_state_last_instance_at"] == ["state", "last_instance_at"]
        assert study_ix["ix_studies_state_lease_expires_at"] == ["state", "lease_expires_at"]
        dix = {ix["name"]: ix["column_names"] for ix in insp.get_indexes("deliveries")}
        assert dix["ix_deliveries_state_next_attempt_at"] == ["state", "next_attempt_at"]
    finally:
        eng.dispose()


def test_migration_matches_models(database_url: str) -> None:
    upgrade(database_url)
    eng = make_engine(database_url)
    try:
        with eng.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"db/schema.py and the migrations differ; add a revision: {diff}"
    finally:
        eng.dispose()


def test_check_constraint_refuses_unknown_state(database_url: str) -> None:
    upgrade(database_url)
    eng = make_engine(database_url)
    now = datetime.now(UTC)
    try:
        with pytest.raises(sa.exc.IntegrityError), eng.begin() as conn:
            conn.execute(
                Base.metadata.tables["studies"]
                .insert()
                .values(study_uid="1.2.3", state="lost", created_at=now, updated_at=now)
            )
    finally:
        eng.dispose()


def test_timestamps_round_trip_as_aware_utc(database_url: str) -> None:
    upgrade(database_url)
    eng = make_engine(database_url)
    t = datetime(2026, 3, 29, 3, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    studies = Base.metadata.tables["studies"]
    try:
        with eng.begin() as conn:
            conn.execute(
                studies.insert().values(
                    study_uid="1.2.3", state="receiving", created_at=t, updated_at=t
                )
            )
        with eng.connect() as conn:
            got = conn.execute(sa.select(studies.c.created_at)).scalar_one()
        assert got == t and got.tzinfo is not None and got.utcoffset() == timedelta(0)
        assert got.hour == 1
    finally:
        eng.dispose()


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        UTCDateTime().process_bind_param(
            datetime(2026, 1, 1), sa.create_engine("sqlite://").dialect
        )


def test_queue_check_schema(database_url: str) -> None:
    from db.errors import QueueUnavailable
    from db.queue import Queue

    # from_url, not from_config: from_config refuses an empty database itself (test_from_config.py)
    q = Queue.from_url(database_url, lease_seconds=60, max_attempts=3)
    try:
        with pytest.raises(
            QueueUnavailable, match=r"revision none \(empty\).*cxr-worker db upgrade"
        ):
            q.check_schema()
        upgrade(database_url)
        assert q.check_schema() == head_revision()
        assert q.lease == timedelta(seconds=60) and q.max_attempts == 3
    finally:
        q.close()


def test_upgrade_from_0001_keeps_events(database_url: str) -> None:
    """0002 adds ``events.delivery_id`` to a database that already has studies and events."""
    upgrade(database_url, "0001_initial")
    assert current_revision(database_url) == "0001_initial"
    now = datetime.now(UTC)
    eng = make_engine(database_url)
    try:
        with eng.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO studies (id, study_uid, state, created_at, updated_at) "
                    "VALUES (1, '1.2.3', 'receiving', :t, :t)"
                ),
                {"t": now.replace(tzinfo=None)},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO events (study_id, at, from_state, to_state, reason, actor) "
                    "VALUES (1, :t, NULL, 'receiving', 'first instance received', 'scp')"
                ),
                {"t": now.replace(tzinfo=None)},
            )
        upgrade(database_url)
        assert current_revision(database_url) == head_revision() == "0003_views_and_errors"
        with eng.connect() as conn:
            rows = conn.execute(sa.text("SELECT study_id, delivery_id, to_state FROM events")).all()
        assert [tuple(r) for r in rows] == [(1, None, "receiving")]
        ix = {i["name"]: i["column_names"] for i in sa.inspect(eng).get_indexes("events")}
        assert ix["ix_events_delivery_id"] == ["delivery_id"]
    finally:
        eng.dispose()


def test_upgrade_from_0002_adds_view_and_last_error(database_url: str) -> None:
    """0003 adds ``instances.view`` and ``studies.last_error(_at)``; existing rows keep their
    values and read NULL there (an old instance's view is unknown: it never holds a study back
    for a lateral)."""
    upgrade(database_url, "0002_delivery_events")
    now = datetime.now(UTC).replace(tzinfo=None)
    eng = make_engine(database_url)
    try:
        with eng.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO studies (id, study_uid, state, created_at, updated_at) "
                    "VALUES (1, '1.2.3', 'done', :t, :t)"
                ),
                {"t": now},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO instances (study_id, sop_instance_uid, sop_class_uid, series_uid,"
                    " transfer_syntax_uid, rel_path, size_bytes, eligible, received_at) VALUES "
                    "(1, '1.2.3.4', '1.2.840.10008.5.1.4.1.1.1', '1.2.3.5', '1.2.840.10008.1.2.1',"
                    " '1.2.3/1.2.3.4.dcm', 10, true, :t)"
                ),
                {"t": now},
            )
        upgrade(database_url)
        assert current_revision(database_url) == "0003_views_and_errors"
        with eng.connect() as conn:
            inst = conn.execute(sa.text("SELECT sop_instance_uid, view FROM instances")).one()
            study = conn.execute(sa.text("SELECT state, last_error FROM studies")).one()
        assert tuple(inst) == ("1.2.3.4", None)
        assert tuple(study) == ("done", None)
    finally:
        eng.dispose()
