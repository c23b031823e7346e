"""Run a Celery worker in the foreground: what ``allot worker`` and ``python -m workers.worker`` start.

    python -m workers.worker [--broker URL] [--queue NAME] [--concurrency N] [--pool prefork|solo|threads]

The broker defaults to ``ALLOT_BROKER_URL``, else the embedded broker of ``<ALLOT_HOME or cwd>``; the
database comes with each message, so one worker serves every study that sends to its broker and queue.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

from celery.signals import after_setup_logger

from workers.celery_app import describe_broker, make_celery, prune_processed, resolve_queue

__all__ = ["POOLS", "main", "run_worker"]

log = logging.getLogger(__name__)

POOLS = ("prefork", "solo", "threads")
"""``prefork``: one process per slot, a crash kills one task and not the worker; ``solo``: tasks run in
the worker process itself (simplest, one at a time); ``threads``: for I/O-bound (API) environments."""


def _quiet_libraries(*_args: Any, **_kwargs: Any) -> None:
    """Keep the worker's log readable and free of secrets.

    Alembic's per-process plugin chatter is not worth reading; Celery's pool logs every task's raw
    arguments at DEBUG, and ours carry the database URL (password included), so that logger stays at INFO.
    """
    logging.getLogger("alembic").setLevel(logging.WARNING)
    pool_logger = logging.getLogger("celery.pool")
    pool_logger.setLevel(max(pool_logger.getEffectiveLevel(), logging.INFO))


def run_worker(
    broker_url: str | None = None,
    concurrency: int = 1,
    loglevel: str = "INFO",
    pool: str = "prefork",
    *,
    queue: str | None = None,
    hostname: str | None = None,
) -> None:
    """Consume trials from ``queue`` on ``broker_url`` until stopped (SIGTERM or Ctrl-C: warm shutdown,
    the task in flight finishes; a second Ctrl-C abandons it and its message is re-delivered)."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}: expected one of {', '.join(POOLS)}")
    app = make_celery(broker_url, queue=queue)
    after_setup_logger.connect(_quiet_libraries, weak=False)
    queue_name = resolve_queue(queue)
    prune_processed(app.conf.broker_url)
    log.info("allot worker: broker %s, queue %s", describe_broker(app.conf.broker_url), queue_name)
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={queue_name}",
        f"--hostname={hostname or f'allot-{os.getpid()}@%h'}",
        # No cluster chatter: workers coordinate through the database, not through each other.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.worker", description="Run an Allot Celery worker.")
    parser.add_argument("--broker", default=None, help="broker URL (default: ALLOT_BROKER_URL, else embedded)")
    parser.add_argument("--queue", default=None, help="queue to consume (default: ALLOT_QUEUE, else allot)")
    parser.add_argument("--concurrency", type=int, default=1, help="tasks run at once (default 1)")
    parser.add_argument("--pool", choices=POOLS, default="prefork")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", default=None, help="node name (default allot-<pid>@<host>)")
    args = parser.parse_args(argv)
    run_worker(
        args.broker,
        concurrency=args.concurrency,
        loglevel=args.loglevel,
        pool=args.pool,
        queue=args.queue,
        hostname=args.hostname,
    )


if __name__ == "__main__":
    main()
