"""End-to-end throughput of the job service: Allot jobs against a bare Celery no-op task, same run, same workers.

Both runs go through the same broker (Redis), the same queue and the same worker processes, and are timed
the same way, from just before the first submission to the last result stored:

1. **bare Celery**: ``--jobs`` messages of a no-op task (``allot.bench_noop``) published through one
   producer connection; the task's whole work is to report that it ran, with one ``RPUSH`` of its index,
   its submission time and its completion time to a Redis list: one write to a store per task, which is
   what Allot's finish is, minus everything else. No Celery result backend: that would add a second write
   and a pub/sub subscription on the caller's side, which Allot does not have either (its results are in
   the SQL database, where ``created_at`` and ``finished_at`` are read afterwards).
2. **Allot**: ``--jobs`` replay-backed jobs (``ServiceTask(backend="replay", benchmark="aime24")``, inputs
   cycling through the 30 AIME 2024 problems) submitted with ``Dispatcher.submit_many`` (each distinct
   input checked once, one transaction, one message per job through one producer connection; ``--chunk N``
   submits N at a time instead), each run by a worker: claimed, its plan chosen from the task's learned
   graph and recorded, run against recorded samples behind the sample store, finished once (conditional on
   its attempt), its scored result recorded and learnt from (a new graph version every ``learn_every`` = 8
   results), with heartbeats throughout.

Latency is submission to stored result: for the no-op, each message's publication to its report; for
Allot, each job's ``created_at`` to its ``finished_at``. With one bulk submission every job is created at
once, so Allot's latencies are mostly time spent queued (the median is about half the run), while the
no-op's messages are published one by one over the run; ``--chunk`` shows the streaming case.

Before each measured run ``--warmup`` tasks of its kind run, then the state is reset (the benchmark task's
jobs, feedback and graph versions, the sample store of a fresh database, the Redis list, the queue), so
neither run pays for starting Python or loading the replay data in the worker processes, and the Allot run
starts from the initial graph version and an empty sample store. Afterwards both runs are checked: every
no-op ran exactly once; every job succeeded, finished once, with its cost written and exactly one
scored result recorded. A second table shows the CPU time per job of the workers, PostgreSQL, Redis, this
process and the rest of the machine during each run (from /proc): on 2 cores both runs are CPU-bound.

Workers: ``--workers`` processes of ``python -m workers.worker`` (the same ``workers.worker.main``, with the
no-op task registered and the job reaper on), each ``--concurrency 1`` with the ``prefork`` pool: how
``allot worker`` is deployed, one worker node per core, so a node killed or stuck takes one slot with it
and each slot has its own consumer and reaper. One node with ``--concurrency 2`` has a single consumer
process feeding two children, an extra hop and a shared bottleneck; ``--pool solo`` (tasks in the
consumer process) is faster for both runs but gives up the crash isolation of a pool child.

    python benchmarks/service_throughput.py [--jobs 2000] [--workers 2] [--database URL]
        [--broker redis://127.0.0.1:6379/12] [--pool prefork] [--concurrency 1] [--warmup 60] [--chunk N]

``--database`` defaults to a fresh PostgreSQL database created on ``--postgres`` (the server of the
tests, ``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and dropped at the end; a given database
is used as is (its ``bench-aime`` task's jobs, feedback and graph versions are replaced; its sample store
is kept). Needs PostgreSQL and Redis on loopback; about a minute on 2 cores. Exits with status 1 if a
check fails (with ``--strict`` also if a target is missed: at least 200 jobs/s, and no more than 2x the
bare task's time). The machine's other load shows in the CPU table's last columns: compare runs made on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

NOOP = "allot.bench_noop"
TASK = "bench-aime"
TARGET_JOBS_PER_S = 200.0
TARGET_RATIO = 2.0
DEFAULT_POSTGRES = os.environ.get("ALLOT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# -- the worker side: the no-op task, registered in the worker processes this script starts -----------------

_redis_clients: dict[tuple[int, str], Any] = {}


def _redis(url: str) -> Any:
    """One Redis client per process and URL (made after the fork, in the pool child that uses it)."""
    import redis

    key = (os.getpid(), url)
    client = _redis_clients.get(key)
    if client is None:
        client = _redis_clients[key] = redis.Redis.from_url(url)
    return client


def _register_noop() -> None:
    from celery import shared_task

    @shared_task(name=NOOP, ignore_result=True, acks_late=True)
    def bench_noop(redis_url: str, key: str, index: int, submitted: float) -> None:
        """The bare task: report ``index`` as done (submission and completion time) in one Redis write."""
        _redis(redis_url).rpush(key, f"{index} {submitted!r} {time.time()!r}")


def worker_main(argv: Sequence[str]) -> None:
    """``python benchmarks/service_throughput.py worker ARGS``: ``python -m workers.worker ARGS`` plus the
    no-op task, and a line in Redis when the worker is ready to consume."""
    from celery.signals import worker_ready

    _register_noop()
    ready_url, ready_key = os.environ["BENCH_READY_URL"], os.environ["BENCH_READY_KEY"]

    def ready(**_: Any) -> None:
        _redis(ready_url).incr(ready_key)

    worker_ready.connect(ready, weak=False)
    from workers.worker import main

    main(list(argv))


# -- the benchmark --------------------------------------------------------------------------------------------


def cpu_seconds(worker_groups: Sequence[int]) -> dict[str, float]:
    """CPU time used so far (user + system, from /proc) by the worker processes (their process groups),
    PostgreSQL's processes, Redis, this process, and everything else on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {"workers": 0.0, "postgres": 0.0, "redis": 0.0, "benchmark": 0.0, "other": 0.0}
    groups = set(worker_groups)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        seconds = (int(rest[11]) + int(rest[12])) / tick
        if int(rest[2]) in groups:
            used["workers"] += seconds
        elif comm.startswith(("postgres", "postmaster")):
            used["postgres"] += seconds
        elif comm.startswith("redis"):
            used["redis"] += seconds
        elif int(entry) == os.getpid():
            used["benchmark"] += seconds
        else:
            used["other"] += seconds
    return used


