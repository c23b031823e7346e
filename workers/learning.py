"""Online learning: jobs' scored results and users' feedback move a task's learned graph.

``learn(storage, spec)`` turns the graph's pending evidence (``allot_feedback`` rows not yet applied) into
one new graph version, once there are ``spec.learn_every`` of them (or always, with ``force``):

1. evidence = (the plan a job ran, per stage; its score). A user's feedback on a job replaces that job's
   own scored result; jobs that ran a pinned plan (not drawn from this graph) are not evidence for it;
2. per stage, GPTSwarm's REINFORCE step (``reinforce_step``) from the newest version, with a moving
   baseline kept in the graph state, passed through ``ProbabilisticGraph.apply_update`` so that an edge,
   slot or sample count rises only where the jobs that used it scored above the batch mean;
3. the new version is stored with its cause (which jobs, how many, mean score, what the rules clipped),
   and the evidence rows are marked with it, all in one transaction under the graph's lock, so two
   workers learning at once cannot apply one piece of evidence twice.

A version is made of the oldest ``learn_every`` pending rows (with later rows of the same jobs), so each
version has the same amount of evidence however many workers finish jobs at once. ``learn_in`` does the
same in a caller's transaction: a worker finishing a batch of jobs stores their results and the version
they complete together (``workers.execution.drain``).

Learning continues from the newest version even while an older one is pinned: pinning decides what new
jobs run, not what is learned (``planner.views.rollback`` copies an old version as the newest).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, update
from sqlmodel import Session, col, select

from graphs.plan import Plan, StageGraph
from graphs.probabilistic import reinforce_step
from planner.graph_record import GraphVersion
from planner.storage import SQLStorage
from planner.storage._sql import lock_graph
from planner.storage.tables import FeedbackRow, GraphVersionRow, JobRow, PlanRow, strict_json, utcnow
from planner.strategies._reinforce import GraphState, describe
from workers.service import ServiceTask, graph_state, graph_version, remember_version

__all__ = ["BASELINE_DECAY", "learn", "learn_in", "pending_count"]

BASELINE_DECAY = 0.7
"""The REINFORCE baseline after a batch: 0.7 * previous + 0.3 * the batch's mean score."""


def pending_count(storage: SQLStorage, graph: str) -> int:
    with storage.transaction() as session:
        query = (
            select(func.count())
            .select_from(FeedbackRow)
            .where(FeedbackRow.graph == graph, col(FeedbackRow.applied_version_id).is_(None))
        )
        return int(session.exec(query).one())


_FEEDBACK: Table = FeedbackRow.__table__  # type: ignore[attr-defined]
_VERSIONS: Table = GraphVersionRow.__table__  # type: ignore[attr-defined]
_JOBS: Table = JobRow.__table__  # type: ignore[attr-defined]
_PLANS: Table = PlanRow.__table__  # type: ignore[attr-defined]
# built once: a learning step runs every ``learn_every`` jobs
_PENDING_ROWS = (
    select(_FEEDBACK.c.id, _FEEDBACK.c.job_id, _FEEDBACK.c.score, _FEEDBACK.c.source)
    .where(_FEEDBACK.c.graph == bindparam("graph"), _FEEDBACK.c.applied_version_id.is_(None))
    .order_by(_FEEDBACK.c.id)
)
_NEWEST = (
    select(_VERSIONS.c.id, _VERSIONS.c.version, _VERSIONS.c.pinned)
    .where(_VERSIONS.c.graph == bindparam("graph"))
    .order_by(_VERSIONS.c.version.desc())
    .limit(1)
)
_RAN_WITH = (
    select(_JOBS.c.id, _JOBS.c.plan_id, _JOBS.c.graph_version_id, _VERSIONS.c.graph)
    .select_from(_JOBS.outerjoin(_VERSIONS, _VERSIONS.c.id == _JOBS.c.graph_version_id))
    .where(_JOBS.c.id.in_(bindparam("job_ids", expanding=True)))
)
"""What learning needs of the evidence's jobs: their plan and the graph of the version they ran."""
_PLAN_TEXTS = select(_PLANS.c.plan_id, _PLANS.c.plan).where(_PLANS.c.plan_id.in_(bindparam("plan_ids", expanding=True)))
_INSERT_VERSION = insert(_VERSIONS).returning(_VERSIONS.c.id, _VERSIONS.c.created_at)
_APPLIED = (
    update(_FEEDBACK).where(_FEEDBACK.c.id.in_(bindparam("ids", expanding=True))).values(applied_version_id=bindparam("applied"))
)


def learn(
    storage: SQLStorage, spec: ServiceTask, *, force: bool = False, models: Sequence[str] | None = None
) -> GraphVersion | None:
    """Apply the graph's pending evidence as one new version (see the module docstring); ``None`` if
    there is too little of it (fewer than ``spec.learn_every`` rows, unless ``force``) or none usable."""
    with storage.transaction(write=True) as session:
        learned = learn_in(session, storage, spec, force=force, models=models)
    if learned is None:
        return None
    remember_version(storage.url, *learned)  # committed: this process's next jobs start from it
    return learned[0]


