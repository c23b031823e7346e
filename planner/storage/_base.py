"""The storage contract: where studies, trials and plans live.

Implementations: ``InMemoryStorage`` (tests, throwaway studies) and ``SQLStorage`` (SQLite file by
default, PostgreSQL by URL; schema owned by Alembic). Guarantees every implementation keeps:

- Thread-safe; safe across processes for ``SQLStorage`` (a Celery worker and the CLI share one database).
- Records returned are frozen and never change under later writes.
- A finished trial (``COMPLETE``, ``FAIL``, ``REJECTED``) is immutable: finishing it again raises
  ``RuntimeError`` and stores nothing.
- Trial numbers within a study are 0, 1, 2, ... in creation order, with no gaps.
- Unknown ids or names raise ``KeyError``; a duplicate study name raises ``DuplicateStudy``.
- Graph versions within a graph are 1, 2, 3, ... in creation order, with no gaps, also when several
  processes add versions of one graph at once. A version's definition never changes; only ``pinned`` does.
- Nothing stored is lost by a failed write: each call is one transaction.
- Samples are keyed by (model, prompt hash, params hash, sample index); adding one whose key is stored
  keeps the stored one (idempotent), also when several processes add it at once.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from graphs.cost import Budget, Cost
from graphs.plan import Plan
from planner.graph_record import GraphVersion
from planner.trial import FrozenTrial, StudyRecord, TrialState

__all__ = ["BaseStorage", "DuplicateStudy", "GraphVersion", "SampleRecord"]


class DuplicateStudy(KeyError):
    """A study with this name exists already (resume it instead)."""


@dataclass(frozen=True)
class SampleRecord:
    """One stored generation. ``prompt_hash`` and ``params_hash`` are sha256 hex digests of the rendered
    prompt and of the decoding parameters; ``sample_index`` is 0, 1, 2, ... per (model, prompt, params)."""

    model: str
    prompt_hash: str
    params_hash: str
    sample_index: int
    text: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float | None = None
    usd: float | None = None


class BaseStorage(abc.ABC):
    """Persistence of studies, trials and graph versions. See the module docstring for the contract."""

    @abc.abstractmethod
    def create_study(
        self,
        *,
        name: str,
        strategy: str,
        strategy_params: dict[str, Any],
        environment: dict[str, Any],
        budget: Budget,
        seed: int,
        space: dict[str, Any],
    ) -> StudyRecord:
        """Store a new study. Raises ``DuplicateStudy`` if ``name`` is taken."""

    @abc.abstractmethod
    def get_study(self, study_id: int) -> StudyRecord:
        """Raises ``KeyError`` for an unknown id."""

    @abc.abstractmethod
    def get_study_by_name(self, name: str) -> StudyRecord:
        """Raises ``KeyError`` for an unknown name."""

    @abc.abstractmethod
    def list_studies(self) -> list[StudyRecord]:
        """All studies, oldest first."""

    @abc.abstractmethod
    def create_trial(
        self,
        study_id: int,
        *,
        plan: Plan,
        estimated_cost: Cost,
        rationale: str = "",
        strategy_info: dict[str, Any] | None = None,
        planner_cost: Cost | None = None,
        state: TrialState = TrialState.RUNNING,
    ) -> FrozenTrial:
        """Store a new trial with the next number. ``state`` is WAITING, RUNNING or REJECTED (with
        ``finish_trial`` not needed for REJECTED; pass the reason as ``rationale``)."""

    @abc.abstractmethod
    def set_trial_running(self, trial_id: int) -> FrozenTrial:
        """Move a WAITING trial to RUNNING (a worker took it). Raises ``RuntimeError`` otherwise."""

    @abc.abstractmethod
    def finish_trial(
        self,
        trial_id: int,
        *,
        state: TrialState,
        score: float | None = None,
        spread: float | None = None,
        scores: Iterable[float] = (),
        cost: Cost | None = None,
        error: str | None = None,
        prefix_scores: Mapping[int, float] | None = None,
    ) -> FrozenTrial:
        """Finish a WAITING or RUNNING trial as COMPLETE or FAIL. Raises ``RuntimeError`` if it is
        already finished and ``KeyError`` if unknown."""

    @abc.abstractmethod
    def get_trial(self, trial_id: int) -> FrozenTrial:
        """Raises ``KeyError`` for an unknown id."""

    @abc.abstractmethod
    def get_trials(self, study_id: int, states: Iterable[TrialState] | None = None) -> list[FrozenTrial]:
        """A study's trials in number order, optionally only those in ``states``."""

    @abc.abstractmethod
    def get_plan(self, plan_id: str) -> Plan:
        """A stored plan by id (or unique id prefix of at least 6 characters). ``KeyError`` otherwise."""

    # graph versions

    @abc.abstractmethod
    def add_graph_version(
        self, graph: str, definition: dict[str, Any], cause: str = "", parent_id: int | None = None
    ) -> GraphVersion:
        """Store the next version of ``graph`` (1 for a new graph).

        Args:
            graph: the graph's name (non-empty).
            definition: JSON (no NaN or infinity); stored as a copy.
            cause: why this version exists (which update, review or feedback made it).
            parent_id: the version this one was derived from, of any graph.

        Returns:
            The stored record, unpinned.

        Raises:
            ValueError: ``graph`` is empty or ``definition`` is not strict JSON.
            KeyError: ``parent_id`` names no stored version.
        """

    @abc.abstractmethod
    def get_graph_versions(self, graph: str) -> list[GraphVersion]:
        """A graph's versions, oldest (version 1) first. Raises ``KeyError`` for a graph with none."""

    @abc.abstractmethod
    def get_graph_version(self, version_id: int) -> GraphVersion:
        """Raises ``KeyError`` for an unknown id."""

    @abc.abstractmethod
    def list_graphs(self) -> list[str]:
        """Names of every graph with at least one version, sorted."""

    @abc.abstractmethod
    def set_graph_pinned(self, version_id: int, pinned: bool) -> GraphVersion:
        """Pin or unpin one version (other versions are left as they are); returns the updated record.
        Raises ``KeyError`` for an unknown id."""

    # samples

    @abc.abstractmethod
    def get_samples(self, model: str, prompt_hash: str, params_hash: str, limit: int | None = None) -> list[SampleRecord]:
        """Stored samples of one (model, prompt, params) with ``sample_index < limit`` (all if ``None``),
        in index order. Indices may have gaps (a run that stopped half-way); none is an empty list."""

    @abc.abstractmethod
    def add_samples(self, samples: Iterable[SampleRecord]) -> int:
        """Store every sample whose key is not stored yet, in one transaction; returns how many were new.
        A sample whose key is stored is skipped (the stored one stays)."""

    def latest_graph_version(self, graph: str) -> GraphVersion:
        """The newest version of ``graph``. Raises ``KeyError`` for a graph with none."""
        return self.get_graph_versions(graph)[-1]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
