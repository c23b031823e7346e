"""The search space: which plans a strategy may propose in an environment.

Per stage: a set of 1..``max_models`` models (a mixture pools their samples), a sample count per model,
a thinking-token cap shared by the stage's nodes, and the decision rule (majority vote, or majority vote
that stops early once ``k`` answers agree). Every choice maps to exactly one plan with a stable id.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from executors.environment import EnvironmentInfo
from graphs.errors import UnknownModel
from graphs.plan import Node, Plan, StageGraph

__all__ = ["SearchSpace", "StageChoice", "clear_plan_cache"]

DEFAULT_EARLY_STOP = (2, 3)
PLAN_CACHE_SIZE = 2048
"""Plans built from choices and kept for reuse (``SearchSpace.plan``): a strategy's step builds the same
neighbouring plans again and again, and a plan is a validated, immutable value whose id is computed once. A
4-stage plan takes about 6 KB, so the cache stays near 13 MB; 8,192 was no faster in ``benchmarks/planner_step.py``."""


@dataclass(frozen=True)
class StageChoice:
    """One stage's allocation: ``{model: n}``, a cap and an early-stop threshold."""

    samples: tuple[tuple[str, int], ...]
    cap: int | None = None
    early_stop: int | None = None

    def graph(self, stage: str) -> StageGraph:
        nodes = tuple(Node(id=f"n{i}", model=model, n=n, max_tokens=self.cap) for i, (model, n) in enumerate(self.samples))
        return StageGraph(stage=stage, nodes=nodes, early_stop=self.early_stop)

    @property
    def total_samples(self) -> int:
        return sum(n for _, n in self.samples)


