"""The REST API (workers/api.py) through FastAPI's TestClient, on SQLite and PostgreSQL: every endpoint, tokens
and scopes, ownership, idempotency, limits and validation (nothing stored on a 4xx), a broker that is down,
feedback that moves the learned graph, no token secret in the database or the logs; the ``allot token``
commands; and a schemathesis fuzz run against the app's own OpenAPI spec (no 5xx).

Jobs run in-process (``drain``) with the replay backend; messages go to an embedded broker in a temporary
folder (or to a dead Redis port, for the broker-down cases).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select
from typer.testing import CliRunner

from executors.replay import ReplayEnvironment
from graphs.cost import Budget
from graphs.errors import StorageError
from planner.storage import SQLStorage
from planner.storage.tables import JobRow, TokenRow
from planner.study import create_study
from workers.execution import drain
from workers.jobs import JobQueue
from workers.review import create_review_app
from workers.service import ServiceTask, clear_runtimes, initial_state, register_task, runtime_for
from workers.tokens import TOKEN_PREFIX, TokenStore

BUDGET = Budget(limit=300_000, unit="tokens")
LEGACY = "legacy-write-token"
DEAD_BROKER = "redis://127.0.0.1:1/0"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStorage]:
    url = f"sqlite:///{tmp_path / 'api.db'}" if request.param == "sqlite" else request.getfixturevalue("fresh_postgres_url")
    store = SQLStorage(url)
    yield store
    clear_runtimes()
    store.close()


def make_task(storage: SQLStorage, name: str = "aime", **fields: Any) -> ServiceTask:
    spec = ServiceTask(name=name, backend="replay", benchmark="aime24", budget=BUDGET, graph=name, **fields)
    register_task(storage, spec)
    runtime = runtime_for(spec, storage)
    storage.add_graph_version(spec.graph, initial_state(spec, runtime.task, runtime.catalog).definition(), "initial")
    return spec


@dataclass
class Api:
    client: TestClient
    storage: SQLStorage
    broker: Path
    alice: str
    """write scope, max_concurrent 2"""
    alice_read: str
    bob: str
    """write scope, no limit"""

    def h(self, secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    def submit(self, secret: str, example: str = "aime24-01", **body: Any) -> dict[str, Any]:
        response = self.client.post(
            "/api/v1/jobs", json={"task": "aime", "input": {"example": example}, **body}, headers=self.h(secret)
        )
        assert response.status_code == 201, response.text
        return response.json()

    def job_count(self) -> int:
        return sum(JobQueue(self.storage).counts().values())

    def messages(self) -> int:
        return len(list((self.broker / "queue").glob("*.msg")))


def make_api(storage: SQLStorage, tmp_path: Path, *, learn_every: int = 8, broker: str | None = None, **app_kwargs: Any) -> Api:
    make_task(storage, learn_every=learn_every)
    tokens = TokenStore(storage)
    _, alice = tokens.create("alice-write", "alice", "write", max_concurrent=2)
    _, alice_read = tokens.create("alice-read", "alice", "read")
    _, bob = tokens.create("bob-write", "bob", "write")
    folder = tmp_path / "broker"
    app = create_review_app(storage, LEGACY, broker_url=broker or f"filesystem://{folder}", **app_kwargs)
    return Api(TestClient(app), storage, folder, alice, alice_read, bob)


@pytest.fixture
def api(storage: SQLStorage, tmp_path: Path) -> Api:
    return make_api(storage, tmp_path)


# -- health, docs, spec ----------------------------------------------------------------------------------------


def test_health_ready_and_the_published_spec(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    c = api.client
    assert c.get("/api/health").json() == {"status": "ok", "version": "1"}
    assert c.get("/api/v1/health").status_code == 200
    ready = c.get("/api/v1/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json() | {"schema_revision": None} == {
        "ready": True,
        "database": "ok",
        "schema_revision": None,
        "broker": "ok",
        "reason": None,
    }
    import planner.storage.database as database

    with monkeypatch.context() as patch:
        patch.setattr(database, "head_revision", lambda: "9999")
        behind = c.get("/api/ready")
        assert behind.status_code == 503 and "not at head 9999" in behind.json()["reason"]

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise StorageError("cannot reach the database at postgresql://db/allot (connection refused)")

    with monkeypatch.context() as patch:
        patch.setattr(database, "current_revision", unreachable)
        down = c.get("/api/v1/ready")
        assert down.status_code == 503 and down.json()["reason"].startswith("database: cannot reach the database")
        assert down.json()["ready"] is False and down.json()["broker"] == "ok"
        patch.setattr(TokenStore, "verify", unreachable)  # any route that meets a dead database: 503, not 500
        jobs = c.get("/api/v1/jobs", headers=api.h(api.alice))
        assert jobs.status_code == 503 and jobs.json()["detail"].startswith("database unavailable: cannot reach")
        assert jobs.headers["retry-after"] == "5"

    spec = c.get("/openapi.json").json()
    assert c.get("/api/openapi.json").json() == spec
    assert spec["info"]["version"] == "1" and spec["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    operations = {(m.upper(), p) for p, methods in spec["paths"].items() for m in methods}
    expected = {
        ("GET", "/api/v1/health"),
        ("GET", "/api/v1/ready"),
        ("GET", "/api/v1/tasks"),
        ("GET", "/api/v1/tasks/{name}"),
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/{job_id}"),
        ("POST", "/api/v1/jobs/{job_id}/cancel"),
        ("POST", "/api/v1/jobs/{job_id}/feedback"),
        ("GET", "/api/v1/studies"),
        ("GET", "/api/v1/studies/{name}"),
        ("GET", "/api/v1/studies/{name}/trials"),
        ("GET", "/api/v1/plans/{plan_id}"),
        ("GET", "/api/v1/graphs"),
        ("GET", "/api/v1/graphs/{graph}/versions"),
        ("GET", "/api/v1/graphs/{graph}/versions/{version}"),
        ("GET", "/api/v1/graphs/{graph}/diff"),
        ("POST", "/api/v1/graphs/{graph}/versions/{version}/pin"),
        ("POST", "/api/v1/graphs/{graph}/versions/{version}/rollback"),
    }
    assert operations == expected
    for path, methods in spec["paths"].items():
        for op in methods.values():
            secured = bool(op.get("security"))
            assert secured == (not path.endswith(("/health", "/ready"))), path
    submit = spec["paths"]["/api/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobSubmission")
    assert {"200", "201", "401", "403", "404", "409", "413", "422"} <= set(submit["responses"])
    assert submit["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/SubmittedJob")
    assert {"Job", "Feedback", "JobDetail", "FeedbackResult", "ServiceTask", "ApiError"} <= set(spec["components"]["schemas"])
    # /docs renders the spec on this server: every operation, no external script
    docs = c.get("/docs")
    assert docs.status_code == 200
    for _, path in expected:
        assert path.replace("{", "").replace("}", "") in docs.text.replace("{", "").replace("}", "")
    assert not re.findall(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", docs.text)


def _call(c: TestClient, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
    concrete = path.replace("{job_id}", "1").replace("{version}", "1").replace("{name}", "aime").replace("{graph}", "aime")
    concrete = concrete.replace("{plan_id}", "abcdef")
    params = {"a": 1, "b": 1} if concrete.endswith("/diff") else None
    return c.request(method, concrete, headers=headers, params=params, json={} if method == "POST" else None)


def test_every_endpoint_needs_a_valid_token_and_writes_need_write_scope(api: Api) -> None:
    c = api.client
    spec = c.get("/openapi.json").json()
    secured = [(m.upper(), p) for p, methods in spec["paths"].items() for m, op in methods.items() if op.get("security")]
    assert len(secured) == 17
    revoked_secret = TokenStore(api.storage).create("old", "alice", "write")[1]
    TokenStore(api.storage).revoke("old")
    for method, path in secured:
        for headers in (
            None,
            {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
            api.h("allot_not-a-real-token"),
            api.h("not even the prefix"),
            api.h(revoked_secret),
        ):
            response = _call(c, method, path, headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
            assert "token" in response.json()["detail"]
        # the unversioned alias is guarded alike
        assert _call(c, method, path.replace("/api/v1/", "/api/"), None).status_code == 401
        with_read = _call(c, method, path, api.h(api.alice_read))
        if method == "POST":
            assert with_read.status_code == 403, (path, with_read.text)
            assert "write-scope" in with_read.json()["detail"]
            assert 'error="insufficient_scope"' in with_read.headers["www-authenticate"]
        else:
            assert with_read.status_code not in (401, 403), (path, with_read.text)
    assert api.job_count() == 0


# -- jobs --------------------------------------------------------------------------------------------------------


def test_submit_read_list_and_the_job_runs(api: Api) -> None:
    c = api.client
    job = api.submit(api.alice, "aime24-03", priority=3)
    assert job["created"] is True and job["dispatched"] is True
    assert job["state"] == "queued" and job["owner"] == "alice" and job["task"] == "aime" and job["priority"] == 3
    assert job["budget_limit"] == BUDGET.limit and job["budget_unit"] == "tokens"
    assert api.messages() == 1, "one message went to the broker"
    with api.storage.transaction() as session:
        row = session.get(JobRow, job["id"])
        assert row is not None and row.max_concurrent == 2 and row.dispatched_at is not None  # the token's limit
    smaller = api.submit(api.bob, "aime24-04", budget={"limit": 200_000})
    assert smaller["budget_limit"] == 200_000 and smaller["owner"] == "bob" and smaller["dispatched"] is True
    with api.storage.transaction() as session:
        row = session.get(JobRow, smaller["id"])
        assert row is not None and row.max_concurrent is None

    queued = c.get(f"/api/v1/jobs/{job['id']}", headers=api.h(api.alice_read)).json()
    assert queued["state"] == "queued" and queued["stage_outputs"] == [] and queued["feedback"] == []
    assert drain(JobQueue(api.storage)) == [job["id"], smaller["id"]]  # priority first

    done = c.get(f"/api/v1/jobs/{job['id']}", headers=api.h(api.alice_read))
    assert done.status_code == 200
    body = done.json()
    assert body["state"] == "succeeded", body["error"]
    assert [s["stage"] for s in body["stage_outputs"]] == ["answer"] and body["stage_outputs"][0]["output"]
    assert body["result"]["answer"] is not None and body["result"]["plan"]["plan_id"] == body["plan_id"]
    assert 0 < body["cost"]["prompt_tokens"] + body["cost"]["output_tokens"] <= BUDGET.limit
    assert body["latency_s"] > 0 and body["score"] in (0.0, 1.0) and body["attempt"] == 1
    assert [f["source"] for f in body["feedback"]] == ["result"]
    # the old, unversioned path answers the same
    assert c.get(f"/api/jobs/{job['id']}", headers=api.h(api.alice)).json() == body

    more = [api.submit(api.alice, f"aime24-{n:02d}")["id"] for n in (5, 6, 7)]
    listed = c.get("/api/v1/jobs", headers=api.h(api.alice_read)).json()
    assert [j["id"] for j in listed] == [*reversed(more), job["id"]], "own jobs only, newest first"
    page = c.get("/api/v1/jobs", params={"limit": 2}, headers=api.h(api.alice)).json()
    assert [j["id"] for j in page] == [more[2], more[1]]
    older = c.get("/api/v1/jobs", params={"limit": 2, "before_id": more[1]}, headers=api.h(api.alice)).json()
    assert [j["id"] for j in older] == [more[0], job["id"]]
    done_only = c.get("/api/v1/jobs", params={"state": "succeeded"}, headers=api.h(api.alice)).json()
    assert [j["id"] for j in done_only] == [job["id"]]
    assert c.get("/api/v1/jobs", params={"task": "other"}, headers=api.h(api.alice)).json() == []
    assert len(c.get("/api/v1/jobs", params={"task": "aime"}, headers=api.h(api.alice)).json()) == 4
    assert [j["id"] for j in c.get("/api/v1/jobs", headers=api.h(api.bob)).json()] == [smaller["id"]]


def test_other_users_jobs_are_not_found(api: Api) -> None:
    c = api.client
    job = api.submit(api.alice)
    drain(JobQueue(api.storage))
    missing = c.get("/api/v1/jobs/999999", headers=api.h(api.bob))
    for method, path, body in [
        ("GET", f"/api/v1/jobs/{job['id']}", None),
        ("POST", f"/api/v1/jobs/{job['id']}/cancel", None),
        ("POST", f"/api/v1/jobs/{job['id']}/feedback", {"score": 0.0}),
    ]:
        response = c.request(method, path, json=body, headers=api.h(api.bob))
        assert response.status_code == 404, (path, response.text)
        assert response.json()["detail"] == f"no job {job['id']}", "the same answer as for a job that does not exist"
    assert missing.status_code == 404 and missing.json()["detail"] == "no job 999999"
    assert c.get("/api/v1/jobs", headers=api.h(api.bob)).json() == []
    assert JobQueue(api.storage).feedback(job["id"])[-1].source == "result", "bob's feedback was not stored"


def test_cancel(api: Api) -> None:
    c = api.client
    job = api.submit(api.alice)
    cancelled = c.post(f"/api/v1/jobs/{job['id']}/cancel", headers=api.h(api.alice))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = c.post(f"/api/v1/jobs/{job['id']}/cancel", headers=api.h(api.alice))
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert drain(JobQueue(api.storage)) == []


def test_idempotency(api: Api) -> None:
    c = api.client
    body = {"task": "aime", "input": {"example": "aime24-02"}, "idempotency_key": "order-17"}
    first = c.post("/api/v1/jobs", json=body, headers=api.h(api.alice))
    assert first.status_code == 201 and first.json()["created"] is True
    again = c.post("/api/v1/jobs", json=body, headers=api.h(api.alice))
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.json()["created"] is False and again.json()["dispatched"] is None
    assert api.messages() == 1, "a repeat sends nothing"
    # the header works alike, and must agree with the body
    plain = {"task": "aime", "input": {"example": "aime24-02"}}
    by_header = c.post("/api/v1/jobs", json=plain, headers={**api.h(api.alice), "Idempotency-Key": "order-17"})
    assert by_header.status_code == 200 and by_header.json()["id"] == first.json()["id"]
    new_by_header = c.post("/api/v1/jobs", json=plain, headers={**api.h(api.alice), "Idempotency-Key": "order-18"})
    assert new_by_header.status_code == 201 and new_by_header.json()["idempotency_key"] == "order-18"
    before = api.job_count()
    differ = c.post("/api/v1/jobs", json=body, headers={**api.h(api.alice), "Idempotency-Key": "order-99"})
    assert differ.status_code == 422 and "differ" in differ.json()["detail"]
    stolen = c.post("/api/v1/jobs", json=body, headers=api.h(api.bob))
    assert stolen.status_code == 409 and "another user" in stolen.json()["detail"]
    changed = c.post("/api/v1/jobs", json={**body, "input": {"example": "aime24-05"}}, headers=api.h(api.alice))
    assert changed.status_code == 409 and "another task or input" in changed.json()["detail"]
    assert api.job_count() == before == 2


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


BAD_SUBMISSIONS: list[tuple[str, Any, int, str]] = [
    ("unknown task", {"task": "nope", "input": {"example": "aime24-01"}}, 404, "unknown task 'nope': registered tasks are aime"),
    ("unknown example", {"task": "aime", "input": {"example": "nope"}}, 422, "has no example 'nope'"),
    ("missing input field", {"task": "aime", "input": {"inputs": {"text": "hi"}}}, 422, "reads input field(s) question"),
    ("unknown input field", {"task": "aime", "input": {"question": "hi"}}, 422, "unknown field(s) in the job's input: question"),
    (
        "budget too small",
        {"task": "aime", "input": {"example": "aime24-01"}, "budget": {"limit": 10}},
        422,
        "too small for any plan",
    ),
    ("budget over task's", {"task": "aime", "input": {"example": "aime24-01"}, "budget": {"limit": 1e9}}, 422, "cannot exceed"),
    ("budget zero", {"task": "aime", "input": {"example": "aime24-01"}, "budget": {"limit": 0}}, 422, "body.budget.limit"),
    (
        "budget unit",
        {"task": "aime", "input": {"example": "aime24-01"}, "budget": {"limit": 1, "unit": "gold"}},
        422,
        "body.budget.unit",
    ),
    ("unknown plan", {"task": "aime", "input": {"example": "aime24-01"}, "plan_id": "0" * 64}, 422, "no plan with id"),
    ("bad plan id", {"task": "aime", "input": {"example": "aime24-01"}, "plan_id": "xyz"}, 422, "body.plan_id"),
    ("unknown version", {"task": "aime", "input": {"example": "aime24-01"}, "graph_version": 99}, 422, "no version 99"),
    (
        "plan and version",
        {"task": "aime", "input": {"example": "aime24-01"}, "plan_id": "a" * 64, "graph_version": 1},
        422,
        "not both",
    ),
    ("missing task", {"input": {"example": "aime24-01"}}, 422, "body.task: Field required"),
    ("input not an object", {"task": "aime", "input": ["aime24-01"]}, 422, "body.input"),
    ("extra field", {"task": "aime", "input": {"example": "aime24-01"}, "owner": "mallory"}, 422, "body.owner: Extra inputs"),
    ("priority type", {"task": "aime", "input": {"example": "aime24-01"}, "priority": "high"}, 422, "body.priority"),
    ("priority range", {"task": "aime", "input": {"example": "aime24-01"}, "priority": 2**40}, 422, "body.priority"),
    (
        "key with spaces",
        {"task": "aime", "input": {"example": "aime24-01"}, "idempotency_key": "a b"},
        422,
        "body.idempotency_key",
    ),
    ("NUL in task", {"task": "ai\x00me", "input": {"example": "aime24-01"}}, 422, "body.task"),
    ("deep input", {"task": "aime", "input": {"inputs": {"question": _nested(40)}}}, 422, "nested deeper"),
    ("not JSON", b"{not json", 422, "body"),
    ("body too large", {"task": "aime", "input": {"inputs": {"question": "x" * 70_000}}}, 413, "at most 65536 bytes"),
]


def test_bad_submissions_are_refused_and_nothing_is_stored(api: Api) -> None:
    headers = api.h(api.alice)
    for case, body, status, message in BAD_SUBMISSIONS:
        if isinstance(body, bytes):
            response = api.client.post("/api/v1/jobs", content=body, headers={**headers, "Content-Type": "application/json"})
        else:
            response = api.client.post("/api/v1/jobs", json=body, headers=headers)
        assert response.status_code == status, (case, response.text)
        assert message in response.json()["detail"], (case, response.json())
        assert api.job_count() == 0 and api.messages() == 0, case


def test_non_finite_numbers_and_streamed_bodies(api: Api) -> None:
    """JSON with NaN (Python's json accepts it) is refused; a streamed body is held to the size limit too."""
    headers = {**api.h(api.alice), "Content-Type": "application/json"}
    nan_input = b'{"task": "aime", "input": {"inputs": {"question": "q"}, "x": NaN}}'
    response = api.client.post("/api/v1/jobs", content=nan_input, headers=headers)
    assert response.status_code == 422 and "finite" in response.json()["detail"]
    nan_budget = b'{"task": "aime", "input": {"example": "aime24-01"}, "budget": {"limit": Infinity}}'
    response = api.client.post("/api/v1/jobs", content=nan_budget, headers=headers)
    assert response.status_code == 422 and "body.budget.limit" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b'{"task": "aime", "input": {"inputs": {"question": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}}}'

    streamed = api.client.post("/api/v1/jobs", content=chunks(), headers=headers)
    assert streamed.status_code == 413 and "too large" in streamed.json()["detail"]
    assert api.job_count() == 0


def test_body_limit_is_configurable(storage: SQLStorage, tmp_path: Path) -> None:
    api = make_api(storage, tmp_path, max_body_bytes=2048)
    body = {"task": "aime", "input": {"inputs": {"question": "x" * 3000}}}
    response = api.client.post("/api/v1/jobs", json=body, headers=api.h(api.alice))
    assert response.status_code == 413 and "at most 2048 bytes" in response.json()["detail"]
    assert api.submit(api.alice)["created"]


def test_a_dead_broker_does_not_fail_a_submission(storage: SQLStorage, tmp_path: Path) -> None:
    api = make_api(storage, tmp_path, broker=DEAD_BROKER)
    c = api.client
    dispatcher = api.client.app.state.jobs.dispatcher()  # type: ignore[attr-defined]
    attempts = []
    real_send = dispatcher.send

    def counted_send(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        real_send(*args, **kwargs)

    dispatcher.send = counted_send
    started = time.perf_counter()
    response = c.post("/api/v1/jobs", json={"task": "aime", "input": {"example": "aime24-01"}}, headers=api.h(api.alice))
    assert response.status_code == 201, response.text
    assert response.json()["dispatched"] is False and response.json()["state"] == "queued"
    assert "not sent" in response.headers["x-allot-warning"]
    second = api.submit(api.alice, "aime24-02")
    assert second["dispatched"] is False
    assert len(attempts) == 1, "while the broker is known down, submissions do not wait for it again"
    assert time.perf_counter() - started < 30
    # stored, never sent: the reaper re-sends both once they are older than redispatch_after_s
    report = JobQueue(storage).reap(stale_after_s=30, redispatch_after_s=0.0)
    assert set(report.redispatch) == {response.json()["id"], second["id"]}
    ready = c.get("/api/v1/ready")
    assert ready.status_code == 503 and ready.json()["database"] == "ok"
    assert ready.json()["reason"].startswith("broker: cannot reach the broker at redis://127.0.0.1:1/0")
    assert drain(JobQueue(storage)) == [response.json()["id"], second["id"]], "the jobs run once a worker sees them"


# -- feedback and learning ---------------------------------------------------------------------------------------


def test_feedback_moves_the_graph_after_learn_every(storage: SQLStorage, tmp_path: Path) -> None:
    api = make_api(storage, tmp_path, learn_every=3)
    c = api.client
    first, second = api.submit(api.alice, "aime24-01"), api.submit(api.alice, "aime24-02")
    queued = api.submit(api.alice, "aime24-03")
    queue = JobQueue(storage)
    assert queue.cancel(queued["id"]).state.value == "cancelled"
    drain(queue)
    assert len(storage.get_graph_versions("aime")) == 1, "two scored results: one short of learn_every"
    url = f"/api/v1/jobs/{first['id']}/feedback"
    for body, status, message in [
        ({}, 422, "either score"),
        ({"score": 0.5, "answer": "204"}, 422, "not both"),
        ({"score": 1.5}, 422, "body.score"),
        ({"score": -0.1}, 422, "body.score"),
        ({"answer": ""}, 422, "body.answer"),
        ({"score": 1, "rating": 5}, 422, "body.rating"),
    ]:
        response = c.post(url, json=body, headers=api.h(api.alice))
        assert response.status_code == status and message in response.json()["detail"], (body, response.text)
    not_done = c.post(f"/api/v1/jobs/{queued['id']}/feedback", json={"score": 1.0}, headers=api.h(api.alice))
    assert not_done.status_code == 409 and "feedback is for succeeded jobs" in not_done.json()["detail"]
    assert c.post(url, json={"score": 1.0}, headers=api.h(api.alice_read)).status_code == 403
    assert [f.source for f in queue.feedback(first["id"])] == ["result"], "no refused feedback was stored"

    answer = queue.get(first["id"]).result["answer"]  # type: ignore[index]
    made = c.post(url, json={"answer": str(answer), "comment": "checked by hand"}, headers=api.h(api.alice))
    assert made.status_code == 201, made.text
    out = made.json()
    assert (
        out["feedback"]["score"] == 1.0
        and out["feedback"]["source"] == "user"
        and out["feedback"]["comment"] == "checked by hand"
    )
    versions = storage.get_graph_versions("aime")
    assert len(versions) == 2 and out["graph_version"]["version"] == 2
    assert out["graph_version"]["version_id"] == versions[1].version_id and out["graph_version"]["cause"] == versions[1].cause
    assert out["graph_version"]["cause"].startswith("feedback: 2 scored job(s)")
    assert out["feedback"]["applied_version_id"] is None  # pending when stored; applied by that version
    assert {f.applied_version_id for f in queue.feedback(first["id"])} == {versions[1].version_id}
    detail = c.get(f"/api/v1/jobs/{first['id']}", headers=api.h(api.alice)).json()
    assert [f["source"] for f in detail["feedback"]] == ["result", "user"]
    later = c.post(f"/api/v1/jobs/{second['id']}/feedback", json={"score": 0.2}, headers=api.h(api.alice)).json()
    assert later["graph_version"] is None and later["feedback"]["score"] == 0.2


# -- tasks, studies, plans, graphs ------------------------------------------------------------------------------


def test_tasks(api: Api) -> None:
    c = api.client
    tasks = c.get("/api/v1/tasks", headers=api.h(api.alice_read)).json()
    assert [t["name"] for t in tasks] == ["aime"] and tasks[0]["budget"] == {"limit": BUDGET.limit, "unit": "tokens"}
    task = c.get("/api/v1/tasks/aime", headers=api.h(api.alice_read)).json()
    assert task["graph"] == "aime" and task["backend"] == "replay" and task["learn_every"] == 8
    assert task["current_version"]["version"] == 1 and task["current_version"]["cause"] == "initial"
    unknown = c.get("/api/v1/tasks/nope", headers=api.h(api.alice_read))
    assert unknown.status_code == 404 and unknown.json()["detail"] == "unknown task 'nope': registered tasks are aime"


def test_studies_plans_graphs_pin_and_rollback(api: Api) -> None:
    c, read = api.client, api.h(api.alice_read)
    study = create_study(
        storage=api.storage,
        environment=ReplayEnvironment(benchmark="aime24", orderings=1, seed=0),
        budget=Budget(limit=500),
        strategy="insight",
        name="s1",
    )
    study.optimize(4)
    studies = c.get("/api/v1/studies", headers=read).json()
    assert [s["name"] for s in studies] == ["s1"] and studies[0]["trials"] == 4
    assert studies[0]["best"]["plan_id"] == study.best_trial.plan_id
    detail = c.get("/api/v1/studies/s1", headers=read).json()
    assert detail["study"]["name"] == "s1" and "trials" not in detail and detail["best_plans"]
    trials = c.get("/api/v1/studies/s1/trials", headers=read).json()
    assert [t["number"] for t in trials] == [t.number for t in study.trials]
    plan = c.get(f"/api/v1/plans/{study.best_trial.plan_id[:10]}", headers=read).json()
    assert plan["plan_id"] == study.best_trial.plan_id and plan["summary"] == study.best_trial.plan.summary()
    for path in (
        "/api/v1/studies/nope",
        "/api/v1/studies/nope/trials",
        "/api/v1/plans/ffffffffffff",
        "/api/v1/graphs/nope/versions",
    ):
        assert c.get(path, headers=read).status_code == 404, path

    graphs = c.get("/api/v1/graphs", headers=read).json()
    assert [g["graph"] for g in graphs] == ["aime"] and graphs[0]["latest"]["version"] == 1
    # pin and roll back: a write-scope token, the legacy write token; not a read-scope token
    path = "/api/v1/graphs/aime/versions/1"
    assert c.post(f"{path}/pin", json={"pinned": True}, headers=read).status_code == 403
    pinned = c.post(f"{path}/pin", json={"pinned": True}, headers=api.h(api.bob))
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    rolled = c.post(f"{path}/rollback", headers=api.h(LEGACY))
    assert rolled.status_code == 200 and rolled.json()["version"] == 2 and rolled.json()["cause"] == "rollback to v1"
    assert c.post(f"{path}/pin", json={"pinned": False}, headers=api.h(LEGACY)).json()["pinned"] is False
    assert c.post("/api/graphs/aime/versions/9/pin", headers=api.h(api.bob)).status_code == 404
    versions = c.get("/api/v1/graphs/aime/versions", headers=read).json()
    assert [v["version"] for v in versions] == [1, 2] and [v["pinned"] for v in versions] == [False, False]
    one = c.get("/api/v1/graphs/aime/versions/2", headers=read).json()
    assert one["definition"] == api.storage.get_graph_versions("aime")[1].definition and one["stages"][0]["stage"] == "answer"
    diff = c.get("/api/v1/graphs/aime/diff", params={"a": 1, "b": 2}, headers=read).json()
    assert diff["a"]["version"] == 1 and [v["version"] for v in diff["between"]] == [2]
    # the HTML form takes a write-scope API token in its token field as well as the legacy token
    form = c.post("/graphs/aime/versions/2/pin", data={"pinned": "1", "token": api.bob}, follow_redirects=False)
    assert form.status_code == 303 and api.storage.get_graph_versions("aime")[1].pinned
    refused = c.post("/graphs/aime/versions/2/pin", data={"pinned": "0", "token": api.alice_read}, follow_redirects=False)
    assert refused.status_code == 403 and "read-only" in refused.text
    assert api.storage.get_graph_versions("aime")[1].pinned


# -- secrets -----------------------------------------------------------------------------------------------------


def test_no_token_secret_in_the_database_or_the_logs(
    storage: SQLStorage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api = make_api(storage, tmp_path, learn_every=2)
    c = api.client
    job = api.submit(api.alice, idempotency_key="k-1")
    api.submit(api.bob)
    drain(JobQueue(storage))
    c.post(f"/api/v1/jobs/{job['id']}/feedback", json={"score": 1.0}, headers=api.h(api.alice))
    c.get("/api/v1/jobs", headers=api.h(api.alice_read))
    c.get("/api/v1/jobs", headers=api.h(api.alice + "x"))  # a near miss is not logged either
    c.post("/api/v1/jobs", json={"task": "aime", "input": {"example": "aime24-01"}}, headers=api.h(api.alice_read))
    TokenStore(storage).revoke("bob-write")
    c.get("/api/v1/jobs", headers=api.h(api.bob))
    secrets = [api.alice, api.alice_read, api.bob]
    assert all(s.startswith(TOKEN_PREFIX) and len(s) > 40 for s in secrets)
    with storage.transaction() as session:
        tokens = session.exec(select(TokenRow)).all()
        jobs = session.exec(select(JobRow)).all()
        stored = " ".join(repr(row.model_dump()) for row in [*tokens, *jobs])
    assert len(tokens) == 3 and len(jobs) == 2
    for secret in secrets:
        assert secret not in stored and secret[len(TOKEN_PREFIX) :][:20] not in stored
        assert secret not in caplog.text
    assert {row.token_hash for row in tokens} == {__import__("hashlib").sha256(s.encode()).hexdigest() for s in secrets}
    assert "job " in caplog.text, "the API did log (without secrets)"
    listed = TokenStore(storage).list()
    assert [t.name for t in listed] == ["alice-write", "alice-read", "bob-write"] and listed[2].revoked
    assert not any(secret in repr(t.model_dump()) for t in listed for secret in secrets)


# -- the CLI -----------------------------------------------------------------------------------------------------


def test_cli_token_create_list_revoke(tmp_path: Path) -> None:
    from planner.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(app, ["token", *args, "--database", url])

    created = run("create", "ci", "--owner", "alice", "--scope", "write", "--max-concurrent", "3")
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith(TOKEN_PREFIX)
    storage = SQLStorage(url)
    try:
        token = TokenStore(storage).verify(secret)
        assert token is not None and (token.owner, token.scope.value, token.max_concurrent) == ("alice", "write", 3)
        listed = run("list")
        assert listed.exit_code == 0 and "ci" in listed.output and "alice" in listed.output and "write" in listed.output
        assert secret not in listed.output
        for args, message in [
            (("create", "ci", "--owner", "bob"), "already exists"),
            (("create", "x y", "--owner", "bob"), "invalid token name"),
            (("create", "x", "--owner", "bob", "--scope", "admin"), "invalid scope 'admin'"),
            (("revoke", "nope"), "no token named 'nope'"),
        ]:
            bad = run(*args)
            assert bad.exit_code == 1 and "error:" in bad.output and message in bad.output, (args, bad.output)
        revoked = run("revoke", "ci")
        assert revoked.exit_code == 0 and "revoked" in revoked.output
        assert TokenStore(storage).verify(secret) is None
        assert run("revoke", "ci").exit_code == 0  # again: nothing changes
    finally:
        storage.close()


# -- fuzzing against the published spec ---------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(storage: SQLStorage, tmp_path: Path) -> None:
    """Every operation of /openapi.json, authenticated with a write token: 25 valid requests generated from
    the spec (positive) and 25 that break it (negative) per operation; no response may be a 5xx, and every
    response's status and body must be declared in the spec."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    api = make_api(storage, tmp_path)
    job = api.submit(api.alice)
    drain(JobQueue(storage))
    api.submit(api.alice, "aime24-02")
    assert job["id"] == 1  # so that generated small ids hit real jobs too
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)
    headers = api.h(api.alice)
    # no 5xx; and the spec is accurate: every status and body the app answered is one the spec declares
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    failures, ran = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=25, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                response = case.call(headers=headers)
                case.validate_response(response, checks=checks, headers=headers)

            try:
                fuzz()
            except Unsatisfiable:  # nothing to break: no parameters, no body
                assert mode is GenerationMode.NEGATIVE and operation.path.endswith(("/health", "/ready")), operation.path
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
        ran += 1
    assert ran == 19
    assert not failures, "\n\n".join(failures)