@dataclass
class RunStats:
    name: str
    jobs: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float] | None = None
    """CPU seconds used during the run, by whom (``cpu_seconds``)."""

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def wait_until(condition: Any, timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:g} s")
        time.sleep(poll_s)


@contextmanager
def fresh_database(server_url: str, keep: bool) -> Iterator[str]:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    server = make_url(server_url)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    name = f"allot_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        if not keep:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


class Workers:
    """The worker processes, each in a session of its own (stopped with its pool children at the end)."""

    def __init__(self, args: argparse.Namespace, queue: str, database_url: str, log_dir: Path) -> None:
        self.args, self.queue, self.database_url, self.log_dir = args, queue, database_url, log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ready_key = f"allot-bench:{queue}:ready"

    def start(self) -> None:
        import redis

        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "BENCH_READY_URL": self.args.broker,
            "BENCH_READY_KEY": self.ready_key,
        }
        for number in range(self.args.workers):
            command = [
                sys.executable, str(Path(__file__).resolve()), "worker",
                "--broker", self.args.broker, "--queue", self.queue,
                "--concurrency", str(self.args.concurrency), "--pool", self.args.pool,
                "--loglevel", self.args.loglevel, "--hostname", f"bench-{number}-{uuid.uuid4().hex[:6]}@%h",
                "--database", self.database_url,
            ]  # fmt: skip
            log = open(self.log_dir / f"worker-{number}.log", "wb")  # noqa: SIM115 - the child keeps it open
            self.processes.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
            log.close()
        client = redis.Redis.from_url(self.args.broker)

        def ready() -> bool:
            for number, process in enumerate(self.processes):
                if process.poll() is not None:
                    raise RuntimeError(f"worker {number} exited with {process.returncode}:\n{self.log(number)}")
            return int(client.get(self.ready_key) or 0) >= len(self.processes)

        wait_until(ready, 90, "workers ready", poll_s=0.1)

    def log(self, number: int, chars: int = 3000) -> str:
        path = self.log_dir / f"worker-{number}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "<no log>"

    def stop(self) -> None:
        import signal

        for process in self.processes:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def run_noop(app: Any, args: argparse.Namespace, queue: str, jobs: int, tag: str) -> RunStats:
    """``jobs`` no-op tasks through one producer connection; done when all reported in Redis."""
    import redis

    client = redis.Redis.from_url(args.broker)
    key = f"allot-bench:{queue}:noop:{tag}"
    client.delete(key)
    start = time.time()
    with app.connection_for_write() as connection:
        for index in range(jobs):
            app.send_task(NOOP, args=(args.broker, key, index, time.time()), connection=connection, queue=queue)
    wait_until(lambda: client.llen(key) >= jobs, args.timeout, f"{jobs} no-op tasks done")
    time.sleep(0.2)  # a task run twice would show up as an extra entry
    entries = [line.decode().split() for line in client.lrange(key, 0, -1)]
    client.delete(key)
    indices = sorted(int(index) for index, _, _ in entries)
    if indices != list(range(jobs)):
        raise AssertionError(f"no-op tasks: {len(indices)} reports for {jobs} tasks ({len(set(indices))} distinct)")
    done = [float(finished) for _, _, finished in entries]
    latencies = [float(finished) - float(submitted) for _, submitted, finished in entries]
    return RunStats("bare Celery no-op", jobs, max(done) - start, latencies)


