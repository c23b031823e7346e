"""AgentTTS (arXiv 2508.00890) as a langgraph agent: probe, write guidelines, propose candidates as JSON.

Each ``propose(context, n)`` runs the agent's graph (compiled once per instance) once::

    probe ──(probes pending)──────────────────────────────────────> END
      │
    queued ──(filled from the last round's spare candidates)──────> END
      │
    guidelines ──> propose ──(filled)─────────────────────────────> END
      │               │
      └─────────> fallback ───────────────────────────────────────> END

- ``probe`` (insight 1): models at the space's smallest sample count, no cap (the widest cap that fits where
  that is over budget), the other stages at a fixed cheap default (each stage's cheapest single sample):
  first each stage's cheapest and costliest model, then every other model on a single-stage task only
  (``probes_every_model``: on a multi-stage task the planner places the others from the ends and the search
  tries them in context). No LLM.
- ``queued``: candidates the planner proposed in an earlier round beyond what that call needed (it is
  asked for ``batch`` at a time), still new and within budget. No LLM.
- ``guidelines`` (insights 2 and 3): the planner reads the trial history (plan, score, spread, cost in
  budget units, state) and the probe table, and writes short guidelines: which model suits each stage,
  where more samples stop paying, how an earlier stage's budget shifts what later ones need.
- ``propose``: the planner proposes a batch of candidates as JSON in the space's terms (per stage a list
  of ``{"model", "n"}``, optional ``cap`` and ``early_stop``). Each is snapped to the space (``n`` to the
  nearest allowed count, caps and early stops to allowed ones); a candidate naming an unknown stage or
  model, over budget, or already tried is discarded here, so it never costs a trial.
- ``fallback``: when no planner model is configured, the planner fails (no valid JSON after re-asking, or
  unreachable) or it yields too few valid new candidates, ``InsightStrategy`` fills the batch (skipping its
  own probes: the agent has probed), and seeded random draws within the budget fill what it cannot.

Accounting: every proposal carries ``planner_cost``, its share of the LLM calls made in the ``propose``
call that returned it (split evenly; probes and queued candidates cost nothing, since their calls were
billed when made), and ``info["planner_attempts"]`` / ``info["planner_errors"]`` likewise, so summing over
trials gives the planner's whole cost. Nothing lives only in memory: guidelines are stored in every
planner proposal's ``info["guidelines"]`` and probes are recognised by plan id, so an agent rebuilt on
resume reads both back from ``context.trials``. The spare-candidate queue is the only in-memory state; a
resumed agent simply asks the planner again.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypedDict

from pydantic import BaseModel, Field, field_validator, model_validator

from graphs.cost import Budget, BudgetUnit, Cost
from graphs.errors import AllotError
from graphs.plan import Plan
from planner.llm import PlannerCall, planner_llm
from planner.space import StageChoice
from planner.strategies._base import Proposal, Strategy, StudyContext
from planner.strategies._insight import InsightStrategy, probes_every_model
from planner.trial import FrozenTrial, TrialState

__all__ = ["AgentTTSStrategy", "CandidateBatch", "CandidateSpec", "GuidelineList", "SampleSpec", "StageSpec"]

MAX_CANDIDATES = 16
HISTORY_BEST = 15
HISTORY_RECENT = 25
MAX_GUIDELINES = 8
MAX_ERRORS = 10
RANDOM_TRIES = 100  # rejection-sampling draws per missing plan when even the heuristic has nothing
_END = "__end__"  # langgraph's END, without importing langgraph at module import

SYSTEM_PROMPT = (
    "You are the planner of AgentTTS: you allocate test-time compute across the stages of a multi-stage LLM "
    "task. Per stage you choose which model(s) to sample and how many samples to draw (they are fused by "
    "majority vote), so that the final score is as high as possible while the whole plan stays within the "
    "budget. Three facts hold in such tasks: (1) stages prefer different models, and a small model with many "
    "samples can beat a large one at equal cost; (2) more samples help a stage only up to a point, then "
    "plateau or decline, so each stage has its own optimal budget; (3) stages interact: what an earlier "
    "stage gets changes what later stages need. You answer with JSON only: no prose, no code fences."
)

_UNIT_TEXT = {
    BudgetUnit.AGENTTTS: "agenttts units (1 unit = one sample of a 3B model with 128 prompt and 64 output tokens)",
    BudgetUnit.CALL1B: "call1b units (1 unit = one call of a 1B model with 128 prompt and 64 output tokens)",
    BudgetUnit.FLOPS: "FLOPs",
    BudgetUnit.TOKENS: "tokens (prompt + output)",
    BudgetUnit.USD: "US dollars",
}


_UNIT_SHORT = {
    BudgetUnit.AGENTTTS: "agenttts units",
    BudgetUnit.CALL1B: "call1b units",
    BudgetUnit.FLOPS: "FLOPs",
    BudgetUnit.TOKENS: "tokens",
    BudgetUnit.USD: "USD",
}


# -- what the planner must answer ---------------------------------------------------------------------------


class SampleSpec(BaseModel):
    """``n`` samples of one model."""

    model: str = Field(min_length=1)
    n: int = Field(default=1, ge=1)


class StageSpec(BaseModel):
    """One stage of a candidate: its models (several make a mixture), a thinking cap, an early stop.

    Also accepted: a bare list of samples, or ``{"model": ..., "n": ...}`` for a single model.
    """

    samples: list[SampleSpec] = Field(min_length=1)
    cap: int | None = Field(default=None, ge=1)
    early_stop: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {"samples": value}
        if isinstance(value, dict) and "samples" not in value and "model" in value:
            rest = {key: value[key] for key in ("cap", "early_stop") if key in value}
            return {"samples": [{"model": value["model"], "n": value.get("n", 1)}], **rest}
        return value


class CandidateSpec(BaseModel):
    stages: dict[str, StageSpec] = Field(min_length=1)
    reason: str = ""

    @field_validator("reason")
    @classmethod
    def _short_reason(cls, value: str) -> str:
        return " ".join(value.split())[:400]


class CandidateBatch(BaseModel):
    """The ``propose`` node's schema: ``{"candidates": [{"stages": {...}, "reason": "..."}, ...]}``."""

    candidates: list[CandidateSpec] = Field(min_length=1, max_length=MAX_CANDIDATES)


