"""What review shows: studies, trials, plans, learned graphs and jobs as plain JSON-ready data.

The review page (``workers.review``), its JSON API and the CLI views (``allot graph ...``) all read
through these functions, so they show the same numbers. Everything is read from a ``BaseStorage`` and
nothing rebuilds an environment: a study's best trial and Pareto front use the same rules as ``Study``
(highest score, ties to the cheaper plan then the earlier trial; cost is the estimate the budget was
checked against, in the study's budget unit).

Writes are two, both through the storage contract: ``set_pinned`` and ``rollback`` (a new version
copying an older definition, caused ``"rollback to vN"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from graphs.cost import Budget, Cost
from graphs.errors import BudgetError, InvalidPlan
from graphs.pareto import pareto_front
from graphs.plan import Plan
from graphs.probabilistic import FORMAT as GRAPH_FORMAT
from graphs.probabilistic import ProbabilisticGraph
from planner.graph_record import GraphVersion
from planner.storage import BaseStorage
from planner.trial import FrozenTrial, StudyRecord, TrialState

__all__ = [
    "best_trial",
    "graph_list",
    "graph_stages",
    "graph_version",
    "job_view",
    "pareto_numbers",
    "plan_view",
    "recent_jobs",
    "rollback",
    "set_pinned",
    "study_detail",
    "study_summaries",
    "study_summary",
    "trial_row",
    "version_diff",
    "version_record",
    "version_view",
]

STATE_FORMAT = "allot.graph-state/1"
TOP_PLANS = 5


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def _spent(budget: Budget, cost: Cost | None) -> float | None:
    if cost is None:
        return None
    try:
        return budget.spent(cost)
    except BudgetError:  # a dollar budget over a cost without prices
        return None


# -- studies and trials ---------------------------------------------------------------------------------------


def _complete(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state is TrialState.COMPLETE and t.score is not None]


def best_trial(trials: Sequence[FrozenTrial], budget: Budget) -> FrozenTrial | None:
    """``Study.best_trial``'s rule on stored trials; ``None`` before the first complete one."""
    complete = _complete(trials)
    if not complete:
        return None
    return max(complete, key=lambda t: (t.score, -(_spent(budget, t.estimated_cost) or 0.0), -t.number))


def pareto_numbers(trials: Sequence[FrozenTrial], budget: Budget) -> list[int]:
    """Trial numbers of the Pareto front (score up, estimated cost down), cheapest first."""
    complete = _complete(trials)
    points = [(t.score or 0.0, _spent(budget, t.estimated_cost) or 0.0) for t in complete]
    return [complete[i].number for i in pareto_front(points)]


def _task(record: StudyRecord) -> str:
    env = record.environment
    return str(env.get("benchmark") or env.get("name") or env.get("kind") or "?")


def _stage_nodes(plan: Plan) -> list[dict[str, Any]]:
    return [
        {
            "stage": stage.stage,
            "summary": stage.summary(),
            "decision": stage.decision.value,
            "early_stop": stage.early_stop,
            "edges": len(stage.edges),
            "nodes": [
                {"id": n.id, "role": n.role.value, "model": n.model, "n": n.n, "max_tokens": n.max_tokens} for n in stage.nodes
            ],
        }
        for stage in plan.stages
    ]


def trial_row(trial: FrozenTrial, budget: Budget) -> dict[str, Any]:
    """One trial as the trials table and ``/api/studies/{name}/trials`` show it.

    ``cost`` is the estimate in the budget's unit (what the budget and the Pareto front use);
    ``eval_cost`` what the evaluation spent, in the same unit; ``planner_*`` what the planner LLM spent.
    """
    duration = None
    if trial.started_at is not None and trial.finished_at is not None:
        duration = (trial.finished_at - trial.started_at).total_seconds()
    return {
        "number": trial.number,
        "trial_id": trial.trial_id,
        "state": trial.state.value,
        "score": trial.score,
        "spread": trial.spread,
        "cost": _spent(budget, trial.estimated_cost),
        "eval_cost": _spent(budget, trial.cost),
        "eval_tokens": None if trial.cost is None else trial.cost.tokens,
        "eval_usd": None if trial.cost is None else trial.cost.usd,
        "planner_tokens": trial.planner_cost.tokens,
        "planner_usd": trial.planner_cost.usd,
        "plan_id": trial.plan_id,
        "plan_summary": trial.plan.summary(),
        "stages": {stage.stage: stage.summary() for stage in trial.plan.stages},
        "rationale": trial.rationale,
        "error": trial.error,
        "started_at": _iso(trial.started_at),
        "finished_at": _iso(trial.finished_at),
        "seconds": duration,
    }


