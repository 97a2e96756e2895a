"""Operations: ``instances.view`` (frontal/lateral from the header, for the lateral grace) and
``studies.last_error`` / ``last_error_at`` (the last failed attempt, for ``cxr-worker status``).

Revision ID: 0003_views_and_errors
Revises: 0002_delivery_events
Create Date: 2027-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_views_and_errors"
down_revision = "0002_delivery_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("view", sa.String(16), nullable=True))
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch.add_column(sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("last_error_at")
        batch.drop_column("last_error")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("view")
