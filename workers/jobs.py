"""The job table as a queue: submit, claim, heartbeat, finish, cancel, reap. The SQL row is the truth.

A broker message only wakes a worker; what runs is decided here, in the database, so that priorities,
per-user limits and exactly-once completion hold whatever the broker does (loses messages on a restart,
delivers one twice, re-delivers after a worker died):

- ``submit`` inserts a ``queued`` row (an idempotency key returns the row it already made, for the same
  owner; another owner's key is a conflict) and the caller then sends a message (``mark_dispatched``).
- ``claim(worker)`` takes the best eligible queued job: highest ``priority``, then oldest; skipping jobs
  whose owner already runs ``max_concurrent`` jobs. It sets ``running``, the worker, a fresh heartbeat
  and ``attempt + 1``, with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL and under SQLite's write lock, so two
  workers never claim one job.
- ``heartbeat`` and ``finish`` are conditional on ``(state='running', worker, attempt)``: a worker whose
  job was re-queued (it looked dead) or cancelled learns so from a ``False``, and its late result is
  dropped. A job therefore completes exactly once, by the attempt that holds it.
- ``reap`` re-queues running jobs whose heartbeat is older than ``stale_after_s`` (their worker died) and
  reports queued jobs whose last message is older than ``redispatch_after_s`` (the broker lost it), for
  the caller to send again. Any number of reapers may run: every change is conditional.

Costs are written once, by ``finish``, as the whole run's cost (samples a re-run served from the sample
store count as in the first run), so a re-delivered job never counts twice.

For throughput (``benchmarks/service_throughput.py``) every step also exists for many jobs at once, with
the same conditions: ``submit_many`` (one transaction), ``claim_many`` (the top ``n`` eligible jobs, per-owner
limits counted under the owner's lock as in ``claim``), ``heartbeat_many``, and ``complete_many_and_claim``
(finish a worker's batch, record the scored results, count the pending evidence and claim the next batch in
one transaction). ``claim_with``/``claim_many`` and ``complete_many_and_claim`` take callbacks that run in
the same transaction (the worker chooses and records plans there, and stores the graph versions that
results complete). On PostgreSQL each step is one statement (data-modifying CTEs). Only a finish (and a
submission) waits for the disk at commit: claims, plan records and heartbeats use ``relax_commit`` (lost
only with the database server, and then redone: the job is queued again and the attempt's conditional
writes fail), and the log is flushed in order, so the finish that follows makes them durable too.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Select, Table, and_, bindparam, func, insert, literal, or_, text, true, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from graphs.cost import Cost
from graphs.errors import AllotError
from graphs.plan import Plan
from planner.storage import SQLStorage
from planner.storage._sql import insert_plan, plan_texts
from planner.storage.database import relax_commit
from planner.storage.tables import FeedbackRow, JobRow, PlanRow, TaskRow, strict_json, utcnow

__all__ = [
    "FINISHED_STATES",
    "MAX_JOB_ID",
    "Claim",
    "Feedback",
    "Job",
    "JobConflict",
    "JobNotFound",
    "JobQueue",
    "JobState",
    "ReapReport",
]


T = TypeVar("T")
R = TypeVar("R")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
MAX_JOB_ID = 2**31 - 1
"""The largest job id the ``allot_jobs.id`` column holds (a 32-bit integer on PostgreSQL)."""


class JobNotFound(AllotError, KeyError):
    """No such job (or not one the asking owner may see)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "job not found"


class JobConflict(AllotError, ValueError):
    """The request contradicts the job's state or another owner's idempotency key."""


class Job(BaseModel):
    """A job as the API, the CLI and Python see it (read from ``allot_jobs``)."""

    model_config = ConfigDict(frozen=True)

    id: int
    task: str | None
    state: JobState
    input: dict[str, Any]
    owner: str | None = None
    priority: int = 0
    attempt: int = 0
    plan_id: str | None = None
    graph_version_id: int | None = None
    result: dict[str, Any] | None = None
    score: float | None = None
    cost: dict[str, float | None] | None = None
    budget_limit: float | None = None
    budget_unit: str | None = None
    error: str | None = None
    idempotency_key: str | None = None
    worker: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    latency_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


class Feedback(BaseModel):
    """One piece of evidence on a job's plan: its own scored result, or a user's later score."""

    model_config = ConfigDict(frozen=True)

    id: int
    job_id: int
    graph: str
    score: float
    source: str
    answer: str | None = None
    comment: str | None = None
    applied_version_id: int | None = None
    created_at: datetime


@dataclass(frozen=True)
class Claim:
    """What a worker holds while it runs a job: finish and heartbeat only with this."""

    job: Job
    worker: str
    attempt: int


@dataclass(frozen=True)
class ReapReport:
    requeued: tuple[int, ...]
    """Running jobs whose worker stopped beating: now queued again (send each a message)."""
    redispatch: tuple[int, ...]
    """Queued jobs whose last message is old: the broker may have lost it (send each a message)."""


# -- the hot path's statements, built once (building SQLAlchemy statements per call costs more than running them)

_JOBS: Table = JobRow.__table__  # type: ignore[attr-defined]
_FEEDBACK: Table = FeedbackRow.__table__  # type: ignore[attr-defined]
_COLUMNS = tuple(_JOBS.columns)
"""Every column of a job row, for ``UPDATE ... RETURNING``: the row as written, without reading it again."""
_OUTCOME_COLUMNS = ("result", "score", "flops", "prompt_tokens", "output_tokens", "usd", "finished_at", "latency_s")
_CLAIMED_COLUMNS = tuple(
    column for column in _COLUMNS if column.name not in (*_OUTCOME_COLUMNS, "max_concurrent", "dispatched_at", "heartbeat_at")
)
"""What a claim returns of its row: a claimable (queued) job has no outcome yet, so those columns are left out
(they are null); every column costs the driver a column description per statement."""
_QUEUED, _RUNNING = "queued", "running"

