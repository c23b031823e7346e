"""Shared pytest fixtures. Each section is self-contained; add yours as a new section."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

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
