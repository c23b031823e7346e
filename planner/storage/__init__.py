"""Where studies, trials and plans live: the ``BaseStorage`` contract and its implementations.

``get_storage()`` opens the default database (``ALLOT_DATABASE_URL`` or ``<ALLOT_HOME or cwd>/allot.db``),
creating or upgrading Allot's schema on first use; ``get_storage("postgresql+psycopg://...")`` opens
another; ``InMemoryStorage()`` keeps nothing past the process.
"""

from __future__ import annotations

from planner.graph_record import GraphVersion
from planner.storage._base import BaseStorage, DuplicateStudy, SampleRecord
from planner.storage._memory import InMemoryStorage
from planner.storage._sql import SQLStorage
from planner.storage.database import default_database_url, ensure_schema, upgrade

__all__ = [
    "BaseStorage",
    "DuplicateStudy",
    "GraphVersion",
    "InMemoryStorage",
    "SQLStorage",
    "SampleRecord",
    "default_database_url",
    "ensure_schema",
    "get_storage",
    "upgrade",
]


def get_storage(url: str | BaseStorage | None = None) -> BaseStorage:
    """The storage for a URL (``None``: the default database); a storage passed in is returned as is."""
    if isinstance(url, BaseStorage):
        return url
    return SQLStorage(url or default_database_url())
