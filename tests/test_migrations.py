"""Alembic owns the schema: migrations build exactly the models, leave other tables alone, and fail clearly.

Runs on a SQLite file and on a fresh PostgreSQL database per test (marked ``postgres``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from alembic import command
from graphs.cost import Budget
from graphs.errors import StorageError
from planner.storage import SQLStorage, ensure_schema, upgrade
from planner.storage import database as db
from planner.storage.tables import metadata

REPO = Path(__file__).resolve().parent.parent
ALLOT_TABLES = set(metadata.tables)
MODES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=MODES)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with nothing in it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'allot.db'}"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


@pytest.fixture
def engine(empty_url: str) -> Iterator[Engine]:
    engine = db.make_engine(empty_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    return type_ != "table" or name in ALLOT_TABLES


def _drift(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "version_table": db.VERSION_TABLE,
                "include_name": _include_name,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(context, metadata))


def _alembic_config(url: str) -> Config:
    """The repo's ``alembic/`` through its own env.py, URL given like ``alembic -x url=...``."""
    config = Config(cmd_opts=argparse.Namespace(x=[f"url={url}"]))
    config.set_main_option("script_location", str(REPO / "alembic"))
    return config


def test_upgrade_from_empty(empty_url: str, engine: Engine) -> None:
    assert _tables(engine) == set()
    upgrade(empty_url)
    assert _tables(engine) == ALLOT_TABLES | {db.VERSION_TABLE}
    assert db.current_revision(empty_url) == db.head_revision()
    with engine.connect() as connection:
        versions = connection.execute(text(f"SELECT version_num FROM {db.VERSION_TABLE}")).scalars().all()
    assert versions == [db.head_revision()]


def test_migrated_schema_matches_the_models(empty_url: str, engine: Engine) -> None:
    upgrade(empty_url)
    assert _drift(engine) == []
    command.check(_alembic_config(empty_url))  # the same through env.py: raises on any difference


def test_named_constraints(empty_url: str, engine: Engine) -> None:
    upgrade(empty_url)
    inspector = inspect(engine)
    assert all(name.startswith("allot_") for name in _tables(engine))
    trials = "allot_trials"
    assert {uq["name"] for uq in inspector.get_unique_constraints(trials)} == {"uq_allot_trials_study_id_number"}
    assert {fk["name"] for fk in inspector.get_foreign_keys(trials)} == {
        "fk_allot_trials_study_id_allot_studies",
        "fk_allot_trials_plan_id_allot_plans",
    }
    assert {ck["name"] for ck in inspector.get_check_constraints(trials)} == {"ck_allot_trials_state"}
    assert {ix["name"] for ix in inspector.get_indexes("allot_jobs")} >= {"ix_allot_jobs_state"}
    assert inspector.get_pk_constraint("allot_plans")["constrained_columns"] == ["plan_id"]


def test_downgrade_and_upgrade_again(empty_url: str, engine: Engine) -> None:
    config = _alembic_config(empty_url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    assert _tables(engine) == {db.VERSION_TABLE}
    command.upgrade(config, "head")
    assert _drift(engine) == []


def test_optuna_tables_are_left_untouched(empty_url: str, engine: Engine) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna_storage = optuna.storages.RDBStorage(empty_url)
    study = optuna.create_study(storage=optuna_storage, study_name="theirs")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    optuna_tables = _tables(engine)
    assert "alembic_version" in optuna_tables
    with engine.connect() as connection:
        optuna_version = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()

    ensure_schema(empty_url)
    assert _tables(engine) == optuna_tables | ALLOT_TABLES | {db.VERSION_TABLE}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == optuna_version
        assert connection.execute(text(f"SELECT version_num FROM {db.VERSION_TABLE}")).scalar() == db.head_revision()
    assert _drift(engine) == []
    command.check(_alembic_config(empty_url))

    command.downgrade(_alembic_config(empty_url), "base")  # drops Allot's tables and nothing else
    assert _tables(engine) == optuna_tables | {db.VERSION_TABLE}
    reloaded = optuna.load_study(study_name="theirs", storage=optuna.storages.RDBStorage(empty_url))
    assert len(reloaded.trials) == 2
    optuna_storage.remove_session()
    optuna_storage.engine.dispose()


def test_optuna_after_allot(empty_url: str, engine: Engine) -> None:
    import optuna

    storage = SQLStorage(empty_url)
    storage.create_study(
        name="ours", strategy="random", strategy_params={}, environment={}, budget=Budget(limit=1), seed=0, space={}
    )
    storage.close()
    optuna_storage = optuna.storages.RDBStorage(empty_url)
    optuna.create_study(storage=optuna_storage, study_name="theirs")
    optuna_storage.engine.dispose()
    assert _drift(engine) == []
    again = SQLStorage(empty_url)
    try:
        assert [study.name for study in again.list_studies()] == ["ours"]
    finally:
        again.close()


def test_ensure_schema_is_idempotent(empty_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_schema(empty_url)
    storage = SQLStorage(empty_url)
    storage.create_study(
        name="kept", strategy="random", strategy_params={}, environment={}, budget=Budget(limit=1), seed=0, space={}
    )

    def no_upgrade(*args: object, **kwargs: object) -> None:
        raise AssertionError("ensure_schema upgraded a database that is at head")

    monkeypatch.setattr(db, "upgrade", no_upgrade)
    ensure_schema(empty_url)
    ensure_schema(storage.engine)
    assert storage.get_study_by_name("kept").name == "kept"
    storage.close()


def test_concurrent_first_use_migrates_once(empty_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def first_use() -> None:
        barrier.wait()
        try:
            ensure_schema(empty_url)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert db.current_revision(empty_url) == db.head_revision()


def test_unknown_revision_is_a_storage_error(empty_url: str, engine: Engine) -> None:
    upgrade(empty_url)
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {db.VERSION_TABLE} SET version_num = 'f00dfeed'"))
    with pytest.raises(StorageError, match="f00dfeed") as info:
        ensure_schema(empty_url)
    assert "\n" not in str(info.value)


UNREACHABLE = [
    "postgresql://postgres@127.0.0.1:1/x",
    "postgresql+psycopg://allot:s3cret@127.0.0.1:1/allot",
    "sqlite:////nonexistent-allot-dir/sub/allot.db",
]


@pytest.mark.parametrize("url", UNREACHABLE)
def test_database_that_does_not_answer(url: str) -> None:
    for attempt in (ensure_schema, SQLStorage, db.check_connection):
        with pytest.raises(StorageError) as info:
            attempt(url)
        message = str(info.value)
        assert "\n" not in message
        assert "s3cret" not in message
        assert db.mask_url(url) in message
        assert "ALLOT_DATABASE_URL" in message
        assert "--database" in message


def test_password_is_masked() -> None:
    assert db.mask_url("postgresql+psycopg://allot:s3cret@h/db") == "postgresql+psycopg://allot:***@h/db"


def test_invalid_url_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="ALLOT_DATABASE_URL"):
        SQLStorage("not a url")


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'allot.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_alembic_cli(tmp_path: Path) -> None:
    """``alembic`` run from the repo root uses alembic.ini, finds the library (not our alembic/ dir)."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    alembic = [sys.executable, "-m", "alembic", "-x", f"url={url}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["upgrade", "head"], ["check"], ["current"]):
        result = subprocess.run([*alembic, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert f"{db.head_revision()} (head)" in result.stdout
    assert db.current_revision(url) == db.head_revision()
