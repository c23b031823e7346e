"""Agent-REINFORCE (arXiv 2511.00086) as a langgraph agent: the planner LLM is the gradient of a
probabilistic collaboration graph.

Each ``propose(context, n)`` runs the agent's graph (compiled once per instance) once; ``observe``
reads where the search stands from ``context.trials`` and routes::

    observe ─┬─> enumerate ──> select ──> pretest ──(pre-tests left)──────────────> END
             ├─> pretest ──(all pre-tested)──> init_graph ──> sample ─────────────> END
             ├─> init_graph ──> sample ──────────────────────────────────────────> END
             ├─> update ──> sample ──────────────────────────────────────────────> END
             └─> sample ─────────────────────────────────────────────────────────> END

- ``enumerate`` (a): the model-count combinations of the space (no cap, no early stop) that fit the
  budget (``context.fits``; a seeded subset of ``ENUMERATION_LIMIT`` where there are more), shortened to
  the most budget-using combination per choice of models.
- ``select`` (b): the planner picks up to ``batch`` promising ones as JSON (an index into the list, or an
  allocation ``{stage: {model: n}}`` of its own); picks over budget or outside the space are discarded.
- ``pretest`` (c): the chosen combinations are proposed as trials (solver-only plans).
- ``init_graph``: a probabilistic graph per stage (``graphs.probabilistic``) biased toward the best
  pre-tests: their models are likelier, their sample counts the centre of the count distributions, and
  the best and the largest model of each stage fill the reviewer, reviser and aggregator slots where the
  environment runs those roles.
- ``sample`` (d): ``batch`` graphs are sampled per iteration and proposed (over budget: drawn again).
- ``update`` (e): once an iteration's samples are scored, the planner acts as the gradient: from the
  sampled graphs and their scores it rewrites each stage's graph and its edge probabilities (JSON).
  ``ProbabilisticGraph.apply_update`` enforces the rules (acyclic, bounded in-degree, a probability rises
  only if the graphs that used it scored above the batch mean); what it clips is reported.

Fallbacks, recorded in ``info["fallback"]`` and the rationale: without a planner model, or when its
answer is unusable after re-asking (or a rewrite cannot be applied at all), ``select`` takes the
coverage rule (one model per stage, every model of every stage pre-tested once, at the most budget-using
count) and ``update`` takes the numeric REINFORCE step
(``planner.strategies._reinforce``); after ``iterations`` planner updates the numeric step continues
alone, so the planner's cost is bounded.

Every update is a graph version in the first next proposal's ``info["graph_version"]`` (``definition``
and ``cause``), which the study layer stores; ``planner_cost`` carries what the planner LLM spent. The
agent keeps no state between calls: the selection is stored with the first pre-test, the graph with each
version, so an agent rebuilt on resume continues from ``context.trials``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from graphs.cost import Cost
from graphs.errors import AllotError
from graphs.plan import Plan, Role, StageGraph
from graphs.probabilistic import ProbabilisticGraph, Violation
from planner.llm import PlannerCall, planner_llm
from planner.space import StageChoice
from planner.strategies._base import Proposal, Strategy, StudyContext
from planner.strategies._reinforce import (
    GraphState,
    apply_step,
    describe,
    fits,
    initial_graphs,
    iteration_trials,
    latest_state,
    numeric_step,
    sample_plans,
    trial_score,
)
from planner.trial import FrozenTrial, TrialState

__all__ = ["AgentReinforceStrategy", "GraphRewrite", "Picks", "StageRewrite"]

ENUMERATION_LIMIT = 4_000
"""Combinations checked against the budget in ``enumerate``; bigger spaces are sampled (seeded)."""
SHORTLIST = 32
"""Combinations shown to the planner in ``select``."""
MAX_SHOWN_SAMPLES = 8
"""Sampled graphs (best first) shown to the planner in ``update``."""
MAX_ERRORS = 10
MAX_REPORTED = 20
"""Violations kept in a version's report (all are counted)."""

