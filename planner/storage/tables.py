"""Allot's lasting database schema, as SQLModel table models on one ``MetaData``.

Alembic owns the schema (``alembic/versions``); these models are what migrations are checked against
(``tests/test_migrations.py`` fails on any drift). Rules that keep migrations stable on SQLite and
PostgreSQL alike:

- every table and constraint has an explicit name (``NAMING_CONVENTION``), so a later migration can
  drop or alter it by name, also in SQLite's batch mode;
- datetimes are timezone-aware UTC (``UTCDateTime``) whatever the backend stores;
- JSON is SQLAlchemy's ``JSON`` (``json`` on PostgreSQL, text on SQLite); a plan is stored as the text of
  its canonical JSON so its sha256 (the plan id) can be recomputed byte for byte;
- states are strings with a CHECK constraint: the state machine lives in the schema.

Every table name starts with ``allot_``: optuna's RDB storage, which may live in the same database (a
TPE strategy persisting its own study), owns ``studies`` and ``trials``. Only tables in ``metadata`` are
Allot's; other tables in the database are never touched by Allot's migrations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from planner.trial import TrialState

__all__ = [
    "JOB_STATES",
    "NAMING_CONVENTION",
    "TRIAL_STATES",
    "AllotTable",
    "CatalogEntryRow",
    "FeedbackRow",
    "GraphVersionRow",
    "JobRow",
    "PlanRow",
    "SampleRow",
    "StudyRow",
    "TaskRow",
    "TokenRow",
    "TrialRow",
    "UTCDateTime",
    "finite_prefix_scores",
    "finite_scores",
    "metadata",
    "strict_json",
    "utcnow",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)
"""Allot's tables and nothing else: Alembic's ``target_metadata`` and its ``include_name`` filter."""

TRIAL_STATES: tuple[str, ...] = tuple(state.value for state in TrialState)
JOB_STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
"""A job's life: queued -> running -> succeeded | failed; queued or running -> cancelled."""


def utcnow() -> datetime:
    """Now, timezone-aware UTC: the only kind of datetime Allot stores."""
    return datetime.now(UTC)


def strict_json(value: Any, what: str) -> Any:
    """``value`` as it comes back from a JSON column (a deep copy), or ``ValueError`` naming ``what``.

    Strict: NaN and infinities are refused, because PostgreSQL's ``json`` refuses them and SQLite would
    store them; a value that works on one backend must work on all.
    """
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON (no NaN or infinity, string keys): {exc}") from exc


def finite_scores(score: float | None, spread: float | None, scores: Iterable[float]) -> tuple[float, ...]:
    """Check a trial's result before storing it; returns ``scores`` as floats. NaN is not a score."""
    values = tuple(float(value) for value in scores)
    for name, value in (("score", score), ("spread", spread), *(("scores", v) for v in values)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}: record a failure as FAIL instead")
    return values


def finite_prefix_scores(prefix_scores: Mapping[int, float] | None) -> dict[int, float]:
    """Check a trial's prefix votes (sample count -> score) before storing them; returns them as ints and floats."""
    shown = {int(k): float(v) for k, v in (prefix_scores or {}).items()}
    for count, value in shown.items():
        if count < 1 or not math.isfinite(value):
            raise ValueError(f"prefix_scores must map sample counts >= 1 to finite scores, got {count}: {value}")
    return shown


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always returns aware UTC, also on SQLite (which stores no zone).

    Naive datetimes are refused on the way in: guessing their zone is how timestamps go wrong.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Allot stores timezone-aware UTC datetimes only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _json(*, nullable: bool = False) -> Any:
    """A fresh JSON column (a ``Column`` object belongs to one table only)."""
    return Column(JSON, nullable=nullable)


def _created_at() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, sa_column_kwargs={"default": utcnow})


def _state_check(states: tuple[str, ...]) -> CheckConstraint:
    allowed = ", ".join(f"'{state}'" for state in states)
    return CheckConstraint(f"state IN ({allowed})", name="state")


class AllotTable(SQLModel, registry=registry(metadata=metadata)):
    """Base of Allot's table models: puts them on ``metadata``, not on SQLModel's global one."""


