"""Service: API tokens, job feedback, and the job columns the queue needs (attempt, limits, dispatch).

Written by hand against planner/storage/tables.py (the no-drift test checks it); like 0001 it never
imports Allot's code. Columns are added in batch mode so SQLite (which cannot add a constraint to an
existing table) copies the table; indexes are created outside batch mode.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 19:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("allot_jobs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("max_concurrent", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("latency_s", sa.Float(), nullable=True))
    with op.batch_alter_table("allot_jobs") as batch:
        batch.alter_column("attempt", server_default=None)
    op.create_table(
        "allot_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_allot_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_allot_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_allot_tokens_token_hash")),
    )
    op.create_table(
        "allot_feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("graph", sa.String(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(), nullable=True),
        sa.Column("applied_version_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["applied_version_id"],
            ["allot_graph_versions.id"],
            name=op.f("fk_allot_feedback_applied_version_id_allot_graph_versions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(["job_id"], ["allot_jobs.id"], name=op.f("fk_allot_feedback_job_id_allot_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_allot_feedback")),
    )
    op.create_index(op.f("ix_allot_feedback_job_id"), "allot_feedback", ["job_id"], unique=False)
    op.create_index(op.f("ix_allot_feedback_graph"), "allot_feedback", ["graph"], unique=False)
    op.create_index("ix_allot_jobs_claim", "allot_jobs", ["state", "priority", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_allot_jobs_claim", table_name="allot_jobs")
    op.drop_index(op.f("ix_allot_feedback_graph"), table_name="allot_feedback")
    op.drop_index(op.f("ix_allot_feedback_job_id"), table_name="allot_feedback")
    op.drop_table("allot_feedback")
    op.drop_table("allot_tokens")
    with op.batch_alter_table("allot_jobs") as batch:
        batch.drop_column("latency_s")
        batch.drop_column("score")
        batch.drop_column("dispatched_at")
        batch.drop_column("max_concurrent")
        batch.drop_column("attempt")