SYSTEM = (
    "You are the planner of Agent-REINFORCE: you allocate test-time compute of a multi-stage LLM task as "
    "a collaboration graph per stage. Nodes have a role (solver answers; reviewer criticises answers; "
    "reviser rewrites answers given reviews; aggregator fuses answers into the stage's answer) and a model "
    "with a number of samples; an edge u->v appends u's output to v's prompt, so wide inputs make later "
    "nodes expensive. Width (parallel samples) and depth (review and revise rounds) both cost compute and "
    "each has a task-dependent optimum; they interact. The plan's cost must stay within the budget. You "
    "answer with JSON only."
)

SELECT_TASK = (
    "TASK: select. Pick up to {k} promising model-count combinations to pre-test. Answer "
    '{{"picks": [...], "reason": "..."}} where each pick is an index from the list, or an allocation of '
    'your own as {{"stage name": {{"model": samples}}}}. Allocations over budget are discarded.'
)

GRADIENT_TASK = (
    "TASK: gradient. Act as the gradient of the probabilistic graph: from the sampled graphs and their "
    "scores, rewrite each stage's graph (slots with include_probability and a counts distribution, edges "
    "with probability). Rules, enforced after you answer: the graph stays acyclic (an edge points forward "
    "in the slot order; solvers take no inputs; aggregators feed nothing); a node's expected in-degree "
    "stays within {max_in} ; raise a probability only if the sampled graphs that used it scored above the "
    "mean ({mean}); new slots and edges enter at probability 0.5 at most. Answer "
    '{{"stages": [{{"stage": "...", "slots": [...], "edges": [...]}}], "reason": "..."}} in the format of '
    "CURRENT GRAPH; a stage you leave out keeps its graph."
)


# -- what the planner must answer ---------------------------------------------------------------------------


class Picks(BaseModel):
    """``select``'s schema: indices into the shortlist, or allocations ``{stage: {model: n}}``."""

    picks: list[int | dict[str, dict[str, int]]] = Field(min_length=1)
    reason: str = ""


class StageRewrite(BaseModel):
    """One stage of ``update``'s answer, in ``ProbabilisticGraph.to_probabilities`` form (lenient)."""

    model_config = ConfigDict(extra="allow")

    stage: str = Field(min_length=1)
    slots: list[dict[str, Any]] | None = None
    edges: list[dict[str, Any]] | None = None


class GraphRewrite(BaseModel):
    """``update``'s schema: ``{"stages": [...], "reason": "..."}``."""

    stages: list[StageRewrite] = Field(min_length=1)
    reason: str = ""


class _State(TypedDict, total=False):
    context: StudyContext
    n: int
    phase: str
    graph: GraphState
    members: list[FrozenTrial]
    candidates: list[Plan]
    chosen: list[Plan]
    selection: dict[str, Any]
    version: dict[str, Any]
    note: str
    fallback: str
    calls: list[PlannerCall]
    proposals: list[Proposal]


