"""Database URLs, engines and the schema: where Allot's SQL lives and how it gets to the current version.

A SQLite file is the default (``<ALLOT_HOME or cwd>/allot.db``); PostgreSQL is one URL away
(``ALLOT_DATABASE_URL`` or ``--database``). Alembic owns the schema; ``ensure_schema`` runs on first use
of every command, so users never run migrations by hand, and it costs one query when nothing is to do.

Errors a user can cause (a server that is down, a path in a missing directory, a database newer than
this Allot) become one-line ``StorageError`` messages that name the URL, password masked, and the fix.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, NoSuchModuleError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from graphs.errors import StorageError

__all__ = [
    "ALEMBIC_DIR",
    "VERSION_TABLE",
    "check_connection",
    "current_revision",
    "default_database_url",
    "ensure_schema",
    "head_revision",
    "interrupts_deferred",
    "make_engine",
    "mask_url",
    "migration_transaction",
    "relax_commit",
    "session_scope",
    "storage_error",
    "upgrade",
]

ALEMBIC_DIR = Path(__file__).resolve().parent.parent.parent / "alembic"
"""The repo's top-level ``alembic/`` directory (``script_location``)."""

VERSION_TABLE = "allot_alembic_version"
"""Allot's own version table, so Alembic-managed neighbours (optuna's ``alembic_version``) are left alone."""

_FIX = "start the database server (and create the database), or set ALLOT_DATABASE_URL (or pass --database) to one that answers"
_SCHEMA_LOCK_KEY = 0x616C6C6F74  # "allot": the PostgreSQL advisory lock held while migrating
_SQLITE_BEGIN = "allot_sqlite_begin"  # execution option: the BEGIN statement for SQLite transactions


def default_database_url() -> str:
    """``ALLOT_DATABASE_URL`` if set, else the SQLite file ``<ALLOT_HOME or cwd>/allot.db``."""
    url = os.environ.get("ALLOT_DATABASE_URL", "").strip()
    if url:
        return url
    home = os.environ.get("ALLOT_HOME", "").strip()
    directory = Path(home).expanduser() if home else Path.cwd()
    return f"sqlite:///{(directory / 'allot.db').absolute()}"


def mask_url(url: str | URL | Engine) -> str:
    """The URL as it may be shown or logged: the password replaced by ``***``."""
    if isinstance(url, Engine):
        url = url.url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def _is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine configured for Allot's access pattern: many short transactions from threads and processes.

    SQLite: WAL (readers never block the writer), a 30 s busy timeout, foreign keys enforced, usable from
    any thread, and real ``BEGIN`` statements instead of pysqlite's implicit ones so that a transaction
    covers its reads too (``session_scope(write=True)`` takes the write lock up front). In-memory SQLite
    shares one connection, or every connection would see its own empty database.
    PostgreSQL: a connection taken from the pool is pinged first if it has been idle for ``PING_IDLE_S``
    or more, so a restarted server costs a reconnect, not a failed command (a connection used a moment ago
    is not: a ping per transaction is a round trip per transaction; were the server restarted in that
    moment, the command fails with ``StorageError`` and the pool reconnects for the next one).
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StorageError(
            "invalid database URL: expected e.g. sqlite:////path/to/allot.db or "
            "postgresql+psycopg://user@host:5432/allot (set ALLOT_DATABASE_URL or pass --database)"
        ) from exc
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
            if _is_memory_sqlite(parsed):
                kwargs.setdefault("poolclass", StaticPool)
            engine = create_engine(parsed, connect_args=connect_args, **kwargs)
            _configure_sqlite(engine)
            return engine
        if backend == "postgresql" and "pool_pre_ping" not in kwargs:
            engine = create_engine(parsed, **kwargs)
            _ping_when_idle(engine)
            return engine
        return create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise StorageError(f"no driver for database URL {mask_url(parsed)}: {exc}") from exc


