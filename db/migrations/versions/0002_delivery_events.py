"""Delivery events: ``events.delivery_id`` (nullable) marks a delivery's state change.

Revision ID: 0002_delivery_events
Revises: 0001_initial
Create Date: 2027-01-11
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_delivery_events"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch: SQLite cannot add a foreign key to an existing table (the table is copied there).
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("delivery_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_events_delivery_id_deliveries"), "deliveries", ["delivery_id"], ["id"]
        )
        batch.create_index("ix_events_delivery_id", ["delivery_id"])


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_delivery_id")
        batch.drop_constraint(op.f("fk_events_delivery_id_deliveries"), type_="foreignkey")
        batch.drop_column("delivery_id")