class AgentReinforceStrategy(Strategy):
    """Agent-REINFORCE: enumerate, select, pre-test, then sample graphs and let the planner be the gradient.

    Args:
        seed: seeds the sampling stream (with the number of trials so far).
        planner_model: any litellm route; ``None`` runs the fallbacks (coverage selection, numeric updates).
        api_base: the planner's endpoint (a vLLM server), if not the provider's default.
        batch: pre-tests, and sampled graphs per update.
        iterations: planner updates of the graph; later updates are numeric.
        max_attempts: planner calls per question (the first plus re-asks after invalid JSON).
        max_tokens: the planner's output cap per call (a JSON answer cut off there is re-asked).
        timeout_s: how long one planner call may take; a call that times out is not retried (fallback).
        learning_rate: step size of the numeric fallback.
    """

    name = "agent-reinforce"

    def __init__(
        self,
        seed: int | None = None,
        planner_model: str | None = None,
        api_base: str | None = None,
        batch: int = 3,
        iterations: int = 10,
        max_attempts: int = 3,
        max_tokens: int = 4096,
        timeout_s: float = 60.0,
        learning_rate: float = 0.5,
    ) -> None:
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        self.planner_model = planner_model
        self.api_base = api_base
        self.batch = int(batch)
        self.iterations = int(iterations)
        self.max_attempts = int(max_attempts)
        self.max_tokens = int(max_tokens)
        self.timeout_s = float(timeout_s)
        self.learning_rate = float(learning_rate)
        self.baseline_decay = 0.7
        self._llm = planner_llm(
            planner_model, api_base=api_base, batch=batch, max_attempts=max_attempts, max_tokens=max_tokens, timeout_s=timeout_s
        )
        super().__init__(seed)
        self._graph = self._build_graph()

    def params(self) -> dict[str, Any]:
        return {
            "planner_model": self.planner_model,
            "api_base": self.api_base,
            "batch": self.batch,
            "iterations": self.iterations,
            "max_attempts": self.max_attempts,
            "max_tokens": self.max_tokens,
            "timeout_s": self.timeout_s,
            "learning_rate": self.learning_rate,
        }

    @property
    def usage(self) -> PlannerCall | None:
        """Running total of this instance's planner calls (``None`` without a planner model)."""
        return None if self._llm is None else self._llm.usage

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        if n < 1:
            return []
        state = self._graph.invoke({"context": context, "n": n, "calls": [], "proposals": []})
        proposals: list[Proposal] = list(state.get("proposals", []))
        calls: list[PlannerCall] = state.get("calls", [])
        if proposals and calls:
            cost = Cost()
            for call in calls:
                cost = cost + call.cost
            errors = [e for call in calls for e in call.errors][:MAX_ERRORS]
            first = proposals[0]
            info = {**first.info, "planner_attempts": sum(c.attempts for c in calls), "planner_errors": errors}
            proposals[0] = replace(first, info=info, planner_cost=cost)
        return proposals

    # -- the graph ----------------------------------------------------------------------------------

    def _build_graph(self) -> Any:
        from langgraph.graph import END, START, StateGraph

        graph = StateGraph(_State)
        graph.add_node("observe", self._observe)
        graph.add_node("enumerate", self._enumerate)
        graph.add_node("select", self._select)
        graph.add_node("pretest", self._pretest)
        graph.add_node("init_graph", self._init_graph)
        graph.add_node("update", self._update)
        graph.add_node("sample", self._sample)
        graph.add_edge(START, "observe")
        graph.add_conditional_edges("observe", lambda s: s["phase"], ["enumerate", "pretest", "init_graph", "update", "sample"])
        graph.add_edge("enumerate", "select")
        graph.add_edge("select", "pretest")
        graph.add_conditional_edges("pretest", lambda s: END if s.get("proposals") else "init_graph", ["init_graph", END])
        graph.add_edge("init_graph", "sample")
        graph.add_edge("update", "sample")
        graph.add_edge("sample", END)
        return graph.compile()

    def _observe(self, state: _State) -> _State:
        context = state["context"]
        trials = list(context.trials)
        graph = latest_state(trials, self.name)
        if graph is None:
            selection = _selection(trials, self.name)
            if selection is None:
                return {"phase": "enumerate"}
            chosen = _plans(selection.get("chosen", []))
            tried = context.tried()
            if any(plan.plan_id not in tried for plan in chosen):
                return {"phase": "pretest", "chosen": chosen, "selection": selection}
            return {"phase": "init_graph"}
        members = iteration_trials(trials, self.name, graph.iteration)
        finished = [t for t in members if t.state.is_finished]
        if len(members) >= self.batch and finished:
            return {"phase": "update", "graph": graph, "members": finished}
        return {"phase": "sample", "graph": graph, "members": members}

    # (a) enumerate

    def _enumerate(self, state: _State) -> _State:
        context = state["context"]
        space = context.space
        # the AgentTTS combinations of the space: no thinking cap and no early stop where the space allows
        per_stage = []
        for stage in space.stages:
            choices = [
                c
                for c in space.stage_choices(stage)
                if (c.cap is None or None not in space.caps) and (c.early_stop is None or None not in space.early_stop)
            ]
            per_stage.append([c.graph(stage) for c in choices])
        total = math.prod(len(graphs) for graphs in per_stage)
        if total <= ENUMERATION_LIMIT:
            indices: Iterable[int] = range(total)
        else:
            indices = sorted(random.Random(f"{self.name}:enumerate:{self.seed}").sample(range(total), ENUMERATION_LIMIT))
        # per choice of models (per stage), the combination within budget that uses the most of it
        best: dict[tuple[tuple[str, ...], ...], tuple[float, Plan]] = {}
        for index in indices:
            stages = []
            for graphs in reversed(per_stage):
                index, pick = divmod(index, len(graphs))
                stages.append(graphs[pick])
            plan = Plan.model_construct(stages=tuple(reversed(stages)))  # valid stages of distinct names
            try:
                cost = context.estimate_cost(plan)  # costed once: the budget check and the ranking share it
            except AllotError:
                continue  # a plan the environment cannot run
            if not context.budget.allows(cost):
                continue
            key = tuple(stage.models for stage in plan.stages)
            spent = context.budget.spent(cost)
            if key not in best or spent > best[key][0]:
                best[key] = (spent, plan)
        ranked = [plan for _, plan in sorted(best.values(), key=lambda item: (-item[0], item[1].plan_id))]
        if len(ranked) > SHORTLIST:
            step = len(ranked) / SHORTLIST
            ranked = [ranked[int(i * step)] for i in range(SHORTLIST)]
        return {"candidates": ranked}

    # (b) select

    def _select(self, state: _State) -> _State:
        context, candidates = state["context"], state.get("candidates", [])
        calls: list[PlannerCall] = []
        chosen: list[Plan] = []
        notes: list[str] = []
        fallback = ""
        reason = ""
        if self._llm is None:
            fallback = "no planner model configured"
        else:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": self._select_prompt(context, candidates)},
            ]
            picks, call = self._llm.ask_json(messages, Picks)
            calls.append(call)
            if picks is None:
                fallback = f"planner output unusable ({_last_error(call)})"
            else:
                chosen, notes = self._resolve(context, candidates, picks)
                reason = " ".join(picks.reason.split())[:300] if chosen else ""
                if not chosen:
                    fallback = f"planner picked nothing usable ({'; '.join(notes[:3]) or 'no picks'})"
        source = "planner"
        if fallback:
            source = "coverage"
            chosen = self._coverage_picks(context, candidates)
        selection = {
            "role": "pretest",
            "iteration": 0,
            "chosen": [json.loads(plan.canonical_json()) for plan in chosen],
            "source": source,
            "reason": reason,
            "discarded": notes[:MAX_ERRORS],
        }
        update: _State = {"chosen": chosen, "selection": selection, "calls": calls}
        if fallback:
            update["fallback"] = fallback
        return update

    def _resolve(self, context: StudyContext, candidates: Sequence[Plan], picks: Picks) -> tuple[list[Plan], list[str]]:
        space = context.space
        chosen: list[Plan] = []
        notes: list[str] = []
        for pick in picks.picks:
            if len(chosen) >= self.batch:
                break
            if isinstance(pick, int):
                if not 0 <= pick < len(candidates):
                    notes.append(f"index {pick} is not in the list")
                    continue
                plan = candidates[pick]
            else:
                try:
                    plan = _allocation(space, pick)
                except (AllotError, KeyError, ValueError) as exc:
                    notes.append(f"allocation {json.dumps(pick)[:80]} is not in the space: {exc}")
                    continue
                if not fits(context, plan):
                    notes.append(f"allocation {plan.summary()} is over budget; discarded")
                    continue
            if plan.plan_id not in {p.plan_id for p in chosen}:
                chosen.append(plan)
        return chosen, notes

    def _coverage_picks(self, context: StudyContext, candidates: Sequence[Plan]) -> list[Plan]:
        """Without a planner, pre-test combinations that between them put every model on every stage once
        (insight 1: stages prefer different models), each the most budget-using combination of its models,
        with one model per stage so that a score speaks for its models and not for a pairing. Greedy: the
        candidate adding the most untested (stage, model) pairs, ties to the one spending most; at least
        ``batch`` of them."""
        space = context.space
        wanted = max([self.batch, *(len(space.stage_models[s]) for s in space.stages)])
        single = [plan for plan in candidates if all(len(stage.nodes) == 1 for stage in plan.stages)]
        left = list(single or candidates)  # most budget-using first
        covered: set[tuple[str, str]] = set()
        chosen: list[Plan] = []
        while left and len(chosen) < wanted:
            gains = [len(_pairs(plan) - covered) for plan in left]
            best = max(range(len(left)), key=lambda i: gains[i])  # the first, most spending, of equals
            if gains[best] == 0 and len(chosen) >= self.batch:
                break
            plan = left.pop(best)
            chosen.append(plan)
            covered |= _pairs(plan)
        return chosen

    # (c) pretest

    def _pretest(self, state: _State) -> _State:
        context, n = state["context"], state["n"]
        selection = dict(state.get("selection") or {})
        tried = context.tried()
        first_time = _selection(list(context.trials), self.name) is None
        fallback = state.get("fallback", "")
        proposals = []
        for plan in state.get("chosen", []):
            if len(proposals) >= n:
                break
            if plan.plan_id in tried or not fits(context, plan):
                continue
            tag: dict[str, Any] = {"iteration": 0, "role": "pretest"}
            if first_time and not proposals:
                tag = selection  # the selection rides with the first pre-test, for resume and review
            info: dict[str, Any] = {self.name: tag}
            if fallback:
                info["fallback"] = fallback
            source = {"planner": "the planner", "coverage": "the coverage rule"}.get(selection.get("source"), "the planner")
            rationale = f"Agent-REINFORCE pre-test of a combination chosen by {source}"
            if selection.get("reason"):
                rationale += f": {selection['reason']}"
            if fallback:
                rationale += f" [fallback to the coverage rule: {fallback}]"
            proposals.append(Proposal(plan, rationale, info))
        return {"proposals": proposals}

    # graph initialisation

    def _init_graph(self, state: _State) -> _State:
        context = state["context"]
        tested = [
            (score, t.plan)
            for t in context.trials
            if _solver_only(t.plan) and (score := trial_score(t)) is not None and t.state is TrialState.COMPLETE
        ]
        tested.sort(key=lambda item: (-item[0], item[1].plan_id))
        top = [plan for _, plan in tested[:2]]
        space = context.space
        solver_probability: dict[str, dict[str, float]] = {}
        count_weights: dict[str, dict[str, dict[int, float]]] = {}
        helpers: dict[str, list[str]] = {}
        for stage in space.stages:
            models = space.stage_models[stage]
            probs = dict.fromkeys(models, 0.15)
            weights: dict[str, dict[int, float]] = {}
            for rank, plan in enumerate(top):
                for node in plan.stage(stage).nodes:
                    if node.model not in probs:
                        continue
                    probs[node.model] = max(probs[node.model], 0.8 if rank == 0 else 0.6)
                    table = weights.setdefault(node.model, {})
                    for c in space.n_choices[node.model]:
                        w = math.exp(-abs(math.log2(c) - math.log2(node.n)))
                        table[c] = max(table.get(c, 0.05), w)
            solver_probability[stage] = probs
            count_weights[stage] = weights
            largest = max(models, key=lambda m: context.info.models[m].params_b if m in context.info.models else 0.0)
            best = top[0].stage(stage).nodes[0].model if top else largest
            helpers[stage] = list(dict.fromkeys([best, largest]))
        graphs = initial_graphs(
            context, helper_models=helpers, solver_probability=solver_probability, count_weights=count_weights
        )
        graph = GraphState(self.name, 1, graphs)
        best_text = f"best pre-test {tested[0][1].summary()} scored {tested[0][0]:.3f}" if tested else "no pre-test scored"
        cause = f"agent-reinforce: initial graph from {len(tested)} pre-test(s); {best_text}"
        version = {"definition": graph.definition(update={"method": "pretest", "trials": []}), "cause": cause}
        return {"graph": graph, "members": [], "version": version, "note": cause}

    # (e) update

    def _update(self, state: _State) -> _State:
        context, graph, members = state["context"], state["graph"], state["members"]
        proposed_numeric, baseline = numeric_step(
            graph, members, learning_rate=self.learning_rate, baseline_decay=self.baseline_decay
        )
        calls: list[PlannerCall] = []
        fallback = ""
        reason = ""
        proposed: dict[str, ProbabilisticGraph | Mapping[str, Any]] = {}
        if self._llm is None:
            fallback = "no planner model configured"
        elif graph.iteration > self.iterations:
            fallback = f"the planner's {self.iterations} update(s) are spent"
        else:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": self._gradient_prompt(context, graph, members)},
            ]
            rewrite, call = self._llm.ask_json(messages, GraphRewrite)
            calls.append(call)
            if rewrite is None:
                fallback = f"planner output unusable ({_last_error(call)})"
            else:
                reason = " ".join(rewrite.reason.split())[:300]
                for stage in rewrite.stages:
                    if stage.stage in {g.stage for g in graph.graphs} and stage.stage not in proposed:
                        proposed[stage.stage] = stage.model_dump(exclude_none=True)
                if not proposed:
                    fallback = "planner rewrote no stage of this task"
        method = "planner"
        applied: tuple[tuple[ProbabilisticGraph, ...], list[Violation]] | None = None
        if not fallback:
            try:
                applied = apply_step(graph, proposed, members, context)
            except Exception as exc:  # a rewrite the rules cannot read is a fallback, never a crashed study
                fallback = f"planner rewrite could not be applied ({type(exc).__name__}: {str(exc)[:200]})"
        if fallback:
            method = "numeric"
            proposed = dict(proposed_numeric)
            applied = apply_step(graph, proposed, members, context)
        assert applied is not None
        graphs, violations = applied
        new = GraphState(self.name, graph.iteration + 1, graphs, baseline)
        numbers = [t.number for t in members]
        scores = [s for s in (trial_score(t) for t in members) if s is not None]
        mean = f"{sum(scores) / len(scores):.3f}" if scores else "n/a"
        how = "planner rewrite" if method == "planner" else f"numeric REINFORCE step ({fallback})"
        cause = f"agent-reinforce: update {graph.iteration} by {how} from trials {numbers} (mean score {mean})"
        if reason:
            cause += f": {reason}"
        cause += f"; {describe(violations)}"
        report = {
            "method": method,
            "trials": numbers,
            "violations": [v.model_dump() for v in violations[:MAX_REPORTED]],
            "violation_count": len(violations),
            "reason": reason,
            "fallback": fallback or None,
        }
        version = {"definition": new.definition(update=report), "cause": cause}
        update: _State = {"graph": new, "members": [], "version": version, "note": cause, "calls": calls}
        if fallback:
            update["fallback"] = fallback
        return update

    # (d) sample

    def _sample(self, state: _State) -> _State:
        context, n, graph = state["context"], state["n"], state["graph"]
        members = state.get("members", [])
        k = n if len(members) >= self.batch else min(n, self.batch - len(members))
        plans = sample_plans(graph, context, f"{self.name}:{self.seed}:{graph.iteration}", len(members), k)
        version, fallback = state.get("version"), state.get("fallback", "")
        proposals = []
        for j, plan in enumerate(plans):
            info: dict[str, Any] = {self.name: {"iteration": graph.iteration, "role": "sample"}}
            rationale = f"Agent-REINFORCE iteration {graph.iteration}: graph sampled from the probabilistic graph"
            if j == 0 and version is not None:
                info["graph_version"] = version
                rationale += f"; {state.get('note', '')}"
                if fallback:
                    info["fallback"] = fallback
            proposals.append(Proposal(plan, rationale, info))
        return {"proposals": proposals}

    # -- prompts ------------------------------------------------------------------------------------

    def _task_text(self, context: StudyContext) -> str:
        space, info = context.space, context.info
        lines = [f"Task {info.name}: stages {list(space.stages)} (in order; each works on the previous one's output)."]
        for stage in space.stages:
            models = []
            for m in space.stage_models[stage]:
                spec = info.models.get(m)
                size = f"{spec.params_b:g}B" if spec is not None else "?"
                models.append(f"{m} ({size}, samples {list(space.n_choices[m])})")
            lines.append(f"- {stage}: models {', '.join(models)}")
        lines.append(f"Roles this environment runs: {[r.value for r in info.roles]}; budget {context.budget} per input.")
        return "\n".join(lines)

    def _select_prompt(self, context: StudyContext, candidates: Sequence[Plan]) -> str:
        rows = [
            f"{i}: {plan.summary()} (uses {context.spent(plan) / context.budget.limit:.0%} of the budget)"
            for i, plan in enumerate(candidates)
        ]
        return "\n".join(
            [
                SELECT_TASK.format(k=self.batch),
                self._task_text(context),
                "COMBINATIONS WITHIN BUDGET:",
                *rows,
            ]
        )

    def _gradient_prompt(self, context: StudyContext, graph: GraphState, members: Sequence[FrozenTrial]) -> str:
        scored = [(s, t) for t in members if (s := trial_score(t)) is not None]
        mean = sum(s for s, _ in scored) / len(scored) if scored else 0.0
        scored.sort(key=lambda item: (-item[0], item[1].number))
        samples = [
            {
                "trial": t.number,
                "score": round(s, 4),
                "cost_share": round(context.spent(t.plan) / context.budget.limit, 3) if fits(context, t.plan) else None,
                "stages": [_graph_json(stage) for stage in t.plan.stages],
            }
            for s, t in scored[:MAX_SHOWN_SAMPLES]
        ]
        current = [g.to_probabilities() for g in graph.graphs]
        max_in = min(g.max_in_degree for g in graph.graphs)
        return "\n".join(
            [
                GRADIENT_TASK.format(max_in=max_in, mean=f"{mean:.4f}"),
                self._task_text(context),
                "CURRENT GRAPH:",
                "```json",
                json.dumps({"stages": current}, separators=(",", ":")),
                "```",
                f"SAMPLED GRAPHS (mean score {mean:.4f}):",
                "```json",
                json.dumps(samples, separators=(",", ":")),
                "```",
            ]
        )