@dataclass(frozen=True)
class SearchSpace:
    stages: tuple[str, ...]
    stage_models: Mapping[str, tuple[str, ...]]
    n_choices: Mapping[str, tuple[int, ...]]
    """Sample counts allowed per model."""
    caps: tuple[int | None, ...] = (None,)
    early_stop: tuple[int | None, ...] = (None,)
    max_models: int = 1

    @classmethod
    def from_info(
        cls,
        info: EnvironmentInfo,
        *,
        max_models: int | None = None,
        caps: Sequence[int | None] | None = None,
        early_stop: Sequence[int | None] | None = None,
        models: Sequence[str] | None = None,
    ) -> SearchSpace:
        """The full space an environment offers: mixtures of up to two models for single-stage tasks
        (one per stage for multi-stage tasks, where mixtures multiply the space), sample counts in
        powers of two up to what the environment allows, every cap, early stop where supported.
        ``models`` restricts the pool; a name the environment does not have is ``UnknownModel``."""
        stage_models = {s: tuple(info.stage_models[s]) for s in info.stages}
        if models is not None:
            unknown = [m for m in models if m not in info.models]
            if unknown:
                raise UnknownModel(f"unknown model {unknown[0]!r} in {info.name}: known models are {', '.join(info.models)}")
            stage_models = {s: tuple(m for m in ms if m in models) for s, ms in stage_models.items()}
            empty = [s for s, ms in stage_models.items() if not ms]
            if empty:
                raise UnknownModel(f"none of the chosen models can run stage {empty[0]!r} of {info.name}")
        n_choices = {m: _powers_of_two(limit) for m, limit in info.max_samples.items()}
        if max_models is None:
            max_models = 2 if len(info.stages) == 1 else 1
        if early_stop is None:
            early_stop = (None, *DEFAULT_EARLY_STOP) if info.early_stop else (None,)
        return cls(
            stages=info.stages,
            stage_models=stage_models,
            n_choices=n_choices,
            caps=tuple(caps) if caps is not None else tuple(info.caps),
            early_stop=tuple(early_stop),
            max_models=max(1, max_models),
        )

    # -- serialisation ---------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        return {
            "stages": list(self.stages),
            "stage_models": {s: list(ms) for s, ms in self.stage_models.items()},
            "n_choices": {m: list(ns) for m, ns in self.n_choices.items()},
            "caps": list(self.caps),
            "early_stop": list(self.early_stop),
            "max_models": self.max_models,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> SearchSpace:
        return cls(
            stages=tuple(spec["stages"]),
            stage_models={s: tuple(ms) for s, ms in spec["stage_models"].items()},
            n_choices={m: tuple(ns) for m, ns in spec["n_choices"].items()},
            caps=tuple(spec.get("caps", [None])),
            early_stop=tuple(spec.get("early_stop", [None])),
            max_models=int(spec.get("max_models", 1)),
        )

    # -- choices ---------------------------------------------------------------------------------

    def model_sets(self, stage: str) -> list[tuple[str, ...]]:
        models = self.stage_models[stage]
        sets: list[tuple[str, ...]] = []
        for k in range(1, min(self.max_models, len(models)) + 1):
            sets.extend(itertools.combinations(models, k))
        return sets

    def stage_choices(self, stage: str) -> Iterator[StageChoice]:
        for models in self.model_sets(stage):
            for counts in itertools.product(*(self.n_choices[m] for m in models)):
                total = sum(counts)
                for cap in self.caps:
                    for stop in self.early_stop:
                        if stop is not None and total <= stop:
                            continue
                        yield StageChoice(tuple(zip(models, counts, strict=True)), cap, stop)

    def size(self) -> int:
        return math.prod(sum(1 for _ in self.stage_choices(s)) for s in self.stages)

    def enumerate(self) -> Iterator[Plan]:
        """Every plan in the space (the product of every stage's choices), each built once: not through the
        cache of ``plan``, which a pass over thousands of plans would only churn."""
        per_stage = [list(self.stage_choices(s)) for s in self.stages]
        for combo in itertools.product(*per_stage):
            yield _build_plan(self.stages, combo)

    def plan(self, choices: Sequence[StageChoice]) -> Plan:
        return _plan(self.stages, tuple(choices))

    def single_model_plans(self) -> Iterator[Plan]:
        """The baseline family: one model for every stage, ``n`` samples, majority vote, no cap."""
        shared = set.intersection(*(set(self.stage_models[s]) for s in self.stages))
        for model in sorted(shared, key=self.stage_models[self.stages[0]].index):
            for n in self.n_choices[model]:
                yield self.plan([StageChoice(((model, n),)) for _ in self.stages])

    def sample(self, rng: random.Random) -> Plan:
        """A random plan: model-set size, models, counts, cap and rule drawn uniformly per stage."""
        choices = []
        for stage in self.stages:
            models = self.stage_models[stage]
            k = rng.randint(1, min(self.max_models, len(models)))
            chosen = tuple(sorted(rng.sample(list(models), k), key=models.index))
            counts = tuple(rng.choice(self.n_choices[m]) for m in chosen)
            cap = rng.choice(self.caps)
            stops = [s for s in self.early_stop if s is None or sum(counts) > s]
            choices.append(StageChoice(tuple(zip(chosen, counts, strict=True)), cap, rng.choice(stops)))
        return self.plan(choices)

    def choices_of(self, plan: Plan) -> list[StageChoice]:
        """The stage choices a plan of this space was built from (inverse of ``plan``)."""
        out = []
        for stage in self.stages:
            graph = plan.stage(stage)
            caps = {node.max_tokens for node in graph.nodes}
            order = self.stage_models[stage]
            samples = tuple(sorted(((n.model, n.n) for n in graph.nodes), key=lambda mn: order.index(mn[0])))
            out.append(StageChoice(samples, caps.pop() if len(caps) == 1 else None, graph.early_stop))
        return out


def _powers_of_two(limit: int) -> tuple[int, ...]:
    values, n = [], 1
    while n <= limit:
        values.append(n)
        n *= 2
    return tuple(values)


def _build_plan(stages: tuple[str, ...], choices: tuple[StageChoice, ...]) -> Plan:
    """The plan of one choice per stage."""
    return Plan(stages=tuple(c.graph(s) for s, c in zip(stages, choices, strict=True)))


_plan = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)(_build_plan)
"""``_build_plan`` kept for reuse: the same value for the same choices (plans are frozen, so it is shared)."""


def clear_plan_cache() -> None:
    """Forget the plans kept by ``SearchSpace.plan`` (for a benchmark that times a strategy from a cold start)."""
    _plan.cache_clear()