class GuidelineList(BaseModel):
    """The ``guidelines`` node's schema: ``{"guidelines": ["...", ...]}``."""

    guidelines: list[str] = Field(min_length=1)

    @field_validator("guidelines")
    @classmethod
    def _short_lines(cls, value: list[str]) -> list[str]:
        lines = [" ".join(line.split())[:300] for line in value]
        lines = [line for line in lines if line][:MAX_GUIDELINES]
        if not lines:
            raise ValueError("guidelines are empty")
        return lines


# -- the space, indexed once per study ----------------------------------------------------------------------


class _Discard(Exception):
    """A candidate that cannot become a plan of the space: what kind of problem, and the detail."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class _Probe:
    plan: Plan
    covers: tuple[tuple[str, str], ...]
    """(stage, model) pairs this probe measures (the all-default plan measures every stage's default)."""
    fits: bool


@dataclass(frozen=True)
class _ProbeCost:
    spent: float | None
    """Cost of the probe plan in budget units (None: not runnable)."""
    per_sample: float | None
    """Cost of one more sample of this model at this stage."""
    cap: int | None = None


class _Setup:
    """Everything derived once from a study's space and budget: snapping tables, probes, the task text."""

    def __init__(self, context: StudyContext, seed: int = 0) -> None:
        space = context.space
        self.space = space
        self.budget = context.budget
        self.stages = space.stages
        self.order = {s: {m: i for i, m in enumerate(space.stage_models[s])} for s in space.stages}
        self.n_choices = {m: tuple(sorted(ns)) for m, ns in space.n_choices.items()}
        self.caps = tuple(sorted(c for c in space.caps if c is not None))
        self.uncapped = None in space.caps
        self.stops = tuple(sorted(s for s in space.early_stop if s is not None))
        self.no_stop = None in space.early_stop
        self.probe_cap = None if self.uncapped or not self.caps else self.caps[-1]

        def spent(plan: Plan) -> float | None:
            try:
                return context.spent(plan)
            except AllotError:
                return None

        def option(model: str, n: int | None = None) -> StageChoice:
            return StageChoice(((model, n if n is not None else self.n_choices[model][0]),), self.probe_cap)

        first = [option(space.stage_models[s][0]) for s in space.stages]

        def with_stage(i: int, choice: StageChoice, base: Sequence[StageChoice]) -> Plan:
            return space.plan([choice if j == i else c for j, c in enumerate(base)])

        # The cheap default: each stage's cheapest single sample (costs add across stages).
        self.default = []
        for i, stage in enumerate(space.stages):
            options = [option(m) for m in space.stage_models[stage]]
            costs = [spent(with_stage(i, o, first)) for o in options]
            ranked = sorted(range(len(options)), key=lambda k: (math.inf if costs[k] is None else costs[k], k))
            self.default.append(options[ranked[0]])
        self.default_plan = space.plan(self.default)
        self.default_spent = spent(self.default_plan)

        # Probes: the smallest n uncapped; where that is over budget, the widest cap that fits.
        cap_order = ([None] if self.uncapped else []) + list(reversed(self.caps))
        self.probes: list[_Probe] = []
        self.probe_costs: dict[tuple[str, str], _ProbeCost] = {}
        self.probe_of: dict[tuple[str, str], str] = {}  # (stage, model) -> plan id
        self.probe_fits: dict[str, bool] = {}
        by_id: dict[str, list[tuple[str, str]]] = {}
        plans: dict[str, Plan] = {}
        order = random.Random(seed)  # the seed decides the probing order, as in the insight heuristic
        for i, stage in enumerate(space.stages):
            models = list(space.stage_models[stage])
            order.shuffle(models)
            for model in models:
                ns = self.n_choices[model]
                for cap in cap_order or [None]:
                    plan = with_stage(i, StageChoice(((model, ns[0]),), cap), self.default)
                    cost = spent(plan)
                    fits = cost is not None and _fits(context, plan)
                    if fits:
                        break
                by_id.setdefault(plan.plan_id, []).append((stage, model))
                plans[plan.plan_id] = plan
                self.probe_of[(stage, model)] = plan.plan_id
                self.probe_fits[plan.plan_id] = self.probe_fits.get(plan.plan_id, True) and fits
                per_sample = None
                if cost is not None and len(ns) > 1:
                    more = spent(with_stage(i, StageChoice(((model, ns[1]),), cap), self.default))
                    per_sample = None if more is None else (more - cost) / (ns[1] - ns[0])
                self.probe_costs[(stage, model)] = _ProbeCost(cost, per_sample, cap)
        for plan_id, covers in by_id.items():
            self.probes.append(_Probe(plans[plan_id], tuple(covers), self.probe_fits[plan_id]))
        # Each stage's cheapest and costliest model are probed first; the others only on a single-stage task
        # (``probes_every_model``).
        self.first_probes: set[tuple[str, str]] = set()
        for stage in space.stages:
            costs = {m: self.probe_costs[(stage, m)].spent for m in space.stage_models[stage]}
            runnable = sorted((c, m) for m, c in costs.items() if c is not None and self.probe_fits[self.probe_of[(stage, m)]])
            if runnable:
                self.first_probes |= {(stage, runnable[0][1]), (stage, runnable[-1][1])}
        self.task_text = self._task_text(context)

    # -- candidates -> plans

    def to_plan(self, candidate: CandidateSpec) -> tuple[Plan, list[str]]:
        """The plan of the space closest to ``candidate``, and the adjustments made. ``_Discard`` if none."""
        unknown = [s for s in candidate.stages if s not in self.order]
        if unknown:
            raise _Discard("unknown stage", f"{unknown[0]!r} (stages are {', '.join(self.stages)})")
        missing = [s for s in self.stages if s not in candidate.stages]
        if missing:
            raise _Discard("missing stage", repr(missing[0]))
        notes: list[str] = []
        choices = []
        for stage in self.stages:
            spec = candidate.stages[stage]
            pooled: dict[str, int] = {}
            for sample in spec.samples:
                if sample.model not in self.order[stage]:
                    raise _Discard("unknown model", f"{sample.model!r} for stage {stage!r}")
                pooled[sample.model] = pooled.get(sample.model, 0) + sample.n
            if len(pooled) > self.space.max_models:
                raise _Discard("too many models", f"stage {stage!r} mixes {len(pooled)}, at most {self.space.max_models}")
            samples = []
            for model in sorted(pooled, key=self.order[stage].__getitem__):
                n = _nearest_log(self.n_choices[model], pooled[model])
                if n != pooled[model]:
                    notes.append(f"{stage}: {model} n {pooled[model]} -> {n}")
                samples.append((model, n))
            cap = self._cap(spec.cap)
            if cap != spec.cap:
                notes.append(f"{stage}: cap {spec.cap} -> {cap}")
            total = sum(n for _, n in samples)
            stop = self._stop(spec.early_stop, total, stage)
            if stop != spec.early_stop:
                notes.append(f"{stage}: early_stop {spec.early_stop} -> {stop}")
            choices.append(StageChoice(tuple(samples), cap, stop))
        try:
            return self.space.plan(choices), notes
        except AllotError as exc:
            raise _Discard("invalid plan", str(exc)) from None

    def _cap(self, cap: int | None) -> int | None:
        if cap is None:
            return None if self.uncapped or not self.caps else self.caps[-1]
        if not self.caps:
            return None
        return min(self.caps, key=lambda c: (abs(math.log(c / cap)), c))

    def _stop(self, stop: int | None, total: int, stage: str) -> int | None:
        valid = [s for s in self.stops if total > s]
        if stop is not None and valid:
            return min(valid, key=lambda s: (abs(s - stop), s))
        if self.no_stop:
            return None
        if valid:
            return valid[0]
        raise _Discard("no early stop", f"stage {stage!r}: no threshold below its {total} samples")

    # -- prompt text

    def _task_text(self, context: StudyContext) -> str:
        space, info, budget = self.space, context.info, context.budget
        lines = [f"Task: {info.name}."]
        if len(space.stages) == 1:
            lines.append(f"One stage: {space.stages[0]}.")
        else:
            lines.append(
                f"{len(space.stages)} stages, run in order: {' -> '.join(space.stages)} "
                "(each works on the previous stage's answer)."
            )
        models = sorted({m for s in space.stages for m in space.stage_models[s]}, key=lambda m: _size(info, m))
        sizes = ", ".join(f"{m} ({_size(info, m):g}B parameters)" for m in models)
        lines.append(f"Models: {sizes}.")
        pools = {tuple(space.stage_models[s]) for s in space.stages}
        if len(pools) == 1:
            lines.append(f"Every stage may use: {', '.join(space.stage_models[space.stages[0]])}.")
        else:
            lines += [f"Stage {s} may use: {', '.join(space.stage_models[s])}." for s in space.stages]
        groups: dict[tuple[int, ...], list[str]] = {}
        for m in models:
            groups.setdefault(self.n_choices[m], []).append(m)
        counts = "; ".join(f"{', '.join(ms)}: {', '.join(map(str, ns))}" for ns, ms in groups.items())
        lines.append(f"Allowed samples n per model: {counts}.")
        if space.max_models > 1:
            lines.append(f"A stage may mix up to {space.max_models} models; their samples are pooled in one majority vote.")
        else:
            lines.append("One model per stage.")
        if self.caps:
            allowed = (["null (no cap)"] if self.uncapped else []) + [str(c) for c in self.caps]
            lines.append(f"Thinking-token cap per stage (cap): {', '.join(allowed)}; a cap cuts cost and may cut accuracy.")
        else:
            lines.append("Thinking-token caps: not available (cap must be null).")
        if self.stops:
            allowed = (["null (never)"] if self.no_stop else []) + [str(s) for s in self.stops]
            lines.append(
                f"Early stop per stage (early_stop): {', '.join(allowed)}: stop sampling once that many answers agree "
                "(it must be below the stage's total samples); it saves cost."
            )
        else:
            lines.append("Early stop: not available (early_stop must be null).")
        lines.append(
            f"Budget: at most {budget.limit:.6g} {_UNIT_TEXT[budget.unit]} per task input, for the whole plan "
            "(the sum of its stages' costs). Plans over budget are discarded unseen."
        )
        return "\n".join(lines)


def _size(info: Any, model: str) -> float:
    spec = info.models.get(model)
    return float(spec.active_params_b or spec.params_b) if spec is not None else 0.0


def _nearest_log(choices: Sequence[int], n: int) -> int:
    return min(choices, key=lambda c: (abs(math.log2(c) - math.log2(n)), c))


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


# -- the graph ----------------------------------------------------------------------------------------------


class _State(TypedDict, total=False):
    context: StudyContext
    n: int
    proposals: list[Proposal]
    calls: list[PlannerCall]
    fallback_reason: str | None
    discarded: list[str]
    probing: bool
    round: int
    """Index of the planner round this call started (absent when the planner was not asked)."""


@dataclass(frozen=True)
class _Queued:
    plan: Plan
    rationale: str
    info: dict[str, Any]


class AgentTTSStrategy(Strategy):
    """The AgentTTS planner agent: probes, guidelines and JSON batches from any litellm planner model.

    Args:
        seed: seeds the insight heuristic it falls back to.
        planner_model: a litellm route (``openai/gpt-4o-mini``, ``hosted_vllm/qwen3-8b``,
            ``allot-scripted/<name>``); ``None`` runs on probes and the insight heuristic alone.
        api_base: the planner's endpoint (a vLLM server), if not the provider's default.
        batch: candidates asked of the planner per round; spares are served by later ``propose`` calls.
        max_attempts: planner calls per question (the first plus re-asks after invalid JSON).
        max_tokens: the planner's output cap per call (a JSON answer cut off there is re-asked).
        timeout_s: how long one planner call may take; a call that times out is not retried (fallback).
    """

    name = "agenttts"

    def __init__(
        self,
        seed: int | None = None,
        planner_model: str | None = None,
        api_base: str | None = None,
        batch: int = 3,
        max_attempts: int = 3,
        max_tokens: int = 2048,
        timeout_s: float = 60.0,
    ) -> None:
        self.planner_model = planner_model
        self.api_base = api_base
        self.batch = int(batch)
        self.max_attempts = int(max_attempts)
        self.max_tokens = int(max_tokens)
        self.timeout_s = float(timeout_s)
        self._llm = planner_llm(
            planner_model, api_base=api_base, batch=batch, max_attempts=max_attempts, max_tokens=max_tokens, timeout_s=timeout_s
        )
        super().__init__(seed)
        self._graph = self._build_graph()

    # -- Strategy -----------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {
            "planner_model": self.planner_model,
            "api_base": self.api_base,
            "batch": self.batch,
            "max_attempts": self.max_attempts,
            "max_tokens": self.max_tokens,
            "timeout_s": self.timeout_s,
        }

    def reseed(self, seed: int) -> None:
        self._insight = InsightStrategy(seed=seed)
        self._rng = random.Random(seed)
        self._queue: list[_Queued] = []
        self._setup: _Setup | None = None  # built on the first propose, kept while the space and budget are
        self._guidelines: list[str] = []
        self._round = 0
        self._unbilled = Cost()
        self._restored = False

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        if n <= 0:
            return []
        self._prepare(context)
        state = self._graph.invoke({"context": context, "n": n, "proposals": [], "calls": [], "discarded": []})
        return self._bill(state)

    @property
    def guidelines(self) -> list[str]:
        """The latest guidelines the planner wrote (read back from the trials on resume)."""
        return list(self._guidelines)

    @property
    def usage(self) -> PlannerCall | None:
        """Running total of this instance's planner calls (``None`` without a planner model)."""
        return None if self._llm is None else self._llm.usage

    # -- setup and resume ---------------------------------------------------------------------------

    def _prepare(self, context: StudyContext) -> None:
        setup = self._setup
        if setup is None or setup.space is not context.space or setup.budget != context.budget:
            self._setup = _Setup(context, self.seed)
        if not self._restored:
            self._restored = True
            for trial in context.trials:
                info = trial.strategy_info or {}
                if isinstance(info.get("guidelines"), list) and info["guidelines"]:
                    self._guidelines = [str(g) for g in info["guidelines"]]
                if isinstance(info.get("round"), int):
                    self._round = max(self._round, info["round"] + 1)

    def _bill(self, state: _State) -> list[Proposal]:
        """Split the LLM calls' cost over the proposals this call returned; record attempts and errors."""
        proposals = state.get("proposals", [])
        calls = state.get("calls", [])
        if not calls:
            return proposals
        total = self._unbilled
        for call in calls:
            total = total + call.cost
        billed = [i for i, p in enumerate(proposals) if "queued_from_round" not in p.info and "probe" not in p.info]
        if not billed:
            self._unbilled = total
            return proposals
        self._unbilled = Cost()
        share = total.scaled(1.0 / len(billed))
        attempts = sum(call.attempts for call in calls)
        errors = [error[:200] for call in calls for error in call.errors][:MAX_ERRORS]
        out = list(proposals)
        for i in billed:
            info = {**out[i].info, "planner_attempts": attempts, "planner_errors": errors}
            out[i] = replace(out[i], planner_cost=share, info=info)
        return out

    # -- graph --------------------------------------------------------------------------------------

    def _build_graph(self) -> Any:
        from langgraph.graph import END, START, StateGraph

        graph = StateGraph(_State)
        graph.add_node("probe", self._probe_node)
        graph.add_node("queued", self._queued_node)
        graph.add_node("guidelines", self._guidelines_node)
        graph.add_node("propose", self._propose_node)
        graph.add_node("fallback", self._fallback_node)
        graph.add_edge(START, "probe")
        graph.add_conditional_edges("probe", lambda s: END if s.get("probing") else "queued", ["queued", END])
        graph.add_conditional_edges("queued", self._after_queued, ["guidelines", "fallback", END])
        graph.add_conditional_edges("guidelines", self._after_guidelines, ["propose", "fallback"])
        graph.add_conditional_edges("propose", lambda s: END if _filled(s) else "fallback", ["fallback", END])
        graph.add_edge("fallback", END)
        return graph.compile()

    def _probe_node(self, state: _State) -> _State:
        context, setup = state["context"], self._setup
        assert setup is not None
        tried = context.tried()
        pending = [p for p in setup.probes if p.fits and p.plan.plan_id not in tried]
        first = [p for p in pending if setup.first_probes & set(p.covers)]
        pending = first + ([p for p in pending if p not in first] if probes_every_model(context.space) else [])
        if not pending:
            return {"probing": False}
        default = "; ".join(f"{s}: {c.graph(s).summary()}" for s, c in zip(setup.stages, setup.default, strict=True))
        proposals = []
        for probe in pending[: state["n"]]:
            measured = ", ".join(f"{m} at {s}" for s, m in probe.covers)
            caps = {setup.probe_costs[c].cap for c in probe.covers} - {None}
            rationale = (
                f"probe (insight 1): {measured} at the smallest sample count, "
                + (f"cap {min(caps)}" if caps else "no cap")
                + (f"; other stages at the cheap default ({default})" if len(setup.stages) > 1 else "")
            )
            info = {"probe": [list(c) for c in probe.covers], "planner_attempts": 0, "planner_errors": []}
            proposals.append(Proposal(probe.plan, rationale, info))
        return {"proposals": proposals, "probing": True}

    def _queued_node(self, state: _State) -> _State:
        context, n = state["context"], state["n"]
        tried = context.tried()
        proposals = list(state.get("proposals", []))
        keep: list[_Queued] = []
        for item in self._queue:
            if item.plan.plan_id in tried:
                continue
            if len(proposals) < n:
                proposals.append(Proposal(item.plan, item.rationale, item.info))
            else:
                keep.append(item)
        self._queue = keep
        return {"proposals": proposals}

    def _after_queued(self, state: _State) -> str:
        if _filled(state):
            return _END
        return "guidelines" if self._llm is not None else "fallback"

    def _guidelines_node(self, state: _State) -> _State:
        assert self._llm is not None
        context = state["context"]
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self._situation(context, revise=True) + "\n\n" + GUIDELINES_ASK},
        ]
        round_ = self._round
        self._round += 1
        answer, call = self._llm.ask_json(messages, GuidelineList)
        update: _State = {"calls": [*state.get("calls", []), call], "round": round_}
        if answer is not None:
            self._guidelines = list(answer.guidelines)
        elif call.prompt_tokens == 0 and call.output_tokens == 0:  # never answered: do not ask again now
            update["fallback_reason"] = f"planner failed: {_last_error(call)}"
        return update

    def _after_guidelines(self, state: _State) -> str:
        return "fallback" if state.get("fallback_reason") else "propose"

    def _propose_node(self, state: _State) -> _State:
        assert self._llm is not None and self._setup is not None
        context, setup = state["context"], self._setup
        proposals = list(state.get("proposals", []))
        need = state["n"] - len(proposals)
        ask = max(need, self.batch)
        round_ = state["round"]
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self._situation(context) + "\n\n" + self._propose_ask(ask)},
        ]
        answer, call = self._llm.ask_json(messages, CandidateBatch)
        calls = [*state.get("calls", []), call]
        if answer is None:
            return {"calls": calls, "fallback_reason": f"planner failed: {_last_error(call)}"}
        tried = context.tried()
        seen = {p.plan.plan_id for p in proposals} | {q.plan.plan_id for q in self._queue}
        discarded: list[str] = []
        kinds: dict[str, int] = {}
        fresh: list[tuple[Plan, str, dict[str, Any]]] = []
        for index, candidate in enumerate(answer.candidates, start=1):
            kind, detail = None, ""
            try:
                plan, notes = setup.to_plan(candidate)
                if plan.plan_id in tried:
                    kind, detail = "already tried", plan.summary()
                elif plan.plan_id in seen:
                    kind, detail = "duplicate", plan.summary()
                elif not context.fits(plan):
                    kind, detail = "over budget", f"{context.spent(plan):.4g} > {context.budget}: {plan.summary()}"
            except _Discard as exc:
                kind, detail = exc.kind, str(exc).split(": ", 1)[1]
            except AllotError as exc:
                kind, detail = "not runnable", str(exc)
            if kind is not None:
                discarded.append(f"candidate {index}: {kind} ({detail})"[:300])
                kinds[kind] = kinds.get(kind, 0) + 1
                continue
            seen.add(plan.plan_id)
            info: dict[str, Any] = {"round": round_, "reason": candidate.reason, "candidate": candidate.model_dump()}
            if notes:
                info["adjusted"] = notes
            fresh.append((plan, candidate.reason or "no reason given", info))
        guidelines = list(self._guidelines)
        used = f" | guidelines: {' / '.join(guidelines)}" if guidelines else ""
        made = []
        for plan, reason, info in fresh:
            info = {**info, "discarded": discarded[:MAX_ERRORS]} if discarded else info
            if guidelines:
                info["guidelines"] = guidelines
            made.append((plan, f"planner: {reason}{used}", info))
        for plan, rationale, info in made[:need]:
            proposals.append(Proposal(plan, rationale, info))
        for plan, rationale, info in made[need:]:
            queued_info = {**info, "queued_from_round": round_, "planner_attempts": 0, "planner_errors": []}
            self._queue.append(_Queued(plan, rationale, queued_info))
        update: _State = {"calls": calls, "proposals": proposals, "discarded": discarded}
        why = ", ".join(f"{kind} x{count}" for kind, count in kinds.items())
        if not fresh:
            update["fallback_reason"] = f"planner proposed no valid new plan ({len(discarded)} discarded: {why})"
        elif len(proposals) < state["n"]:
            update["fallback_reason"] = (
                f"planner proposed only {len(fresh)} valid new plan(s) of {need} needed ({len(discarded)} discarded: {why})"
            )
        return update

    def _fallback_node(self, state: _State) -> _State:
        context, n = state["context"], state["n"]
        reason = state.get("fallback_reason") or (
            "no planner model configured" if self._llm is None else "planner proposed too few plans"
        )
        proposals = list(state.get("proposals", []))
        seen = {p.plan.plan_id for p in proposals}
        round_info: dict[str, Any] = {"round": state["round"]} if "round" in state else {}
        if self._guidelines and self._llm is not None:
            round_info["guidelines"] = list(self._guidelines)
        if state.get("discarded"):
            round_info["discarded"] = state["discarded"][:MAX_ERRORS]
        # The heuristic probes first, around an anchor of its own; this agent has probed already, so ask
        # for enough to get past its probes and skip them.
        extra = len(self._setup.probe_of) if self._setup is not None else 0
        need = n - len(proposals)
        for proposal in self._insight.propose(context, need + extra) if need > 0 else []:
            plan = proposal.plan
            if len(proposals) >= n:
                break
            if plan.plan_id in seen or proposal.info.get("phase") == "probe" or not _fits(context, plan):
                continue
            seen.add(plan.plan_id)
            rationale = f"fallback to insight heuristic: {reason}"
            if proposal.rationale:
                rationale += f" ({proposal.rationale})"
            info = {**proposal.info, **round_info, "fallback": reason, "planner_attempts": 0, "planner_errors": []}
            proposals.append(Proposal(plan, rationale, info, proposal.planner_cost))
        # Last resort when the heuristic has nothing new either: seeded random draws within the budget.
        tried = context.tried()
        for _ in range(RANDOM_TRIES * max(0, n - len(proposals))):
            if len(proposals) >= n:
                break
            plan = context.space.sample(self._rng)
            if plan.plan_id in seen or plan.plan_id in tried or not _fits(context, plan):
                continue
            seen.add(plan.plan_id)
            rationale = f"fallback to random draw: {reason}; the insight heuristic had nothing new"
            info = {**round_info, "fallback": reason, "random": True, "planner_attempts": 0, "planner_errors": []}
            proposals.append(Proposal(plan, rationale, info))
        return {"proposals": proposals}

    # -- prompts ------------------------------------------------------------------------------------

    def _situation(self, context: StudyContext, *, revise: bool = False) -> str:
        """The task, the probe table, the trial history and the latest guidelines (to revise, or to follow)."""
        setup = self._setup
        assert setup is not None
        budget = context.budget
        by_plan: dict[str, FrozenTrial] = {t.plan_id: t for t in context.trials}
        lines = [setup.task_text, ""]
        default = f"; every other stage at the cheap default: {setup.default_plan.summary()}, costing {_fmt(setup.default_spent)}"
        lines.append(
            "Probes (one model at one stage at its smallest n, no cap unless over budget"
            + (default if len(setup.stages) > 1 else "")
            + "):"
        )
        lines.append("stage | model | score | plan cost | cost per extra sample")
        every = probes_every_model(context.space)
        for (stage, model), plan_id in setup.probe_of.items():
            cost = setup.probe_costs[(stage, model)]
            trial = by_plan.get(plan_id)
            if trial is not None and trial.state is TrialState.COMPLETE:
                score = _fmt(trial.score, 3)
            elif trial is not None:
                score = trial.state.value
            elif cost.spent is None:
                score = "not runnable"
            elif not setup.probe_fits[plan_id]:
                score = "over budget"
            elif not every and (stage, model) not in setup.first_probes:
                score = "not probed (multi-stage task: each stage's cheapest and costliest model are)"
            else:
                score = "pending"
            label = model if cost.cap is None else f"{model} (cap {cost.cap})"
            lines.append(f"{stage} | {label} | {score} | {_fmt(cost.spent)} | {_fmt(cost.per_sample)}")
        if len(setup.stages) > 1:
            lines.append(
                "A plan costs about: default plan cost + for each stage (that stage's probe cost - default plan cost) "
                "+ (n - smallest n) x cost per extra sample."
            )
        lines.append("")
        lines.append(_history(context, budget))
        if self._guidelines:
            lines.append("")
            lines.append("Guidelines so far:" if revise else "Guidelines (from the history so far):")
            lines += [f"- {g}" for g in self._guidelines]
        return "\n".join(lines)

    def _propose_ask(self, k: int) -> str:
        setup = self._setup
        assert setup is not None
        space, budget = setup.space, setup.budget
        example: dict[str, Any] = {}
        for stage in space.stages:
            models = space.stage_models[stage]
            samples = [{"model": models[0], "n": 4}]
            if space.max_models > 1 and len(models) > 1:
                samples.append({"model": models[1], "n": 2})
            example[stage] = {"samples": samples, "cap": None, "early_stop": None}
        shape = json.dumps({"candidates": [{"stages": example, "reason": "why this plan, in one sentence"}]})
        return (
            f"Propose {k} new plans, each different from every plan in the history, each likely to beat the best score "
            f"so far or to match it for less. Rules: name every stage ({', '.join(space.stages)}) and only models listed "
            f"for it; n must be an allowed sample count; keep the whole plan within {budget.limit:.6g} "
            f"{_UNIT_SHORT[budget.unit]}; follow the guidelines and explore where the history is thin.\n"
            f"Answer with JSON only (no prose, no code fences), exactly this shape (the values are an example):\n{shape}"
        )


