"""Allot's error hierarchy.

Every error a user can cause carries one line that names the problem and the fix, so the CLI can print
``str(error)`` and exit non-zero without a traceback.

    AllotError
    ├── InvalidPlan          a plan or graph breaks an invariant (cycle, unknown node, ...)
    ├── BudgetError          a budget is malformed, or too small for any plan in the space
    ├── UnknownModel         a plan names a model the catalog or data does not have
    ├── DataError            a task, catalog or replay directory cannot be read
    ├── StorageError         the database cannot be reached or holds something unexpected
    └── BrokerError          the Celery broker cannot be reached
"""

from __future__ import annotations

__all__ = [
    "AllotError",
    "BrokerError",
    "BudgetError",
    "DataError",
    "InvalidPlan",
    "StorageError",
    "UnknownModel",
]


class AllotError(Exception):
    """Base of every error Allot raises on purpose."""


class InvalidPlan(AllotError, ValueError):
    """A plan or collaboration graph breaks an invariant."""


class BudgetError(AllotError, ValueError):
    """A budget is malformed or cannot be met."""


class UnknownModel(AllotError, KeyError):
    """A plan names a model that the catalog or the data does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it a plain line
        return str(self.args[0]) if self.args else "unknown model"


class DataError(AllotError, ValueError):
    """A task file, catalog file or replay directory cannot be read."""


class StorageError(AllotError, RuntimeError):
    """The database cannot be reached or is in an unexpected state."""


class BrokerError(AllotError, RuntimeError):
    """The Celery broker cannot be reached."""
