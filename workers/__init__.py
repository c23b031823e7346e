"""Workers: the Celery app and tasks that evaluate trials (and run jobs) outside the planning process.

Names are loaded on first use, so ``import workers`` stays cheap and does not import Celery.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["CeleryRunner", "describe_broker", "make_celery", "run_worker"]

_WHERE = {
    "CeleryRunner": "workers.queue_runner",
    "describe_broker": "workers.celery_app",
    "make_celery": "workers.celery_app",
    "run_worker": "workers.worker",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
