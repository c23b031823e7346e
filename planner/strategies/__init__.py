"""Strategies: everything that proposes plans, behind one interface."""

from __future__ import annotations

from typing import Any

from planner.strategies._base import Proposal, Strategy, StudyContext
from planner.strategies._optuna import NSGAIIStrategy, TPEStrategy
from planner.strategies._random import GridStrategy, RandomStrategy

__all__ = [
    "STRATEGIES",
    "GridStrategy",
    "NSGAIIStrategy",
    "Proposal",
    "RandomStrategy",
    "Strategy",
    "StudyContext",
    "TPEStrategy",
    "make_strategy",
]

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (RandomStrategy, GridStrategy, TPEStrategy, NSGAIIStrategy)}


def make_strategy(name: str, seed: int, params: dict[str, Any] | None = None) -> Strategy:
    """Build a strategy by its registered name. ``ValueError`` names the known ones."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}") from None
    return cls(seed=seed, **(params or {}))
