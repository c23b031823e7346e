"""``InMemoryStorage``: the storage contract in a dict, for tests and throwaway studies.

It behaves like ``SQLStorage`` wherever a caller could tell: JSON fields go through a JSON round trip (so
what is not JSON fails here too, and tuples come back as lists), records returned are copies, numbering
and immutability follow the same rules. Nothing survives the process.
"""

from __future__ import annotations

import copy
import string
import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from graphs.cost import Budget, Cost
from graphs.plan import Plan
from planner.graph_record import GraphVersion
from planner.storage._base import BaseStorage, DuplicateStudy, SampleRecord
from planner.storage.tables import finite_prefix_scores, finite_scores, strict_json, utcnow
from planner.trial import FrozenTrial, StudyRecord, TrialState

__all__ = ["InMemoryStorage"]

_NEW_STATES = (TrialState.WAITING, TrialState.RUNNING, TrialState.REJECTED)
_MIN_PREFIX = 6


def _study_out(study: StudyRecord) -> StudyRecord:
    """A copy whose dicts the caller may mutate without touching what is stored."""
    return replace(
        study,
        strategy_params=copy.deepcopy(study.strategy_params),
        environment=copy.deepcopy(study.environment),
        space=copy.deepcopy(study.space),
    )


def _version_out(version: GraphVersion) -> GraphVersion:
    """A copy whose ``definition`` the caller may mutate."""
    return replace(version, definition=copy.deepcopy(version.definition))


def _trial_out(trial: FrozenTrial) -> FrozenTrial:
    """A copy whose ``strategy_info`` the caller may mutate; plans and costs are immutable values."""
    return replace(trial, strategy_info=copy.deepcopy(trial.strategy_info), prefix_scores=dict(trial.prefix_scores))


