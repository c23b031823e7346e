"""What a finished study means: best plans, Pareto front, and the single-model baseline of equal cost."""

from __future__ import annotations

from dataclasses import dataclass

from executors.environment import Environment, Evaluation
from graphs.cost import Budget
from graphs.plan import Plan
from planner.space import SearchSpace

__all__ = ["Baseline", "best_single_model_baseline", "most_expensive_single_model_cost"]


@dataclass(frozen=True)
class Baseline:
    plan: Plan
    evaluation: Evaluation
    spent: float


def best_single_model_baseline(environment: Environment, space: SearchSpace, budget: Budget, max_spent: float) -> Baseline | None:
    """The best plan using one model everywhere (majority vote, no cap) that costs at most ``max_spent``
    in the budget's unit: what a user would do without Allot, at the same cost."""
    best: Baseline | None = None
    for plan in space.single_model_plans():
        spent = budget.spent(environment.estimate_cost(plan))
        if spent > max_spent * (1 + 1e-9):
            continue
        evaluation = environment.evaluate(plan)
        if best is None or (evaluation.score, -spent) > (best.evaluation.score, -best.spent):
            best = Baseline(plan, evaluation, spent)
    return best


def most_expensive_single_model_cost(environment: Environment, space: SearchSpace, budget: Budget) -> float:
    """Cost (in ``budget``'s unit) of the costliest single-model plan: the scale of budget fractions."""
    return max(budget.spent(environment.estimate_cost(plan)) for plan in space.single_model_plans())
