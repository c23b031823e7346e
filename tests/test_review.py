"""The review app's JSON API, write-token checks and pages (FastAPI's TestClient), the drawings, and the
``allot graph`` commands, against a real SQLite database holding a real replay study and a learned graph
(``review_sqlite_template`` in conftest.py). The browser tests are in test_review_browser.py.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from graphs.drawing import plan_stage_drawing, probabilistic_dot, probabilistic_drawing, stack, svg_to_png
from planner import views
from planner.storage import BaseStorage, InMemoryStorage, get_storage
from planner.study import load_study
from planner.trial import TrialState
from workers.review import create_review_app
from workers.review._app import plotly_js_path

TOKEN = "s3cret-review-token"
"""The server's legacy write token (pin and roll back)."""
ALLOT = Path(sys.executable).with_name("allot")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def db_url(tmp_path: Path, review_sqlite_template: Path) -> str:
    path = tmp_path / "review.db"
    shutil.copy(review_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def storage(db_url: str) -> Iterator[BaseStorage]:
    storage = get_storage(db_url)
    yield storage
    storage.close()


@pytest.fixture
def read_token(storage: BaseStorage) -> str:
    """A read-scope API token (``allot token create``): the JSON API needs one."""
    from workers.tokens import TokenStore

    return TokenStore(storage).create("reviewer", "reviewer", "read")[1]  # type: ignore[arg-type]


@pytest.fixture
def client(storage: BaseStorage, read_token: str) -> TestClient:
    """The review app as an API client with a read-scope token sees it."""
    return TestClient(create_review_app(storage, TOKEN), headers={"Authorization": f"Bearer {read_token}"})


@pytest.fixture
def anonymous(storage: BaseStorage) -> TestClient:
    """The review app as a browser sees it: no token."""
    return TestClient(create_review_app(storage, TOKEN))


def _fresh(db_url: str) -> BaseStorage:
    """Another storage on the same database: what persisted, not what one object remembers."""
    return get_storage(db_url)


# -- JSON API --------------------------------------------------------------------------------------------------


def test_studies_and_trials_match_the_study(client: TestClient, storage: BaseStorage) -> None:
    studies = {s["name"]: s for s in client.get("/api/studies").json()}
    assert set(studies) == {"aime", "graphs"}
    for name, summary in studies.items():
        study = load_study(name, storage)
        trials = study.trials
        assert summary["trials"] == len(trials)
        assert summary["evaluated"] == len(study.evaluated_trials)
        assert summary["best"]["number"] == study.best_trial.number
        assert summary["best"]["score"] == pytest.approx(study.best_trial.score)
        assert summary["best"]["plan_summary"] == study.best_trial.plan.summary()
        rows = client.get(f"/api/studies/{name}/trials").json()
        assert [r["number"] for r in rows] == [t.number for t in trials]
        assert [r["plan_id"] for r in rows] == [t.plan_id for t in trials]
        assert [r["state"] for r in rows] == [t.state.value for t in trials]
        detail = client.get(f"/api/studies/{name}").json()
        assert detail["pareto"] == [t.number for t in study.pareto_trials()]
        assert detail["best_plans"][0]["number"] == study.best_trial.number
        best_so_far = [p["best"] for p in detail["best_so_far"]]
        assert best_so_far == sorted(best_so_far) and best_so_far[-1] == pytest.approx(study.best_trial.score)
    # the planner LLM's own cost is reported beside the evaluation's
    graphs = studies["graphs"]
    planner_tokens = sum(t.planner_cost.tokens for t in load_study("graphs", storage).trials)
    assert planner_tokens > 0 and graphs["planner_cost"]["tokens"] == pytest.approx(planner_tokens)
    assert graphs["evaluation_cost"]["in_unit"] > 0
    assert studies["aime"]["planner_cost"]["tokens"] == 0


def test_plans_and_graph_versions(client: TestClient, storage: BaseStorage) -> None:
    best = load_study("aime", storage).best_trial
    plan = client.get(f"/api/plans/{best.plan_id[:10]}").json()
    assert plan["plan_id"] == best.plan_id and plan["summary"] == best.plan.summary()
    assert client.get("/api/plans/ffffffffffff").status_code == 404
    versions = storage.get_graph_versions("graphs")
    assert len(versions) >= 3
    listed = client.get("/api/graphs/graphs/versions").json()
    assert [v["version"] for v in listed] == list(range(1, len(versions) + 1))
    assert [v["cause"] for v in listed] == [v.cause for v in versions]
    one = client.get("/api/graphs/graphs/versions/2").json()
    assert one["definition"] == versions[1].definition
    assert [s["stage"] for s in one["stages"]] == ["stage1", "stage2"]
    diff = client.get("/api/graphs/graphs/diff", params={"a": 1, "b": 2}).json()
    before, after = views.graph_stages(versions[0].definition), views.graph_stages(versions[1].definition)
    for stage, a, b in zip(diff["stages"], before, after, strict=True):
        expected = a.diff(b)
        assert stage["stage"] == b.stage
        edges = {(e["source"], e["target"]) for e in stage["edge_changes"]}
        assert edges == {(e.source, e.target) for e in expected.edge_changes}
        assert {c["id"] for c in stage["slot_changes"]} == {c.id for c in expected.slot_changes}
    assert [v["version"] for v in diff["between"]] == [2] and diff["between"][0]["cause"] == versions[1].cause
    assert client.get("/api/graphs/nope/versions").status_code == 404
    assert client.get("/api/graphs/graphs/versions/99").status_code == 404
    assert client.get("/api/studies/nope").json() == {"detail": "no study named 'nope'"}


def _state(db_url: str) -> list[tuple[int, bool, str]]:
    storage = _fresh(db_url)
    try:
        return [(v.version, v.pinned, v.cause) for v in storage.get_graph_versions("graphs")]
    finally:
        storage.close()


def test_writes_need_the_token(client: TestClient, anonymous: TestClient, db_url: str, storage: BaseStorage) -> None:
    from workers.tokens import TokenStore

    before = _state(db_url)
    for path in ("/api/graphs/graphs/versions/2/pin", "/api/graphs/graphs/versions/1/rollback"):
        missing = anonymous.post(path, json={"pinned": True})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = anonymous.post(path, json={"pinned": True}, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid or revoked token"
        assert anonymous.post(path, json={"pinned": True, "token": TOKEN}).status_code == 401  # the body is no credential
        read_only = client.post(path, json={"pinned": True})  # a read-scope API token
        assert read_only.status_code == 403 and "write-scope" in read_only.json()["detail"]
    form = anonymous.post("/graphs/graphs/versions/2/pin", data={"pinned": "1", "token": "wrong"}, follow_redirects=False)
    assert form.status_code == 403 and "wrong write token" in form.text
    assert anonymous.post("/graphs/graphs/versions/2/pin", data={"pinned": "1"}, follow_redirects=False).status_code == 401
    reader = TokenStore(storage).create("reader-2", "someone", "read")[1]  # type: ignore[arg-type]
    form = anonymous.post("/graphs/graphs/versions/2/pin", data={"pinned": "1", "token": reader}, follow_redirects=False)
    assert form.status_code == 403 and "read-only" in form.text
    no_legacy = TestClient(create_review_app(storage, None))  # the legacy token is then just a wrong token
    denied = no_legacy.post("/api/graphs/graphs/versions/2/pin", headers={"Authorization": f"Bearer {TOKEN}"})
    assert denied.status_code == 401 and "invalid" in denied.json()["detail"]
    assert _state(db_url) == before, "a refused write changed nothing"


def test_pin_and_rollback_persist(client: TestClient, db_url: str) -> None:
    before = _state(db_url)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    pinned = client.post("/api/graphs/graphs/versions/2/pin", json={"pinned": True}, headers=auth)
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    assert [p for _, p, _ in _state(db_url)] == [v == 2 for v, _, _ in before]
    assert client.post("/api/graphs/graphs/versions/2/pin", json={"pinned": False}, headers=auth).json()["pinned"] is False
    assert _state(db_url) == before
    # a form post with the token field redirects to the graph page
    form = client.post("/graphs/graphs/versions/1/pin", data={"pinned": "1", "token": TOKEN}, follow_redirects=False)
    assert form.status_code == 303 and form.headers["location"] == "/graphs/graphs/versions/1"
    assert _state(db_url)[0][1] is True
    rolled = client.post("/api/graphs/graphs/versions/1/rollback", headers=auth).json()
    assert rolled["version"] == len(before) + 1 and rolled["cause"] == "rollback to v1"
    storage = _fresh(db_url)
    try:
        versions = storage.get_graph_versions("graphs")
        assert versions[-1].definition == versions[0].definition
        assert versions[-1].parent_id == versions[0].version_id
    finally:
        storage.close()
    form = client.post("/graphs/graphs/versions/2/rollback", data={"token": TOKEN}, follow_redirects=False)
    assert form.status_code == 303 and form.headers["location"] == f"/graphs/graphs/versions/{len(before) + 2}"


# -- pages ---------------------------------------------------------------------------------------------------------


def _external_urls(html: str) -> list[str]:
    urls = re.findall(r"""(?:src|href|action)\s*=\s*["']((?:https?:)?//[^"']+)""", html)
    return [u for u in urls if not re.match(r"(https?:)?//(127\.0\.0\.1|localhost)[:/]", u)]


def test_pages_render_offline(client: TestClient, storage: BaseStorage) -> None:
    best = load_study("aime", storage).best_trial
    pages = {
        "/": ["aime", "graphs", "No jobs yet"],
        "/studies/aime": ["aime", best.plan.summary(), "plot-history", "plot-scatter", "/static/plotly.min.js"],
        "/studies/graphs": ["graphs", "planner LLM cost", "learned graph"],
        f"/plans/{best.plan_id}": ['class="allot-graph"', best.plan.stages[0].nodes[0].model, "decision"],
        "/graphs": ["graphs"],
        "/graphs/graphs": ["version", "why:", 'class="allot-graph"', "prev-version"],
        "/graphs/graphs/versions/1": ["version 1 of", "next-version", "solver"],
        "/graphs/graphs/diff?a=1&b=2": ["v1 → v2", storage.get_graph_versions("graphs")[1].cause[:40]],
        "/jobs": ["No jobs yet"],
    }
    for path, expected in pages.items():
        response = client.get(path)
        assert response.status_code == 200, path
        for text in expected:
            assert text in response.text, (path, text)
        assert _external_urls(response.text) == [], path
    assert client.get("/studies/nope").status_code == 404
    assert client.get("/api/docs").status_code == 404  # Swagger UI would load from a CDN: /docs is rendered here
    assert client.get("/api/openapi.json").json()["info"]["title"] == "Allot"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/api/v1/studies/{name}/trials" in docs.text and _external_urls(docs.text) == []
    # a version some other writer stored in another format is shown raw, not drawn
    storage.add_graph_version("other", {"format": "something/1", "weights": [1, 2]}, "imported")
    other = client.get("/graphs/other")
    assert other.status_code == 200 and "cannot be drawn" in other.text and "weights" in other.text
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and js.content == plotly_js_path().read_bytes()
    assert client.get("/static/review.js").status_code == 200 and client.get("/static/nope.js").status_code == 404


def test_jobs_from_the_job_table(client: TestClient, storage: BaseStorage) -> None:
    from sqlmodel import Session

    from planner.storage.tables import JobRow

    assert client.get("/api/jobs").json() == []
    plan_id = load_study("aime", storage).best_trial.plan_id
    with Session(storage.engine) as session:  # type: ignore[attr-defined]
        session.add(
            JobRow(
                state="succeeded",
                input={"question": "1+1?"},
                owner="reviewer",  # the read token's owner: the API lists its caller's jobs only
                plan_id=plan_id,
                result={"answer": "2", "stages": {"answer": {"output": "2", "votes": {"2": 3}}}},
                budget_limit=500.0,
                budget_unit="agenttts",
                flops=1.0e12,
                prompt_tokens=100.0,
                output_tokens=50.0,
                usd=0.001,
            )
        )
        session.commit()
    jobs = client.get("/api/jobs").json()
    assert len(jobs) == 1 and jobs[0]["state"] == "succeeded"
    assert jobs[0]["cost"]["prompt_tokens"] + jobs[0]["cost"]["output_tokens"] == 150.0
    job = client.get(f"/api/jobs/{jobs[0]['id']}").json()
    assert job["stage_outputs"] == [{"stage": "answer", "output": {"output": "2", "votes": {"2": 3}}}]
    page = client.get(f"/jobs/{jobs[0]['id']}").text
    assert "succeeded" in page and "votes" in page and plan_id[:12] in page
    assert "succeeded" in client.get("/jobs").text
    assert client.get("/api/jobs/999").status_code == 404
    from workers.tokens import TokenStore

    other = TokenStore(storage).create("other", "someone-else", "read")[1]  # type: ignore[arg-type]
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {other}"}).json() == [], "another owner's job"
    assert client.get(f"/api/jobs/{jobs[0]['id']}", headers={"Authorization": f"Bearer {other}"}).status_code == 404


def test_in_memory_storage() -> None:
    client = TestClient(create_review_app(InMemoryStorage(), None))
    assert "No studies yet" in client.get("/").text and "No jobs yet" in client.get("/jobs").text
    # no token table: the JSON API refuses everyone, the forms say writes are disabled
    assert client.get("/api/studies", headers={"Authorization": "Bearer allot_x"}).status_code == 401
    assert client.get("/api/jobs").status_code == 401
    assert client.get("/api/health").status_code == 200 and client.get("/api/ready").json()["ready"] is True
    form = client.post("/graphs/g/versions/1/pin", data={"token": "x"}, follow_redirects=False)
    assert form.status_code == 403 and "writes are disabled" in form.text


# -- drawings -------------------------------------------------------------------------------------------------------


def test_drawings(storage: BaseStorage) -> None:
    trials = load_study("graphs", storage).trials
    plan = next(t.plan for t in trials if t.state is TrialState.COMPLETE and any(s.edges for s in t.plan.stages))
    for stage in plan.stages:
        drawing = plan_stage_drawing(stage)
        root = ET.fromstring(drawing.svg())  # well-formed XML
        texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
        for node in stage.nodes:
            assert node.model in texts and node.role.value in texts
        assert len([g for g in root.iter() if g.get("class") == "edge"]) == len(stage.edges) + len(stage.answer_nodes)
    versions = [views.graph_stages(v.definition) for v in storage.get_graph_versions("graphs")]
    pairs = [(a, b) for old, new in itertools.pairwise(versions) for a, b in zip(old, new, strict=True)]
    moves = [(a, b, [e for e in a.diff(b).edge_changes if abs(e.delta) >= 5e-4]) for a, b in pairs]
    a, b, moved = next(m for m in moves if m[2])  # an update that moved edges
    changed = probabilistic_drawing(b, previous=a).svg()
    ET.fromstring(changed)
    assert "#16a34a" in changed or "#dc2626" in changed
    top = max(moved, key=lambda e: abs(e.delta))
    assert f"{top.before:.2f}→{top.after:.2f}" in changed
    after = versions[1]
    dot = probabilistic_dot(after, name="graphs v2")
    assert dot.startswith('digraph "graphs v2" {') and dot.count(" -> ") == sum(len(g.edges) for g in after)
    png = svg_to_png(stack([probabilistic_drawing(g) for g in after], title="graphs v2").svg())
    assert png.startswith(PNG_MAGIC)


# -- CLI ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def allot(monkeypatch: pytest.MonkeyPatch, db_url: str):  # type: ignore[no-untyped-def]
    """``allot ...`` in-process (typer's runner, a wide plain console) on the test's database."""
    from rich.console import Console
    from typer.testing import CliRunner

    import planner.cli_review
    from planner.cli import app

    monkeypatch.setattr(planner.cli_review, "console", Console(width=200, no_color=True, highlight=False))
    monkeypatch.setattr(planner.cli_review, "err_console", Console(width=200, no_color=True, stderr=True))
    runner = CliRunner()

    def run(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(app, [*args, "--database", db_url])

    return run


def test_cli_graph_show_and_diff(allot, storage: BaseStorage) -> None:  # type: ignore[no-untyped-def]
    versions = storage.get_graph_versions("graphs")
    latest = views.graph_stages(versions[-1].definition)
    shown = allot("graph", "show", "graphs", "--edges", "0")
    assert shown.exit_code == 0, shown.output
    assert f"graphs version {len(versions)}" in shown.output and versions[-1].cause[:50] in shown.output
    for graph in latest:
        assert f"stage {graph.stage}" in shown.output
        for slot in graph.slots:
            assert slot.id in shown.output
        edge = max(graph.edges, key=lambda e: e.probability)
        assert f"{edge.source} → {edge.target}  p={edge.probability:.3f}" in shown.output
    first = allot("graph", "show", "graphs", "--version", "1")
    assert first.exit_code == 0 and "graphs version 1" in first.output

    last = len(versions)
    diff = allot("graph", "diff", "graphs", "1", str(last))
    assert diff.exit_code == 0, diff.output
    assert f"graphs: v1 → v{last}" in diff.output
    assert all(f"v{v.version}: {v.cause[:50]}" in diff.output for v in versions[1:])
    expected = views.version_diff(storage, "graphs", 1, last)
    listed = [e for stage in expected["stages"] for e in stage["edge_changes"] if e["listed"]]
    assert listed
    for edge in listed[:5]:
        assert f"{edge['source']} → {edge['target']}" in diff.output and f"{edge['delta']:+.3f}" in diff.output

    assert "graphs" in allot("graph", "list").output
    for args, message in [
        (("graph", "show", "nope"), "no learned graph named 'nope': known graphs are graphs"),
        (("graph", "show", "graphs", "--version", "99"), "has no version 99"),
        (("graph", "diff", "graphs", "1", "99"), "has no version 99"),
        (("graph", "export", "graphs", "--format", "gif", "-o", "x.gif"), "unknown format 'gif'"),
    ]:
        bad = allot(*args)
        assert bad.exit_code == 1 and "error:" in bad.output and message in bad.output, bad.output


def test_cli_graph_export(allot, db_url: str, storage: BaseStorage, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    versions = storage.get_graph_versions("graphs")
    latest = views.graph_stages(versions[-1].definition)
    out = tmp_path / "g.dot"
    assert allot("graph", "export", "graphs", "--format", "dot", "--output", str(out)).exit_code == 0
    dot = out.read_text()
    assert dot.startswith(f'digraph "graphs v{len(versions)}" {{') and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == sum(len(g.edges) for g in latest) and dot.count("subgraph") == len(latest)
    out = tmp_path / "g.json"
    assert allot("graph", "export", "graphs", "--version", "2", "--format", "json", "-o", str(out)).exit_code == 0
    body = json.loads(out.read_text())
    assert body["version"] == 2 and body["definition"] == versions[1].definition and len(body["stages"]) == 2
    # PNG through the installed console script, as a user runs it
    out = tmp_path / "g.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")}
    env.update(ALLOT_DATABASE_URL=db_url, NO_COLOR="1", LITELLM_LOCAL_MODEL_COST_MAP="True")
    done = subprocess.run(
        [str(ALLOT), "graph", "export", "graphs", "--format", "png", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000


def test_cli_graph_pin_and_rollback(allot, storage: BaseStorage) -> None:  # type: ignore[no-untyped-def]
    """Pinning steers new jobs to that version; a rollback appends a copy of an old version, history kept."""
    from workers.service import current_version

    before = storage.get_graph_versions("graphs")
    newest = before[-1].version
    assert current_version(storage, "graphs").version == newest
    pinned = allot("graph", "pin", "graphs", "1")
    assert pinned.exit_code == 0 and "graphs v1 pinned" in pinned.output, pinned.output
    assert current_version(storage, "graphs").version == 1
    unpinned = allot("graph", "pin", "graphs", "1", "--unpin")
    assert unpinned.exit_code == 0 and "graphs v1 unpinned" in unpinned.output
    assert current_version(storage, "graphs").version == newest

    rolled = allot("graph", "rollback", "graphs", "1")
    assert rolled.exit_code == 0, rolled.output
    after = storage.get_graph_versions("graphs")
    assert [v.version for v in after] == [*[v.version for v in before], newest + 1]
    assert after[-1].cause == "rollback to v1" and after[-1].definition == before[0].definition
    assert current_version(storage, "graphs").version == newest + 1
    for args in (("graph", "pin", "graphs", "99"), ("graph", "rollback", "graphs", "99"), ("graph", "rollback", "nope", "1")):
        bad = allot(*args)
        assert bad.exit_code == 1 and "error:" in bad.output, bad.output
    assert len(storage.get_graph_versions("graphs")) == len(after)  # a failed command stores nothing