class InMemoryStorage(BaseStorage):
    """Studies, trials, plans and graph versions in process memory. Thread-safe (one lock); not shared across processes."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._studies: dict[int, StudyRecord] = {}
        self._trials: dict[int, FrozenTrial] = {}
        self._study_trials: dict[int, list[int]] = {}
        self._plans: dict[str, Plan] = {}
        self._versions: dict[int, GraphVersion] = {}
        self._graph_versions: dict[str, list[int]] = {}
        self._samples: dict[tuple[str, str, str], dict[int, SampleRecord]] = {}

    def __repr__(self) -> str:
        return "InMemoryStorage()"

    # studies

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
        record = StudyRecord(
            study_id=0,
            name=name,
            strategy=strategy,
            strategy_params=strict_json(strategy_params, "strategy_params"),
            environment=strict_json(environment, "environment"),
            budget=budget,
            seed=int(seed),
            created_at=utcnow(),
            space=strict_json(space, "space"),
        )
        with self._lock:
            if any(study.name == name for study in self._studies.values()):
                raise DuplicateStudy(f"a study named {name!r} exists already: resume it or pick another name")
            record = replace(record, study_id=len(self._studies) + 1)
            self._studies[record.study_id] = record
            self._study_trials[record.study_id] = []
            return _study_out(record)

    def get_study(self, study_id: int) -> StudyRecord:
        with self._lock:
            return _study_out(self._study(study_id))

    def get_study_by_name(self, name: str) -> StudyRecord:
        with self._lock:
            for study in self._studies.values():
                if study.name == name:
                    return _study_out(study)
        raise KeyError(f"no study named {name!r}")

    def list_studies(self) -> list[StudyRecord]:
        with self._lock:
            return [_study_out(study) for study in self._studies.values()]

    def _study(self, study_id: int) -> StudyRecord:
        try:
            return self._studies[study_id]
        except KeyError:
            raise KeyError(f"no study with id {study_id}") from None

    # trials

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
        state = TrialState(state)
        if state not in _NEW_STATES:
            raise ValueError(f"a new trial is waiting, running or rejected, not {state}")
        info = strict_json(strategy_info or {}, "strategy_info")
        now = utcnow()
        with self._lock:
            self._study(study_id)
            numbers = self._study_trials[study_id]
            self._plans.setdefault(plan.plan_id, plan)
            trial = FrozenTrial(
                trial_id=len(self._trials) + 1,
                study_id=study_id,
                number=len(numbers),
                state=state,
                plan=self._plans[plan.plan_id],
                estimated_cost=estimated_cost,
                rationale=rationale,
                strategy_info=info,
                planner_cost=planner_cost or Cost(),
                started_at=now if state is TrialState.RUNNING else None,
                finished_at=now if state is TrialState.REJECTED else None,
            )
            self._trials[trial.trial_id] = trial
            numbers.append(trial.trial_id)
            return _trial_out(trial)

    def set_trial_running(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            trial = self._trial(trial_id)
            if trial.state is not TrialState.WAITING:
                raise RuntimeError(f"trial {trial_id} is {trial.state}, not waiting: it cannot start")
            trial = replace(trial, state=TrialState.RUNNING, started_at=utcnow())
            self._trials[trial_id] = trial
            return _trial_out(trial)

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
        state = TrialState(state)
        if not state.is_finished:
            raise ValueError(f"a trial finishes as complete, fail or rejected, not {state}")
        values = finite_scores(score, spread, scores)
        shown = finite_prefix_scores(prefix_scores)
        with self._lock:
            trial = self._trial(trial_id)
            if trial.state.is_finished:
                raise RuntimeError(f"trial {trial_id} is already {trial.state}; finished trials are immutable")
            trial = replace(
                trial,
                state=state,
                score=None if score is None else float(score),
                spread=None if spread is None else float(spread),
                scores=values,
                cost=cost,
                error=error,
                prefix_scores=shown,
                finished_at=utcnow(),
            )
            self._trials[trial_id] = trial
            return _trial_out(trial)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            return _trial_out(self._trial(trial_id))

    def get_trials(self, study_id: int, states: Iterable[TrialState] | None = None) -> list[FrozenTrial]:
        wanted = None if states is None else {TrialState(state) for state in states}
        with self._lock:
            self._study(study_id)
            trials = [self._trials[trial_id] for trial_id in self._study_trials[study_id]]
            return [_trial_out(t) for t in trials if wanted is None or t.state in wanted]

    def _trial(self, trial_id: int) -> FrozenTrial:
        try:
            return self._trials[trial_id]
        except KeyError:
            raise KeyError(f"no trial with id {trial_id}") from None

    # plans

    def get_plan(self, plan_id: str) -> Plan:
        key = plan_id.strip().lower()
        if len(key) < _MIN_PREFIX or any(char not in string.hexdigits for char in key):
            raise KeyError(f"plan id {plan_id!r}: give the id or at least {_MIN_PREFIX} of its hex characters")
        with self._lock:
            if key in self._plans:
                return self._plans[key]
            matches = [pid for pid in self._plans if pid.startswith(key)]
        if not matches:
            raise KeyError(f"no plan with id {plan_id!r}")
        if len(matches) > 1:
            raise KeyError(f"plan id prefix {plan_id!r} matches several plans: give more characters")
        return self._plans[matches[0]]

    # graph versions

    def add_graph_version(
        self, graph: str, definition: dict[str, Any], cause: str = "", parent_id: int | None = None
    ) -> GraphVersion:
        if not isinstance(graph, str) or not graph.strip():
            raise ValueError("a graph version needs a non-empty graph name")
        stored = strict_json(definition, "definition")
        with self._lock:
            if parent_id is not None:
                self._version(parent_id)
            numbers = self._graph_versions.setdefault(graph, [])
            version = GraphVersion(
                version_id=len(self._versions) + 1,
                graph=graph,
                version=len(numbers) + 1,
                definition=stored,
                cause=str(cause),
                parent_id=parent_id,
                pinned=False,
                created_at=utcnow(),
            )
            self._versions[version.version_id] = version
            numbers.append(version.version_id)
            return _version_out(version)

    def get_graph_versions(self, graph: str) -> list[GraphVersion]:
        with self._lock:
            ids = self._graph_versions.get(graph)
            if not ids:
                raise KeyError(f"no graph named {graph!r}")
            return [_version_out(self._versions[version_id]) for version_id in ids]

    def get_graph_version(self, version_id: int) -> GraphVersion:
        with self._lock:
            return _version_out(self._version(version_id))

    def list_graphs(self) -> list[str]:
        with self._lock:
            return sorted(name for name, ids in self._graph_versions.items() if ids)

    def set_graph_pinned(self, version_id: int, pinned: bool) -> GraphVersion:
        with self._lock:
            version = replace(self._version(version_id), pinned=bool(pinned))
            self._versions[version_id] = version
            return _version_out(version)

    def _version(self, version_id: int) -> GraphVersion:
        try:
            return self._versions[version_id]
        except KeyError:
            raise KeyError(f"no graph version with id {version_id}") from None

    # samples

    def get_samples(self, model: str, prompt_hash: str, params_hash: str, limit: int | None = None) -> list[SampleRecord]:
        with self._lock:
            stored = self._samples.get((model, prompt_hash, params_hash), {})
            return [stored[i] for i in sorted(stored) if limit is None or i < limit]

    def add_samples(self, samples: Iterable[SampleRecord]) -> int:
        checked = [_checked_sample(sample) for sample in samples]
        added = 0
        with self._lock:
            for sample in checked:
                stored = self._samples.setdefault((sample.model, sample.prompt_hash, sample.params_hash), {})
                if sample.sample_index not in stored:
                    stored[sample.sample_index] = sample
                    added += 1
        return added


def _checked_sample(sample: SampleRecord) -> SampleRecord:
    """What the SQL columns would refuse is refused here too."""
    if sample.sample_index < 0:
        raise ValueError(f"sample_index must be >= 0, got {sample.sample_index}")
    if not sample.model or not sample.prompt_hash or not sample.params_hash:
        raise ValueError("a sample needs a model, a prompt hash and a params hash")
    return replace(sample, prompt_tokens=int(sample.prompt_tokens), output_tokens=int(sample.output_tokens))