# -- helpers ------------------------------------------------------------------------------------------------


def _selection(trials: Sequence[FrozenTrial], name: str) -> dict[str, Any] | None:
    for trial in trials:
        tag = trial.strategy_info.get(name)
        if isinstance(tag, Mapping) and tag.get("role") == "pretest" and "chosen" in tag:
            return dict(tag)
    return None


def _plans(values: Sequence[Any]) -> list[Plan]:
    plans = []
    for value in values:
        try:
            plans.append(Plan.from_json(value))
        except AllotError:
            continue
    return plans


def _pairs(plan: Plan) -> set[tuple[str, str]]:
    """The (stage, model) pairs a plan uses."""
    return {(stage.stage, node.model) for stage in plan.stages for node in stage.nodes}


def _solver_only(plan: Plan) -> bool:
    return all(not stage.edges and all(node.role is Role.SOLVER for node in stage.nodes) for stage in plan.stages)


def _allocation(space: Any, pick: Mapping[str, Mapping[str, int]]) -> Plan:
    """A planner-written ``{stage: {model: n}}`` as a plan of the space (``ValueError`` if it is not one)."""
    if set(pick) != set(space.stages):
        raise ValueError(f"stages {sorted(pick)} are not {list(space.stages)}")
    choices = []
    for stage in space.stages:
        samples = pick[stage]
        if not samples or len(samples) > space.max_models:
            raise ValueError(f"stage {stage!r} needs 1..{space.max_models} models")
        for model, n in samples.items():
            if model not in space.stage_models[stage]:
                raise ValueError(f"model {model!r} cannot run stage {stage!r}")
            if n not in space.n_choices[model]:
                raise ValueError(f"{n} samples of {model} are not allowed ({list(space.n_choices[model])})")
        order = space.stage_models[stage]
        ordered = tuple(sorted(samples.items(), key=lambda item: order.index(item[0])))
        cap = None if None in space.caps else space.caps[0]
        choices.append(StageChoice(ordered, cap))
    return space.plan(choices)


def _graph_json(stage: StageGraph) -> dict[str, Any]:
    return {
        "stage": stage.stage,
        "decision": stage.decision.value,
        "nodes": [{"id": n.id, "role": n.role.value, "model": n.model, "n": n.n} for n in stage.nodes],
        "edges": [list(edge) for edge in stage.edges],
    }


def _last_error(call: PlannerCall) -> str:
    return call.errors[-1] if call.errors else "no answer"