def reset_allot(storage: Any, spec: Any, *, drop_samples: bool) -> None:
    """The task's jobs, feedback and graph versions deleted, its initial version stored again."""
    from sqlalchemy import delete
    from sqlmodel import col, select

    from planner.storage.tables import FeedbackRow, GraphVersionRow, JobRow, SampleRow, TaskRow
    from workers.service import initial_state, runtime_for

    with storage.transaction(write=True) as session:
        task_id = session.exec(select(TaskRow.id).where(TaskRow.name == spec.name)).one()
        job_ids = select(JobRow.id).where(JobRow.task_id == task_id)
        session.exec(delete(FeedbackRow).where(col(FeedbackRow.job_id).in_(job_ids)))  # type: ignore[call-overload]
        session.exec(delete(FeedbackRow).where(FeedbackRow.graph == spec.graph))  # type: ignore[call-overload]
        session.exec(delete(JobRow).where(JobRow.task_id == task_id))  # type: ignore[call-overload]
        session.exec(delete(GraphVersionRow).where(GraphVersionRow.graph == spec.graph))  # type: ignore[call-overload]
        if drop_samples:
            session.exec(delete(SampleRow))  # type: ignore[call-overload]
    runtime = runtime_for(spec, storage)
    storage.add_graph_version(spec.graph, initial_state(spec, runtime.task, runtime.catalog).definition(), "initial")