PING_IDLE_S = 1.0
"""A pooled PostgreSQL connection idle this long is pinged before use (see ``make_engine``)."""


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, but only for connections that have been idle for ``PING_IDLE_S``."""

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["allot_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("allot_idle_since")
        if since is not None and time.monotonic() - since < PING_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool discards this connection and checks out another
            raise DisconnectionError(f"connection lost while idle: {exc}") from exc
        if not alive:
            raise DisconnectionError("connection lost while idle")


def _enable_wal(cursor: Any) -> None:
    """Switch a SQLite file to WAL once (the mode persists in the file).

    The switch needs an exclusive lock and SQLite reports "database is locked" at once, without waiting
    for the busy timeout, when another connection is creating the same new file: retry for a while.
    """
    import sqlite3
    import time

    for attempt in range(100):
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() in ("wal", "memory"):
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(min(0.01 * (attempt + 1), 0.2))


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 30000")
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(connection.get_execution_options().get(_SQLITE_BEGIN, "BEGIN"))


@contextmanager
def session_scope(engine: Engine, *, write: bool = False) -> Iterator[Session]:
    """One transaction as a session: committed on success, rolled back on error, closed always.

    ``write=True`` on SQLite starts with ``BEGIN IMMEDIATE``: the write lock is taken before the first
    read, so read-then-write code (next trial number, claiming a job) cannot race another process.
    On PostgreSQL use row locks (``with_for_update``) or conditional updates for the same effect.
    Objects stay readable after the session closes (``expire_on_commit=False``).
    """
    with Session(engine, expire_on_commit=False) as session:
        if write and engine.dialect.name == "sqlite":
            session.connection(execution_options={_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
        try:
            yield session
            with interrupts_deferred():
                session.commit()
        except BaseException as exc:
            try:
                session.rollback()
            except Exception:
                if isinstance(exc, KeyboardInterrupt):
                    raise exc from None  # Ctrl-C stays Ctrl-C, whatever state it left the session in
                raise
            raise


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it. A ``KeyboardInterrupt`` raised inside
    SQLAlchemy's commit leaves its transaction half closed, and the error that raises next replaces the
    interrupt: the command then dies with a traceback instead of its resume hint, and whether the trial it was
    storing got stored is left to chance. Only in the main thread and under Python's own SIGINT handler (a
    Celery worker or a test runner keeps its own)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def relax_commit(session: Session) -> None:
    """Let this transaction's commit return before its WAL reaches the disk (PostgreSQL's
    ``synchronous_commit = off`` for this transaction only; nothing on SQLite).

    For writes whose loss in a crash of the database *server* is harmless because they are redone or
    superseded: heartbeats, a job's claim and plan (a lost claim re-queues the job and the attempt's
    conditional writes then fail), samples (regenerated). The transaction is atomic and visible at once
    as usual, and a later synchronous commit (of any session) makes it durable too: the log is flushed
    in order. Never for what a caller is told is stored (a submission, a job's result, a graph version).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.exec(text("SET LOCAL synchronous_commit TO OFF"))  # type: ignore[call-overload]


def _reason(exc: BaseException) -> str:
    """The first line of a driver error, without SQLAlchemy's background link."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def _unreachable(url: str | URL | Engine, exc: BaseException) -> StorageError:
    masked = mask_url(url)
    engine_url = url.url if isinstance(url, Engine) else make_url(url)
    if engine_url.get_backend_name() == "sqlite" and not _is_memory_sqlite(engine_url):
        directory = Path(engine_url.database or ".").expanduser().absolute().parent
        if not directory.is_dir():
            return StorageError(
                f"cannot open the database {masked}: directory {directory} does not exist; "
                "create it, or set ALLOT_DATABASE_URL (or pass --database) to another location"
            )
    return StorageError(f"cannot reach the database {masked} ({_reason(exc)}): {_FIX}")


def storage_error(url: str | URL | Engine, exc: BaseException) -> StorageError:
    """The one-line ``StorageError`` for a driver error: "cannot reach" if the database no longer answers,
    else what went wrong (e.g. a lock held past the busy timeout)."""
    try:
        check_connection(url)
    except StorageError as unreachable:
        return unreachable
    return StorageError(f"the database {mask_url(url)} failed: {_reason(exc)}")


def check_connection(url: str | URL | Engine) -> None:
    """Raise ``StorageError`` (one line, password masked) unless the database answers ``SELECT 1``."""
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise _unreachable(url, exc) from exc
    finally:
        if engine is not url:
            engine.dispose()


def _alembic_config() -> Any:
    """Alembic's config without an ini file; the URL never goes in (the connection is passed instead)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    return config


@cache
def head_revision() -> str:
    """The newest migration this code knows (read once per process from ``alembic/versions``)."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(_alembic_config()).get_heads()
    if len(heads) != 1:
        raise StorageError(f"Allot's migrations have {len(heads)} heads ({heads}); expected one")
    return heads[0]


def current_revision(url: str | URL | Engine) -> str | None:
    """The database's schema revision; ``None`` for a database Allot has never touched."""
    from alembic.runtime.migration import MigrationContext

    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            heads = context.get_current_heads()
    except DBAPIError as exc:
        raise _unreachable(url, exc) from exc
    finally:
        if engine is not url:
            engine.dispose()
    return heads[0] if heads else None


@contextmanager
def migration_transaction(connection: Connection) -> Iterator[Connection]:
    """The one transaction a schema upgrade runs in, holding a lock so two processes never migrate at once.

    SQLite: ``BEGIN IMMEDIATE`` with foreign keys off (batch migrations recreate tables; with foreign keys
    on, dropping the old copy would cascade). PostgreSQL: a transaction-scoped advisory lock. The second
    process waits, then finds the schema at head and does nothing.
    """
    if connection.dialect.name == "sqlite":
        raw = connection.connection.driver_connection
        assert raw is not None
        foreign_keys = raw.execute("PRAGMA foreign_keys").fetchone()[0]
        raw.execute("PRAGMA foreign_keys = OFF")
        connection.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
        try:
            with connection.begin():
                yield connection
        finally:
            connection.execution_options(**{_SQLITE_BEGIN: "BEGIN"})
            raw.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        return
    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        yield connection


def upgrade(url: str | URL | Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (default: the newest), creating Allot's tables if absent.

    Only Allot's tables and ``allot_alembic_version`` are touched; anything else in the database stays.
    """
    from alembic import command

    engine = url if isinstance(url, Engine) else make_engine(url)
    config = _alembic_config()
    try:
        with engine.connect() as connection, migration_transaction(connection):
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except DBAPIError as exc:
        check_connection(engine)  # a database that stopped answering says so; else the migration failed
        raise StorageError(f"cannot migrate the database {mask_url(engine)}: {_reason(exc)}") from exc
    finally:
        if engine is not url:
            engine.dispose()


def ensure_schema(url: str | URL | Engine) -> None:
    """Upgrade the database to head unless it is there already (one query when it is).

    Raises ``StorageError`` if the database does not answer, or holds a schema newer than this code.
    """
    current = current_revision(url)
    head = head_revision()
    if current == head:
        return
    if current is not None:
        from alembic.script import ScriptDirectory

        try:
            ScriptDirectory.from_config(_alembic_config()).get_revision(current)
        except Exception as exc:  # alembic raises several kinds for an unknown revision
            raise StorageError(
                f"the database {mask_url(url)} has schema revision {current}, which this Allot does not "
                f"know (newest: {head}): upgrade Allot, or point ALLOT_DATABASE_URL at another database"
            ) from exc
    upgrade(url)
