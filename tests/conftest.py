"""Shared pytest fixtures. Each section is self-contained; add yours as a new section."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# --- PostgreSQL databases (storage, migrations, workers) -------------------------------------------------
# Tests marked ``postgres`` get a database of their own on the server at ALLOT_TEST_POSTGRES_URL
# (default: postgresql+psycopg://postgres@127.0.0.1:5432/test); they fail if it does not answer.

_PG_SERVER_URL = os.environ.get("ALLOT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_database_factory() -> Iterator[Callable[[], str]]:
    """A function that creates a fresh, uniquely named PostgreSQL database and returns its URL.

    Every database it made is dropped at the end of the session (``WITH (FORCE)``: leftover connections
    from a test's engines must not keep it alive).
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    server = make_url(_PG_SERVER_URL)
    admin = create_engine(server, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    created: list[str] = []

    def create() -> str:
        name = f"allot_test_{uuid.uuid4().hex[:12]}"
        try:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        except OperationalError as exc:
            pytest.fail(f"PostgreSQL at {server.render_as_string()} does not answer ({exc.orig}): start it (see README)")
        created.append(name)
        return server.set(database=name).render_as_string(hide_password=False)

    try:
        yield create
    finally:
        try:
            if created:
                with admin.connect() as connection:
                    for name in created:
                        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(postgres_database_factory: Callable[[], str]) -> str:
    """One fresh PostgreSQL database for the whole test session (dropped afterwards)."""
    return postgres_database_factory()


@pytest.fixture
def fresh_postgres_url(postgres_database_factory: Callable[[], str]) -> str:
    """An empty PostgreSQL database for this test only (e.g. to migrate from nothing)."""
    return postgres_database_factory()


# --- Review page: a real database holding a real replay study and a learned graph --------------------------------
# ``review_studies(url)`` stores, in the database at ``url``, a replay study (``aime``: the bundled AIME 2024 data,
# the insight strategy) and an Agent-REINFORCE study on a simulated 2-stage graph task (``graphs``, with a scripted
# planner LLM, so planner cost is recorded) whose graph versions (named ``graphs``) are what the page reviews.
# ``review_sqlite_template`` is such a SQLite file, built once per session: copy it before writing to it.

REVIEW_PLANNER = "review-planner"


def _review_planner(messages: list[dict[str, str]]) -> str:
    """A planner LLM that follows the best sampled graph (as in tests/test_reinforce.py)."""
    import json
    import re

    prompt = next(m["content"] for m in messages if m["role"] == "user")
    if "TASK: select" in prompt:
        return json.dumps({"picks": [0, 2, 4], "reason": "the most budget-using combinations"})
    current, samples = (json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", prompt, re.S)[:2])
    used = {(s["stage"], n["id"]) for s in samples[0]["stages"] for n in s["nodes"]}
    for stage in current["stages"]:
        for slot in stage["slots"]:
            slot["include_probability"] = 0.9 if (stage["stage"], slot["id"]) in used else 0.2
        for edge in stage["edges"]:
            edge["probability"] = 0.9
    reply = json.dumps({"stages": current["stages"], "reason": "follow the best"})
    return f"Following the best graph:\n```json\n{reply}\n```"


@pytest.fixture(scope="session")
def review_studies() -> Callable[..., None]:
    def build(url: str, *, replay_trials: int = 12, graph_trials: int = 15) -> None:
        from executors.replay import ReplayEnvironment
        from executors.simulated import SimulatedEnvironment
        from graphs.cost import Budget
        from planner.agents.agent_reinforce import AgentReinforceStrategy
        from planner.llm import scripted_model
        from planner.storage import get_storage
        from planner.study import create_study

        storage = get_storage(url)
        try:
            replay = ReplayEnvironment(benchmark="aime24", orderings=2, seed=0)
            study = create_study(storage=storage, environment=replay, budget=Budget(limit=500), strategy="insight", name="aime")
            study.optimize(replay_trials)
            sim = SimulatedEnvironment(stages=2, graphs=True, seed=0)
            agent = AgentReinforceStrategy(seed=0, planner_model=scripted_model(REVIEW_PLANNER, _review_planner), iterations=3)
            study = create_study(storage=storage, environment=sim, budget=Budget(limit=150), strategy=agent, name="graphs")
            study.optimize(graph_trials, batch_size=3)
        finally:
            storage.close()

    return build


@pytest.fixture(scope="session")
def review_sqlite_template(tmp_path_factory: pytest.TempPathFactory, review_studies: Callable[..., None]) -> Path:
    path = tmp_path_factory.mktemp("review") / "template.db"
    review_studies(f"sqlite:///{path}")
    return path


# --- A real llama.cpp server with a real small model (tests/test_llama_e2e.py) ---------------------------------
# ``llama_server`` (session) starts ``llama-server`` on 127.0.0.1 with Gemma 3 270M (``executors.llama_server``)
# and stops it at the end; the GGUF is assembled once into ``ALLOT_CACHE_DIR`` or ``<repo>/.allot-cache``.
# ``llama`` is the same server, restarted first if an earlier test killed it; a test kills and restarts it with
# ``llama.kill()`` and ``llama.restart()`` (same port, so ``llama.api_base`` stays valid).

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its price map


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from executors.llama_server import LlamaServer, LlamaServerError

    cache = Path(os.environ.get("ALLOT_CACHE_DIR") or Path(__file__).resolve().parent.parent / ".allot-cache")
    server = LlamaServer(cache_dir=cache, log_path=tmp_path_factory.mktemp("llama") / "llama-server.log")
    try:
        server.start()
    except LlamaServerError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def llama(llama_server: object) -> object:
    """The session's llama.cpp server, (re)started and healthy."""
    return llama_server.ensure_running()  # type: ignore[attr-defined]
