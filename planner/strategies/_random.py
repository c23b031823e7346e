"""Random search and exhaustive grid over the feasible plans of a space."""

from __future__ import annotations

import random

from graphs.errors import AllotError
from graphs.plan import Plan
from planner.strategies._base import Proposal, Strategy, StudyContext

__all__ = ["GridStrategy", "RandomStrategy", "SpaceTooLarge"]

ENUMERATION_LIMIT = 200_000


class SpaceTooLarge(AllotError, ValueError):
    """The space cannot be listed, so a strategy that needs the list cannot run on it."""


def feasible_plans(context: StudyContext) -> list[Plan] | None:
    """Every plan of the space within budget, or ``None`` when the space is too big to list."""
    if context.space.size() > ENUMERATION_LIMIT:
        return None
    return [plan for plan in context.space.enumerate() if context.fits(plan)]


class RandomStrategy(Strategy):
    """Uniform over the feasible plans not tried yet (rejection sampling where the space is huge)."""

    name = "random"

    def reseed(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._pool: list[Plan] | None = None

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        tried = context.tried()
        if self._pool is None:
            self._pool = feasible_plans(context)
            if self._pool is not None:
                self._rng.shuffle(self._pool)
        out: list[Proposal] = []
        if self._pool is not None:
            while self._pool and len(out) < n:
                plan = self._pool.pop()
                if plan.plan_id not in tried:
                    out.append(Proposal(plan, "uniform random draw from the feasible plans"))
            return out
        for _ in range(100 * n):
            plan = context.space.sample(self._rng)
            if plan.plan_id not in tried and context.fits(plan):
                out.append(Proposal(plan, "random draw from the space (rejection-sampled to the budget)"))
                tried.add(plan.plan_id)
                if len(out) == n:
                    break
        return out


class GridStrategy(Strategy):
    """Every feasible plan once, in a seeded shuffled order (like optuna's GridSampler)."""

    name = "grid"

    def reseed(self, seed: int) -> None:
        self._seed = seed
        self._order: list[Plan] | None = None

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        if self._order is None:
            plans = feasible_plans(context)
            if plans is None:
                raise SpaceTooLarge(
                    f"the space has more than {ENUMERATION_LIMIT:,} plans, too many for a grid: use random, tpe or nsga2"
                )
            random.Random(self._seed).shuffle(plans)
            self._order = plans
        tried = context.tried()
        out = []
        for plan in self._order:
            if plan.plan_id not in tried:
                out.append(Proposal(plan, f"grid point {len(tried) + len(out) + 1} of {len(self._order)}"))
                if len(out) == n:
                    break
        return out
