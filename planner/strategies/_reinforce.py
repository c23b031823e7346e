"""GPTSwarm's numeric REINFORCE over probabilistic collaboration graphs, and the pieces the agents share.

Per stage the strategy keeps a ``ProbabilisticGraph`` over the space's models: solver slots with a
sample-count distribution (``space.n_choices``); where the environment runs them (``info.roles``) also
reviewer and reviser slots for ``rounds`` rounds and aggregator slots, joined by candidate edges. One
iteration:

1. sample ``batch`` plans (one graph per stage); a plan over budget or not runnable is drawn again
   (``context.fits``), untried plans are preferred, so nothing over budget is proposed;
2. the study evaluates them and ``tell``s the scores;
3. the logits move along the score-function gradient ``mean_i((s_i - b) * d log p(G_i))``, the advantages
   divided by the scores' spread, with ``b`` a moving average of past batch means (the batch mean itself
   on the first iteration); the step goes through ``ProbabilisticGraph.apply_update``, so an edge (slot,
   count) is raised only if the sampled graphs that used it scored above the batch mean;
4. the new graphs are one *graph version*: the first proposal of the next iteration carries
   ``info["graph_version"] = {"definition": ..., "cause": ...}`` for the study layer to store
   (``storage.add_graph_version``); strategies do no I/O.

Stateless between calls: ``propose`` rebuilds the current graphs from the newest ``graph_version`` in
``context.trials`` and the scores of that iteration's trials, and draws sample ``j`` of iteration ``i``
from a stream seeded by ``(seed, i, j)``, so a resumed study continues exactly where it stopped, however
the study batches its calls.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from graphs.errors import AllotError, InvalidPlan
from graphs.plan import Plan, Role, StageGraph
from graphs.probabilistic import LOGIT_LIMIT, ProbabilisticGraph, Violation, reinforce_step
from planner.space import StageChoice
from planner.strategies._base import Proposal, Strategy, StudyContext
from planner.trial import FrozenTrial, TrialState

__all__ = [
    "STATE_FORMAT",
    "GraphState",
    "ReinforceStrategy",
    "apply_step",
    "describe",
    "evidence_of",
    "fits",
    "initial_graphs",
    "iteration_trials",
    "latest_state",
    "numeric_step",
    "sample_plans",
    "shape",
    "trial_score",
]

STATE_FORMAT = "allot.graph-state/1"
MAX_DRAWS = 200
"""Draws per proposal before giving up on an untried plan that fits the budget."""
MAX_REPORTED = 20
"""Violations kept in a version's report (all are counted)."""


