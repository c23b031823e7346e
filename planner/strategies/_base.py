"""The Strategy interface: what proposes plans to a study.

Mirrors optuna's ``BaseSampler``. A study calls, in a trial's life:

1. ``propose(context, n)``: up to ``n`` plans to evaluate next, each with a rationale. The study rejects
   (and stores as ``REJECTED``) any plan over budget or not runnable, before evaluation.
2. ``tell(trial)``: once per finished trial (complete, failed or rejected), in trial-number order.

``reseed(seed)`` resets the random stream. Strategies hold no I/O: the ``StudyContext`` hands them the
space, the budget, a pure cost estimate, the frozen trials so far and, where the environment keeps the
samples, what their evaluations showed at fewer samples. Everything a strategy needs to
resume is in ``context.trials``: a strategy rebuilt after an interruption reads them on its first
``propose``, so no state lives only in memory.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from executors.environment import EnvironmentInfo
from graphs.cost import Budget, Cost
from graphs.plan import Plan
from planner.space import SearchSpace
from planner.trial import FrozenTrial, TrialState

__all__ = ["Proposal", "Strategy", "StudyContext"]


@dataclass(frozen=True)
class Proposal:
    """A plan a strategy wants evaluated, and why."""

    plan: Plan
    rationale: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific data stored with the trial (e.g. optuna's params) and read back on resume."""
    planner_cost: Cost = field(default_factory=Cost)


@dataclass(frozen=True)
class StudyContext:
    """What a strategy may look at: read-only, no I/O."""

    space: SearchSpace
    budget: Budget
    info: EnvironmentInfo
    estimate_cost: Callable[[Plan], Cost]
    trials: Sequence[FrozenTrial]
    seed: int
    prefix_scores: Callable[[Plan], Mapping[int, float]] | None = None
    """``Environment.prefix_scores``: what an evaluated plan's samples showed of its last stage at fewer samples."""

    def fits(self, plan: Plan) -> bool:
        return self.budget.allows(self.estimate_cost(plan))

    def spent(self, plan: Plan) -> float:
        return self.budget.spent(self.estimate_cost(plan))

    @property
    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state is TrialState.COMPLETE]

    def tried(self) -> set[str]:
        return {t.plan_id for t in self.trials}


class Strategy(abc.ABC):
    """Proposes plans. One instance serves one study."""

    name: str = "abstract"

    def __init__(self, seed: int | None = None) -> None:
        self.seed = 0 if seed is None else seed
        self.reseed(self.seed)

    @abc.abstractmethod
    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        """Up to ``n`` plans to evaluate next; an empty list means the strategy has nothing left."""

    def tell(self, trial: FrozenTrial) -> None:  # noqa: B027 - optional hook
        """Learn from one finished trial."""

    def reseed(self, seed: int) -> None:  # noqa: B027 - optional hook
        """Reset random state from ``seed``."""

    def params(self) -> dict[str, Any]:
        """Constructor arguments (besides the seed) that rebuild this strategy; stored with the study."""
        return {}
