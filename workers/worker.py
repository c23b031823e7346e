"""Run a Celery worker in the foreground: what ``allot worker`` and ``python -m workers.worker`` start.

    python -m workers.worker [--broker URL] [--queue NAME] [--concurrency N] [--pool prefork|solo|threads]

The broker defaults to ``ALLOT_BROKER_URL``, else the embedded broker of ``<ALLOT_HOME or cwd>``; the
database comes with each message, so one worker serves every study that sends to its broker and queue.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from celery.signals import after_setup_logger, worker_ready, worker_shutdown

from workers.celery_app import describe_broker, make_celery, prune_processed, resolve_queue

__all__ = ["POOLS", "Reaper", "main", "run_worker"]

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


class Reaper:
    """The job reaper on a timer, in the worker's main process (see ``workers.dispatch``).

    Every ``every_s`` it re-queues jobs of ``database_url`` whose worker stopped beating and re-sends
    messages that may be lost. A database or broker that is away is logged and tried again next round.
    """

    def __init__(
        self, app: Any, database_url: str, *, every_s: float, stale_after_s: float, redispatch_after_s: float, queue: str | None
    ) -> None:
        self.app, self.database_url, self.every_s, self.queue = app, database_url, every_s, queue
        self.stale_after_s, self.redispatch_after_s = stale_after_s, redispatch_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, **_: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="allot-reaper", daemon=True)
            self._thread.start()

    def stop(self, **_: Any) -> None:
        self._stop.set()

    def _run(self) -> None:
        from graphs.errors import AllotError
        from planner.storage import SQLStorage
        from workers.dispatch import Dispatcher

        dispatcher = None
        while not self._stop.wait(self.every_s):
            try:
                if dispatcher is None:
                    dispatcher = Dispatcher(
                        SQLStorage(self.database_url),
                        self.app,
                        queue=self.queue,
                        stale_after_s=self.stale_after_s,
                        redispatch_after_s=self.redispatch_after_s,
                    )
                dispatcher.reap()
            except (AllotError, OSError) as exc:
                log.warning("reaper: %s (trying again in %.0f s)", exc, self.every_s)


def run_worker(
    broker_url: str | None = None,
    concurrency: int = 1,
    loglevel: str = "INFO",
    pool: str = "prefork",
    *,
    queue: str | None = None,
    hostname: str | None = None,
    database_url: str | None = None,
    reap_every_s: float = 5.0,
    stale_after_s: float = 30.0,
    redispatch_after_s: float = 60.0,
) -> None:
    """Consume trials and jobs from ``queue`` on ``broker_url`` until stopped (SIGTERM or Ctrl-C: warm
    shutdown, the task in flight finishes; a second Ctrl-C abandons it and its message is re-delivered).

    With ``database_url`` (``allot worker --database``) the worker also runs the job reaper for that
    database every ``reap_every_s``; ``reap_every_s=0`` turns it off."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}: expected one of {', '.join(POOLS)}")
    app = make_celery(broker_url, queue=queue)
    after_setup_logger.connect(_quiet_libraries, weak=False)
    queue_name = resolve_queue(queue)
    prune_processed(app.conf.broker_url)
    log.info("allot worker: broker %s, queue %s", describe_broker(app.conf.broker_url), queue_name)
    if database_url and reap_every_s > 0:
        reaper = Reaper(
            app,
            database_url,
            every_s=reap_every_s,
            stale_after_s=stale_after_s,
            redispatch_after_s=redispatch_after_s,
            queue=queue,
        )
        worker_ready.connect(reaper.start, weak=False)
        worker_shutdown.connect(reaper.stop, weak=False)
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
    parser.add_argument("--database", default=None, help="run the job reaper for this database URL")
    parser.add_argument("--reap-every", type=float, default=5.0, help="seconds between reaper rounds (0: off)")
    parser.add_argument("--stale-after", type=float, default=30.0, help="re-queue running jobs silent this long")
    parser.add_argument("--redispatch-after", type=float, default=60.0, help="re-send queued jobs' messages this old")
    args = parser.parse_args(argv)
    run_worker(
        args.broker,
        concurrency=args.concurrency,
        loglevel=args.loglevel,
        pool=args.pool,
        queue=args.queue,
        hostname=args.hostname,
        database_url=args.database,
        reap_every_s=args.reap_every,
        stale_after_s=args.stale_after,
        redispatch_after_s=args.redispatch_after,
    )


if __name__ == "__main__":
    main()