@dataclass(frozen=True)
class GraphState:
    """What an iteration samples from: one probabilistic graph per stage, and the REINFORCE baseline."""

    strategy: str
    iteration: int
    graphs: tuple[ProbabilisticGraph, ...]
    baseline: float | None = None

    def definition(self, **extra: Any) -> dict[str, Any]:
        """The JSON stored as a graph version (``extra`` adds e.g. the update's report)."""
        return {
            "format": STATE_FORMAT,
            "strategy": self.strategy,
            "iteration": self.iteration,
            "baseline": self.baseline,
            "stages": [graph.to_dict() for graph in self.graphs],
            **extra,
        }

    @classmethod
    def from_definition(cls, data: Mapping[str, Any]) -> GraphState:
        """Parse ``definition()``; ``InvalidPlan`` if it is not one."""
        if not isinstance(data, Mapping) or data.get("format") != STATE_FORMAT:
            raise InvalidPlan(f"not a graph state: expected format {STATE_FORMAT!r}")
        try:
            graphs = tuple(ProbabilisticGraph.from_json(stage) for stage in data["stages"])
            baseline = data.get("baseline")
            return cls(
                strategy=str(data["strategy"]),
                iteration=int(data["iteration"]),
                graphs=graphs,
                baseline=None if baseline is None else float(baseline),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidPlan(f"invalid graph state: {exc}") from exc

    def graph(self, stage: str) -> ProbabilisticGraph:
        for graph in self.graphs:
            if graph.stage == stage:
                return graph
        raise KeyError(stage)

    def sample(self, rng: random.Random) -> Plan:
        return Plan(stages=tuple(graph.sample(rng) for graph in self.graphs))


# -- building and reading states -------------------------------------------------------------------------


def initial_graphs(
    context: StudyContext,
    *,
    rounds: int = 2,
    helper_models: Mapping[str, Sequence[str]] | None = None,
    solver_probability: Mapping[str, Mapping[str, float]] | None = None,
    count_weights: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
    helper_probability: float = 0.15,
) -> tuple[ProbabilisticGraph, ...]:
    """A template graph per stage of ``context.space``.

    Solver slots for every model of the stage (counts from ``space.n_choices``, at most
    ``space.max_models`` per sample); reviewer, reviser and aggregator slots for ``helper_models[stage]``
    (default: every model of the stage) where ``context.info.roles`` has them. ``solver_probability`` and
    ``count_weights`` (per stage, per model) bias the start, e.g. toward pre-tested allocations.
    """
    space, roles = context.space, set(context.info.roles)
    cap = None if None in space.caps else space.caps[0]
    graphs = []
    for stage in space.stages:
        models = space.stage_models[stage]
        helpers = tuple(helper_models.get(stage, models)) if helper_models else models
        graph = ProbabilisticGraph.template(
            stage,
            {m: space.n_choices[m] for m in models},
            reviewers=helpers if Role.REVIEWER in roles and Role.REVISER in roles else (),
            revisers=helpers if Role.REVISER in roles else (),
            aggregators=helpers if Role.AGGREGATOR in roles else (),
            rounds=rounds,
            solver_probability=min(0.5, space.max_models / len(models)),
            helper_probability=helper_probability,
            count_weights=(count_weights or {}).get(stage),
            max_solvers=space.max_models,
            max_tokens=cap,
        )
        wanted = (solver_probability or {}).get(stage)
        if wanted:
            slots = tuple(
                slot.model_copy(update={"include_logit": _logit(wanted[slot.model])})
                if slot.role is Role.SOLVER and slot.model in wanted
                else slot
                for slot in graph.slots
            )
            graph = ProbabilisticGraph(
                stage=graph.stage,
                slots=slots,
                edges=graph.edges,
                max_in_degree=graph.max_in_degree,
                max_solvers=graph.max_solvers,
            )
        graphs.append(graph)
    return tuple(graphs)


def latest_state(trials: Sequence[FrozenTrial], strategy: str) -> GraphState | None:
    """The newest graph state ``strategy`` published in ``trials`` (``None`` before the first)."""
    for trial in reversed(trials):
        version = trial.strategy_info.get("graph_version")
        if not isinstance(version, Mapping):
            continue
        try:
            state = GraphState.from_definition(version.get("definition", {}))
        except InvalidPlan:
            continue
        if state.strategy == strategy:
            return state
    return None


def iteration_trials(trials: Sequence[FrozenTrial], strategy: str, iteration: int, role: str = "sample") -> list[FrozenTrial]:
    """The trials ``strategy`` proposed as ``role`` in ``iteration``."""
    out = []
    for trial in trials:
        tag = trial.strategy_info.get(strategy)
        if isinstance(tag, Mapping) and tag.get("iteration") == iteration and tag.get("role", "sample") == role:
            out.append(trial)
    return out


def trial_score(trial: FrozenTrial) -> float | None:
    """A finished trial's score for learning: a failure scores 0, a rejected or unfinished trial nothing."""
    if trial.state is TrialState.COMPLETE:
        return trial.score if trial.score is not None else 0.0
    if trial.state is TrialState.FAIL:
        return 0.0
    return None


def evidence_of(trials: Iterable[FrozenTrial], stage: str) -> list[tuple[StageGraph, float]]:
    out = []
    for trial in trials:
        score = trial_score(trial)
        if score is None:
            continue
        try:
            out.append((trial.plan.stage(stage), score))
        except KeyError:
            continue
    return out


def apply_step(
    state: GraphState,
    proposed: Mapping[str, ProbabilisticGraph | Mapping[str, Any]],
    trials: Sequence[FrozenTrial],
    context: StudyContext,
) -> tuple[tuple[ProbabilisticGraph, ...], list[Violation]]:
    """Pass each stage's proposed graph through ``apply_update`` against the iteration's evidence, with
    the models, roles and counts the space and environment allow. Stages not in ``proposed`` keep theirs."""
    graphs, violations = [], []
    for graph in state.graphs:
        if graph.stage not in proposed:
            graphs.append(graph)
            continue
        update = graph.apply_update(
            proposed[graph.stage],
            evidence_of(trials, graph.stage),
            allowed_models=context.space.stage_models.get(graph.stage, ()),
            allowed_roles=context.info.roles,
            allowed_counts=context.space.n_choices,
        )
        graphs.append(update.graph)
        violations.extend(update.violations)
    return tuple(graphs), violations


def numeric_step(
    state: GraphState, trials: Sequence[FrozenTrial], *, learning_rate: float, baseline_decay: float
) -> tuple[dict[str, ProbabilisticGraph], float | None]:
    """The REINFORCE proposal per stage, and the baseline after this batch."""
    scores = [s for s in (trial_score(t) for t in trials) if s is not None]
    if not scores:
        return {}, state.baseline
    mean = fmean(scores)
    baseline = mean if state.baseline is None else state.baseline
    proposed = {
        graph.stage: reinforce_step(graph, evidence_of(trials, graph.stage), baseline=baseline, learning_rate=learning_rate)
        for graph in state.graphs
    }
    after = mean if state.baseline is None else baseline_decay * state.baseline + (1 - baseline_decay) * mean
    return proposed, after


def fits(context: StudyContext, plan: Plan) -> bool:
    """``context.fits``, with a plan the environment cannot run counting as not fitting."""
    try:
        return context.fits(plan)
    except AllotError:
        return False


def sample_plans(state: GraphState, context: StudyContext, seed: str, first: int, k: int) -> list[Plan]:
    """Up to ``k`` distinct plans drawn from ``state`` that fit the budget, untried ones first.

    Sample ``j`` of the iteration draws from its own stream ``(seed, j)`` (``j`` from ``first``), so the
    plans do not depend on how the study batches its ``propose`` calls. A draw over budget is drawn again
    (at most ``MAX_DRAWS`` times per plan); if only tried plans fit, one of them is re-proposed; if none
    fits, the cheapest solver-only plan of the graphs is used.
    """
    tried = {shape(t.plan) for t in context.trials}
    out: list[Plan] = []
    taken: set[tuple[Any, ...]] = set()
    for j in range(first, first + k):
        rng = random.Random(f"{seed}:{j}")
        chosen: Plan | None = None
        fallback: Plan | None = None
        for _ in range(MAX_DRAWS):
            plan = state.sample(rng)
            key = shape(plan)
            if key in taken or not fits(context, plan):
                continue
            if key in tried:
                fallback = fallback or plan
                continue
            chosen = plan
            break
        chosen = chosen or fallback or _cheapest(state, context, taken)
        if chosen is None:
            break
        out.append(chosen)
        taken.add(shape(chosen))
    return out


def shape(plan: Plan) -> tuple[Any, ...]:
    """What a plan computes, whatever its node ids: per stage the nodes' (role, model, n, cap), the edges
    between those labels and the decision. Plans of equal shape get equal evaluations, so a search that
    knows one has tried the other (``n0`` of a pre-test and ``solver-m`` of a sampled graph, say)."""
    stages = []
    for stage in plan.stages:
        label = {node.id: (node.role.value, node.model, node.n, node.max_tokens or 0) for node in stage.nodes}
        edges = tuple(sorted((label[u], label[v]) for u, v in stage.edges))
        stages.append((stage.stage, tuple(sorted(label.values())), edges, stage.decision.value, stage.early_stop or 0))
    return tuple(stages)


def _cheapest(state: GraphState, context: StudyContext, taken: set[tuple[Any, ...]]) -> Plan | None:
    """The cheapest plan of one solver at its smallest count per stage, if it fits and is not taken."""
    options = []
    for graph in state.graphs:
        options.append([StageChoice(((s.model, s.counts[0]),), s.max_tokens) for s in graph.slots if s.role is Role.SOLVER])
    choices = [opts[0] for opts in options]
    for i, opts in enumerate(options):

        def spent(choice: StageChoice, i: int = i) -> float:
            probe = [choice if j == i else c for j, c in enumerate(choices)]
            try:
                return context.spent(context.space.plan(probe))
            except AllotError:
                return float("inf")

        choices[i] = min(opts, key=spent)
    plan = context.space.plan(choices)
    return plan if shape(plan) not in taken and fits(context, plan) else None


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return max(-LOGIT_LIMIT, min(LOGIT_LIMIT, math.log(p / (1 - p))))


def describe(violations: Sequence[Violation], limit: int = 6) -> str:
    """A short line about clipped violations for a rationale or a version's cause."""
    if not violations:
        return "no rule violations"
    kinds: dict[str, int] = {}
    for v in violations:
        kinds[v.kind] = kinds.get(v.kind, 0) + 1
    head = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    shown = "; ".join(str(v) for v in violations[:limit])
    return f"clipped {len(violations)} ({head}): {shown}" + (" ..." if len(violations) > limit else "")


# -- the strategy ------------------------------------------------------------------------------------------


class ReinforceStrategy(Strategy):
    """GPTSwarm: REINFORCE on edge, slot and count logits of per-stage probabilistic graphs.

    Args:
        seed: seeds the sampling stream (with the number of trials so far).
        learning_rate: step size on the logits (advantages are divided by the batch's score spread).
        batch: sampled plans per update.
        baseline_decay: weight of the old baseline in its moving average.
        rounds: reviewer/reviser rounds of the template where the environment runs them.
    """

    name = "gptswarm"

    def __init__(
        self,
        seed: int | None = None,
        learning_rate: float = 0.5,
        batch: int = 4,
        baseline_decay: float = 0.7,
        rounds: int = 2,
    ) -> None:
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        self.learning_rate = float(learning_rate)
        self.batch = int(batch)
        self.baseline_decay = float(baseline_decay)
        self.rounds = int(rounds)
        super().__init__(seed)

    def params(self) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "batch": self.batch,
            "baseline_decay": self.baseline_decay,
            "rounds": self.rounds,
        }

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        if n < 1:
            return []
        trials = list(context.trials)
        state = latest_state(trials, self.name)
        version: dict[str, Any] | None = None
        note = ""
        if state is None:
            state = GraphState(self.name, 1, initial_graphs(context, rounds=self.rounds))
            version = {"definition": state.definition(), "cause": "gptswarm: initial template graph"}
            members: list[FrozenTrial] = []
        else:
            members = iteration_trials(trials, self.name, state.iteration)
        finished = [t for t in members if t.state.is_finished]
        if len(members) >= self.batch and finished:
            state, version, note = self._update(state, finished, context)
            members = []
        # a full iteration whose trials are all still running keeps sampling from the same graphs
        k = n if len(members) >= self.batch else min(n, self.batch - len(members))
        plans = sample_plans(state, context, f"{self.name}:{self.seed}:{state.iteration}", len(members), k)
        baseline = "none yet" if state.baseline is None else f"{state.baseline:.3f}"
        out = []
        for j, plan in enumerate(plans):
            info: dict[str, Any] = {self.name: {"iteration": state.iteration, "role": "sample"}}
            rationale = f"GPTSwarm REINFORCE iteration {state.iteration}: sampled graph (baseline {baseline})"
            if j == 0 and version is not None:
                info["graph_version"] = version
                rationale += f"; {note}" if note else ""
            out.append(Proposal(plan, rationale, info))
        return out

    def _update(
        self, state: GraphState, trials: Sequence[FrozenTrial], context: StudyContext
    ) -> tuple[GraphState, dict[str, Any], str]:
        proposed, baseline = numeric_step(state, trials, learning_rate=self.learning_rate, baseline_decay=self.baseline_decay)
        graphs, violations = apply_step(state, proposed, trials, context)
        scores = [s for s in (trial_score(t) for t in trials) if s is not None]
        new = GraphState(self.name, state.iteration + 1, graphs, baseline)
        numbers = [t.number for t in trials]
        mean = f"{fmean(scores):.3f}" if scores else "n/a"
        cause = (
            f"gptswarm: REINFORCE step {state.iteration} from trials {numbers} "
            f"(mean score {mean}, learning rate {self.learning_rate}); {describe(violations)}"
        )
        report = {
            "method": "numeric",
            "trials": numbers,
            "violations": [v.model_dump() for v in violations[:MAX_REPORTED]],
            "violation_count": len(violations),
        }
        return new, {"definition": new.definition(update=report), "cause": cause}, describe(violations)