_HELD = and_(
    _JOBS.c.id == bindparam("held_id"),
    _JOBS.c.state == _RUNNING,
    _JOBS.c.worker == bindparam("held_worker"),
    _JOBS.c.attempt == bindparam("held_attempt"),
)
"""The row is still this claim's: running, by this worker, in this attempt."""


def _held(claim: Claim) -> dict[str, Any]:
    return {"held_id": claim.job.id, "held_worker": claim.worker, "held_attempt": claim.attempt}


def _candidates(postgres: bool, by_id: bool) -> Select[Any]:
    """Queued jobs in claim order whose owner may run one more (counted again under a lock before taking it)."""
    others = _JOBS.alias("others")
    busy_owner = (
        select(func.count())
        .select_from(others)
        .where(others.c.owner == _JOBS.c.owner, others.c.state == _RUNNING)
        .scalar_subquery()
    )
    query = select(_JOBS.c.id, _JOBS.c.owner, _JOBS.c.max_concurrent).where(
        _JOBS.c.state == _QUEUED,
        or_(_JOBS.c.max_concurrent.is_(None), _JOBS.c.owner.is_(None), busy_owner < _JOBS.c.max_concurrent),
    )
    if by_id:
        query = query.where(_JOBS.c.id == bindparam("job_id"))
    query = query.order_by(_JOBS.c.priority.desc(), _JOBS.c.id)
    if postgres:
        query = query.with_for_update(skip_locked=True, of=_JOBS)
    return query


_CANDIDATES = {(postgres, by_id): _candidates(postgres, by_id) for postgres in (False, True) for by_id in (False, True)}
_FIRST_CANDIDATE = {key: query.limit(1) for key, query in _CANDIDATES.items()}
_OWNER_RUNNING = select(func.count()).select_from(_JOBS).where(_JOBS.c.state == _RUNNING, _JOBS.c.owner == bindparam("owner"))
_OWNER_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_TAKE = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("take_id"), _JOBS.c.state == _QUEUED)
    .values(
        state=_RUNNING,
        worker=bindparam("take_worker"),
        heartbeat_at=bindparam("take_now"),
        started_at=bindparam("take_now"),
        attempt=_JOBS.c.attempt + 1,
    )
    .returning(*_CLAIMED_COLUMNS)
)
_BEAT = (
    update(_JOBS)
    .where(
        _JOBS.c.state == _RUNNING,
        tuple_(_JOBS.c.id, _JOBS.c.worker, _JOBS.c.attempt).in_(bindparam("keys", expanding=True)),
    )
    .values(heartbeat_at=bindparam("now"))
    .returning(_JOBS.c.id, _JOBS.c.worker, _JOBS.c.attempt)
)
_RETURN = (
    update(_JOBS)
    .where(
        _JOBS.c.state == _RUNNING,
        tuple_(_JOBS.c.id, _JOBS.c.worker, _JOBS.c.attempt).in_(bindparam("keys", expanding=True)),
    )
    .values(state=_QUEUED, worker=None)
)
"""Give held jobs that were never started back to the queue (their attempt stays counted)."""
_SET_PLAN = update(_JOBS).where(_HELD).values(plan_id=bindparam("set_plan_id"), graph_version_id=bindparam("set_version_id"))
_OUTCOME = ("state", "result", "score", "error", "finished_at", "latency_s")
_COSTS = ("flops", "prompt_tokens", "output_tokens", "usd")
_FINISH = {
    (with_cost, full): update(_JOBS)
    .where(_HELD)
    .values({name: bindparam(f"out_{name}", type_=_JOBS.c[name].type) for name in _OUTCOME + (_COSTS if with_cost else ())})
    .returning(*(_COLUMNS if full else (_JOBS.c.id,)))
    for with_cost in (False, True)
    for full in (False, True)
}
"""Finish the held attempt; ``full``: return the whole row (for a ``Job``), else only its id."""
_ADD_RESULT = insert(_FEEDBACK)
_PENDING = (
    select(func.count())
    .select_from(_FEEDBACK)
    .where(_FEEDBACK.c.graph == bindparam("graph"), _FEEDBACK.c.applied_version_id.is_(None))
)


# PostgreSQL: each step of a job in one statement (data-modifying CTEs), where SQLite takes two or three.


def _pg_take(by_id: bool, many: bool = False) -> Select[Any]:
    """Lock the first candidate (``many``: the first ``n``) and take it unless its owner has a limit (then the
    candidate's id comes back alone, for ``_claim``'s locked count): no row when nothing is eligible."""
    first = _CANDIDATES[(True, by_id)].limit(bindparam("n")) if many else _FIRST_CANDIDATE[(True, by_id)]
    candidate = first.cte("candidate")
    taken = (
        update(_JOBS)
        .where(
            _JOBS.c.id == candidate.c.id,
            _JOBS.c.state == _QUEUED,
            or_(candidate.c.max_concurrent.is_(None), candidate.c.owner.is_(None)),
        )
        .values(
            state=_RUNNING,
            worker=bindparam("take_worker"),
            heartbeat_at=bindparam("take_now"),
            started_at=bindparam("take_now"),
            attempt=_JOBS.c.attempt + 1,
        )
        .returning(*_CLAIMED_COLUMNS)
        .cte("taken")
    )
    joined = candidate.outerjoin(taken, taken.c.id == candidate.c.id) if many else candidate.outerjoin(taken, true())
    return select(candidate.c.id.label("candidate_id"), *taken.c).select_from(joined)