def study_summary(storage: BaseStorage, record: StudyRecord, trials: Sequence[FrozenTrial] | None = None) -> dict[str, Any]:
    """A study's configuration, trial counts, best trial and the search's own cost."""
    trials = storage.get_trials(record.study_id) if trials is None else trials
    budget = record.budget
    states = {state.value: 0 for state in TrialState}
    for trial in trials:
        states[trial.state.value] += 1
    best = best_trial(trials, budget)
    evaluated = [t for t in trials if t.cost is not None]
    eval_total = sum((t.cost for t in evaluated if t.cost is not None), Cost())
    planner_total = sum((t.planner_cost for t in trials), Cost())
    return {
        "name": record.name,
        "study_id": record.study_id,
        "task": _task(record),
        "strategy": record.strategy,
        "strategy_params": record.strategy_params,
        "seed": record.seed,
        "budget": {"limit": budget.limit, "unit": budget.unit.value, "text": str(budget)},
        "environment": record.environment,
        "created_at": _iso(record.created_at),
        "trials": len(trials),
        "evaluated": states[TrialState.COMPLETE.value] + states[TrialState.FAIL.value],
        "states": states,
        "best": None
        if best is None
        else {
            "number": best.number,
            "score": best.score,
            "spread": best.spread,
            "cost": _spent(budget, best.estimated_cost),
            "plan_id": best.plan_id,
            "plan_summary": best.plan.summary(),
        },
        "evaluation_cost": {
            "in_unit": _spent(budget, eval_total),
            "tokens": eval_total.tokens,
            "usd": eval_total.usd,
            "flops": eval_total.flops,
        },
        "planner_cost": {"tokens": planner_total.tokens, "usd": planner_total.usd, "flops": planner_total.flops},
    }


def study_summaries(storage: BaseStorage) -> list[dict[str, Any]]:
    """Every stored study's summary, oldest first."""
    return [study_summary(storage, record) for record in storage.list_studies()]


def study_detail(storage: BaseStorage, name: str, *, top: int = TOP_PLANS) -> dict[str, Any]:
    """Everything the study page shows. ``KeyError`` for an unknown study name."""
    record = storage.get_study_by_name(name)
    trials = storage.get_trials(record.study_id)
    budget = record.budget
    rows = [trial_row(t, budget) for t in trials]
    best_so_far: list[dict[str, Any]] = []
    best: float | None = None
    for trial in trials:
        if trial.state is TrialState.COMPLETE and trial.score is not None:
            best = trial.score if best is None else max(best, trial.score)
            best_so_far.append({"number": trial.number, "score": trial.score, "best": best})
    ranked = sorted(_complete(trials), key=lambda t: (-(t.score or 0.0), _spent(budget, t.estimated_cost) or 0.0, t.number))
    best_plans = [
        {
            "number": t.number,
            "score": t.score,
            "spread": t.spread,
            "cost": _spent(budget, t.estimated_cost),
            "plan_id": t.plan_id,
            "stages": _stage_nodes(t.plan),
        }
        for t in ranked[:top]
    ]
    stages = list(dict.fromkeys(stage.stage for t in trials for stage in t.plan.stages))
    graphs = [g for g in storage.list_graphs() if g == record.name]
    return {
        "study": study_summary(storage, record, trials),
        "trials": rows,
        "best_so_far": best_so_far,
        "pareto": pareto_numbers(trials, budget),
        "best_plans": best_plans,
        "stages": stages,
        "graphs": graphs,
    }


def plan_view(storage: BaseStorage, plan_id: str) -> dict[str, Any]:
    """A stored plan by id or unique prefix. ``KeyError`` if unknown."""
    plan = storage.get_plan(plan_id)
    return {
        "plan_id": plan.plan_id,
        "summary": plan.summary(),
        "models": list(plan.models),
        "stages": _stage_nodes(plan),
        "plan": plan.model_dump(mode="json"),
    }


# -- learned graphs -----------------------------------------------------------------------------------------------


def graph_stages(definition: Mapping[str, Any]) -> tuple[ProbabilisticGraph, ...]:
    """The per-stage probabilistic graphs a stored version holds: a strategy's graph state
    (``allot.graph-state/1``, one graph per stage) or a single ``allot.probabilistic-graph/1``.
    ``InvalidPlan`` for anything else."""
    kind = definition.get("format") if isinstance(definition, Mapping) else None
    try:
        if kind == STATE_FORMAT:
            return tuple(ProbabilisticGraph.from_json(stage) for stage in definition["stages"])
        if kind == GRAPH_FORMAT:
            return (ProbabilisticGraph.from_json(definition),)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidPlan(f"invalid graph definition: {exc}") from exc
    raise InvalidPlan(f"not a probabilistic graph definition (format {kind!r})")