GUIDELINES_ASK = (
    "Write at most 6 short guidelines for the next plans, from the probes and the trials: which model suits each "
    "stage (compare scores at equal cost), where more samples stop paying for each stage, and how spending on an "
    "earlier stage changes what later stages need. Answer with JSON only (no prose, no code fences), exactly this "
    'shape:\n{"guidelines": ["...", "..."]}'
)


def _history(context: StudyContext, budget: Budget) -> str:
    trials = list(context.trials)
    if not trials:
        return "Trials so far: 0."
    complete = [t for t in trials if t.state is TrialState.COMPLETE and t.score is not None]
    best = sorted(complete, key=lambda t: (-(t.score or 0.0), budget.spent(t.estimated_cost), t.number))[:HISTORY_BEST]
    shown = {t.number for t in best} | {t.number for t in trials[-HISTORY_RECENT:]}
    header = f"Trials so far: {len(trials)}"
    if len(shown) < len(trials):
        header += f" (showing the best {HISTORY_BEST} and the last {HISTORY_RECENT})"
    lines = [header, "# | plan | score | spread | cost | state"]
    for trial in trials:
        if trial.number not in shown:
            continue
        cost = budget.spent(trial.estimated_cost)
        lines.append(
            f"{trial.number} | {trial.plan.summary()} | {_fmt(trial.score, 3)} | {_fmt(trial.spread, 2)} | "
            f"{cost:.4g} | {trial.state.value}"
        )
    return "\n".join(lines)


def _filled(state: _State) -> bool:
    return len(state.get("proposals", [])) >= state["n"]


def _fits(context: StudyContext, plan: Plan) -> bool:
    try:
        return context.fits(plan)
    except AllotError:
        return False


def _last_error(call: PlannerCall) -> str:
    return call.errors[-1][:200] if call.errors else "no answer"
