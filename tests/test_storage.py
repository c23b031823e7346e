"""The storage contract, checked on every implementation (like optuna's ``StorageTestCase``).

``StorageTestCase`` runs over ``InMemoryStorage``, ``SQLStorage`` on in-memory SQLite, on a SQLite file
and on PostgreSQL (marked ``postgres``). Tests specific to SQL follow it.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from functools import cache
from pathlib import Path

import pytest
from sqlalchemy import text

from graphs.cost import Budget, BudgetUnit, Cost
from graphs.plan import Plan
from planner.graph_record import GraphVersion
from planner.storage import (
    BaseStorage,
    DuplicateStudy,
    InMemoryStorage,
    SQLStorage,
    default_database_url,
    get_storage,
)
from planner.storage.tables import metadata
from planner.trial import FrozenTrial, StudyRecord, TrialState

STORAGE_MODES = [
    "memory",
    "sqlite-memory",
    "sqlite-file",
    pytest.param("postgres", marks=pytest.mark.postgres),
]


def _truncate_postgres(url: str) -> None:
    storage = SQLStorage(url)
    try:
        tables = ", ".join(table.name for table in metadata.sorted_tables)
        with storage.engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        storage.close()


def _make_url(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if mode == "sqlite-memory":
        return "sqlite://"
    if mode == "sqlite-file":
        return f"sqlite:///{tmp_path / 'allot.db'}"
    url: str = request.getfixturevalue("postgres_url")
    _truncate_postgres(url)
    return url


@pytest.fixture(params=STORAGE_MODES)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """The URL of a clean database for the mode (``None`` for ``InMemoryStorage``)."""
    if request.param == "memory":
        return None
    return _make_url(request.param, request, tmp_path)


@pytest.fixture
def storage(storage_url: str | None) -> Iterator[BaseStorage]:
    instance = InMemoryStorage() if storage_url is None else SQLStorage(storage_url)
    try:
        yield instance
    finally:
        instance.close()


def _study(storage: BaseStorage, name: str = "study", **overrides: object) -> StudyRecord:
    fields: dict[str, object] = {
        "name": name,
        "strategy": "random",
        "strategy_params": {"batch": 4, "nested": {"a": [1, 2]}},
        "environment": {"kind": "simulated", "seed": 3},
        "budget": Budget(limit=12.5, unit=BudgetUnit.AGENTTTS),
        "seed": 7,
        "space": {"models": ["m-3b", "m-8b"], "max_samples": 16},
    }
    fields.update(overrides)
    return storage.create_study(**fields)  # type: ignore[arg-type]


def _plan(n: int = 4, model: str = "m-3b") -> Plan:
    return Plan.allocation({"retrieve": (model, n), "answer": ("m-8b", 2)})


@cache
def _plans_sharing_a_prefix() -> tuple[Plan, Plan]:
    """Two different plans whose ids share their first 6 hex characters (found by a birthday search)."""
    seen: dict[str, Plan] = {}
    for model in ("m-3b", "m-8b", "m-70b", "m-1b", "m-14b", "m-32b", "m-7b", "m-2b"):
        for n in range(1, 4097):
            plan = Plan.allocation({"answer": (model, n)})
            prefix = plan.plan_id[:6]
            if prefix in seen:
                return seen[prefix], plan
            seen[prefix] = plan
    raise AssertionError("no shared prefix found")


class StorageTestCase:
    """The ``BaseStorage`` contract. Every test uses the ``storage`` fixture, so it runs on every mode."""

    # studies

    def test_study_round_trip(self, storage: BaseStorage) -> None:
        created = _study(storage)
        assert created.name == "study"
        assert created.strategy_params == {"batch": 4, "nested": {"a": [1, 2]}}
        assert created.budget == Budget(limit=12.5, unit=BudgetUnit.AGENTTTS)
        assert created.seed == 7
        assert created.created_at.tzinfo is not None
        assert created.created_at.utcoffset() == UTC.utcoffset(None)
        assert storage.get_study(created.study_id) == created
        assert storage.get_study_by_name("study") == created

    def test_list_studies_oldest_first(self, storage: BaseStorage) -> None:
        names = ["b", "a", "c"]
        for name in names:
            _study(storage, name)
        assert [study.name for study in storage.list_studies()] == names

    def test_duplicate_study(self, storage: BaseStorage) -> None:
        _study(storage, "same")
        with pytest.raises(DuplicateStudy):
            _study(storage, "same", seed=1)
        assert issubclass(DuplicateStudy, KeyError)
        assert [study.seed for study in storage.list_studies()] == [7]

    def test_unknown_study(self, storage: BaseStorage) -> None:
        with pytest.raises(KeyError):
            storage.get_study(999)
        with pytest.raises(KeyError):
            storage.get_study_by_name("nope")
        with pytest.raises(KeyError):
            storage.create_trial(999, plan=_plan(), estimated_cost=Cost())
        with pytest.raises(KeyError):
            storage.get_trials(999)

    # trials

    def test_numbering_is_zero_to_n_minus_one(self, storage: BaseStorage) -> None:
        first, second = _study(storage, "one"), _study(storage, "two")
        trials = [storage.create_trial(first.study_id, plan=_plan(n), estimated_cost=Cost()) for n in (1, 2, 3)]
        other = storage.create_trial(second.study_id, plan=_plan(), estimated_cost=Cost())
        assert [trial.number for trial in trials] == [0, 1, 2]
        assert other.number == 0
        assert [t.number for t in storage.get_trials(first.study_id)] == [0, 1, 2]
        assert [t.plan for t in storage.get_trials(first.study_id)] == [_plan(1), _plan(2), _plan(3)]
        assert len({t.trial_id for t in [*trials, other]}) == 4

    def test_trial_round_trip(self, storage: BaseStorage) -> None:
        study = _study(storage)
        plan = _plan(8)
        created = storage.create_trial(
            study.study_id,
            plan=plan,
            estimated_cost=Cost(flops=1e12, prompt_tokens=300, output_tokens=120, usd=None),
            rationale="probe the 3B model at 8 samples",
            strategy_info={"batch": 1, "guideline": ["insight 1"]},
            planner_cost=Cost(flops=0, prompt_tokens=900, output_tokens=200, usd=0.0031),
        )
        assert created.state is TrialState.RUNNING
        assert created.started_at is not None and created.started_at.tzinfo is not None
        assert created.finished_at is None
        assert created.cost is None and created.score is None and created.scores == ()
        assert storage.get_trial(created.trial_id) == created

        finished = storage.finish_trial(
            created.trial_id,
            state=TrialState.COMPLETE,
            score=0.72,
            spread=0.05,
            scores=[1.0, 0.0, 1.0],
            cost=Cost(flops=2e12, prompt_tokens=310, output_tokens=99, usd=0.002),
            prefix_scores={1: 0.61, 2: 0.66, 4: 0.7},
        )
        assert finished.state is TrialState.COMPLETE
        assert finished.prefix_scores == {1: 0.61, 2: 0.66, 4: 0.7} and created.prefix_scores == {}
        assert finished.score == pytest.approx(0.72)
        assert finished.spread == pytest.approx(0.05)
        assert finished.scores == (1.0, 0.0, 1.0)
        assert finished.cost == Cost(flops=2e12, prompt_tokens=310, output_tokens=99, usd=0.002)
        assert finished.estimated_cost == Cost(flops=1e12, prompt_tokens=300, output_tokens=120, usd=None)
        assert finished.planner_cost == Cost(flops=0, prompt_tokens=900, output_tokens=200, usd=0.0031)
        assert finished.rationale == "probe the 3B model at 8 samples"
        assert finished.strategy_info == {"batch": 1, "guideline": ["insight 1"]}
        assert finished.finished_at is not None and finished.finished_at >= finished.started_at  # type: ignore[operator]
        assert storage.get_trial(created.trial_id) == finished
        assert storage.get_trials(study.study_id) == [finished]

    def test_plans_round_trip(self, storage: BaseStorage) -> None:
        study = _study(storage)
        plan = Plan.from_json(_plan(5).canonical_json())
        trial = storage.create_trial(study.study_id, plan=plan, estimated_cost=Cost())
        again = storage.create_trial(study.study_id, plan=_plan(5), estimated_cost=Cost())  # stored once
        for loaded in (storage.get_trial(trial.trial_id).plan, storage.get_trial(again.trial_id).plan):
            assert loaded == plan
            assert loaded.plan_id == plan.plan_id
            assert loaded.canonical_json() == plan.canonical_json()
        assert storage.get_plan(plan.plan_id) == plan
        assert storage.get_plan(plan.plan_id[:6]) == plan
        assert storage.get_plan(plan.plan_id[:12].upper()) == plan
        for bad in (plan.plan_id[:5], "zzzzzzzz", "0" * 64, "%" * 8):
            with pytest.raises(KeyError):
                storage.get_plan(bad)

    def test_plan_prefix_must_be_unique(self, storage: BaseStorage) -> None:
        study = _study(storage)
        first, second = _plans_sharing_a_prefix()
        for plan in (first, second):
            storage.create_trial(study.study_id, plan=plan, estimated_cost=Cost())
        with pytest.raises(KeyError, match="several"):
            storage.get_plan(first.plan_id[:6])
        assert storage.get_plan(first.plan_id) == first
        assert storage.get_plan(second.plan_id) == second

    def test_finishing_twice_keeps_the_first_result(self, storage: BaseStorage) -> None:
        study = _study(storage)
        trial = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost())
        first = storage.finish_trial(trial.trial_id, state=TrialState.COMPLETE, score=0.5, cost=Cost(flops=1))
        for state in (TrialState.COMPLETE, TrialState.FAIL):
            with pytest.raises(RuntimeError):
                storage.finish_trial(trial.trial_id, state=state, score=0.9, error="again")
        assert storage.get_trial(trial.trial_id) == first
        with pytest.raises(RuntimeError):
            storage.set_trial_running(trial.trial_id)

    def test_fail_is_a_result(self, storage: BaseStorage) -> None:
        study = _study(storage)
        trial = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost())
        failed = storage.finish_trial(trial.trial_id, state=TrialState.FAIL, error="BackendTimeout: m-3b")
        assert failed.state is TrialState.FAIL
        assert failed.error == "BackendTimeout: m-3b"
        assert failed.score is None and failed.cost is None

    def test_unknown_trial(self, storage: BaseStorage) -> None:
        with pytest.raises(KeyError):
            storage.get_trial(12345)
        with pytest.raises(KeyError):
            storage.finish_trial(12345, state=TrialState.COMPLETE, score=1.0)
        with pytest.raises(KeyError):
            storage.set_trial_running(12345)

    def test_waiting_then_running(self, storage: BaseStorage) -> None:
        study = _study(storage)
        waiting = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost(), state=TrialState.WAITING)
        assert waiting.state is TrialState.WAITING and waiting.started_at is None
        running = storage.set_trial_running(waiting.trial_id)
        assert running.state is TrialState.RUNNING and running.started_at is not None
        with pytest.raises(RuntimeError):
            storage.set_trial_running(waiting.trial_id)
        assert storage.get_trials(study.study_id, states=[TrialState.WAITING]) == []
        assert storage.get_trials(study.study_id, states=[TrialState.RUNNING]) == [running]

    def test_waiting_trial_can_finish_directly(self, storage: BaseStorage) -> None:
        study = _study(storage)
        waiting = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost(), state=TrialState.WAITING)
        done = storage.finish_trial(waiting.trial_id, state=TrialState.FAIL, error="worker lost")
        assert done.state is TrialState.FAIL

    def test_rejected_trials_are_stored(self, storage: BaseStorage) -> None:
        study = _study(storage)
        rejected = storage.create_trial(
            study.study_id,
            plan=_plan(64),
            estimated_cost=Cost(flops=9e15),
            rationale="over budget: 40.1 agenttts > 12.5",
            state=TrialState.REJECTED,
        )
        kept = storage.create_trial(study.study_id, plan=_plan(2), estimated_cost=Cost())
        assert rejected.state is TrialState.REJECTED and rejected.number == 0 and kept.number == 1
        assert rejected.finished_at is not None
        assert storage.get_trial(rejected.trial_id).rationale == "over budget: 40.1 agenttts > 12.5"
        assert storage.get_trials(study.study_id, states=[TrialState.REJECTED]) == [rejected]
        with pytest.raises(RuntimeError):
            storage.finish_trial(rejected.trial_id, state=TrialState.COMPLETE, score=1.0)

    def test_states_are_checked(self, storage: BaseStorage) -> None:
        study = _study(storage)
        with pytest.raises(ValueError):
            storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost(), state=TrialState.COMPLETE)
        trial = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost())
        with pytest.raises(ValueError):
            storage.finish_trial(trial.trial_id, state=TrialState.RUNNING)
        assert storage.get_trials(study.study_id) == [trial]

    def test_get_trials_filters_by_state(self, storage: BaseStorage) -> None:
        study = _study(storage)
        a = storage.create_trial(study.study_id, plan=_plan(1), estimated_cost=Cost())
        b = storage.create_trial(study.study_id, plan=_plan(2), estimated_cost=Cost())
        c = storage.create_trial(study.study_id, plan=_plan(3), estimated_cost=Cost(), state=TrialState.REJECTED)
        a = storage.finish_trial(a.trial_id, state=TrialState.COMPLETE, score=1.0)
        finished = storage.get_trials(study.study_id, states=[TrialState.COMPLETE, TrialState.REJECTED])
        assert finished == [a, c]
        assert storage.get_trials(study.study_id, states=[]) == []
        assert storage.get_trials(study.study_id, states=[TrialState.RUNNING]) == [b]

    def test_values_must_be_strict_json_and_finite(self, storage: BaseStorage) -> None:
        with pytest.raises(ValueError):
            _study(storage, space={"bad": float("nan")})
        with pytest.raises(ValueError):
            _study(storage, environment={"bad": object()})
        assert storage.list_studies() == []
        study = _study(storage)
        with pytest.raises(ValueError):
            storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost(), strategy_info={"x": {1, 2}})
        trial = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost())
        for bad in (
            {"score": float("nan")},
            {"scores": [1.0, float("inf")]},
            {"spread": float("-inf")},
            {"prefix_scores": {2: float("nan")}},
            {"prefix_scores": {0: 0.5}},
        ):
            with pytest.raises(ValueError):
                storage.finish_trial(trial.trial_id, state=TrialState.COMPLETE, **bad)  # type: ignore[arg-type]
        assert storage.get_trial(trial.trial_id).state is TrialState.RUNNING

    # records

    def test_records_are_frozen(self, storage: BaseStorage) -> None:
        study = _study(storage)
        trial = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost(), strategy_info={"k": [1]})
        with pytest.raises(dataclasses.FrozenInstanceError):
            study.name = "other"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            trial.state = TrialState.COMPLETE  # type: ignore[misc]
        # Mutating a returned record's dicts changes nothing stored ...
        study.strategy_params["batch"] = 99
        trial.strategy_info["k"].append(2)
        assert storage.get_study(study.study_id).strategy_params["batch"] == 4
        assert storage.get_trial(trial.trial_id).strategy_info == {"k": [1]}
        # ... and later writes change no record returned earlier.
        storage.finish_trial(trial.trial_id, state=TrialState.COMPLETE, score=1.0)
        assert trial.state is TrialState.RUNNING and trial.score is None

    def test_inputs_are_copied(self, storage: BaseStorage) -> None:
        params = {"batch": [1]}
        study = _study(storage, strategy_params=params)
        params["batch"].append(2)
        assert storage.get_study(study.study_id).strategy_params == {"batch": [1]}

    # concurrency

    def test_concurrent_create_trial_numbers_are_unique(self, storage: BaseStorage) -> None:
        study = _study(storage)
        count = 48
        with ThreadPoolExecutor(max_workers=8) as pool:
            trials = list(
                pool.map(
                    lambda n: storage.create_trial(study.study_id, plan=_plan(n % 5 + 1), estimated_cost=Cost()),
                    range(count),
                )
            )
        assert sorted(trial.number for trial in trials) == list(range(count))
        assert [t.number for t in storage.get_trials(study.study_id)] == list(range(count))

    def test_concurrent_finish_has_one_winner(self, storage: BaseStorage) -> None:
        study = _study(storage)
        trial = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost())
        barrier = threading.Barrier(6)

        def finish(score: float) -> FrozenTrial | None:
            barrier.wait()
            try:
                return storage.finish_trial(trial.trial_id, state=TrialState.COMPLETE, score=score)
            except RuntimeError:
                return None

        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(finish, [float(i) for i in range(6)]))
        winners = [result for result in results if result is not None]
        assert len(winners) == 1
        assert storage.get_trial(trial.trial_id) == winners[0]

    # graph versions

    def test_graph_versions_round_trip(self, storage: BaseStorage) -> None:
        definition = {"stages": [{"stage": "answer", "edges": [["a", "b", 0.5]]}], "iteration": 1}
        first = storage.add_graph_version("study-a", definition, cause="initial")
        assert isinstance(first, GraphVersion)
        assert (first.graph, first.version, first.cause, first.parent_id, first.pinned) == ("study-a", 1, "initial", None, False)
        assert first.definition == definition
        assert first.created_at.tzinfo is not None and first.created_at.utcoffset() == UTC.utcoffset(None)
        second = storage.add_graph_version("study-a", {"iteration": 2}, cause="update 2", parent_id=first.version_id)
        other = storage.add_graph_version("study-b", {"iteration": 1})
        assert (second.version, second.parent_id) == (2, first.version_id)
        assert other.version == 1 and other.cause == ""
        assert storage.get_graph_versions("study-a") == [first, second]
        assert storage.get_graph_version(second.version_id) == second
        assert storage.latest_graph_version("study-a") == second
        assert storage.list_graphs() == ["study-a", "study-b"]
        # a parent may belong to another graph (a fork)
        fork = storage.add_graph_version("study-c", {"x": 1}, parent_id=other.version_id)
        assert fork.version == 1 and fork.parent_id == other.version_id

    def test_graph_versions_unknown_and_invalid(self, storage: BaseStorage) -> None:
        assert storage.list_graphs() == []
        with pytest.raises(KeyError):
            storage.get_graph_versions("nothing")
        with pytest.raises(KeyError):
            storage.latest_graph_version("nothing")
        with pytest.raises(KeyError):
            storage.get_graph_version(12345)
        with pytest.raises(KeyError):
            storage.set_graph_pinned(12345, True)
        with pytest.raises(KeyError):
            storage.add_graph_version("g", {}, parent_id=12345)
        with pytest.raises(ValueError):
            storage.add_graph_version("g", {"p": float("nan")})
        with pytest.raises(ValueError):
            storage.add_graph_version("", {})
        assert storage.list_graphs() == []  # failed writes stored nothing
        assert storage.add_graph_version("g", {}).version == 1

    def test_pinning(self, storage: BaseStorage) -> None:
        one = storage.add_graph_version("g", {"v": 1})
        two = storage.add_graph_version("g", {"v": 2}, parent_id=one.version_id)
        pinned = storage.set_graph_pinned(one.version_id, True)
        assert pinned.pinned and pinned.definition == one.definition and pinned.version == 1
        assert one.pinned is False  # the record returned earlier did not change
        assert [v.pinned for v in storage.get_graph_versions("g")] == [True, False]
        assert storage.set_graph_pinned(two.version_id, True).pinned
        assert [v.pinned for v in storage.get_graph_versions("g")] == [True, True]  # pins are independent
        assert not storage.set_graph_pinned(one.version_id, False).pinned
        assert [v.pinned for v in storage.get_graph_versions("g")] == [False, True]

    def test_graph_version_records_are_frozen_copies(self, storage: BaseStorage) -> None:
        definition = {"edges": [1, 2]}
        version = storage.add_graph_version("g", definition, cause="c")
        definition["edges"].append(3)  # the input was copied
        with pytest.raises(dataclasses.FrozenInstanceError):
            version.cause = "other"  # type: ignore[misc]
        version.definition["edges"].append(4)  # the output is a copy too
        assert storage.get_graph_version(version.version_id).definition == {"edges": [1, 2]}

    def test_concurrent_graph_versions_are_numbered_without_gaps(self, storage: BaseStorage) -> None:
        count = 32
        with ThreadPoolExecutor(max_workers=8) as pool:
            versions = list(pool.map(lambda n: storage.add_graph_version(f"g{n % 2}", {"n": n}), range(count)))
        for name in ("g0", "g1"):
            numbers = sorted(v.version for v in versions if v.graph == name)
            assert numbers == list(range(1, count // 2 + 1))
            assert [v.version for v in storage.get_graph_versions(name)] == numbers
        assert len({v.version_id for v in versions}) == count


class TestInMemoryAndSQL(StorageTestCase):
    """The contract on every mode in ``STORAGE_MODES``."""


# SQL only: several independent storages (own engines and pools, like separate processes) on one database.

SQL_FILE_MODES = ["sqlite-file", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=SQL_FILE_MODES)
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _make_url(request.param, request, tmp_path)


def test_independent_storages_number_trials_uniquely(shared_url: str) -> None:
    first = SQLStorage(shared_url)
    study = _study(first)
    storages = [SQLStorage(shared_url) for _ in range(6)]
    try:

        def work(index: int) -> list[int]:
            mine = storages[index]
            return [mine.create_trial(study.study_id, plan=_plan(index + 1), estimated_cost=Cost()).number for _ in range(10)]

        with ThreadPoolExecutor(max_workers=len(storages)) as pool:
            numbers = [n for chunk in pool.map(work, range(len(storages))) for n in chunk]
        assert sorted(numbers) == list(range(60))
    finally:
        for storage in [first, *storages]:
            storage.close()


def test_independent_storages_finish_once(shared_url: str) -> None:
    storages = [SQLStorage(shared_url) for _ in range(4)]
    try:
        study = _study(storages[0])
        trial = storages[0].create_trial(study.study_id, plan=_plan(), estimated_cost=Cost())
        barrier = threading.Barrier(len(storages))

        def finish(index: int) -> bool:
            barrier.wait()
            try:
                storages[index].finish_trial(trial.trial_id, state=TrialState.COMPLETE, score=float(index))
            except RuntimeError:
                return False
            return True

        with ThreadPoolExecutor(max_workers=len(storages)) as pool:
            assert sum(pool.map(finish, range(len(storages)))) == 1
    finally:
        for storage in storages:
            storage.close()


def test_independent_storages_number_graph_versions_uniquely(shared_url: str) -> None:
    storages = [SQLStorage(shared_url) for _ in range(5)]
    try:

        def work(index: int) -> list[int]:
            return [storages[index].add_graph_version("shared", {"writer": index, "k": k}).version for k in range(8)]

        with ThreadPoolExecutor(max_workers=len(storages)) as pool:
            numbers = [n for chunk in pool.map(work, range(len(storages))) for n in chunk]
        assert sorted(numbers) == list(range(1, 41))
        assert [v.version for v in storages[0].get_graph_versions("shared")] == list(range(1, 41))
    finally:
        for storage in storages:
            storage.close()


def test_a_second_storage_sees_the_first_ones_writes(shared_url: str) -> None:
    writer, reader = SQLStorage(shared_url), SQLStorage(shared_url)
    try:
        study = _study(writer)
        trial = writer.create_trial(study.study_id, plan=_plan(3), estimated_cost=Cost(flops=5))
        assert reader.get_study_by_name("study") == study
        assert reader.get_trial(trial.trial_id) == trial
        assert reader.get_plan(trial.plan_id[:8]) == _plan(3)
    finally:
        writer.close()
        reader.close()


def test_sql_storage_pickles_as_its_url(tmp_path: Path) -> None:
    storage = SQLStorage(f"sqlite:///{tmp_path / 'allot.db'}")
    study = _study(storage)
    copy = pickle.loads(pickle.dumps(storage))
    try:
        assert copy.url == storage.url
        assert copy.get_study(study.study_id) == study
    finally:
        storage.close()
        copy.close()


def test_repr_masks_the_password() -> None:
    storage = SQLStorage.__new__(SQLStorage)
    storage.url = "postgresql+psycopg://allot:s3cret@db.example/allot"
    assert "s3cret" not in repr(storage)
    assert "***" in repr(storage)


# Default location and get_storage.


def test_default_database_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ALLOT_DATABASE_URL", raising=False)
    monkeypatch.delenv("ALLOT_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_database_url() == f"sqlite:///{tmp_path / 'allot.db'}"
    monkeypatch.setenv("ALLOT_HOME", str(tmp_path / "home"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'home' / 'allot.db'}"
    monkeypatch.setenv("ALLOT_DATABASE_URL", "postgresql+psycopg://u@h/db")
    assert default_database_url() == "postgresql+psycopg://u@h/db"


def test_get_storage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ALLOT_DATABASE_URL", raising=False)
    monkeypatch.setenv("ALLOT_HOME", str(tmp_path))
    storage = get_storage(None)
    try:
        assert isinstance(storage, SQLStorage)
        assert (tmp_path / "allot.db").exists()
        _study(storage)
    finally:
        storage.close()
    memory = InMemoryStorage()
    assert get_storage(memory) is memory
    explicit = get_storage(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        assert isinstance(explicit, SQLStorage)
        assert explicit.list_studies() == []
    finally:
        explicit.close()


@pytest.mark.parametrize("mode", SQL_FILE_MODES)
def test_ctrl_c_during_a_commit_stores_the_write_then_interrupts(
    mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """SIGINT landing inside SQLAlchemy's commit used to surface as an AssertionError from its half-closed
    transaction (the CLI then died with a traceback, not its resume hint): it is held until the commit ends."""
    import os
    import signal

    from sqlalchemy import event

    # Python's own Ctrl-C handler, which a suite started in the background (SIGINT ignored) does not have
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))
    storage = SQLStorage(_make_url(mode, request, tmp_path))
    try:
        study = _study(storage)
        trial = storage.create_trial(study.study_id, plan=_plan(), estimated_cost=Cost())
        fired: list[bool] = []

        @event.listens_for(storage.engine, "commit")
        def interrupt(connection: object) -> None:
            if not fired:
                fired.append(True)
                os.kill(os.getpid(), signal.SIGINT)  # delivered here, in the middle of the commit

        with pytest.raises(KeyboardInterrupt):
            storage.finish_trial(trial.trial_id, state=TrialState.COMPLETE, score=0.5)
        event.remove(storage.engine, "commit", interrupt)
        assert fired
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        stored = storage.get_trial(trial.trial_id)
        assert stored.state is TrialState.COMPLETE and stored.score == 0.5
    finally:
        storage.close()