def version_record(version: GraphVersion, *, definition: bool = False) -> dict[str, Any]:
    out = {
        "version_id": version.version_id,
        "graph": version.graph,
        "version": version.version,
        "cause": version.cause,
        "parent_id": version.parent_id,
        "pinned": version.pinned,
        "created_at": _iso(version.created_at),
    }
    if definition:
        out["definition"] = version.definition
    return out


def graph_list(storage: BaseStorage) -> list[dict[str, Any]]:
    """Every learned graph: how many versions, the newest and which are pinned."""
    out = []
    for name in storage.list_graphs():
        versions = storage.get_graph_versions(name)
        out.append(
            {
                "graph": name,
                "versions": len(versions),
                "latest": version_record(versions[-1]),
                "pinned": [v.version for v in versions if v.pinned],
            }
        )
    return out


def graph_version(storage: BaseStorage, graph: str, version: int | None = None) -> GraphVersion:
    """Version ``version`` (1, 2, ...; ``None``: the newest) of ``graph``. ``KeyError`` if there is none."""
    versions = storage.get_graph_versions(graph)
    if version is None:
        return versions[-1]
    for record in versions:
        if record.version == version:
            return record
    raise KeyError(f"graph {graph!r} has no version {version} (it has 1..{len(versions)})")


def version_view(storage: BaseStorage, graph: str, version: int | None = None) -> dict[str, Any]:
    """One version with its stages as probabilities (``ProbabilisticGraph.to_probabilities``)."""
    record = graph_version(storage, graph, version)
    out = version_record(record)
    out["update"] = record.definition.get("update")
    out["strategy"] = record.definition.get("strategy")
    out["iteration"] = record.definition.get("iteration")
    out["stages"] = [g.to_probabilities() for g in graph_stages(record.definition)]
    return out


SHOWN_CHANGE = 5e-4
"""Changes smaller than this (in probability) are counted but not listed by the page and the CLI."""


def _slot_change(change: Any) -> float:
    """The largest probability move of a slot: its inclusion or any of its sample-count options."""
    counts = {*change.counts_before, *change.counts_after}
    moves = [abs(change.counts_after.get(n, 0.0) - change.counts_before.get(n, 0.0)) for n in counts]
    return max(abs(change.inclusion_after - change.inclusion_before), *moves)


def _diff_stages(before: Sequence[ProbabilisticGraph], after: Sequence[ProbabilisticGraph]) -> list[dict[str, Any]]:
    old = {g.stage: g for g in before}
    out = []
    for graph in after:
        if graph.stage not in old:
            out.append({"stage": graph.stage, "added_stage": True, "added_slots": [s.id for s in graph.slots]})
            continue
        diff = old[graph.stage].diff(graph)
        out.append(
            {
                "stage": graph.stage,
                "added_slots": list(diff.added_slots),
                "removed_slots": list(diff.removed_slots),
                "slot_changes": [
                    {
                        "id": c.id,
                        "change": _slot_change(c),
                        "listed": _slot_change(c) >= SHOWN_CHANGE,
                        "role": c.role.value,
                        "model": c.model,
                        "inclusion_before": c.inclusion_before,
                        "inclusion_after": c.inclusion_after,
                        "counts_before": {str(n): p for n, p in c.counts_before.items()},
                        "counts_after": {str(n): p for n, p in c.counts_after.items()},
                    }
                    for c in sorted(diff.slot_changes, key=lambda c: -_slot_change(c))
                ],
                "edge_changes": [
                    {
                        "source": e.source,
                        "target": e.target,
                        "before": e.before,
                        "after": e.after,
                        "delta": e.delta,
                        "listed": abs(e.delta) >= SHOWN_CHANGE,
                    }
                    for e in sorted(diff.edge_changes, key=lambda e: -abs(e.delta))
                ],
                "summary": diff.summary(),
                "empty": diff.empty,
            }
        )
    out.extend({"stage": stage, "removed_stage": True} for stage in old if stage not in {g.stage for g in after})
    return out


def version_diff(storage: BaseStorage, graph: str, a: int, b: int) -> dict[str, Any]:
    """What changed from version ``a`` to version ``b`` of ``graph``, per stage, and the causes of the
    versions after ``a`` up to ``b``. ``KeyError`` for an unknown graph or version."""
    versions = storage.get_graph_versions(graph)
    first, second = graph_version(storage, graph, a), graph_version(storage, graph, b)
    low, high = sorted((a, b))
    return {
        "graph": graph,
        "a": version_record(first),
        "b": version_record(second),
        "stages": _diff_stages(graph_stages(first.definition), graph_stages(second.definition)),
        "between": [version_record(v) for v in versions if low < v.version <= high],
    }


