"""The Celery app: which broker carries trials to workers, and how messages are handled.

The default broker is embedded (kombu's filesystem transport under ``<ALLOT_HOME or cwd>/.allot/broker``),
so ``allot worker`` and ``allot study run --queue`` work on one machine with no server to install. A URL
(``ALLOT_BROKER_URL`` or an argument) switches to Redis (``redis://``) or RabbitMQ (``amqp://``).

There is no result backend: a task stores its result in the SQL database, which is the source of truth
(trials, jobs, states). Messages are acknowledged late and re-delivered if a worker dies mid-task; that is
safe because every task is idempotent by the id of the row it works on.

The module-level ``app`` is built on first access (``celery -A workers.celery_app worker`` works), so
importing this module creates no directory and opens no connection.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu.utils.url import sanitize_url

from graphs.errors import BrokerError

__all__ = [
    "DEFAULT_QUEUE",
    "EMBEDDED_BROKER_URL",
    "app",
    "broker_folder",
    "describe_broker",
    "make_celery",
    "prune_processed",
    "resolve_broker_url",
    "resolve_queue",
]

EMBEDDED_BROKER_URL = "filesystem://"
"""The embedded broker: message files in a folder, shared by every process on the machine."""

DEFAULT_QUEUE = "allot"
"""The queue trials are sent to and ``allot worker`` consumes (``ALLOT_QUEUE`` overrides it)."""

FILESYSTEM_POLL_S = 0.1
"""How often a worker looks for new message files: a trial waits at most this long to be picked up."""

REDIS_VISIBILITY_TIMEOUT_S = 6 * 3600
"""Redis re-delivers an unacknowledged message after this long; it must exceed the longest trial, or a
trial still being evaluated would be handed to a second worker."""

PROCESSED_MAX_AGE_S = 3600.0


def resolve_broker_url(broker_url: str | None = None) -> str:
    """The broker URL in effect: the argument, else ``ALLOT_BROKER_URL``, else the embedded broker."""
    url = (broker_url or os.environ.get("ALLOT_BROKER_URL", "")).strip()
    return url or EMBEDDED_BROKER_URL


def resolve_queue(queue: str | None = None) -> str:
    """The queue in effect: the argument, else ``ALLOT_QUEUE``, else ``allot``."""
    name = (queue or os.environ.get("ALLOT_QUEUE", "")).strip()
    return name or DEFAULT_QUEUE


def is_embedded(url: str) -> bool:
    return url.split("://", 1)[0].lower() == "filesystem"


def broker_folder(url: str = EMBEDDED_BROKER_URL) -> Path:
    """Where the embedded broker keeps its messages.

    ``filesystem://`` means ``<ALLOT_HOME or cwd>/.allot/broker``; ``filesystem:///some/dir`` (or
    ``filesystem://localhost/some/dir``) means that directory. Producer and worker must resolve to the same
    folder: run both from the same directory or with the same ``ALLOT_HOME``, or name the folder.
    """
    path = urlsplit(url).path
    if path.strip("/"):
        return Path("/" + path.lstrip("/")).expanduser().absolute()
    home = os.environ.get("ALLOT_HOME", "").strip()
    base = Path(home).expanduser() if home else Path.cwd()
    return (base / ".allot" / "broker").absolute()


def describe_broker(url: str | None) -> str:
    """The broker URL as it may be logged or shown: passwords masked, query strings (which may carry
    credentials or certificates) dropped; the embedded broker is named with its folder."""
    url = resolve_broker_url(url)
    parts = []
    for part in url.split(";"):  # Celery accepts failover URLs separated by ';'
        part = part.strip()
        if is_embedded(part):
            parts.append(f"filesystem:// (embedded, {broker_folder(part)})")
            continue
        try:
            parts.append(sanitize_url(part, mask="***"))
        except Exception:  # never echo an unparseable URL: it may hold a secret
            parts.append("<unparseable broker URL>")
    return ";".join(parts)


def _filesystem_options(folder: Path) -> dict[str, Any]:
    """Transport options of the embedded broker; creates its folders.

    Producers write to and consumers read from the same ``queue`` folder. Processed messages are moved to
    ``processed`` in the same file system, so claiming a message is an atomic rename: of two workers racing
    for one file exactly one gets it (``prune_processed`` removes old ones).
    """
    queue_dir, processed_dir, control_dir = folder / "queue", folder / "processed", folder / "control"
    try:
        for directory in (queue_dir, processed_dir, control_dir):
            directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrokerError(
            f"cannot create the embedded broker's folder {folder} ({exc.strerror or exc}): set ALLOT_HOME to a "
            "writable directory, or pass a broker URL (--broker / ALLOT_BROKER_URL)"
        ) from None
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(processed_dir),
        "store_processed": True,
        "control_folder": str(control_dir),
        "polling_interval": FILESYSTEM_POLL_S,
    }


def prune_processed(url: str | None = None, max_age_s: float = PROCESSED_MAX_AGE_S) -> int:
    """Delete the embedded broker's processed message files older than ``max_age_s``; returns how many.

    Does nothing for a server broker.
    """
    url = resolve_broker_url(url)
    if not is_embedded(url):
        return 0
    processed = broker_folder(url) / "processed"
    cutoff = time.time() - max_age_s
    removed = 0
    try:
        entries = list(processed.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.suffix == ".msg" and entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed += 1
        except OSError:  # removed meanwhile by another process
            continue
    return removed


def _transport_options(url: str) -> dict[str, Any]:
    scheme = url.split("://", 1)[0].lower()
    if scheme == "filesystem":
        return _filesystem_options(broker_folder(url))
    if scheme in ("redis", "rediss", "redis+socket"):
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S, "socket_connect_timeout": 3}
    return {}


def make_celery(broker_url: str | None = None, *, queue: str | None = None) -> Celery:
    """A Celery app on ``broker_url`` (default: ``ALLOT_BROKER_URL``, else the embedded broker).

    ``queue`` (default: ``ALLOT_QUEUE``, else ``allot``) is where tasks are sent and what a worker of this
    app consumes; give producer and worker the same one.
    """
    url = resolve_broker_url(broker_url)
    if is_embedded(url):
        # Pin the folder in the URL: resolved once, here, whatever the working directory is later, and
        # shown by ``describe_broker``. The host keeps kombu from warning that none was given.
        url = f"filesystem://localhost{broker_folder(url).as_posix()}"
    celery = Celery("allot", include=["workers.tasks"])
    celery.conf.update(
        broker_url=url,
        broker_transport_options=_transport_options(url),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3.0,
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue=resolve_queue(queue),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # At-least-once delivery: a message is acknowledged after its task ran, and put back if the worker
        # process died meanwhile. Tasks are idempotent by row id, so a second delivery is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # One message at a time per process: a trial waits in the queue, not behind a busy worker.
        worker_prefetch_multiplier=1,
        # A publish to a dead broker fails in seconds, not minutes.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 1.0},
        worker_send_task_events=False,
        enable_utc=True,
    )
    return celery


app: Celery
"""The app for the environment's broker (``ALLOT_BROKER_URL``, ``ALLOT_QUEUE``), built on first access."""

_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """Build the module-level ``app`` on first access (from the environment at that moment)."""
    global _app
    if name == "app":
        if _app is None:
            _app = make_celery()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
