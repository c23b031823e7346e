"""Random search and exhaustive grid over the feasible plans of a space."""

from __future__ import annotations

import math
import random

from graphs.errors import AllotError
from graphs.plan import Plan
from planner.space import SearchSpace, StageChoice
from planner.strategies._base import Proposal, Strategy, StudyContext

__all__ = ["GridStrategy", "RandomStrategy", "SpaceTooLarge"]

ENUMERATION_LIMIT = 200_000
DRAWS_PER_PLAN = 200
"""Uniform draws tried per wanted plan before the feasible plans are listed instead (a budget so tight, or
a space so nearly used up, that a draw rarely lands on a feasible untried plan)."""


class SpaceTooLarge(AllotError, ValueError):
    """The space cannot be listed, so a strategy that needs the list cannot run on it."""


def feasible_plans(context: StudyContext) -> list[Plan] | None:
    """Every plan of the space within budget, or ``None`` when the space is too big to list."""
    if context.space.size() > ENUMERATION_LIMIT:
        return None
    return [plan for plan in context.space.enumerate() if context.fits(plan)]


class _StageChoices:
    """A space as the product of its stages' choices: one choice per stage drawn uniformly is a plan drawn
    uniformly from the whole space, without listing the product (the first step stays fast)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.per_stage: list[list[StageChoice]] = [list(space.stage_choices(s)) for s in space.stages]
        self.size = math.prod(len(choices) for choices in self.per_stage)

    def draw(self, rng: random.Random) -> Plan:
        return self.space.plan([rng.choice(choices) for choices in self.per_stage])


class RandomStrategy(Strategy):
    """Uniform over the feasible plans not tried yet: uniform draws from the space, kept when they fit and
    are new; the feasible plans are listed only where draws keep missing (and the space can be listed)."""

    name = "random"
    rationale = "uniform random draw from the feasible plans"

    def reseed(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._choices: _StageChoices | None = None
        self._pool: list[Plan] | None = None

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        tried = context.tried()
        if self._choices is None:
            self._choices = _StageChoices(context.space)
        out: list[Proposal] = []
        if self._pool is None:
            for _ in range(DRAWS_PER_PLAN * n):
                plan = self._choices.draw(self._rng)
                if plan.plan_id not in tried and context.fits(plan):
                    tried.add(plan.plan_id)
                    out.append(Proposal(plan, self.rationale))
                    if len(out) == n:
                        return out
            self._pool = feasible_plans(context)
            if self._pool is None:
                return out  # too large to list: the next call draws again
            self._rng.shuffle(self._pool)
        while self._pool and len(out) < n:
            plan = self._pool.pop()
            if plan.plan_id not in tried:
                tried.add(plan.plan_id)
                out.append(Proposal(plan, self.rationale))
        return out


class GridStrategy(RandomStrategy):
    """Every feasible plan once, in a seeded random order (like optuna's GridSampler, which takes a random
    unvisited grid point each trial): random search without replacement that stops when the plans run
    out. Refuses a space too large to ever finish."""

    name = "grid"
    rationale = "grid point: a feasible plan not tried yet, in a seeded random order"

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self._rng = random.Random(f"grid:{seed}")  # its own order, not random search's under the same seed

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        if self._choices is None:
            self._choices = _StageChoices(context.space)
        if self._choices.size > ENUMERATION_LIMIT:
            raise SpaceTooLarge(
                f"the space has more than {ENUMERATION_LIMIT:,} plans, too many for a grid: use random, tpe or nsga2"
            )
        return super().propose(context, n)