_PG_FINISH_MANY = text(
    """
WITH v AS (
    SELECT * FROM unnest(
        CAST(:ids AS integer[]), CAST(:workers AS text[]), CAST(:attempts AS integer[]), CAST(:states AS text[]),
        CAST(:results AS text[]), CAST(:scores AS float8[]), CAST(:errors AS text[]), CAST(:latencies AS float8[]),
        CAST(:flops AS float8[]), CAST(:prompt_tokens AS float8[]), CAST(:output_tokens AS float8[]),
        CAST(:usd AS float8[]), CAST(:graphs AS text[]), CAST(:owners AS text[])
    ) AS v(id, worker, attempt, state, result, score, error, latency_s, flops, prompt_tokens, output_tokens, usd, graph, owner)
), done AS (
    UPDATE allot_jobs AS j
    SET state = v.state, result = CAST(v.result AS json), score = v.score, error = v.error, finished_at = :now,
        latency_s = v.latency_s, flops = v.flops, prompt_tokens = v.prompt_tokens, output_tokens = v.output_tokens, usd = v.usd
    FROM v
    WHERE j.id = v.id AND j.state = 'running' AND j.worker = v.worker AND j.attempt = v.attempt
    RETURNING j.id
), added AS (
    INSERT INTO allot_feedback (job_id, graph, score, source, owner, created_at)
    SELECT v.id, v.graph, v.score, 'result', v.owner, :now FROM v JOIN done ON done.id = v.id
    WHERE v.graph IS NOT NULL AND v.score IS NOT NULL
    RETURNING graph
)
SELECT done.id AS id, NULL AS graph, NULL AS pending FROM done
UNION ALL
SELECT NULL, g.graph,
    (SELECT count(*) FROM allot_feedback AS f WHERE f.graph = g.graph AND f.applied_version_id IS NULL)
    + (SELECT count(*) FROM added AS a WHERE a.graph = g.graph)
FROM (SELECT DISTINCT graph FROM added) AS g
"""
)
"""PostgreSQL: finish several held attempts (each only if still held), record their scored results as
evidence and count each graph's pending evidence, in one statement: rows ``(finished job id)`` and
``(graph, pending)``. Cost columns are set for every job (null when a failed run has none: a job that can
be held has no cost yet, so that writes what ``finish`` leaves)."""

_PG_TAKE = {by_id: _pg_take(by_id) for by_id in (False, True)}
_PG_TAKE_MANY = _pg_take(False, many=True)
_PG_RECORD_PLANS = (
    update(_JOBS)
    .where(
        _JOBS.c.id.in_(bindparam("job_ids", expanding=True)),
        _JOBS.c.state == _RUNNING,
        _JOBS.c.worker == bindparam("held_worker"),
    )
    .values(plan_id=bindparam("set_plan_id"), graph_version_id=bindparam("set_version_id"))
)
"""Store a plan and record it for several jobs this worker has just claimed (in the same transaction)."""


def _pg_finish_with_result(full: bool) -> Select[Any]:
    """Finish, record the scored result as evidence for the graph and count the graph's pending evidence."""
    done = _FINISH[(True, full)].cte("done")
    added = (
        insert(_FEEDBACK)
        .from_select(
            ["job_id", "graph", "score", "source", "owner", "created_at"],
            select(
                done.c.id,
                bindparam("graph", type_=_FEEDBACK.c.graph.type),
                bindparam("result_score", type_=_FEEDBACK.c.score.type),
                literal("result", type_=_FEEDBACK.c.source.type),
                bindparam("result_owner", type_=_FEEDBACK.c.owner.type),
                bindparam("result_at", type_=_FEEDBACK.c.created_at.type),
            ),
        )
        .returning(_FEEDBACK.c.id)
        .cte("added")
    )
    pending = _PENDING.scalar_subquery() + select(func.count()).select_from(added).scalar_subquery()
    return select(*done.c, pending.label("pending"))


_PG_FINISH_WITH_RESULT = {full: _pg_finish_with_result(full) for full in (False, True)}
_STORE_PLAN = (
    pg_insert(PlanRow.__table__)  # type: ignore[attr-defined]
    .values(
        plan_id=bindparam("set_plan_id"), plan=bindparam("p_text"), summary=bindparam("p_summary"), created_at=bindparam("p_at")
    )
    .on_conflict_do_nothing(index_elements=["plan_id"])
    .cte("stored_plan")
)
_PG_RECORD_PLAN = _SET_PLAN.add_cte(_STORE_PLAN)
"""Store the plan (unless stored) and record it as the attempt's, in one statement."""
_PG_RECORD_PLANS = _PG_RECORD_PLANS.add_cte(_STORE_PLAN)


def _owner_lock_key(owner: str) -> int:
    return zlib.crc32(b"allot-owner:" + owner.encode()) - 2**31


def _job(row: Any, task: str | None) -> Job:
    """A ``Job`` from a ``JobRow`` or a row of its columns (``RETURNING``; a claim's leaves out the outcome
    columns, which a claimable job does not have yet)."""
    assert row.id is not None
    outcome = {name: getattr(row, name, None) for name in _OUTCOME_COLUMNS}
    cost = None
    if outcome["flops"] is not None:
        cost = {name: outcome[name] for name in _COSTS}
    return Job(
        id=row.id,
        task=task,
        state=JobState(row.state),
        input=dict(row.input or {}),
        owner=row.owner,
        priority=row.priority,
        attempt=row.attempt,
        plan_id=row.plan_id,
        graph_version_id=row.graph_version_id,
        result=outcome["result"],
        score=outcome["score"],
        cost=cost,
        budget_limit=row.budget_limit,
        budget_unit=row.budget_unit,
        error=row.error,
        idempotency_key=row.idempotency_key,
        worker=row.worker,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=outcome["finished_at"],
        latency_s=outcome["latency_s"],
    )


def _feedback(row: FeedbackRow) -> Feedback:
    assert row.id is not None
    return Feedback(
        id=row.id,
        job_id=row.job_id,
        graph=row.graph,
        score=row.score,
        source=row.source,
        answer=row.answer,
        comment=row.comment,
        applied_version_id=row.applied_version_id,
        created_at=row.created_at,
    )


def _outcome(
    state: JobState,
    result: Mapping[str, Any] | None,
    cost: Cost | None,
    score: float | None,
    error: str | None,
    latency_s: float | None,
) -> dict[str, Any]:
    """The parameters of ``_FINISH``: a run's outcome, checked."""
    if state not in (JobState.SUCCEEDED, JobState.FAILED):
        raise ValueError(f"a run finishes as succeeded or failed, not {state}")
    if score is not None and not math.isfinite(score):
        raise ValueError(f"a job's score must be finite, got {score}")
    values: dict[str, Any] = {
        "out_state": state.value,
        "out_result": None if result is None else strict_json(dict(result), "a job's result"),
        "out_score": score,
        "out_error": error,
        "out_finished_at": utcnow(),
        "out_latency_s": latency_s,
    }
    if cost is not None:
        values.update(
            out_flops=cost.flops, out_prompt_tokens=cost.prompt_tokens, out_output_tokens=cost.output_tokens, out_usd=cost.usd
        )
    return values


