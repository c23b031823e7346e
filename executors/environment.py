"""The Environment interface: score a plan on a task's examples and say what it cost.

Like an httpx transport, an environment is the one narrow seam between the search and the world. Three
kinds sit behind it: live (runs models), replay (recorded samples, zero LLM calls) and simulated
(parametric curves with a known optimum). Strategies never see which one they talk to.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphs.cost import Cost, ModelSpec
from graphs.plan import DecisionRule, Plan, Role

__all__ = ["Environment", "EnvironmentInfo", "Evaluation"]


@dataclass(frozen=True)
class EnvironmentInfo:
    """What a search may choose from in this environment."""

    name: str
    stages: tuple[str, ...]
    models: Mapping[str, ModelSpec]
    stage_models: Mapping[str, tuple[str, ...]]
    max_samples: Mapping[str, int]
    """Most samples one plan may draw from a model (replay: what was recorded)."""
    caps: tuple[int | None, ...] = (None,)
    """Thinking-token caps a node may set (``None``: no cap)."""
    decisions: tuple[DecisionRule, ...] = (DecisionRule.MAJORITY_VOTE,)
    roles: tuple[Role, ...] = (Role.SOLVER,)
    early_stop: bool = True
    n_examples: int = 0


@dataclass(frozen=True)
class Evaluation:
    """The result of scoring one plan: mean and spread over sample orderings, and realised cost."""

    score: float
    spread: float
    cost: Cost
    """Mean cost per example, as realised."""
    scores: tuple[float, ...] = ()
    """Score per ordering (replay) or per repeat."""
    n_examples: int = 0
    llm_calls: int = 0
    per_example: tuple[float, ...] = field(default=(), repr=False)
    """Mean correctness per example, in the environment's example order."""


class Environment(abc.ABC):
    """Scores plans. Lifecycle: build (or ``from_spec``), ``check``/``estimate_cost``/``evaluate`` any
    number of times from one thread, ``close``.

    ``spec()`` is a JSON-able description from which ``executors.environment_from_spec`` rebuilds an
    equal environment in another process (a Celery worker); evaluating the same plan there gives the
    same result.
    """

    kind: str = "abstract"

    @property
    @abc.abstractmethod
    def info(self) -> EnvironmentInfo:
        """The choices this environment offers."""

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild this environment (``{"kind": ..., ...}``)."""

    @abc.abstractmethod
    def check(self, plan: Plan) -> None:
        """Raise ``UnknownModel`` or ``InvalidPlan`` if this environment cannot run ``plan``."""

    @abc.abstractmethod
    def estimate_cost(self, plan: Plan) -> Cost:
        """Expected cost per example, known before evaluation: what a budget is checked against."""

    @abc.abstractmethod
    def evaluate(self, plan: Plan) -> Evaluation:
        """Score ``plan``. Deterministic for a given environment spec."""

    def search_cost(self, plans: Sequence[Plan]) -> tuple[Cost, Cost]:
        """What evaluating all ``plans`` generates per example: (with sample reuse, without).

        Without reuse every plan pays its own samples. With reuse a sample is generated once and served
        from the sample store to every later plan that asks for it (the first 8 of 16 samples, a stage
        prefix shared by two plans). This default knows no reuse; environments that do override it.
        """
        total = Cost()
        for plan in plans:
            total = total + self.estimate_cost(plan)
        return total, total

    votes_over_prefixes: bool = False
    """Whether an evaluation's samples also give the last stage's vote over their first ``k`` (``prefix_scores``)."""

    def prefix_scores(self, plan: Plan) -> dict[int, float]:
        """Scores of ``plan`` with its last stage's vote taken over the first ``k`` samples only, for each power of
        two ``k`` below its count: what evaluating ``plan`` showed on the way, at no extra generation (a vote over 8
        samples holds the vote over their first 4). Only for a last stage of one solver node decided by plain
        majority vote (``last_stage_prefixes``); empty where the environment does not keep the samples."""
        if not self.votes_over_prefixes or plan.stages[-1].stage != self.info.stages[-1]:
            return {}  # an earlier stage's prefix is no saving: its answers feed every later stage's prompts
        memo: dict[str, dict[int, float]] = self.__dict__.setdefault("_prefix_memo", {})
        found = memo.get(plan.plan_id)
        if found is None:
            found = memo[plan.plan_id] = {k: self.evaluate(prefix).score for k, prefix in last_stage_prefixes(plan)}
        return dict(found)

    def with_evaluation_seed(self, seed: int) -> Environment:
        """This task with its evaluation luck drawn from ``seed``: what a benchmark varies per study seed so
        that its seeds sample the noise of evaluations, not only the strategy's own randomness. Environments
        whose luck is fixed (a replay's recorded samples and orderings, live models) return themselves."""
        return self

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def last_stage_prefixes(plan: Plan) -> list[tuple[int, Plan]]:
    """``plan`` with its last stage's single solver node cut to each power of two below its count; none where that
    stage has several nodes, edges, another decision rule or an early stop (their votes are not a prefix's)."""
    last = plan.stages[-1]
    if len(last.nodes) != 1 or last.edges or last.decision is not DecisionRule.MAJORITY_VOTE or last.early_stop is not None:
        return []
    node = last.nodes[0]
    if node.role is not Role.SOLVER:
        return []
    out = []
    k = 1
    while k < node.n:
        fields = plan.model_dump()
        fields["stages"][-1]["nodes"][0]["n"] = k
        out.append((k, Plan.model_validate(fields)))  # built anew: a copy would carry the cached plan id
        k *= 2
    return out