def run_allot(dispatcher: Any, args: argparse.Namespace, inputs: list[dict[str, Any]]) -> RunStats:
    """Submit ``inputs`` as jobs of the benchmark's task; done when every job finished."""
    from sqlalchemy import func
    from sqlmodel import select

    from planner.storage.tables import FeedbackRow, JobRow
    from workers.jobs import FINISHED_STATES

    storage = dispatcher.storage
    start = time.time()
    if hasattr(dispatcher, "submit_many"):
        chunk = args.chunk or len(inputs)
        ids = [job.id for at in range(0, len(inputs), chunk) for job, _ in dispatcher.submit_many(TASK, inputs[at : at + chunk])]
    else:  # the one-by-one API (for comparing with older versions of the dispatcher)
        ids = [dispatcher.submit(TASK, job_input)[0].id for job_input in inputs]
    finished = [state.value for state in FINISHED_STATES]

    low, high = min(ids), max(ids)

    def all_finished() -> bool:
        with storage.transaction() as session:
            count = session.exec(
                select(func.count()).select_from(JobRow).where(JobRow.id >= low, JobRow.id <= high, JobRow.state.in_(finished))  # type: ignore[operator,attr-defined]
            ).one()
        return int(count) >= len(ids)

    wait_until(all_finished, args.timeout, f"{len(ids)} jobs finished", poll_s=0.05)
    with storage.transaction() as session:
        rows = session.exec(select(JobRow).where(JobRow.id.in_(ids))).all()  # type: ignore[union-attr]
        results = session.exec(
            select(FeedbackRow.job_id, func.count())
            .where(FeedbackRow.job_id.in_(ids), FeedbackRow.source == "result")  # type: ignore[attr-defined]
            .group_by(FeedbackRow.job_id)
        ).all()
    problems = []
    states: dict[str, int] = {}
    for row in rows:
        states[row.state] = states.get(row.state, 0) + 1
    if len(rows) != len(ids) or states != {"succeeded": len(ids)}:
        errors = sorted({row.error for row in rows if row.error})[:3]
        problems.append(f"states {states} for {len(ids)} jobs (errors: {errors})")
    if any(row.attempt < 1 for row in rows):
        problems.append(f"{sum(row.attempt < 1 for row in rows)} finished job(s) never claimed")
    if any(row.flops is None or row.output_tokens is None for row in rows):
        problems.append("job(s) without their cost")
    if len(results) != len(ids) or any(count != 1 for _, count in results):
        problems.append(f"{len(results)} job(s) with a scored result recorded, for {len(ids)} jobs (one each expected)")
    if problems:
        raise AssertionError("Allot jobs: " + "; ".join(problems))
    again = sum(row.attempt > 1 for row in rows)
    if again:  # given back unstarted by a batch that ran long, or re-queued: still finished once (checked above)
        print(f"note: {again} job(s) were claimed more than once (given back unstarted, or re-queued), each finished once")
    end = max(row.finished_at.timestamp() for row in rows if row.finished_at is not None)
    latencies = [row.finished_at.timestamp() - row.created_at.timestamp() for row in rows if row.finished_at is not None]
    return RunStats("Allot jobs (replay)", len(ids), end - start, latencies)


def purge(app: Any, broker: str, queue: str) -> None:
    """The queue emptied and kombu's keys for it (its binding to the exchange) removed from Redis."""
    import redis
    from kombu import Queue

    with app.connection_for_write() as connection, suppress(Exception):
        Queue(queue, channel=connection.default_channel).purge()
    with suppress(Exception):
        client = redis.Redis.from_url(broker)
        for key in client.scan_iter(match=f"*{queue}*"):
            client.delete(key)


def drained(app: Any, args: argparse.Namespace, queue: str) -> None:
    """Wait until the queue is empty (the leftover wake-up messages of jobs already done are consumed)."""
    import redis

    client = redis.Redis.from_url(args.broker)
    wait_until(lambda: client.llen(queue) == 0, args.timeout, f"queue {queue} drained", poll_s=0.05)
    time.sleep(0.3)