class JobQueue:
    """Jobs on an ``SQLStorage`` (a SQLite file or PostgreSQL). Thread-safe; one per process is enough."""

    def __init__(self, storage: SQLStorage) -> None:
        if not isinstance(storage, SQLStorage):
            raise TypeError(f"jobs live in an SQL database: got {type(storage).__name__}, use an SQLStorage")
        self.storage = storage
        self._task_names: dict[int, str] = {}

    # -- reading --------------------------------------------------------------------------------------

    def _task_name(self, session: Session, task_id: int | None) -> str | None:
        if task_id is None:
            return None
        name = self._task_names.get(task_id)
        if name is None:
            row = session.get(TaskRow, task_id)
            name = None if row is None else row.name
            if name is not None:
                self._task_names[task_id] = name
        return name

    def get(self, job_id: int, *, owner: str | None = None) -> Job:
        """The job; ``JobNotFound`` if it does not exist or (with ``owner``) belongs to someone else."""
        if not 0 < job_id <= MAX_JOB_ID:  # PostgreSQL would refuse to compare the 32-bit id column with it
            raise JobNotFound(f"no job {job_id}")
        with self.storage.transaction() as session:
            row = session.get(JobRow, job_id)
            if row is None or (owner is not None and row.owner != owner):
                raise JobNotFound(f"no job {job_id}")
            return _job(row, self._task_name(session, row.task_id))

    def list(
        self,
        *,
        owner: str | None = None,
        state: JobState | str | None = None,
        task: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[Job]:
        """Newest first; ``owner`` restricts to one owner's jobs, ``before_id`` pages back."""
        query = select(JobRow)
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        if state is not None:
            query = query.where(JobRow.state == JobState(state).value)
        if before_id is not None:
            query = query.where(col(JobRow.id) < before_id)
        with self.storage.transaction() as session:
            if task is not None:
                task_row = session.exec(select(TaskRow).where(TaskRow.name == task)).first()
                if task_row is None:
                    return []
                query = query.where(JobRow.task_id == task_row.id)
            rows = session.exec(query.order_by(col(JobRow.id).desc()).limit(max(1, min(limit, 1000)))).all()
            return [_job(row, self._task_name(session, row.task_id)) for row in rows]

    def counts(self, *, task: str | None = None) -> dict[str, int]:
        """How many jobs are in each state."""
        query = select(JobRow.state, func.count()).group_by(JobRow.state)
        with self.storage.transaction() as session:
            if task is not None:
                task_row = session.exec(select(TaskRow).where(TaskRow.name == task)).first()
                query = query.where(JobRow.task_id == (task_row.id if task_row else -1))
            found = dict(session.exec(query).all())
        return {state.value: int(found.get(state.value, 0)) for state in JobState}

    # -- submitting -----------------------------------------------------------------------------------

    def submit(
        self,
        task_id: int,
        input: Mapping[str, Any],
        *,
        owner: str | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
        budget_limit: float | None = None,
        budget_unit: str | None = None,
        plan_id: str | None = None,
        graph_version_id: int | None = None,
        max_concurrent: int | None = None,
        dispatched: bool = True,
    ) -> tuple[Job, bool]:
        """Store a queued job; returns ``(job, created)``. With an ``idempotency_key`` already used by
        ``owner`` the existing job comes back with ``created=False``; used by another owner: ``JobConflict``.
        ``dispatched``: the caller sends its message right after (a lost send is re-sent by the reaper)."""
        stored = strict_json(dict(input), "a job's input")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if budget_limit is not None and not (math.isfinite(budget_limit) and budget_limit > 0):
            raise ValueError(f"a job's budget must be a positive finite number, got {budget_limit}")
        row = JobRow(
            task_id=task_id,
            state=JobState.QUEUED.value,
            input=stored,
            owner=owner,
            priority=int(priority),
            idempotency_key=idempotency_key,
            budget_limit=budget_limit,
            budget_unit=budget_unit,
            plan_id=plan_id,
            graph_version_id=graph_version_id,
            max_concurrent=max_concurrent,
            created_at=utcnow(),
            dispatched_at=utcnow() if dispatched else None,
        )
        try:
            with self.storage.transaction(write=True) as session:
                session.add(row)
                session.flush()
                session.refresh(row)
                return _job(row, self._task_name(session, row.task_id)), True
        except IntegrityError:
            if idempotency_key is None:
                raise
        with self.storage.transaction() as session:
            existing = session.exec(select(JobRow).where(JobRow.idempotency_key == idempotency_key)).first()
            if existing is None:  # pragma: no cover - the conflicting row vanished (deleted) meanwhile
                raise JobConflict(f"idempotency key {idempotency_key!r} conflicted, then vanished: submit again")
            if existing.owner != owner:
                raise JobConflict(f"idempotency key {idempotency_key!r} is already used by another user")
            if existing.task_id != task_id or existing.input != stored:
                raise JobConflict(
                    f"idempotency key {idempotency_key!r} was used for job {existing.id} with another task or input"
                )
            return _job(existing, self._task_name(session, existing.task_id)), False

    def submit_many(
        self,
        task_id: int,
        inputs: Sequence[Mapping[str, Any]],
        *,
        owner: str | None = None,
        priority: int = 0,
        idempotency_keys: Sequence[str | None] | None = None,
        budget_limit: float | None = None,
        budget_unit: str | None = None,
        plan_id: str | None = None,
        graph_version_id: int | None = None,
        max_concurrent: int | None = None,
        dispatched: bool = True,
    ) -> list[tuple[Job, bool]]:
        """``submit`` for many inputs of one task in one transaction: all stored, or none (a key used by
        another owner, or for another task or input, is a ``JobConflict`` and nothing is stored). Returns
        ``(job, created)`` per input, in order; ``idempotency_keys`` (one per input, ``None`` for none)
        behave as in ``submit``."""
        stored = [strict_json(dict(job_input), "a job's input") for job_input in inputs]
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(stored)
        if len(keys) != len(stored):
            raise ValueError(f"{len(keys)} idempotency keys for {len(stored)} inputs: give one per input (or None)")
        named = [key for key in keys if key is not None]
        if len(set(named)) != len(named):
            raise ValueError("an idempotency key appears twice in one submission")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if budget_limit is not None and not (math.isfinite(budget_limit) and budget_limit > 0):
            raise ValueError(f"a job's budget must be a positive finite number, got {budget_limit}")
        if not stored:
            return []
        now = utcnow()
        common = {
            "task_id": task_id,
            "state": JobState.QUEUED.value,
            "owner": owner,
            "priority": int(priority),
            "budget_limit": budget_limit,
            "budget_unit": budget_unit,
            "plan_id": plan_id,
            "graph_version_id": graph_version_id,
            "max_concurrent": max_concurrent,
            "attempt": 0,
            "created_at": now,
            "dispatched_at": now if dispatched else None,
        }
        rows = [{**common, "input": value, "idempotency_key": key} for value, key in zip(stored, keys, strict=True)]
        out: list[tuple[Job, bool] | None] = [None] * len(rows)
        with self.storage.transaction(write=True) as session:
            dialect = session.get_bind().dialect.name
            task = self._task_name(session, task_id)
            plain = [i for i, key in enumerate(keys) if key is None]
            if plain:
                statement = insert(JobRow).returning(*_COLUMNS, sort_by_parameter_order=True)  # type: ignore[arg-type]
                made = session.execute(statement, [rows[i] for i in plain]).all()
                for i, row in zip(plain, made, strict=True):
                    out[i] = (_job(row, task), True)
            keyed = [i for i, key in enumerate(keys) if key is not None]
            if keyed and dialect in ("postgresql", "sqlite"):
                into = pg_insert if dialect == "postgresql" else sqlite_insert
                statement = into(JobRow).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(*_COLUMNS)  # type: ignore[arg-type]
                by_key = {row.idempotency_key: row for row in session.execute(statement, [rows[i] for i in keyed]).all()}
                for i in keyed:
                    if keys[i] in by_key:
                        out[i] = (_job(by_key[keys[i]], task), True)
            elif keyed:  # pragma: no cover - PostgreSQL and SQLite are the databases Allot runs on
                raise NotImplementedError(f"submitting with idempotency keys in bulk on {dialect}")
            seen = [i for i in keyed if out[i] is None]
            if seen:
                existing = {
                    row.idempotency_key: row
                    for row in session.exec(select(JobRow).where(col(JobRow.idempotency_key).in_([keys[i] for i in seen]))).all()
                }
                for i in seen:
                    row = existing.get(keys[i])
                    if row is None:  # pragma: no cover - the conflicting row was deleted meanwhile
                        raise JobConflict(f"idempotency key {keys[i]!r} conflicted, then vanished: submit again")
                    if row.owner != owner:
                        raise JobConflict(f"idempotency key {keys[i]!r} is already used by another user")
                    if row.task_id != task_id or row.input != stored[i]:
                        raise JobConflict(f"idempotency key {keys[i]!r} was used for job {row.id} with another task or input")
                    out[i] = (_job(row, self._task_name(session, row.task_id)), False)
        return [entry for entry in out if entry is not None]

    def mark_dispatched(self, job_ids: Iterable[int]) -> None:
        """Record that a message was sent for these jobs now (the reaper re-sends one when it gets old)."""
        ids = list(job_ids)
        if not ids:
            return
        with self.storage.transaction(write=True) as session:
            for start in range(0, len(ids), 500):
                session.exec(
                    update(JobRow).where(col(JobRow.id).in_(ids[start : start + 500])).values(dispatched_at=utcnow())  # type: ignore[call-overload]
                )

    # -- running --------------------------------------------------------------------------------------

    def claim(self, worker: str, *, job_id: int | None = None) -> Claim | None:
        """Take the best eligible queued job (or exactly ``job_id`` if it is eligible); ``None`` if none."""
        taken = self.claim_with(worker, None, job_id=job_id)
        return None if taken is None else taken[0]

    def claim_with(
        self, worker: str, prepare: Callable[[Session, Claim], T] | None, *, job_id: int | None = None
    ) -> tuple[Claim, T | None] | None:
        """``claim``, then ``prepare(session, claim)`` in the same transaction (e.g. choose and record the
        plan: ``record_plan(..., session=session)``); ``(claim, what prepare returned)``, or ``None`` if no job
        is eligible. An exception from ``prepare`` undoes the claim: it must return a job's own failures."""
        with self.storage.transaction(write=True) as session:
            # A claim lost in a crash of the database server is harmless: the job is queued again, and this
            # attempt's conditional writes (heartbeat, plan, finish) then fail. ``finish`` commits durably.
            relax_commit(session)
            claim = self._claim(session, worker, job_id)
            if claim is None:
                return None
            return claim, (None if prepare is None else prepare(session, claim))

    def claim_many(
        self, worker: str, limit: int, prepare: Callable[[Session, list[Claim]], list[T]] | None = None
    ) -> list[tuple[Claim, T | None]]:
        """Up to ``limit`` jobs at once, in claim order (priority, then age; per-owner limits counted with
        the ones taken here), then ``prepare(session, claims)`` in the same transaction. For a worker that
        runs short jobs: one transaction (and, on PostgreSQL, one statement) claims them all."""
        with self.storage.transaction(write=True) as session:
            relax_commit(session)  # as ``claim``'s
            return self._prepared(session, self._claim_batch(session, worker, limit), prepare)

    @staticmethod
    def _prepared(
        session: Session, claims: list[Claim], prepare: Callable[[Session, list[Claim]], list[T]] | None
    ) -> list[tuple[Claim, T | None]]:
        if not claims:
            return []
        if prepare is None:
            return [(claim, None) for claim in claims]
        return list(zip(claims, prepare(session, claims), strict=True))

    def _claim_batch(self, session: Session, worker: str, limit: int) -> list[Claim]:
        if limit <= 1 or session.get_bind().dialect.name != "postgresql":
            claims: list[Claim] = []
            while len(claims) < limit and (claim := self._claim(session, worker, None)) is not None:
                claims.append(claim)
            return claims
        rows = session.connection().execute(_PG_TAKE_MANY, {"n": limit, "take_worker": worker, "take_now": utcnow()}).all()
        claims = [
            Claim(_job(row, self._task_name(session, row.task_id)), worker, row.attempt) for row in rows if row.id is not None
        ]
        for row in rows:  # candidates whose owner has a limit: counted under the owner's lock, one by one
            if row.id is None and (claim := self._claim(session, worker, row.candidate_id)) is not None:
                claims.append(claim)
        claims.sort(key=lambda claim: (-claim.job.priority, claim.job.id))
        return claims

    def _claim(self, session: Session, worker: str, job_id: int | None) -> Claim | None:
        connection = session.connection()
        postgres = connection.dialect.name == "postgresql"
        params: dict[str, Any] = {} if job_id is None else {"job_id": job_id}
        tried: list[int] = []
        if postgres:  # the usual case in one statement: the first candidate, unless its owner has a limit
            take = {**params, "take_worker": worker, "take_now": utcnow()}
            row = connection.execute(_PG_TAKE[job_id is not None], take).first()
            if row is None:
                return None
            if row.id is not None:
                return Claim(_job(row, self._task_name(session, row.task_id)), worker, row.attempt)
        # The first candidate is almost always eligible (the query counts the owner's running jobs already):
        # lock one row; look further, past the ones tried, only when an owner's limit turns out to be full.
        for limit in (1, 16):
            if not tried:
                query = _FIRST_CANDIDATE[(postgres, job_id is not None)]
            else:
                query = _CANDIDATES[(postgres, job_id is not None)].where(_JOBS.c.id.not_in(tried)).limit(limit)
            candidates = connection.execute(query, params).all()
            for candidate_id, owner, max_concurrent in candidates:
                tried.append(candidate_id)
                if max_concurrent is not None and owner is not None:
                    if postgres:  # two workers claiming two jobs of one owner: count under the owner's lock
                        connection.execute(_OWNER_LOCK, {"key": _owner_lock_key(owner)})
                    if connection.execute(_OWNER_RUNNING, {"owner": owner}).scalar_one() >= max_concurrent:
                        continue
                row = connection.execute(_TAKE, {"take_id": candidate_id, "take_worker": worker, "take_now": utcnow()}).first()
                if row is None:
                    continue
                return Claim(_job(row, self._task_name(session, row.task_id)), worker, row.attempt)
            if len(candidates) < limit:
                break
        return None

    def heartbeat(self, claim: Claim) -> bool:
        """Beat; ``False`` if the job is no longer this claim's (cancelled, or re-queued as dead)."""
        return bool(self.heartbeat_many([claim]))

    def heartbeat_many(self, claims: Iterable[Claim]) -> list[Claim]:
        """Beat for several claims in one statement; the claims still held (the others' jobs were
        cancelled or re-queued as dead). A worker process beats for all the jobs it runs at once."""
        held = list(claims)
        if not held:
            return []
        keys = list({(claim.job.id, claim.worker, claim.attempt) for claim in held})
        with self.storage.transaction(write=True) as session:
            relax_commit(session)  # a beat lost with the database server is followed by the next one
            rows = session.connection().execute(_BEAT, {"keys": keys, "now": utcnow()}).all()
        beating = {(int(row[0]), row[1], int(row[2])) for row in rows}
        return [claim for claim in held if (claim.job.id, claim.worker, claim.attempt) in beating]

    def set_plan(self, claim: Claim, plan_id: str | None, graph_version_id: int | None) -> bool:
        """Record which plan (and graph version) this attempt runs."""
        with self.storage.transaction(write=True) as session:
            relax_commit(session)
            params = {**_held(claim), "set_plan_id": plan_id, "set_version_id": graph_version_id}
            return session.connection().execute(_SET_PLAN, params).rowcount == 1

    def record_plan(self, claim: Claim, plan: Plan, graph_version_id: int | None, *, session: Session | None = None) -> bool:
        """Store ``plan`` (once, by its id) and record it as what this attempt runs, in one transaction (or
        in ``session``'s); ``False`` if the claim was lost. A re-run of the job after a crash runs the same plan."""
        if session is not None:
            return self._record_plan(session, claim, plan, graph_version_id)
        with self.storage.transaction(write=True) as session:
            # atomic with the plan row; made durable by the finish that follows (the log is flushed in order)
            relax_commit(session)
            return self._record_plan(session, claim, plan, graph_version_id)

    def _record_plan(self, session: Session, claim: Claim, plan: Plan, graph_version_id: int | None) -> bool:
        params = {**_held(claim), "set_plan_id": plan.plan_id, "set_version_id": graph_version_id}
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            text, summary = plan_texts(plan)
            params.update(p_text=text, p_summary=summary, p_at=utcnow())
            return connection.execute(_PG_RECORD_PLAN, params).rowcount == 1
        insert_plan(session, plan)
        return connection.execute(_SET_PLAN, params).rowcount == 1

    def record_plans(self, session: Session, chosen: Sequence[tuple[Claim, Plan, int | None]]) -> None:
        """``record_plan`` for jobs claimed in ``session``'s transaction (held by it: nothing can be lost),
        one statement per distinct plan and version on PostgreSQL."""
        if session.get_bind().dialect.name != "postgresql":
            for claim, plan, version_id in chosen:
                self._record_plan(session, claim, plan, version_id)
            return
        groups: dict[tuple[str, int | None], tuple[Plan, str, list[int]]] = {}
        for claim, plan, version_id in chosen:
            groups.setdefault((plan.plan_id, version_id), (plan, claim.worker, []))[2].append(claim.job.id)
        connection = session.connection()
        for (plan_id, version_id), (plan, worker, job_ids) in groups.items():
            text, summary = plan_texts(plan)
            params = {
                "job_ids": job_ids,
                "held_worker": worker,
                "set_plan_id": plan_id,
                "set_version_id": version_id,
                "p_text": text,
                "p_summary": summary,
                "p_at": utcnow(),
            }
            connection.execute(_PG_RECORD_PLANS, params)

    def finish(
        self,
        claim: Claim,
        *,
        state: JobState,
        result: Mapping[str, Any] | None = None,
        cost: Cost | None = None,
        score: float | None = None,
        error: str | None = None,
        latency_s: float | None = None,
        feedback_graph: str | None = None,
    ) -> bool:
        """Store the outcome of this claim's run; ``False`` (nothing written) if the claim was lost.

        With ``feedback_graph`` and a ``score``, the scored result is also recorded as pending evidence
        for that graph, in the same transaction.
        """
        job, _ = self.complete(
            claim,
            state=state,
            result=result,
            cost=cost,
            score=score,
            error=error,
            latency_s=latency_s,
            feedback_graph=feedback_graph,
        )
        return job is not None

    def complete(
        self,
        claim: Claim,
        *,
        state: JobState,
        result: Mapping[str, Any] | None = None,
        cost: Cost | None = None,
        score: float | None = None,
        error: str | None = None,
        latency_s: float | None = None,
        feedback_graph: str | None = None,
    ) -> tuple[Job | None, int | None]:
        """``finish`` in one round: ``(the job as stored, or None if the claim was lost; how many pieces of
        evidence are now pending for feedback_graph, or None if none was recorded)``. The count is taken
        in the same transaction, so whoever sees it reach ``learn_every`` can learn without asking again."""
        values = _outcome(state, result, cost, score, error, latency_s)
        with self.storage.transaction(write=True) as session:
            _, job, pending = self._complete(session, claim, values, cost is not None, score, feedback_graph, True)
            return job, pending

    def complete_and_claim(
        self,
        claim: Claim,
        *,
        state: JobState,
        result: Mapping[str, Any] | None = None,
        cost: Cost | None = None,
        score: float | None = None,
        error: str | None = None,
        latency_s: float | None = None,
        feedback_graph: str | None = None,
        worker: str,
        prepare: Callable[[Session, Claim], T] | None = None,
    ) -> tuple[bool, int | None, tuple[Claim, T | None] | None]:
        """``complete``, then ``claim_with(worker, prepare)``, in one transaction: what a worker that goes
        on to its next job does (one commit per job). ``(finished, pending evidence, the next claim and
        what prepare returned)``; the next claim is taken also when this one was lost."""
        values = _outcome(state, result, cost, score, error, latency_s)
        with self.storage.transaction(write=True) as session:
            done, _, pending = self._complete(session, claim, values, cost is not None, score, feedback_graph, False)
            taken = self._claim(session, worker, None)
            if taken is None:
                return done, pending, None
            return done, pending, (taken, None if prepare is None else prepare(session, taken))

    def complete_many_and_claim(
        self,
        finishes: Sequence[tuple[Claim, Mapping[str, Any]]],
        *,
        worker: str,
        limit: int,
        prepare: Callable[[Session, list[Claim]], list[T]] | None = None,
        then: Callable[[Session, dict[str, int]], R] | None = None,
        unstarted: Sequence[Claim] = (),
    ) -> tuple[list[bool], dict[str, int], R | None, list[tuple[Claim, T | None]]]:
        """``complete`` for several claims (each as ``complete``'s keyword arguments), gives the
        ``unstarted`` claims' jobs back to the queue (if still held), then ``claim_many``, then
        ``then(session, pending evidence per graph)`` (e.g. learn from it), in one transaction.
        ``(finished or not, per claim; pending evidence per graph; what then returned; the next claims)``."""
        outcomes = [
            (claim, _outcome(o["state"], o.get("result"), o.get("cost"), o.get("score"), o.get("error"), o.get("latency_s")), o)
            for claim, o in finishes
        ]
        with self.storage.transaction(write=True) as session:
            done: list[bool] = []
            pending: dict[str, int] = {}
            if len(outcomes) > 1 and session.get_bind().dialect.name == "postgresql":
                done, pending = self._finish_many_pg(session, outcomes)
                outcomes = []
            for claim, values, given in outcomes:
                graph = given.get("feedback_graph")
                finished, _, count = self._complete(
                    session, claim, values, given.get("cost") is not None, given.get("score"), graph, False
                )
                done.append(finished)
                if count is not None and graph is not None:
                    pending[graph] = max(pending.get(graph, 0), count)
            if unstarted:
                keys = [(claim.job.id, claim.worker, claim.attempt) for claim in unstarted]
                session.connection().execute(_RETURN, {"keys": keys})
            taken = self._prepared(session, self._claim_batch(session, worker, limit), prepare)
            return done, pending, (None if then is None else then(session, pending)), taken

    @staticmethod
    def _finish_many_pg(
        session: Session, outcomes: Sequence[tuple[Claim, dict[str, Any], Mapping[str, Any]]]
    ) -> tuple[list[bool], dict[str, int]]:
        columns: dict[str, list[Any]] = {
            name: []
            for name in (
                "ids", "workers", "attempts", "states", "results", "scores", "errors", "latencies",
                "flops", "prompt_tokens", "output_tokens", "usd", "graphs", "owners",
            )
        }  # fmt: skip
        for claim, values, given in outcomes:
            record = given.get("feedback_graph") is not None and values["out_score"] is not None
            result = values["out_result"]
            for name, value in (
                ("ids", claim.job.id),
                ("workers", claim.worker),
                ("attempts", claim.attempt),
                ("states", values["out_state"]),
                ("results", None if result is None else json.dumps(result, separators=(",", ":"))),
                ("scores", values["out_score"]),
                ("errors", values["out_error"]),
                ("latencies", values["out_latency_s"]),
                ("flops", values.get("out_flops")),
                ("prompt_tokens", values.get("out_prompt_tokens")),
                ("output_tokens", values.get("out_output_tokens")),
                ("usd", values.get("out_usd")),
                ("graphs", given.get("feedback_graph") if record else None),
                ("owners", claim.job.owner),
            ):
                columns[name].append(value)
        rows = session.connection().execute(_PG_FINISH_MANY, {**columns, "now": utcnow()}).all()
        finished = {row.id for row in rows if row.id is not None}
        pending = {row.graph: int(row.pending) for row in rows if row.graph is not None}
        return [claim.job.id in finished for claim, _, _ in outcomes], pending

    def _complete(
        self,
        session: Session,
        claim: Claim,
        values: dict[str, Any],
        with_cost: bool,
        score: float | None,
        feedback_graph: str | None,
        full: bool,
    ) -> tuple[bool, Job | None, int | None]:
        """``(finished, the job as stored if full, pending evidence)``."""
        connection = session.connection()
        record = feedback_graph is not None and score is not None
        if record and with_cost and connection.dialect.name == "postgresql":
            evidence = {
                "graph": feedback_graph,
                "result_score": float(score),  # type: ignore[arg-type]
                "result_owner": claim.job.owner,
                "result_at": utcnow(),
            }
            row = connection.execute(_PG_FINISH_WITH_RESULT[full], {**_held(claim), **values, **evidence}).first()
            if row is None:
                return False, None, None
            return True, (_job(row, self._task_name(session, row.task_id)) if full else None), int(row.pending)
        row = connection.execute(_FINISH[(with_cost, full)], {**_held(claim), **values}).first()
        if row is None:
            return False, None, None
        job = _job(row, self._task_name(session, row.task_id)) if full else None
        if not record:
            return True, job, None
        evidence = {
            "job_id": claim.job.id,
            "graph": feedback_graph,
            "score": float(score),
            "source": "result",
            "owner": claim.job.owner,
            "created_at": utcnow(),
        }
        connection.execute(_ADD_RESULT, evidence)
        return True, job, int(connection.execute(_PENDING, {"graph": feedback_graph}).scalar_one())

    def release(self, claim: Claim, reason: str) -> bool:
        """Give a claimed job back to the queue (e.g. the worker is shutting down): queued again."""
        with self.storage.transaction(write=True) as session:
            release = update(_JOBS).where(_HELD).values(state=JobState.QUEUED.value, worker=None, error=reason)
            return session.connection().execute(release, _held(claim)).rowcount == 1

    def cancel(self, job_id: int, *, owner: str | None = None) -> Job:
        """Cancel a queued or running job (a running one's worker stops at its next heartbeat)."""
        job = self.get(job_id, owner=owner)
        if job.finished:
            raise JobConflict(f"job {job_id} already {job.state.value}: only queued or running jobs can be cancelled")
        with self.storage.transaction(write=True) as session:
            session.exec(
                update(JobRow)  # type: ignore[call-overload]
                .where(and_(JobRow.id == job_id, col(JobRow.state).in_([JobState.QUEUED.value, JobState.RUNNING.value])))
                .values(state=JobState.CANCELLED.value, finished_at=utcnow(), error="cancelled by its owner")
            )
        return self.get(job_id)

    def reap(self, *, stale_after_s: float = 30.0, redispatch_after_s: float = 60.0) -> ReapReport:
        """Re-queue jobs of dead workers; find queued jobs whose message may be lost (see the module doc)."""
        now = utcnow()
        stale = now - timedelta(seconds=stale_after_s)
        old = now - timedelta(seconds=redispatch_after_s)
        with self.storage.transaction(write=True) as session:
            dead = session.exec(
                select(JobRow.id).where(JobRow.state == JobState.RUNNING.value, col(JobRow.heartbeat_at) < stale)
            ).all()
            requeued = []
            for job_id in dead:
                result = session.exec(
                    update(JobRow)  # type: ignore[call-overload]
                    .where(and_(JobRow.id == job_id, JobRow.state == JobState.RUNNING.value, col(JobRow.heartbeat_at) < stale))
                    .values(state=JobState.QUEUED.value, worker=None, dispatched_at=now, error="re-queued: its worker stopped")
                )
                if result.rowcount == 1:
                    requeued.append(int(job_id))
            lost = session.exec(
                select(JobRow.id).where(
                    JobRow.state == JobState.QUEUED.value,
                    or_(col(JobRow.dispatched_at).is_(None), col(JobRow.dispatched_at) < old),
                    col(JobRow.created_at) < old,
                )
            ).all()
            if lost:
                session.exec(update(JobRow).where(col(JobRow.id).in_(list(lost))).values(dispatched_at=now))  # type: ignore[call-overload]
        return ReapReport(tuple(requeued), tuple(int(i) for i in lost))

    # -- feedback -------------------------------------------------------------------------------------

    def add_feedback(
        self,
        job_id: int,
        *,
        graph: str,
        score: float,
        answer: str | None = None,
        comment: str | None = None,
        owner: str | None = None,
    ) -> Feedback:
        """Record a user's score for a finished job (pending until the graph's next update)."""
        if not math.isfinite(score):
            raise ValueError(f"feedback score must be a finite number, got {score}")
        job = self.get(job_id, owner=owner)
        if job.state is not JobState.SUCCEEDED:
            raise JobConflict(f"job {job_id} is {job.state.value}: feedback is for succeeded jobs")
        row = FeedbackRow(
            job_id=job_id, graph=graph, score=float(score), source="user", answer=answer, comment=comment, owner=owner
        )
        with self.storage.transaction(write=True) as session:
            session.add(row)
            session.flush()
            session.refresh(row)
            return _feedback(row)

    def feedback(self, job_id: int) -> list[Feedback]:
        with self.storage.transaction() as session:
            rows = session.exec(select(FeedbackRow).where(FeedbackRow.job_id == job_id).order_by(col(FeedbackRow.id))).all()
            return [_feedback(row) for row in rows]
