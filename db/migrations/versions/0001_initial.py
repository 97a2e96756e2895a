"""Initial queue schema: studies, instances, events, results, deliveries.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

STUDY_STATES = "'receiving', 'ready', 'processing', 'done', 'failed', 'ignored'"
DELIVERY_STATES = "'pending', 'delivered', 'retry', 'failed'"


def upgrade() -> None:
    def ts(name: str, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
        return sa.Column(
            name, sa.DateTime(timezone=True), nullable=nullable
        )  # UTC (db.schema.UTCDateTime)

    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        ts("lease_expires_at"),
        ts("heartbeat_at"),
        ts("first_instance_at"),
        ts("last_instance_at"),
        ts("ready_at"),
        ts("claimed_at"),
        ts("finished_at"),
        sa.Column("reopened_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("needs_reanalysis", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("previous_report_uid", sa.String(64), nullable=True),
        ts("created_at", nullable=False),
        ts("updated_at", nullable=False),
        sa.CheckConstraint(f"state IN ({STUDY_STATES})", name=op.f("ck_studies_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_uid", name=op.f("uq_studies_study_uid")),
    )
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_index("ix_studies_state_last_instance_at", "studies", ["state", "last_instance_at"])
    op.create_index("ix_studies_state_lease_expires_at", "studies", ["state", "lease_expires_at"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("body_part", sa.String(64), nullable=True),
        sa.Column("view_position", sa.String(16), nullable=True),
        sa.Column("rel_path", sa.String(1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("eligible", sa.Boolean(), nullable=False),
        sa.Column("ineligible_reason", sa.Text(), nullable=True),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        ts("received_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_instances_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index("ix_instances_study_id", "instances", ["study_id"])

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        ts("at", nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_events_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_study_id", "events", ["study_id"])

    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        ts("created_at", nullable=False),
        sa.Column(
            "payload", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("report_sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("report_path", sa.String(1024), nullable=True),
        sa.Column("superseded", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_results_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_results")),
    )
    op.create_index("ix_results_study_id", "results", ["study_id"])

    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        ts("next_attempt_at"),
        sa.Column("last_status", sa.Text(), nullable=True),
        ts("updated_at", nullable=False),
        sa.CheckConstraint(f"state IN ({DELIVERY_STATES})", name=op.f("ck_deliveries_state")),
        sa.ForeignKeyConstraint(
            ["result_id"], ["results.id"], name=op.f("fk_deliveries_result_id_results")
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_deliveries_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint(
            "result_id",
            "destination",
            "sop_instance_uid",
            name=op.f("uq_deliveries_result_destination_sop"),
        ),
    )
    op.create_index("ix_deliveries_study_id", "deliveries", ["study_id"])
    op.create_index("ix_deliveries_result_id", "deliveries", ["result_id"])
    op.create_index(
        "ix_deliveries_state_next_attempt_at", "deliveries", ["state", "next_attempt_at"]
    )


def downgrade() -> None:
    for table in ("deliveries", "results", "events", "instances", "studies"):
        op.drop_table(table)
