"""Strategies: everything that proposes plans, behind one interface."""

from __future__ import annotations

import inspect
from typing import Any

from planner.strategies._base import Proposal, Strategy, StudyContext
from planner.strategies._insight import InsightStrategy
from planner.strategies._optuna import NSGAIIStrategy, TPEStrategy
from planner.strategies._random import GridStrategy, RandomStrategy

__all__ = [
    "STRATEGIES",
    "GridStrategy",
    "InsightStrategy",
    "NSGAIIStrategy",
    "Proposal",
    "RandomStrategy",
    "Strategy",
    "StudyContext",
    "TPEStrategy",
    "make_strategy",
    "strategy_params",
]


class _Registry(dict[str, type[Strategy]]):
    """Strategies by name. The planner agents (planner.agents, which import langgraph and this package)
    are added on first use, so importing either package first works."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            from planner.agents.agent_reinforce import AgentReinforceStrategy
            from planner.agents.agenttts import AgentTTSStrategy
            from planner.strategies._reinforce import ReinforceStrategy

            for cls in (AgentTTSStrategy, AgentReinforceStrategy, ReinforceStrategy):
                self.setdefault(cls.name, cls)

    def __getitem__(self, name: str) -> type[Strategy]:
        self._load()
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return super().__contains__(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        self._load()
        return super().__iter__()

    def __len__(self) -> int:
        self._load()
        return super().__len__()

    def keys(self):  # type: ignore[no-untyped-def]
        self._load()
        return super().keys()

    def items(self):  # type: ignore[no-untyped-def]
        self._load()
        return super().items()

    def values(self):  # type: ignore[no-untyped-def]
        self._load()
        return super().values()

    def get(self, name: str, default: type[Strategy] | None = None) -> type[Strategy] | None:  # type: ignore[override]
        self._load()
        return super().get(name, default)


STRATEGIES: dict[str, type[Strategy]] = _Registry(
    {cls.name: cls for cls in (InsightStrategy, RandomStrategy, GridStrategy, TPEStrategy, NSGAIIStrategy)}
)


def make_strategy(name: str, seed: int, params: dict[str, Any] | None = None) -> Strategy:
    """Build a strategy by its registered name. ``ValueError`` names the known ones."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}") from None
    return cls(seed=seed, **(params or {}))


def strategy_params(name: str, planner_model: str | None, api_base: str | None) -> dict[str, Any]:
    """The planner settings a strategy's constructor names explicitly (``planner_model``, ``api_base``);
    a strategy that does not name them gets none (``**kwargs`` does not count: optuna's would pass them on
    to the sampler)."""
    parameters = inspect.signature(STRATEGIES[name]).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in parameters.values() if p.kind in kinds}
    offered = {"planner_model": planner_model, "api_base": api_base}
    return {key: value for key, value in offered.items() if value is not None and key in named}
