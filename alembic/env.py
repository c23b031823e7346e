"""Alembic environment for Allot's schema (``planner/storage/tables.py``).

Allot may share a database with other Alembic users (optuna's RDB storage keeps ``alembic_version`` and
its own tables): our version table is ``allot_alembic_version`` and ``include_name`` hides every table
that is not in Allot's metadata, so autogenerate never proposes to drop or alter them.

The URL comes from ``-x url=...``, else ``sqlalchemy.url`` in ``alembic.ini``, else
``ALLOT_DATABASE_URL`` / ``<ALLOT_HOME or cwd>/allot.db``. ``planner.storage.upgrade`` passes its own
connection (already in a locked transaction) through ``config.attributes["connection"]``.
"""

from __future__ import annotations

from logging.config import fileConfig

from sqlalchemy import Connection

from alembic import context
from planner.storage.database import VERSION_TABLE, default_database_url, make_engine, migration_transaction
from planner.storage.tables import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Only Allot's tables exist as far as migrations are concerned."""
    if type_ == "table":
        return name in target_metadata.tables
    return True


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or default_database_url()
    )


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    url = _url()
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection, migration_transaction(connection):
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
