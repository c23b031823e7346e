"""Trials keep what their evaluation showed of the last stage at fewer samples (``allot_trials.prefix_scores``).

Written by hand against planner/storage/tables.py (the no-drift test checks it); like 0001 it never imports
Allot's code. The column is nullable (trials stored before have none), added in batch mode for SQLite.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("allot_trials") as batch:
        batch.add_column(sa.Column("prefix_scores", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("allot_trials") as batch:
        batch.drop_column("prefix_scores")