def set_pinned(storage: BaseStorage, graph: str, version: int, pinned: bool) -> GraphVersion:
    """Pin or unpin version ``version`` of ``graph``. ``KeyError`` if there is none."""
    return storage.set_graph_pinned(graph_version(storage, graph, version).version_id, pinned)


def rollback(storage: BaseStorage, graph: str, version: int) -> GraphVersion:
    """Make an older version current again: a new version copying its definition, derived from it, with
    cause ``"rollback to vN"``. History is never rewritten. ``KeyError`` if there is no such version."""
    old = graph_version(storage, graph, version)
    return storage.add_graph_version(graph, old.definition, f"rollback to v{old.version}", parent_id=old.version_id)


# -- jobs ---------------------------------------------------------------------------------------------------------


def _job_dict(row: Any) -> dict[str, Any]:
    cost = None
    if row.flops is not None:
        cost = Cost(flops=row.flops, prompt_tokens=row.prompt_tokens or 0.0, output_tokens=row.output_tokens or 0.0, usd=row.usd)
    in_unit = None
    if cost is not None and row.budget_unit:
        try:
            in_unit = cost.in_unit(row.budget_unit)
        except (BudgetError, ValueError):
            in_unit = None
    return {
        "id": row.id,
        "state": row.state,
        "plan_id": row.plan_id,
        "graph_version_id": row.graph_version_id,
        "input": row.input,
        "result": row.result,
        "error": row.error,
        "budget": None if row.budget_limit is None else {"limit": row.budget_limit, "unit": row.budget_unit},
        "cost": None if cost is None else {**cost.as_dict(), "tokens": cost.tokens, "in_unit": in_unit},
        "worker": row.worker,
        "score": row.score,
        "answer": (row.result or {}).get("answer") if isinstance(row.result, Mapping) else None,
        "attempt": row.attempt,
        "priority": row.priority,
        "latency_s": row.latency_s,
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
    }


def _job_rows(storage: BaseStorage, *, limit: int | None = None, job_id: int | None = None) -> list[Any]:
    engine = getattr(storage, "engine", None)
    if engine is None:  # in-memory storage: no job table
        return []
    from sqlmodel import Session, col, select

    from planner.storage.tables import JobRow

    with Session(engine) as session:
        query = select(JobRow)
        if job_id is not None:
            query = query.where(JobRow.id == job_id)
        query = query.order_by(col(JobRow.created_at).desc(), col(JobRow.id).desc())
        if limit is not None:
            query = query.limit(limit)
        return list(session.exec(query).all())


def recent_jobs(storage: BaseStorage, limit: int = 50) -> list[dict[str, Any]]:
    """The newest jobs first (empty where the storage keeps no job table)."""
    return [_job_dict(row) for row in _job_rows(storage, limit=limit)]


def job_view(storage: BaseStorage, job_id: int) -> dict[str, Any]:
    """One job, with its result's per-stage outputs listed (``result["stages"]`` as a mapping or a list
    of ``{"stage": ...}``). ``KeyError`` if unknown."""
    rows = _job_rows(storage, job_id=job_id)
    if not rows:
        raise KeyError(f"no job {job_id}")
    job = _job_dict(rows[0])
    stages = (job["result"] or {}).get("stages") if isinstance(job["result"], Mapping) else None
    outputs: list[dict[str, Any]] = []
    if isinstance(stages, Mapping):
        outputs = [{"stage": str(k), "output": v} for k, v in stages.items()]
    elif isinstance(stages, list):
        outputs = [
            {"stage": str(s.get("stage", i)), "output": s} if isinstance(s, Mapping) else {"stage": str(i), "output": s}
            for i, s in enumerate(stages)
        ]
    job["stage_outputs"] = outputs
    job["feedback"] = _feedback_rows(storage, job_id)
    return job


def _feedback_rows(storage: BaseStorage, job_id: int) -> list[dict[str, Any]]:
    """A job's scored result and users' feedback, and the graph version each went into."""
    from sqlmodel import Session, col, select

    from planner.storage.tables import FeedbackRow, GraphVersionRow

    with Session(storage.engine) as session:  # type: ignore[attr-defined]
        rows = session.exec(select(FeedbackRow).where(FeedbackRow.job_id == job_id).order_by(col(FeedbackRow.id))).all()
        versions = {
            v.id: v.version
            for v in session.exec(
                select(GraphVersionRow).where(
                    col(GraphVersionRow.id).in_([r.applied_version_id for r in rows if r.applied_version_id])
                )
            ).all()
        }
        return [
            {
                "source": r.source,
                "score": r.score,
                "answer": r.answer,
                "comment": r.comment,
                "graph": r.graph,
                "version": versions.get(r.applied_version_id) if r.applied_version_id else None,
                "created_at": _iso(r.created_at),
            }
            for r in rows
        ]
