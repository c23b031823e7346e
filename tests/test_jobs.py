"""Jobs: the SQL queue's guarantees, submission checks, execution with learned plans, online learning.

Everything runs in-process (``drain``) on SQLite and PostgreSQL with the replay backend; worker processes
and brokers are in tests/test_service_reliability.py, the REST API in tests/test_api.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from executors.backends import BackendError, CompletionRequest
from executors.replay_backend import ReplayBackend
from graphs.cost import Budget
from graphs.errors import BudgetError, DataError
from graphs.plan import Role
from planner.storage import SQLStorage
from planner.strategies._reinforce import GraphState
from workers.dispatch import Dispatcher
from workers.execution import drain
from workers.jobs import JobConflict, JobNotFound, JobState
from workers.learning import learn, pending_count
from workers.service import ServiceTask, UnknownTask, clear_runtimes, initial_state, register_task, runtime_for

BUDGET = Budget(limit=300_000, unit="tokens")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStorage]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" else request.getfixturevalue("fresh_postgres_url")
    store = SQLStorage(url)
    yield store
    clear_runtimes()
    store.close()


def make_task(storage: SQLStorage, name: str = "aime", **fields: object) -> ServiceTask:
    spec = ServiceTask(name=name, backend="replay", benchmark="aime24", budget=BUDGET, graph=name, **fields)  # type: ignore[arg-type]
    register_task(storage, spec)
    runtime = runtime_for(spec, storage)
    storage.add_graph_version(spec.graph, initial_state(spec, runtime.task, runtime.catalog).definition(), "initial")
    return spec


@pytest.fixture
def dispatcher(storage: SQLStorage) -> Dispatcher:
    make_task(storage)
    return Dispatcher(storage)


def examples(storage: SQLStorage, spec_name: str = "aime") -> list[str]:
    from workers.service import get_service_task

    _, spec = get_service_task(storage, spec_name)
    return [example.id for example in runtime_for(spec, storage).task.examples]


def submit(d: Dispatcher, example: str, **kwargs: object) -> int:
    job, created = d.submit("aime", {"example": example}, send=False, **kwargs)  # type: ignore[arg-type]
    assert created
    return job.id


# -- the queue -----------------------------------------------------------------------------------------------


def test_claim_takes_highest_priority_then_oldest(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    ids = examples(storage)
    low = submit(dispatcher, ids[0])
    high = submit(dispatcher, ids[1], priority=5)
    low2 = submit(dispatcher, ids[2])
    order = []
    while (claim := dispatcher.jobs.claim("w")) is not None:
        order.append(claim.job.id)
    assert order == [high, low, low2]


def test_per_owner_limit_skips_to_other_owners(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    ids = examples(storage)
    a1 = submit(dispatcher, ids[0], owner="alice", max_concurrent=1)
    a2 = submit(dispatcher, ids[1], owner="alice", max_concurrent=1)
    b1 = submit(dispatcher, ids[2], owner="bob", max_concurrent=1)
    first = dispatcher.jobs.claim("w1")
    second = dispatcher.jobs.claim("w2")
    assert first is not None and second is not None
    assert (first.job.id, second.job.id) == (a1, b1)
    assert dispatcher.jobs.claim("w3") is None  # alice's second job waits for her first
    assert dispatcher.jobs.finish(first, state=JobState.SUCCEEDED, result={"answer": "x"})
    third = dispatcher.jobs.claim("w3")
    assert third is not None and third.job.id == a2


def test_a_lost_attempt_cannot_finish_and_the_job_completes_once(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    job_id = submit(dispatcher, examples(storage)[0])
    first = dispatcher.jobs.claim("dead-worker")
    assert first is not None and first.attempt == 1
    report = dispatcher.jobs.reap(stale_after_s=0.0, redispatch_after_s=3600)
    assert report.requeued == (job_id,)
    assert not dispatcher.jobs.heartbeat(first)
    second = dispatcher.jobs.claim("live-worker")
    assert second is not None and second.attempt == 2
    assert not dispatcher.jobs.finish(first, state=JobState.SUCCEEDED, result={"answer": "stale"})
    assert dispatcher.jobs.finish(second, state=JobState.SUCCEEDED, result={"answer": "fresh"})
    assert not dispatcher.jobs.finish(second, state=JobState.SUCCEEDED, result={"answer": "twice"})
    job = dispatcher.jobs.get(job_id)
    assert (job.state, job.attempt, job.result) == (JobState.SUCCEEDED, 2, {"answer": "fresh"})


def test_reaper_resends_old_queued_jobs_only(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    job_id = submit(dispatcher, examples(storage)[0])
    assert dispatcher.jobs.reap(stale_after_s=30, redispatch_after_s=3600).redispatch == ()
    assert dispatcher.jobs.reap(stale_after_s=30, redispatch_after_s=0.0).redispatch == (job_id,)


def test_cancel_stops_a_running_attempt(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    job_id = submit(dispatcher, examples(storage)[0])
    claim = dispatcher.jobs.claim("w")
    assert claim is not None
    assert dispatcher.jobs.cancel(job_id).state is JobState.CANCELLED
    assert not dispatcher.jobs.heartbeat(claim)
    assert not dispatcher.jobs.finish(claim, state=JobState.SUCCEEDED)
    with pytest.raises(JobConflict, match="already cancelled"):
        dispatcher.jobs.cancel(job_id)


def test_idempotency_key(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    ids = examples(storage)
    job, created = dispatcher.submit("aime", {"example": ids[0]}, owner="alice", idempotency_key="k1", send=False)
    again, created_again = dispatcher.submit("aime", {"example": ids[0]}, owner="alice", idempotency_key="k1", send=False)
    assert created and not created_again and again.id == job.id
    with pytest.raises(JobConflict, match="another user"):
        dispatcher.submit("aime", {"example": ids[0]}, owner="bob", idempotency_key="k1", send=False)
    with pytest.raises(JobConflict, match="another task or input"):
        dispatcher.submit("aime", {"example": ids[1]}, owner="alice", idempotency_key="k1", send=False)
    assert sum(dispatcher.jobs.counts().values()) == 1


@pytest.mark.parametrize(
    ("task", "payload", "kwargs", "error", "match"),
    [
        ("nope", {"example": "x"}, {}, UnknownTask, "unknown task 'nope': registered tasks are aime"),
        ("aime", {"example": "nope"}, {}, DataError, "has no example 'nope'"),
        ("aime", {"inputs": {"text": "hi"}}, {}, DataError, "reads input field"),
        ("aime", {"question": "hi"}, {}, DataError, "unknown field"),
        ("aime", {"example": None}, {"budget_limit": 10.0}, BudgetError, "too small for any plan"),
        ("aime", {"example": None}, {"budget_limit": 10 * BUDGET.limit}, BudgetError, "cannot exceed its task's"),
        ("aime", {"example": None}, {"plan_id": "0" * 64}, KeyError, "no plan"),
        ("aime", {"example": None}, {"graph_version": 99}, KeyError, "no version 99"),
    ],
)
def test_bad_submissions_are_refused_and_nothing_is_stored(
    dispatcher: Dispatcher, storage: SQLStorage, task: str, payload: dict, kwargs: dict, error: type, match: str
) -> None:
    if payload.get("example", "") is None:
        payload = {"example": examples(storage)[0]}
    with pytest.raises(error, match=match):
        dispatcher.submit(task, payload, send=False, **kwargs)
    assert sum(dispatcher.jobs.counts().values()) == 0


def test_submission_survives_a_dead_broker(storage: SQLStorage) -> None:
    make_task(storage)
    dead = Dispatcher(storage, broker_url="redis://127.0.0.1:1/0")
    job, created = dead.submit("aime", {"example": examples(storage)[0]})
    assert created and dead.jobs.get(job.id).state is JobState.QUEUED  # stored; the reaper re-sends it


# -- execution -------------------------------------------------------------------------------------------------


def test_drained_jobs_run_the_learned_plan_within_budget(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    ids = [submit(dispatcher, example) for example in examples(storage)[:6]]
    assert sorted(drain(dispatcher.jobs)) == ids
    version = storage.get_graph_versions("aime")[0]
    for job_id in ids:
        job = dispatcher.jobs.get(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.graph_version_id == version.version_id and job.plan_id is not None
        plan = storage.get_plan(job.plan_id)
        assert job.result is not None and job.result["plan"]["plan_id"] == plan.plan_id
        assert set(job.result["stages"]) == {"answer"}
        tokens = (job.cost or {})["prompt_tokens"] + (job.cost or {})["output_tokens"]  # type: ignore[operator]
        assert 0 < tokens <= BUDGET.limit
        assert job.score in (0.0, 1.0)


def test_a_rerun_reuses_stored_samples(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    example = examples(storage)[0]
    first = submit(dispatcher, example)
    drain(dispatcher.jobs)
    samples_after_first = _sample_count(storage)
    second = submit(dispatcher, example)
    drain(dispatcher.jobs)
    a, b = dispatcher.jobs.get(first), dispatcher.jobs.get(second)
    assert a.plan_id == b.plan_id and a.cost == b.cost and a.result["answer"] == b.result["answer"]  # type: ignore[index]
    assert _sample_count(storage) == samples_after_first  # nothing generated twice


def _sample_count(storage: SQLStorage) -> int:
    from sqlmodel import func, select

    from planner.storage.tables import SampleRow

    with storage.transaction() as session:
        return int(session.exec(select(func.count()).select_from(SampleRow)).one())


def test_pinned_version_is_what_new_jobs_follow(storage: SQLStorage) -> None:
    make_task(storage, learn_every=3)
    d = Dispatcher(storage)
    for example in examples(storage)[:3]:
        submit(d, example)
    drain(d.jobs)
    v1, v2 = storage.get_graph_versions("aime")[:2]
    assert v2.cause.startswith("feedback: 3 scored job(s)")
    storage.set_graph_pinned(v1.version_id, True)
    job_id = submit(d, examples(storage)[5])
    drain(d.jobs)
    assert d.jobs.get(job_id).graph_version_id == v1.version_id


def test_a_job_that_cannot_run_fails_with_the_reason(storage: SQLStorage) -> None:
    spec = make_task(storage)
    d = Dispatcher(storage)
    job_id = submit(d, examples(storage)[0])
    # the task's graph is replaced by one whose stage the task does not have: the job says so
    bad = initial_state(spec, runtime_for(spec, storage).task, runtime_for(spec, storage).catalog)
    renamed = GraphState(bad.strategy, 0, tuple(g.model_copy(update={"stage": "other"}) for g in bad.graphs))
    storage.add_graph_version("aime", renamed.definition(), "broken on purpose")
    drain(d.jobs)
    job = d.jobs.get(job_id)
    assert job.state is JobState.FAILED and "the graph has stages other" in (job.error or "")


# -- learning --------------------------------------------------------------------------------------------------


def test_results_make_a_version_after_learn_every(storage: SQLStorage) -> None:
    make_task(storage, learn_every=4)
    d = Dispatcher(storage)
    ids = [submit(d, example) for example in examples(storage)[:5]]
    drain(d.jobs)
    versions = storage.get_graph_versions("aime")
    assert len(versions) == 2
    assert f"[{ids[0]}-{ids[3]}]" in versions[1].cause and versions[1].parent_id == versions[0].version_id
    assert pending_count(storage, "aime") == 1  # the fifth waits for the next batch
    applied = {f.applied_version_id for job_id in ids[:4] for f in d.jobs.feedback(job_id)}
    assert applied == {versions[1].version_id}


def test_feedback_by_answer_is_scored_and_replaces_the_result(storage: SQLStorage) -> None:
    make_task(storage, learn_every=100)
    d = Dispatcher(storage)
    job_id = submit(d, examples(storage)[0])
    drain(d.jobs)
    job = d.jobs.get(job_id)
    answer = job.result["answer"]  # type: ignore[index]
    record, version = d.feedback(job_id, answer=str(answer))
    assert record.score == 1.0 and record.source == "user" and version is None
    record, _ = d.feedback(job_id, answer="definitely not " + str(answer))
    assert record.score == 0.0
    with pytest.raises(DataError, match="either a score"):
        d.feedback(job_id)
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        d.feedback(job_id, score=3.0)
    with pytest.raises(JobNotFound):
        d.feedback(job_id, score=1.0, owner="someone-else")


def test_learning_raises_what_scored_well(storage: SQLStorage) -> None:
    """Users say only plans with the 8B model are good: its slot's probability rises, the others' fall."""
    make_task(storage, policy="sample", learn_every=1000, learning_rate=1.0)
    d = Dispatcher(storage)
    for example in examples(storage)[:24]:
        submit(d, example)
    drain(d.jobs)
    state0 = GraphState.from_definition(storage.get_graph_versions("aime")[0].definition)
    for job in d.jobs.list(limit=100):
        plan = storage.get_plan(job.plan_id)  # type: ignore[arg-type]
        d.feedback(job.id, score=1.0 if "Qwen3-8B" in plan.models else 0.0, learn_now=False)
    version = learn(storage, make_spec_for(storage), force=True)
    assert version is not None and "24 scored job(s)" in version.cause and "(24 by user feedback)" in version.cause
    state1 = GraphState.from_definition(version.definition)
    before, after = state0.graphs[0], state1.graphs[0]
    solver = {s.model: s.id for s in before.slots if s.role is Role.SOLVER}
    assert after.inclusion_probability(solver["Qwen3-8B"]) > before.inclusion_probability(solver["Qwen3-8B"])
    assert after.inclusion_probability(solver["Qwen3-0.6B"]) < before.inclusion_probability(solver["Qwen3-0.6B"])
    assert pending_count(storage, "aime") == 0


def make_spec_for(storage: SQLStorage) -> ServiceTask:
    from workers.service import get_service_task

    return get_service_task(storage, "aime")[1]


# -- the replay backend ----------------------------------------------------------------------------------------


def test_replay_backend_serves_recorded_samples_by_seed_and_offset() -> None:
    backend = ReplayBackend(benchmark="aime24")
    question = backend.data.problems[0].question
    request = CompletionRequest("Qwen3-4B", ({"role": "user", "content": question},), n=4, seed=1)
    first = asyncio.run(backend.complete(request))
    again = asyncio.run(backend.complete(request))
    tail = asyncio.run(backend.complete(CompletionRequest("Qwen3-4B", request.messages, n=2, seed=1, offset=2)))
    assert [g.text for g in first.generations] == [g.text for g in again.generations]
    assert [g.text for g in tail.generations] == [g.text for g in first.generations[2:]]
    recorded = set(backend.data.records["Qwen3-4B"].answers[0])
    assert {g.text for g in first.generations} <= {a for a in recorded} | {""}
    assert first.cost.output_tokens == sum(g.output_tokens for g in first.generations) > 0
    assert backend.estimate(request).output_tokens >= first.cost.output_tokens
    capped = asyncio.run(backend.complete(CompletionRequest("Qwen3-4B", request.messages, n=4, seed=1, max_tokens=600)))
    assert all(g.output_tokens <= 600 for g in capped.generations)
    with pytest.raises(BackendError, match="no recording for this prompt"):
        asyncio.run(backend.complete(CompletionRequest("Qwen3-4B", ({"role": "user", "content": "hello"},))))
    from graphs.errors import UnknownModel

    with pytest.raises(UnknownModel, match="unknown model 'gpt-9'"):
        asyncio.run(backend.complete(CompletionRequest("gpt-9", request.messages)))


# -- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_task_submit_drain_feedback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.cli import app

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()

    def run(*args: str) -> object:
        return runner.invoke(app, [*args, "--database", url])

    result = run("task", "create", "aime", "--replay", "--benchmark", "aime24", "--budget", "300000")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    result = run("submit", "aime", "--example", "aime24-01", "--drain")
    assert result.exit_code == 0 and "succeeded" in result.output, result.output  # type: ignore[attr-defined]
    bad = [
        (("submit", "nope", "--example", "x"), "unknown task 'nope'"),
        (("submit", "aime", "--example", "x"), "has no example 'x'"),
        (("submit", "aime", "--input", "{not json"), "--input is not JSON"),
        (("submit", "aime", "--example", "aime24-01", "--budget", "3"), "too small for any plan"),
        (("task", "create", "x", "--replay", "--task-file", "t.yaml"), "exactly one of"),
        (("task", "create", "aime", "--replay", "--benchmark", "aime24"), "already exists"),
        (("feedback", "1"), "either a score"),
        (("jobs", "cancel", "1"), "already succeeded"),
        (("jobs", "show", "99"), "no job 99"),
    ]
    for args, message in bad:
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)  # type: ignore[attr-defined]
        assert "error:" in result.output and message in " ".join(result.output.split()), (args, result.output)  # type: ignore[attr-defined]
    assert run("feedback", "1", "--score", "1").exit_code == 0  # type: ignore[attr-defined]
    listed = run("jobs", "list")
    assert "succeeded" in listed.output  # type: ignore[attr-defined]


def test_review_page_shows_a_jobs_answer_score_and_feedback(dispatcher: Dispatcher, storage: SQLStorage) -> None:
    from fastapi.testclient import TestClient

    from workers.review import create_review_app

    job_id = submit(dispatcher, examples(storage)[0])
    drain(dispatcher.jobs)
    dispatcher.feedback(job_id, score=0.25, comment="close but wrong units")
    client = TestClient(create_review_app(storage))
    page = client.get(f"/jobs/{job_id}").text
    job = dispatcher.jobs.get(job_id)
    assert f"answer <strong>{job.result['answer']}</strong>" in page  # type: ignore[index]
    assert "close but wrong units" in page and "0.250" in page and "pending" in page
    assert f'href="/jobs/{job_id}"' in client.get("/jobs").text
