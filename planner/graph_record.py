"""The frozen record of one stored version of a learned probabilistic graph, as storage returns it.

A graph (by name, e.g. a study's name) has versions 1, 2, 3, ...; each holds the whole definition
(``graphs.probabilistic`` JSON and whatever the writer adds), why it was made (``cause``: an update by a
strategy, a review, job feedback) and the version it was derived from (``parent_id``). Versions are
immutable except for ``pinned``, which a reviewer sets; a returned record never changes under later writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["GraphVersion"]


@dataclass(frozen=True, kw_only=True)
class GraphVersion:
    """One stored version of a graph."""

    version_id: int
    """Storage-wide id (what ``parent_id`` and a job's ``graph_version_id`` refer to)."""
    graph: str
    version: int
    """1, 2, 3, ... within ``graph``, in creation order, with no gaps."""
    definition: dict[str, Any]
    cause: str = ""
    parent_id: int | None = None
    pinned: bool = False
    created_at: datetime