def report(bare: RunStats, allot: RunStats, args: argparse.Namespace) -> bool:
    from rich.console import Console
    from rich.table import Table

    setup = f"{args.workers} worker process(es) x concurrency {args.concurrency}, pool {args.pool}, broker {args.broker}"
    table = Table(title=f"Service throughput, submission to result: {args.jobs} jobs each ({setup})")
    for column in ("run", "jobs", "seconds", "jobs/s", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for stats in (bare, allot):
        table.add_row(
            stats.name,
            str(stats.jobs),
            f"{stats.seconds:.2f}",
            f"{stats.rate:.0f}",
            *(f"{stats.percentile(q) * 1000:.0f}" for q in (50, 90, 99)),
            f"{max(stats.latencies) * 1000:.0f}",
        )
    ratio = allot.seconds / bare.seconds
    table.add_row(
        "Allot / bare",
        "",
        f"{ratio:.2f}x",
        f"{allot.rate / bare.rate:.2f}x",
        *(f"{allot.percentile(q) / max(bare.percentile(q), 1e-9):.2f}x" for q in (50, 90, 99)),
        "",
    )
    console = Console(width=max(120, Console().width))
    console.print(table)
    if bare.cpu is not None and allot.cpu is not None:
        usage = Table(title="CPU time per job during each run (ms, user + system from /proc; other: the rest of the machine)")
        usage.add_column("run")
        for key in bare.cpu:
            usage.add_column(key, justify="right")
        usage.add_column("cores busy", justify="right")
        for stats in (bare, allot):
            assert stats.cpu is not None
            cells = [f"{stats.cpu[key] / stats.jobs * 1000:.2f}" for key in stats.cpu]
            usage.add_row(stats.name, *cells, f"{sum(stats.cpu.values()) / stats.seconds:.2f} of {os.cpu_count()}")
        console.print(usage)
    ok = allot.rate >= TARGET_JOBS_PER_S and ratio <= TARGET_RATIO
    console.print(
        f"targets: >= {TARGET_JOBS_PER_S:.0f} jobs/s end to end ({allot.rate:.0f}) and <= {TARGET_RATIO:g}x the bare task's "
        f"time ({ratio:.2f}x): {'[green]met[/]' if ok else '[red]missed[/]'}"
    )
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="tasks per run (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=1, help="slots per worker process (default 1)")
    parser.add_argument("--pool", choices=("prefork", "solo", "threads"), default="prefork")
    parser.add_argument("--database", default=None, help="database URL (default: a fresh PostgreSQL database, dropped after)")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server on which the fresh database is created")
    parser.add_argument("--keep-database", action="store_true", help="do not drop the fresh database")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12", help="Redis broker URL")
    parser.add_argument("--warmup", type=int, default=60, help="tasks of each kind run (and reset) before measuring")
    parser.add_argument("--chunk", type=int, default=0, help="submit Allot jobs N at a time (default: all at once)")
    parser.add_argument("--loglevel", default="WARNING", help="workers' log level (default WARNING)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if a target is missed, too")
    args = parser.parse_args(argv)

    import tempfile

    from graphs.cost import Budget
    from planner.storage import SQLStorage
    from workers.celery_app import make_celery
    from workers.dispatch import Dispatcher
    from workers.service import ServiceTask, get_service_task, register_task, runtime_for

    queue = f"allot-bench-{uuid.uuid4().hex[:8]}"
    own = args.database is None
    database = fresh_database(args.postgres, args.keep_database) if own else nullcontext_str(args.database)
    with database as url, tempfile.TemporaryDirectory(prefix="allot-bench-") as logs:
        storage = SQLStorage(url)
        budget = Budget(limit=300_000, unit="tokens")
        spec = ServiceTask(name=TASK, backend="replay", benchmark="aime24", budget=budget, graph=TASK)
        try:
            get_service_task(storage, TASK)
        except KeyError:
            register_task(storage, spec)
        examples = [example.id for example in runtime_for(spec, storage).task.examples]
        app = make_celery(args.broker, queue=queue)
        dispatcher = Dispatcher(storage, app, queue=queue)
        workers = Workers(args, queue, url, Path(logs))
        ok = False
        try:
            workers.start()
            if args.warmup:
                run_noop(app, args, queue, args.warmup, "warmup")
            drained(app, args, queue)
            groups = [process.pid for process in workers.processes]
            before = cpu_seconds(groups)
            bare = run_noop(app, args, queue, args.jobs, "measured")
            bare.cpu = _minus(cpu_seconds(groups), before)
            drained(app, args, queue)
            if args.warmup:
                reset_allot(storage, spec, drop_samples=own)
                run_allot(dispatcher, args, [{"example": examples[i % len(examples)]} for i in range(args.warmup)])
                drained(app, args, queue)
            reset_allot(storage, spec, drop_samples=own)
            before = cpu_seconds(groups)
            allot = run_allot(dispatcher, args, [{"example": examples[i % len(examples)]} for i in range(args.jobs)])
            allot.cpu = _minus(cpu_seconds(groups), before)
            drained(app, args, queue)
            ok = report(bare, allot, args)
        except BaseException:
            for number in range(len(workers.processes)):
                print(f"--- worker {number} ---\n{workers.log(number)}", file=sys.stderr)
            raise
        finally:
            workers.stop()
            purge(app, args.broker, queue)
            with suppress(Exception):
                import redis

                redis.Redis.from_url(args.broker).delete(workers.ready_key)
            storage.close()
    return 0 if ok or not args.strict else 1


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after}


@contextmanager
def nullcontext_str(value: str) -> Iterator[str]:
    yield value


if __name__ == "__main__":
    sys.exit(main())
