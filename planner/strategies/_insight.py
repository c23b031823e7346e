"""The insight heuristic: AgentTTS's three insights as rules, needing no planner LLM (work in progress)."""

from __future__ import annotations

from planner.strategies._base import Proposal, StudyContext
from planner.strategies._random import RandomStrategy

__all__ = ["InsightStrategy"]


class InsightStrategy(RandomStrategy):
    """Placeholder while the rules are written: behaves like random search."""

    name = "insight"

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        return super().propose(context, n)