class TaskRow(AllotTable, table=True):
    """A task definition (stages, prompts, dataset reference, scorer) as loaded from its file."""

    __tablename__ = "allot_tasks"
    __table_args__ = (UniqueConstraint("name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=String)
    kind: str = Field(sa_type=String)
    definition: dict[str, Any] = Field(sa_column=_json())
    created_at: datetime = _created_at()


class CatalogEntryRow(AllotTable, table=True):
    """One model of a catalog: its ``ModelSpec`` as JSON. API keys never go here (env or secret store)."""

    __tablename__ = "allot_model_catalog"
    __table_args__ = (UniqueConstraint("catalog", "model"),)

    id: int | None = Field(default=None, primary_key=True)
    catalog: str = Field(sa_type=String)
    model: str = Field(sa_type=String)
    spec: dict[str, Any] = Field(sa_column=_json())


class StudyRow(AllotTable, table=True):
    """A study's configuration: everything needed to resume it in another process."""

    __tablename__ = "allot_studies"
    __table_args__ = (UniqueConstraint("name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=String)
    task_id: int | None = Field(default=None, foreign_key="allot_tasks.id")
    strategy: str = Field(sa_type=String)
    strategy_params: dict[str, Any] = Field(sa_column=_json())
    environment: dict[str, Any] = Field(sa_column=_json())
    budget_limit: float = Field(sa_type=Float)
    budget_unit: str = Field(sa_type=String(16))
    seed: int = Field(sa_type=Integer)
    space: dict[str, Any] = Field(sa_column=_json())
    created_at: datetime = _created_at()


class PlanRow(AllotTable, table=True):
    """A plan by id: the sha256 of ``plan``, the text of its canonical JSON (stored verbatim)."""

    __tablename__ = "allot_plans"

    plan_id: str = Field(sa_type=String(64), primary_key=True)
    plan: str = Field(sa_type=Text)
    summary: str = Field(sa_type=Text)
    created_at: datetime = _created_at()


class TrialRow(AllotTable, table=True):
    """One proposed plan and its evaluation. Cost columns are per task input; ``est_*`` is the estimate
    the budget was checked against, ``planner_*`` what the planner LLM spent proposing it."""

    __tablename__ = "allot_trials"
    __table_args__ = (UniqueConstraint("study_id", "number"), _state_check(TRIAL_STATES))

    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(sa_type=Integer, foreign_key="allot_studies.id", index=True, ondelete="CASCADE", nullable=False)
    number: int = Field(sa_type=Integer)
    state: str = Field(sa_type=String(16))
    plan_id: str = Field(sa_type=String(64), foreign_key="allot_plans.plan_id")
    score: float | None = Field(default=None, sa_type=Float)
    spread: float | None = Field(default=None, sa_type=Float)
    scores: list[float] = Field(default_factory=list, sa_column=_json())
    prefix_scores: dict[str, float] | None = Field(default=None, sa_column=_json(nullable=True))
    """Sample count -> score of the last stage voting over that many of its samples (``FrozenTrial.prefix_scores``)."""
    flops: float | None = Field(default=None, sa_type=Float)
    prompt_tokens: float | None = Field(default=None, sa_type=Float)
    output_tokens: float | None = Field(default=None, sa_type=Float)
    usd: float | None = Field(default=None, sa_type=Float)
    est_flops: float = Field(sa_type=Float)
    est_prompt_tokens: float = Field(sa_type=Float)
    est_output_tokens: float = Field(sa_type=Float)
    est_usd: float | None = Field(default=None, sa_type=Float)
    rationale: str = Field(default="", sa_type=Text)
    strategy_info: dict[str, Any] = Field(default_factory=dict, sa_column=_json())
    planner_flops: float = Field(default=0.0, sa_type=Float)
    planner_prompt_tokens: float = Field(default=0.0, sa_type=Float)
    planner_output_tokens: float = Field(default=0.0, sa_type=Float)
    planner_usd: float | None = Field(default=None, sa_type=Float)
    error: str | None = Field(default=None, sa_type=Text)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SampleRow(AllotTable, table=True):
    """One stored generation, keyed so that any later plan asking for it reuses it instead of paying."""

    __tablename__ = "allot_samples"
    __table_args__ = (UniqueConstraint("model", "prompt_hash", "params_hash", "sample_index"),)

    id: int | None = Field(default=None, primary_key=True)
    model: str = Field(sa_type=String)
    prompt_hash: str = Field(sa_type=String(64))
    params_hash: str = Field(sa_type=String(64))
    sample_index: int = Field(sa_type=Integer)
    text: str = Field(sa_type=Text)
    prompt_tokens: int = Field(sa_type=Integer)
    output_tokens: int = Field(sa_type=Integer)
    latency_s: float | None = Field(default=None, sa_type=Float)
    usd: float | None = Field(default=None, sa_type=Float)
    created_at: datetime = _created_at()


class GraphVersionRow(AllotTable, table=True):
    """One version of a learned probabilistic graph; versions form a chain you can diff and review.

    ``graph`` names the learned graph (e.g. the task); ``definition`` is the graph itself as JSON.
    """

    __tablename__ = "allot_graph_versions"
    __table_args__ = (UniqueConstraint("graph", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    graph: str = Field(sa_type=String)
    version: int = Field(sa_type=Integer)
    parent_id: int | None = Field(default=None, foreign_key="allot_graph_versions.id", ondelete="SET NULL")
    definition: dict[str, Any] = Field(sa_column=_json())
    cause: str = Field(default="", sa_type=Text)
    pinned: bool = Field(default=False)
    created_at: datetime = _created_at()


class JobRow(AllotTable, table=True):
    """One execution of a learned plan on a new input. This row is the source of truth for the queue:
    workers claim with a conditional update on ``state``, beat ``heartbeat_at``, and a reaper re-queues
    running jobs whose heartbeat stopped."""

    __tablename__ = "allot_jobs"
    __table_args__ = (
        UniqueConstraint("idempotency_key"),
        _state_check(JOB_STATES),
        Index("ix_allot_jobs_claim", "state", "priority", "id"),  # the claim query's order
    )

    id: int | None = Field(default=None, primary_key=True)
    task_id: int | None = Field(default=None, foreign_key="allot_tasks.id")
    state: str = Field(default="queued", sa_type=String(16), index=True)
    attempt: int = Field(default=0, sa_type=Integer)
    """How many times a worker claimed this job; a worker may only finish the attempt it claimed."""
    max_concurrent: int | None = Field(default=None, sa_type=Integer)
    """Most jobs of ``owner`` that may run at once (from the submitting token); ``None``: no limit."""
    dispatched_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """When a queue message for this job was last sent; the reaper re-sends one for a job queued too long."""
    score: float | None = Field(default=None, sa_type=Float)
    latency_s: float | None = Field(default=None, sa_type=Float)
    input: dict[str, Any] = Field(sa_column=_json())
    plan_id: str | None = Field(default=None, sa_type=String(64), foreign_key="allot_plans.plan_id")
    graph_version_id: int | None = Field(default=None, foreign_key="allot_graph_versions.id")
    result: dict[str, Any] | None = Field(default=None, sa_column=_json(nullable=True))
    budget_limit: float | None = Field(default=None, sa_type=Float)
    budget_unit: str | None = Field(default=None, sa_type=String(16))
    flops: float | None = Field(default=None, sa_type=Float)
    prompt_tokens: float | None = Field(default=None, sa_type=Float)
    output_tokens: float | None = Field(default=None, sa_type=Float)
    usd: float | None = Field(default=None, sa_type=Float)
    idempotency_key: str | None = Field(default=None, sa_type=String)
    priority: int = Field(default=0, sa_type=Integer)
    owner: str | None = Field(default=None, sa_type=String)
    worker: str | None = Field(default=None, sa_type=String)
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = _created_at()
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    error: str | None = Field(default=None, sa_type=Text)


class TokenRow(AllotTable, table=True):
    """An API token: only its sha256 is stored. ``scope`` is ``read`` or ``write`` (write implies read)."""

    __tablename__ = "allot_tokens"
    __table_args__ = (UniqueConstraint("token_hash"), UniqueConstraint("name"))

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=String)
    owner: str = Field(sa_type=String)
    token_hash: str = Field(sa_type=String(64))
    scope: str = Field(sa_type=String(16))
    max_concurrent: int | None = Field(default=None, sa_type=Integer)
    created_at: datetime = _created_at()
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class FeedbackRow(AllotTable, table=True):
    """One piece of evidence about a job's plan: its own scored result or a user's later feedback.

    Pending rows (``applied_version_id`` null) are what the next update of ``graph`` learns from; the
    version they went into is recorded so every change of a learned graph can be traced to its jobs.
    """

    __tablename__ = "allot_feedback"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(sa_type=Integer, foreign_key="allot_jobs.id", index=True, ondelete="CASCADE", nullable=False)
    graph: str = Field(sa_type=String, index=True)
    score: float = Field(sa_type=Float)
    source: str = Field(sa_type=String(16))
    """``result`` (scored when the job finished) or ``user`` (posted later)."""
    answer: str | None = Field(default=None, sa_type=Text)
    comment: str | None = Field(default=None, sa_type=Text)
    owner: str | None = Field(default=None, sa_type=String)
    applied_version_id: int | None = Field(default=None, foreign_key="allot_graph_versions.id", ondelete="SET NULL")
    created_at: datetime = _created_at()
