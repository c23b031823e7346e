"""The job service's fast paths keep the queue's guarantees: bulk submission, batched claims and finishes,
graph updates committed with the results that complete them, and the per-process caches.

In-process on SQLite and PostgreSQL (the PostgreSQL statements differ: one statement per batch step), with
the replay backend; worker processes and brokers are in tests/test_service_reliability.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from executors.sample_store import SampleStore
from graphs.cost import Budget
from graphs.errors import BudgetError, DataError
from planner.storage import InMemoryStorage, SampleRecord, SQLStorage
from workers.dispatch import Dispatcher
from workers.execution import drain, execute
from workers.jobs import JobConflict, JobState
from workers.service import (
    ServiceTask,
    cached_service_task,
    clear_runtimes,
    current_version,
    initial_state,
    register_task,
    runtime_for,
)

BUDGET = Budget(limit=300_000, unit="tokens")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStorage]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" else request.getfixturevalue("fresh_postgres_url")
    store = SQLStorage(url)
    yield store
    clear_runtimes()
    store.close()


def make_task(storage: SQLStorage, **fields: Any) -> ServiceTask:
    spec = ServiceTask(name="aime", backend="replay", benchmark="aime24", budget=BUDGET, graph="aime", **fields)
    register_task(storage, spec)
    runtime = runtime_for(spec, storage)
    storage.add_graph_version(spec.graph, initial_state(spec, runtime.task, runtime.catalog).definition(), "initial")
    return spec


class Recording(Dispatcher):
    """A dispatcher whose messages are recorded instead of sent."""

    def __init__(self, storage: SQLStorage) -> None:
        super().__init__(storage)
        self.sent: list[int] = []

    def send(self, job_ids: Any, *, priority: int = 0) -> None:
        self.sent.extend(job_ids)


@pytest.fixture
def dispatcher(storage: SQLStorage) -> Recording:
    make_task(storage)
    return Recording(storage)


def inputs(storage: SQLStorage, count: int) -> list[dict[str, str]]:
    examples = [example.id for example in runtime_for(cached_service_task(storage, "aime")[1], storage).task.examples]
    return [{"example": examples[i % len(examples)]} for i in range(count)]


# -- bulk submission ---------------------------------------------------------------------------------------------


def test_submit_many_stores_every_input_in_order_and_sends_one_message_each(dispatcher: Recording, storage: SQLStorage) -> None:
    given = inputs(storage, 40)
    submitted = dispatcher.submit_many("aime", given, owner="alice", priority=2)
    assert [job.input for job, _ in submitted] == given and all(created for _, created in submitted)
    ids = [job.id for job, _ in submitted]
    assert ids == sorted(ids) and dispatcher.sent == ids
    assert all(job.state is JobState.QUEUED and job.owner == "alice" and job.priority == 2 for job, _ in submitted)
    assert all(job.budget_limit == BUDGET.limit and job.task == "aime" for job, _ in submitted)
    assert dispatcher.jobs.counts()["queued"] == 40


def test_submit_many_is_all_or_nothing(dispatcher: Recording, storage: SQLStorage) -> None:
    given = inputs(storage, 5)
    with pytest.raises(DataError, match=r"input 3: task .* has no example 'nope'"):
        dispatcher.submit_many("aime", [*given[:3], {"example": "nope"}, given[4]])
    with pytest.raises(BudgetError, match="too small for any plan"):
        dispatcher.submit_many("aime", given, budget_limit=10.0)
    dispatcher.submit_many("aime", given[:1], owner="bob", idempotency_keys=["taken"])
    with pytest.raises(JobConflict, match="another user"):
        dispatcher.submit_many("aime", given, owner="alice", idempotency_keys=["a", "b", "taken", "c", "d"])
    assert sum(dispatcher.jobs.counts().values()) == 1 and len(dispatcher.sent) == 1


def test_submit_many_idempotency_keys_return_the_jobs_already_made(dispatcher: Recording, storage: SQLStorage) -> None:
    given = inputs(storage, 4)
    first = dispatcher.submit_many("aime", given[:2], owner="alice", idempotency_keys=["k0", "k1"])
    again = dispatcher.submit_many("aime", given, owner="alice", idempotency_keys=["k0", "k1", "k2", None])
    assert [created for _, created in again] == [False, False, True, True]
    assert [job.id for job, _ in again[:2]] == [job.id for job, _ in first]
    assert len(dispatcher.sent) == 4  # no second message for a job that exists
    with pytest.raises(JobConflict, match="another task or input"):
        dispatcher.submit_many("aime", [given[3]], owner="alice", idempotency_keys=["k0"])
    with pytest.raises(ValueError, match="twice"):
        dispatcher.submit_many("aime", given[:2], owner="alice", idempotency_keys=["x", "x"])


# -- batched claims and finishes ---------------------------------------------------------------------------------


def test_claim_many_takes_jobs_in_priority_order_within_owner_limits(dispatcher: Recording, storage: SQLStorage) -> None:
    given = inputs(storage, 3)
    alice = [job.id for job, _ in dispatcher.submit_many("aime", given, owner="alice", max_concurrent=1, priority=5)]
    bob = [job.id for job, _ in dispatcher.submit_many("aime", given, owner="bob", max_concurrent=2)]
    anyone = [job.id for job, _ in dispatcher.submit_many("aime", given[:2], priority=9)]
    claimed = dispatcher.jobs.claim_many("w1", 10)
    order = [claim.job.id for claim, _ in claimed]
    assert order == [*anyone, alice[0], *bob[:2]]  # one of alice's (limit 1), two of bob's (limit 2)
    assert all(claim.attempt == 1 and claim.worker == "w1" for claim, _ in claimed)
    assert dispatcher.jobs.claim_many("w2", 10) == []  # the rest wait for their owners' running jobs
    first = next(claim for claim, _ in claimed if claim.job.id == alice[0])
    done, _, _, taken = dispatcher.jobs.complete_many_and_claim(
        [(first, {"state": JobState.SUCCEEDED, "result": {"answer": "1"}})], worker="w1", limit=10
    )
    assert done == [True] and [claim.job.id for claim, _ in taken] == [alice[1]]


def test_a_batch_finish_stores_held_attempts_only_and_counts_evidence(dispatcher: Recording, storage: SQLStorage) -> None:
    ids = [job.id for job, _ in dispatcher.submit_many("aime", inputs(storage, 3))]
    claims = [claim for claim, _ in dispatcher.jobs.claim_many("w1", 3)]
    assert [claim.job.id for claim in claims] == ids
    dispatcher.jobs.cancel(ids[1])  # the second attempt is lost: its result must be dropped
    outcome = {"state": JobState.SUCCEEDED, "result": {"answer": "7"}, "score": 1.0, "feedback_graph": "aime"}
    done, pending, _, taken = dispatcher.jobs.complete_many_and_claim(
        [(claim, outcome) for claim in claims], worker="w1", limit=5
    )
    assert done == [True, False, True] and pending == {"aime": 2} and taken == []
    jobs = [dispatcher.jobs.get(job_id) for job_id in ids]
    assert [job.state for job in jobs] == [JobState.SUCCEEDED, JobState.CANCELLED, JobState.SUCCEEDED]
    assert jobs[0].result == {"answer": "7"} and jobs[0].score == 1.0 and jobs[1].result is None
    assert [len(dispatcher.jobs.feedback(job_id)) for job_id in ids] == [1, 0, 1]
    again, _, _, _ = dispatcher.jobs.complete_many_and_claim([(claims[0], outcome)], worker="w1", limit=0)
    assert again == [False]  # finished once: a second finish of the same attempt writes nothing


def test_a_batch_gives_its_unstarted_jobs_back_to_the_queue(dispatcher: Recording, storage: SQLStorage) -> None:
    ids = [job.id for job, _ in dispatcher.submit_many("aime", inputs(storage, 3))]
    first, second, third = (claim for claim, _ in dispatcher.jobs.claim_many("w1", 3))
    outcome = {"state": JobState.SUCCEEDED, "result": {"answer": "1"}}
    done, _, _, taken = dispatcher.jobs.complete_many_and_claim(
        [(first, outcome)], worker="w2", limit=1, unstarted=[second, third]
    )
    assert done == [True] and [claim.job.id for claim, _ in taken] == [ids[1]]
    assert taken[0][0].attempt == 2 and dispatcher.jobs.get(ids[2]).state is JobState.QUEUED
    assert not dispatcher.jobs.finish(second, state=JobState.SUCCEEDED)  # the given-back attempt is over


def test_heartbeat_many_reports_the_claims_still_held(dispatcher: Recording, storage: SQLStorage) -> None:
    ids = [job.id for job, _ in dispatcher.submit_many("aime", inputs(storage, 2))]
    claims = [claim for claim, _ in dispatcher.jobs.claim_many("w1", 2)]
    assert dispatcher.jobs.heartbeat_many(claims) == claims
    dispatcher.jobs.cancel(ids[0])
    assert dispatcher.jobs.heartbeat_many(claims) == [claims[1]]
    assert not dispatcher.jobs.heartbeat(claims[0]) and dispatcher.jobs.heartbeat(claims[1])


# -- draining in batches ---------------------------------------------------------------------------------------


def test_drained_batches_make_a_version_of_exactly_learn_every_results(storage: SQLStorage) -> None:
    make_task(storage, learn_every=3)
    d = Recording(storage)
    ids = [job.id for job, _ in d.submit_many("aime", inputs(storage, 10))]
    assert sorted(drain(d.jobs)) == ids
    jobs = [d.jobs.get(job_id) for job_id in ids]
    assert all(job.state is JobState.SUCCEEDED and job.attempt == 1 and job.cost for job in jobs), [j.error for j in jobs]
    versions = storage.get_graph_versions("aime")
    assert len(versions) == 4
    assert all(v.cause.startswith("feedback: 3 scored job(s)") for v in versions[1:])
    assert [v.parent_id for v in versions[1:]] == [v.version_id for v in versions[:-1]]
    applied = [f.applied_version_id for job_id in ids for f in d.jobs.feedback(job_id)]
    assert applied[:9] == [v.version_id for v in versions[1:] for _ in range(3)] and applied[9] is None
    # the versions a process made are what its next jobs follow, at once
    assert current_version(storage, "aime").version_id == versions[-1].version_id


def test_execute_runs_one_claim_and_returns_the_stored_job(dispatcher: Recording, storage: SQLStorage) -> None:
    ((job, _),) = dispatcher.submit_many("aime", inputs(storage, 1))
    claim = dispatcher.jobs.claim("w1")
    assert claim is not None
    stored = execute(dispatcher.jobs, claim)
    assert stored is not None and stored.id == job.id and stored.state is JobState.SUCCEEDED
    assert stored.plan_id and stored.result and stored.result["plan"]["plan_id"] == stored.plan_id
    assert stored == dispatcher.jobs.get(job.id)
    assert execute(dispatcher.jobs, claim) is None  # that attempt is over: nothing is written twice


# -- per-process caches ----------------------------------------------------------------------------------------


def test_cached_versions_and_tasks_follow_pins_and_new_registrations_at_once(storage: SQLStorage) -> None:
    spec = make_task(storage)
    d = Recording(storage)
    first = current_version(storage, "aime")
    second = storage.add_graph_version("aime", first.definition, "a copy")
    assert current_version(storage, "aime").version_id == second.version_id
    storage.set_graph_pinned(first.version_id, True)
    pinned = current_version(storage, "aime")
    assert pinned.version_id == first.version_id and pinned.pinned
    storage.set_graph_pinned(first.version_id, False)
    assert current_version(storage, "aime").version_id == second.version_id
    assert not current_version(storage, "aime", first.version_id).pinned
    register_task(storage, spec.model_copy(update={"budget": Budget(limit=200_000, unit="tokens")}), replace=True)
    ((job, _),) = d.submit_many("aime", inputs(storage, 1))
    assert job.budget_limit == 200_000  # the re-registered task, not the cached one


def test_a_sample_store_with_memory_serves_what_it_read_without_asking_again() -> None:
    class Counting(InMemoryStorage):
        reads = 0

        def get_samples(self, *args: Any, **kwargs: Any) -> list[SampleRecord]:
            Counting.reads += 1
            return super().get_samples(*args, **kwargs)

    store = SampleStore(Counting(), memory=10)
    samples = [SampleRecord("m", "p", "k", i, f"answer {i}", 5, 7) for i in range(4)]
    store.add(samples)
    assert store.get("m", "p", "k", limit=4) == samples and Counting.reads == 1
    assert store.get("m", "p", "k", limit=3) == samples[:3] and Counting.reads == 1  # all held: no read
    assert store.get("m", "p", "k", limit=6) == samples and Counting.reads == 2  # indices 4, 5 may exist now
    assert store.get("m", "p", "k") == samples and Counting.reads == 3  # no limit: always read