def learn_in(
    session: Session,
    storage: SQLStorage,
    spec: ServiceTask,
    *,
    force: bool = False,
    models: Sequence[str] | None = None,
    after: tuple[GraphVersion, GraphState] | None = None,
) -> tuple[GraphVersion, GraphState] | None:
    """``learn`` in ``session``'s transaction (e.g. the one that stores the results that complete a batch of
    evidence: they and the version they make are committed together); the version and its parsed state.

    Without ``force`` a version takes the oldest ``learn_every`` pending rows (and any later rows of the
    same jobs: a user's word replaces the job's own result), so every version is made of ``learn_every``
    results however many workers add evidence at once; what is left waits for the next version. ``after``:
    the version this transaction has just made (and its state), to learn on from it (the graph's newest)."""
    graph_name = spec.graph
    lock_graph(session, graph_name)
    connection = session.connection()
    pending = connection.execute(_PENDING_ROWS, {"graph": graph_name}).all()
    if not pending or (len(pending) < spec.learn_every and not force):
        return None
    rows = pending
    if not force:
        taken = {row.job_id for row in pending[: spec.learn_every]}
        rows = [row for row in pending if row.job_id in taken]
    if after is not None:  # made in this transaction: not committed, so kept out of the process's caches
        base, state = after
    else:
        newest = connection.execute(_NEWEST, {"graph": graph_name}).first()
        if newest is None:
            return None
        # versions are immutable: the newest one's definition and parsed state are usually in this process already
        base = graph_version(storage, newest.id, pinned=bool(newest.pinned), session=session)
        state = graph_state(storage.url, base)
    by_job: dict[int, Any] = {}
    for row in rows:  # a user's word on a job replaces the job's own scored result
        if row.job_id not in by_job or row.source == "user":
            by_job[row.job_id] = row
    evidence: list[tuple[Plan, float, int]] = []
    # only what is needed of the jobs (not their inputs and results) and the graph of the version they ran
    jobs = {job.id: job for job in connection.execute(_RAN_WITH, {"job_ids": list(by_job)}).all()}
    plans = _plans(connection, {job.plan_id for job in jobs.values() if job.plan_id})
    for job_id, row in by_job.items():
        job = jobs.get(job_id)
        if job is None or job.plan_id not in plans or job.graph != graph_name:
            continue
        evidence.append((plans[job.plan_id], row.score, job_id))
    ids = [row.id for row in rows]
    if not evidence:
        # nothing here is evidence for this graph (e.g. jobs on pinned plans): mark it seen, no version
        connection.execute(_APPLIED, {"ids": ids, "applied": base.version_id})
        return None
    scores = [score for _, score, _ in evidence]
    mean = fmean(scores)
    baseline = mean if state.baseline is None else state.baseline
    graphs, violations = [], []
    for graph in state.graphs:
        stage_evidence: list[tuple[StageGraph, float]] = []
        for plan, score, _ in evidence:
            try:
                stage_evidence.append((plan.stage(graph.stage), score))
            except KeyError:
                continue
        proposed = reinforce_step(graph, stage_evidence, baseline=baseline, learning_rate=spec.learning_rate)
        result = graph.apply_update(proposed, stage_evidence, allowed_models=models if models is not None else graph.models)
        graphs.append(result.graph)
        violations.extend(result.violations)
    after = mean if state.baseline is None else BASELINE_DECAY * state.baseline + (1 - BASELINE_DECAY) * mean
    new = GraphState(state.strategy, state.iteration + 1, tuple(graphs), after)
    job_ids = sorted(job_id for _, _, job_id in evidence)
    users = sum(1 for row in by_job.values() if row.source == "user")
    cause = (
        f"feedback: {len(evidence)} scored job(s) {_ranges(job_ids)} ({users} by user feedback), mean score "
        f"{mean:.3f}, baseline {baseline:.3f}; {describe(violations)}"
    )
    report = {"method": "feedback", "jobs": job_ids, "mean_score": mean, "violation_count": len(violations)}
    definition = strict_json(new.definition(update=report), "definition")
    # under the graph's lock the newest version is the highest number (the unique (graph, version) backs it up)
    values = {
        "graph": graph_name,
        "version": base.version + 1,
        "parent_id": base.version_id,
        "definition": definition,
        "cause": cause,
        "pinned": False,
        "created_at": utcnow(),
    }
    stored = connection.execute(_INSERT_VERSION, values).one()
    version = GraphVersion(
        version_id=stored.id,
        graph=graph_name,
        version=base.version + 1,
        definition=definition,
        cause=cause,
        parent_id=base.version_id,
        pinned=False,
        created_at=stored.created_at,
    )
    connection.execute(_APPLIED, {"ids": ids, "applied": version.version_id})
    return version, new


_plan_cache: dict[str, Plan] = {}


def _plans(connection: Any, plan_ids: set[str]) -> dict[str, Plan]:
    """The plans with these ids (plans are values: each parsed once per process)."""
    found = {plan_id: _plan_cache[plan_id] for plan_id in plan_ids if plan_id in _plan_cache}
    missing = [plan_id for plan_id in plan_ids if plan_id not in found]
    if missing:
        for plan_id, text in connection.execute(_PLAN_TEXTS, {"plan_ids": missing}).all():
            if len(_plan_cache) >= 4096:
                _plan_cache.clear()
            found[plan_id] = _plan_cache[plan_id] = Plan.from_json(text)
    return found


def _ranges(ids: Sequence[int]) -> str:
    """``[1-4, 7]`` for 1, 2, 3, 4, 7: a cause line stays short whatever the batch size."""
    parts: list[str] = []
    start = prev = None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return "[" + ", ".join(parts) + "]"
