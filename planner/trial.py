"""Frozen records of studies and trials, as storage returns them.

Like optuna's ``FrozenTrial``: a record never changes once returned; a finished trial is immutable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from graphs.cost import Budget, Cost
from graphs.plan import Plan

__all__ = ["FrozenTrial", "StudyRecord", "TrialState"]


class TrialState(StrEnum):
    """A trial's life: ``WAITING`` (queued for a worker) -> ``RUNNING`` -> ``COMPLETE`` or ``FAIL``.

    ``REJECTED`` trials were proposed but never evaluated: over budget or not runnable in the
    environment. They are kept so the strategy (and the reviewer) can see what was refused and why.
    """

    WAITING = "waiting"
    RUNNING = "running"
    COMPLETE = "complete"
    FAIL = "fail"
    REJECTED = "rejected"

    @property
    def is_finished(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.FAIL, TrialState.REJECTED)


@dataclass(frozen=True)
class StudyRecord:
    """A study's identity and configuration: task environment, budget, strategy, seed."""

    study_id: int
    name: str
    strategy: str
    strategy_params: dict[str, Any]
    environment: dict[str, Any]
    """``Environment.spec()``: enough to rebuild the environment in any process."""
    budget: Budget
    seed: int
    created_at: datetime
    space: dict[str, Any] = field(default_factory=dict)
    """``SearchSpace.spec()``: the choices the strategy searches over."""


@dataclass(frozen=True)
class FrozenTrial:
    """One proposed plan and, once finished, its evaluation."""

    trial_id: int
    study_id: int
    number: int
    state: TrialState
    plan: Plan
    estimated_cost: Cost
    """Cost per example known before evaluation; what the budget was checked against."""
    rationale: str = ""
    """Why the strategy proposed this plan (the planner's words, or the sampler's name)."""
    strategy_info: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    spread: float | None = None
    scores: tuple[float, ...] = ()
    cost: Cost | None = None
    """Realised cost per example."""
    prefix_scores: Mapping[int, float] = field(default_factory=dict)
    """What the evaluation showed of the plan's last stage at fewer samples (``Environment.prefix_scores``), kept where
    it was evaluated: a worker's or an earlier process's runs are not in the study process's environment."""
    planner_cost: Cost = field(default_factory=Cost)
    """What the planner LLM spent to propose this trial."""
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def plan_id(self) -> str:
        return self.plan.plan_id
