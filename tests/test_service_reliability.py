"""Reliability of the job service with real processes: workers killed, brokers and the database away.

Everything is on loopback and bounded: every wait has a deadline, every process the tests start (worker
processes in sessions of their own, a private ``redis-server``) is killed in a fixture's teardown, and the
TCP proxies are threads of the test process. The database is PostgreSQL (a fresh one per test).

- A worker killed with ``kill -9`` mid-job: the reaper of a second worker re-queues the job and re-sends its
  message; the job completes once, reusing the samples the dead attempt had stored, at the cost of one run.
- A broker restarted mid-run of 200 jobs: a private Redis that keeps nothing (its queued messages are lost,
  the reaper re-sends them), and RabbitMQ behind a TCP proxy that drops every connection (the shared server
  itself is never restarted: other test runs use it).
- The database away for ~5 s behind a TCP proxy: no job is left ``running``, each completes once.
- A property (hypothesis): a job's plan run never spends more than its budget, whatever the interleaving.
- Malformed submissions through ``Dispatcher.submit`` are refused with the problem named, nothing stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from executors.backends import CompletionRequest, MockBackend
from executors.budget import BudgetMeter
from executors.plan_runner import PlanRunner
from executors.tasks import Task
from graphs.cost import Budget, Cost, ModelSpec
from graphs.errors import AllotError, BudgetError, DataError
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph
from planner.storage import SQLStorage
from workers.dispatch import Dispatcher
from workers.jobs import Job, JobQueue, JobState
from workers.service import (
    ServiceTask,
    TaskRuntime,
    UnknownTask,
    clear_runtimes,
    get_service_task,
    initial_state,
    register_task,
    runtime_for,
)

REPO = Path(__file__).resolve().parent.parent
BUDGET = Budget(limit=300_000, unit="tokens")
READY_S = 60.0
"""A worker that has not said it is ready by then is broken."""
LOOPBACK = "127.0.0.1"


# -- processes and proxies -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, *, poll_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:g} s")
        time.sleep(poll_s)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


class RedisServer:
    """A private ``redis-server`` on a free loopback port that keeps nothing: a restart loses every message."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.ping, 10, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=1, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=10)
        self.process = None

    def queue_length(self, queue: str) -> int:
        import redis

        return int(redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=2).llen(queue))


class TcpProxy:
    """A loopback TCP proxy (asyncio, on a thread of its own) in front of ``127.0.0.1:target``.

    ``stop()`` drops every connection and closes the listening socket, so new connections are refused;
    ``start()`` listens again on the same port. ``close()`` stops it for good.
    """

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{target}", daemon=True)
        self._thread.start()
        self._server: asyncio.base_events.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        await self._stop()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            transport.abort()  # a reset, as when a server or a network path dies
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, self.target), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self.connections += 1
        pair = {writer.transport, upstream_writer.transport}
        self._transports |= pair

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ConnectionError, RuntimeError):
                pass
            finally:
                for transport in pair:
                    transport.abort()

        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            self._transports -= pair


class Workers:
    """Real worker processes (``python -m workers.worker``), each in a session of its own so that
    ``kill`` takes its pool children too; whatever is still running at teardown is killed."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self,
        broker_url: str,
        queue: str,
        database_url: str,
        *,
        concurrency: int = 1,
        reap_every_s: float = 1.0,
        stale_after_s: float = 3.0,
        redispatch_after_s: float = 3.0,
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        number = len(self.processes)
        log_path = self.home / f"worker-{number}.log"
        env = {
            **os.environ,
            "ALLOT_HOME": str(self.home),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        command = [
            sys.executable, "-m", "workers.worker",
            "--broker", broker_url, "--queue", queue, "--concurrency", str(concurrency), "--pool", "prefork",
            "--hostname", f"reliability-{number}-{uuid.uuid4().hex[:6]}@%h",
            "--database", database_url, "--reap-every", str(reap_every_s),
            "--stale-after", str(stale_after_s), "--redispatch-after", str(redispatch_after_s),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, cwd=self.home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append((process, log_path))
        if wait:
            self.wait_ready(process)
        return process

    def start_many(self, count: int, *args: Any, **kwargs: Any) -> list[subprocess.Popen[bytes]]:
        """``count`` workers started at once, then waited for."""
        started = [self.start(*args, wait=False, **kwargs) for _ in range(count)]
        for process in started:
            self.wait_ready(process)
        return started

    def wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        log_path = next(path for p, path in self.processes if p is process)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"worker exited with {process.returncode}:\n{self.logs()}")
            return " ready." in log_path.read_text(errors="replace")

        wait_for(ready, READY_S, "worker ready", poll_s=0.1)

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        """``kill -9`` the worker's whole process group: its main process and its pool children."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def kill_all(self) -> None:
        for process, _ in self.processes:
            self.kill(process)

    def logs(self, chars: int = 3000) -> str:
        parts = []
        for number, (_, path) in enumerate(self.processes):
            body = path.read_text(errors="replace")[-chars:] if path.exists() else "<no log>"
            parts.append(f"--- worker {number} ({path.name}) ---\n{body}")
        return "\n".join(parts)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def proxies() -> Iterator[Callable[[int], TcpProxy]]:
    made: list[TcpProxy] = []

    def make(target: int) -> TcpProxy:
        proxy = TcpProxy(target)
        proxy.start()
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


# -- the service: a replay task on PostgreSQL, and what a correct run of it looks like -----------------------


def make_service(storage: SQLStorage, **fields: Any) -> tuple[ServiceTask, TaskRuntime]:
    spec = ServiceTask(name="aime", backend="replay", benchmark="aime24", budget=BUDGET, graph="aime", **fields)
    register_task(storage, spec)
    runtime = runtime_for(spec, storage)
    storage.add_graph_version("aime", initial_state(spec, runtime.task, runtime.catalog).definition(), "initial")
    return spec, runtime


class Reference:
    """Each (plan, example) run once in-process, with a sample store of its own: what one run costs."""

    def __init__(self, spec: ServiceTask) -> None:
        self.runtime = TaskRuntime(spec.model_copy(update={"latency_s": 0.0}))  # in-memory sample store
        self._runs: dict[tuple[str, str], Any] = {}

    def run(self, plan: Plan, example_id: str) -> Any:
        key = (plan.plan_id, example_id)
        if key not in self._runs:
            example = next(ex for ex in self.runtime.task.examples if ex.id == example_id)
            self._runs[key] = self.runtime.run(plan, example, BUDGET)
        return self._runs[key]


def sql(storage: SQLStorage, statement: str, **params: Any) -> list[Any]:
    with storage.transaction() as session:
        return list(session.execute(text(statement), params).all())


def duplicate_samples(storage: SQLStorage) -> list[Any]:
    return sql(
        storage,
        "SELECT model, prompt_hash, params_hash, sample_index, count(*) FROM allot_samples "
        "GROUP BY model, prompt_hash, params_hash, sample_index HAVING count(*) > 1",
    )


def assert_cost_of_one_run(job: Job, want: Cost) -> None:
    assert job.cost is not None, f"job {job.id} has no cost"
    assert job.cost["prompt_tokens"] == want.prompt_tokens, (job.id, job.cost, want)
    assert job.cost["output_tokens"] == want.output_tokens, (job.id, job.cost, want)
    assert job.cost["flops"] == pytest.approx(want.flops, rel=1e-9), (job.id, job.cost, want)


def assert_each_completed_once(storage: SQLStorage, jobs: list[Job], reference: Reference) -> None:
    """Succeeded, one result, one scored-result feedback row per job (a second finish would add one),
    no sample stored twice, and each job's cost that of one run of its plan."""
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * len(jobs), [(j.id, j.state, j.error) for j in jobs]
    assert all(job.result is not None and job.plan_id and job.attempt >= 1 for job in jobs)
    feedback = dict(
        sql(storage, "SELECT job_id, count(*) FROM allot_feedback WHERE source = 'result' GROUP BY job_id")  # type: ignore[arg-type]
    )
    twice_or_never = [
        (job.id, job.attempt, job.graph_version_id, feedback.get(job.id, 0)) for job in jobs if feedback.get(job.id) != 1
    ]
    assert twice_or_never == []
    assert duplicate_samples(storage) == []
    for job in jobs:
        assert job.plan_id is not None
        want = reference.run(storage.get_plan(job.plan_id), str(job.input["example"]))
        assert_cost_of_one_run(job, want.cost)
        assert job.result is not None and job.result["answer"] == want.answer


def all_finished(storage: SQLStorage, ids: list[int], timeout_s: float, logs: Callable[[], str]) -> list[Job]:
    """Wait (reading the database directly) until every job is finished; the jobs, in ``ids`` order."""
    queue = JobQueue(storage)
    wanted = set(ids)

    def done() -> bool:
        rows = sql(storage, "SELECT count(*) FROM allot_jobs WHERE state IN ('succeeded', 'failed', 'cancelled')")
        return int(rows[0][0]) >= len(wanted)

    try:
        wait_for(done, timeout_s, "all jobs finished", poll_s=0.25)
    except TimeoutError as exc:
        counts = queue.counts()
        pytest.fail(f"{exc}: {counts}\n{logs()}")
    return [queue.get(job_id) for job_id in ids]


def finished_count(storage: SQLStorage) -> int:
    return int(sql(storage, "SELECT count(*) FROM allot_jobs WHERE state = 'succeeded'")[0][0])


@pytest.fixture
def storage(fresh_postgres_url: str) -> Iterator[SQLStorage]:
    store = SQLStorage(fresh_postgres_url)
    try:
        yield store
    finally:
        clear_runtimes()
        store.close()


# -- 1. a worker killed mid-job ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_worker_killed_mid_job_is_replaced_and_the_job_completes_once(
    storage: SQLStorage, workers: Workers, private_redis: RedisServer
) -> None:
    spec, runtime = make_service(storage, latency_s=2.0)
    reference = Reference(spec)
    # One model drawing 6 samples in rounds of 2 until 2 agree: three calls of 2 s, one after the other,
    # on an example where it takes all three rounds (so there are stored samples to kill the worker after).
    plan = Plan.allocation({"answer": ("Qwen3-0.6B", 6)}, early_stop=2)
    example = next(ex.id for ex in runtime.task.examples if reference.run(plan, ex.id).llm_calls == 3)
    want = reference.run(plan, example)
    storage.add_plan(plan)
    queue = f"reliability-{uuid.uuid4().hex[:10]}"
    dispatcher = Dispatcher(storage, broker_url=private_redis.url, queue=queue)

    first = workers.start(private_redis.url, queue, storage.url, stale_after_s=3.0)
    job, _ = dispatcher.submit("aime", {"example": example}, plan_id=plan.plan_id)

    def first_round_stored() -> bool:
        state = dispatcher.jobs.get(job.id).state
        assert state in (JobState.QUEUED, JobState.RUNNING), state
        samples = int(sql(storage, "SELECT count(*) FROM allot_samples")[0][0])
        return state is JobState.RUNNING and samples >= 2

    wait_for(first_round_stored, 30, "the first round of samples stored")
    Workers.kill(first)  # kill -9, mid-way through the second round
    assert dispatcher.jobs.get(job.id).state is JobState.RUNNING
    stored_by_the_dead = int(sql(storage, "SELECT count(*) FROM allot_samples")[0][0])
    assert stored_by_the_dead < len(want.stages["answer"].samples)

    workers.start(private_redis.url, queue, storage.url, stale_after_s=3.0)
    (done,) = all_finished(storage, [job.id], 60, workers.logs)

    assert done.state is JobState.SUCCEEDED, (done.error, workers.logs())
    assert done.attempt == 2  # the dead worker's attempt, then the second worker's
    assert done.result is not None and done.result["reused_samples"] == stored_by_the_dead
    assert done.result["answer"] == want.answer and done.plan_id == plan.plan_id
    assert duplicate_samples(storage) == []
    samples = sql(storage, "SELECT count(*), coalesce(sum(output_tokens), 0) FROM allot_samples")[0]
    assert int(samples[0]) == len(want.stages["answer"].samples)  # what the plan needed, each stored once
    assert_cost_of_one_run(done, want.cost)  # counted once, reused samples as in the first run
    assert float(samples[1]) == done.cost["output_tokens"]  # type: ignore[index]


@pytest.mark.postgres
def test_a_job_rerun_after_a_lost_attempt_keeps_its_graph_version_and_teaches_the_graph(storage: SQLStorage) -> None:
    """What the second worker above does, in-process: the plan an earlier attempt drew from the graph is
    run again, still as that graph version's plan (not as a pinned plan), so its result is evidence."""
    from workers.execution import drain
    from workers.service import choose_plan, current_version

    _, runtime = make_service(storage)
    dispatcher = Dispatcher(storage, broker_url="redis://127.0.0.1:1/0")
    job, _ = dispatcher.submit("aime", {"example": runtime.task.examples[0].id}, send=False)
    dead = dispatcher.jobs.claim("dead-worker")
    assert dead is not None
    version = current_version(storage, "aime")
    choice = choose_plan(runtime, version, runtime.example(job.input), BUDGET, seed=job.id)
    storage.add_plan(choice.plan)
    assert dispatcher.jobs.set_plan(dead, choice.plan.plan_id, choice.graph_version_id)  # then the worker died
    assert dispatcher.jobs.reap(stale_after_s=0.0, redispatch_after_s=3600).requeued == (job.id,)

    assert drain(dispatcher.jobs, "live-worker") == [job.id]
    done = dispatcher.jobs.get(job.id)
    assert (done.state, done.attempt, done.plan_id) == (JobState.SUCCEEDED, 2, choice.plan.plan_id)
    assert done.graph_version_id == version.version_id
    assert done.result is not None and done.result["plan"]["chosen"] != "pinned plan"
    feedback = dispatcher.jobs.feedback(job.id)
    assert [(f.source, f.graph) for f in feedback] == [("result", "aime")]


# -- 2. the broker restarted mid-run -------------------------------------------------------------------------

JOBS = 200
RABBITMQ_PORT = 5672


def _submit_all(dispatcher: Dispatcher, runtime: TaskRuntime, count: int) -> list[int]:
    """``count`` jobs over the task's examples, stored first, then sent on one broker connection."""
    examples = [ex.id for ex in runtime.task.examples]
    ids = [dispatcher.submit("aime", {"example": examples[i % len(examples)]}, send=False)[0].id for i in range(count)]
    dispatcher.send(ids)
    dispatcher.jobs.mark_dispatched(ids)
    return ids


def _run_through_a_broker_outage(
    storage: SQLStorage,
    workers: Workers,
    broker_url: str,
    queue: str,
    *,
    down: Callable[[], None],
    up: Callable[[], None],
    outage_s: float = 2.0,
) -> tuple[ServiceTask, list[int]]:
    """Two workers (2 slots each) run ``JOBS`` jobs; when a fifth is done the broker goes ``down`` for
    ``outage_s``, then ``up``. Returns once the broker is back (the jobs are not finished yet)."""
    spec, runtime = make_service(storage, latency_s=0.1)
    dispatcher = Dispatcher(storage, broker_url=broker_url, queue=queue)
    workers.start_many(2, broker_url, queue, storage.url, concurrency=2, stale_after_s=6.0, redispatch_after_s=3.0)
    ids = _submit_all(dispatcher, runtime, JOBS)
    wait_for(lambda: finished_count(storage) >= JOBS // 5, 90, f"{JOBS // 5} jobs done before the outage")
    down()
    assert finished_count(storage) < JOBS, "the run ended before the broker went down: make the jobs slower"
    time.sleep(outage_s)
    up()
    return spec, ids


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_redis_restarted_mid_run_loses_messages_and_every_job_still_completes_once(
    storage: SQLStorage, workers: Workers, private_redis: RedisServer
) -> None:
    queue = f"reliability-{uuid.uuid4().hex[:10]}"
    in_redis: list[int] = []

    def down() -> None:
        in_redis.append(private_redis.queue_length(queue))
        private_redis.kill()  # it keeps nothing: the messages in it are gone

    spec, ids = _run_through_a_broker_outage(storage, workers, private_redis.url, queue, down=down, up=private_redis.start)
    waiting = len(JobQueue(storage).list(state=JobState.QUEUED, limit=1000))
    assert in_redis[0] > 0 and waiting > 0  # the hard case: queued jobs whose messages were lost

    jobs = all_finished(storage, ids, 120, workers.logs)  # the reapers re-send the lost messages
    assert_each_completed_once(storage, jobs, Reference(spec))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_rabbitmq_connections_dropped_mid_run_and_every_job_still_completes_once(
    storage: SQLStorage, workers: Workers, proxies: Callable[[int], TcpProxy]
) -> None:
    # The shared RabbitMQ is not restarted (other runs use it): a proxy in front of it drops every
    # connection of the workers and the producer, and refuses new ones, for the outage.
    if not _answers(RABBITMQ_PORT):
        pytest.fail(f"no RabbitMQ answers on {LOOPBACK}:{RABBITMQ_PORT}: start it (see README)")
    proxy = proxies(RABBITMQ_PORT)
    queue = f"reliability-{uuid.uuid4().hex[:10]}"
    broker_url = f"amqp://guest:guest@{LOOPBACK}:{proxy.port}//"
    before: list[int] = []

    def down() -> None:
        before.append(proxy.connections)
        proxy.stop()

    try:
        spec, ids = _run_through_a_broker_outage(storage, workers, broker_url, queue, down=down, up=proxy.start)
        jobs = all_finished(storage, ids, 120, workers.logs)
    finally:
        workers.kill_all()
        _delete_queue(f"amqp://guest:guest@{LOOPBACK}:{RABBITMQ_PORT}//", queue)
    assert proxy.connections >= before[0] + 2  # both workers came back through the proxy
    assert_each_completed_once(storage, jobs, Reference(spec))


def _delete_queue(broker_url: str, queue: str) -> None:
    """Remove a test's queue and exchange from the shared RabbitMQ (best effort)."""
    from kombu import Connection, Exchange, Queue

    with contextlib.suppress(Exception), Connection(broker_url, connect_timeout=5) as connection:
        channel = connection.default_channel
        Queue(queue, Exchange(queue, "direct"), routing_key=queue)(channel).delete()
        Exchange(queue, "direct")(channel).delete()


# -- 3. the database away for a few seconds ------------------------------------------------------------------

DB_JOBS = 80
POSTGRES_PORT = 5432


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_database_away_for_seconds_leaves_no_job_running_and_each_completes_once(
    storage: SQLStorage, workers: Workers, private_redis: RedisServer, proxies: Callable[[int], TcpProxy]
) -> None:
    from sqlalchemy.engine import make_url

    spec, runtime = make_service(storage, latency_s=0.3)
    proxy = proxies(POSTGRES_PORT)
    # Workers, their reapers and the messages (which carry the database URL) go through the proxy; the
    # test reads the database directly.
    proxied = make_url(storage.url).set(host=LOOPBACK, port=proxy.port).render_as_string(hide_password=False)
    producer = SQLStorage(proxied)
    queue = f"reliability-{uuid.uuid4().hex[:10]}"
    stale_after_s = 4.0
    try:
        dispatcher = Dispatcher(producer, broker_url=private_redis.url, queue=queue)
        workers.start_many(
            2, private_redis.url, queue, proxied, concurrency=2, stale_after_s=stale_after_s, redispatch_after_s=3.0
        )
        ids = _submit_all(dispatcher, runtime, DB_JOBS)
        wait_for(lambda: finished_count(storage) >= DB_JOBS // 4, 90, f"{DB_JOBS // 4} jobs done before the outage")
        running = len(JobQueue(storage).list(state=JobState.RUNNING))
        proxy.stop()  # every connection dropped, new ones refused
        assert running > 0 and finished_count(storage) < DB_JOBS
        time.sleep(5.0)
        proxy.start()
        jobs = all_finished(storage, ids, 120, workers.logs)
    finally:
        producer.close()
    assert JobQueue(storage).counts()["running"] == 0
    assert_each_completed_once(storage, jobs, Reference(spec))


# -- 4. a job's plan run never spends more than its budget ---------------------------------------------------

PROPERTY_CATALOG = {
    "small": ModelSpec(name="small", params_b=1.0, layers=16, hidden=2048, context=8192),
    "big": ModelSpec(name="big", params_b=8.0, layers=32, hidden=4096, context=8192),
}
_PARSER = {"kind": "regex", "pattern": r"ANS=(\w+)"}
# Stages a and b run concurrently; c reads both.
PROPERTY_TASK = Task.model_validate(
    {
        "name": "property",
        "max_tokens": 48,
        "stages": [
            {"name": "a", "prompt": "STAGE-A {input[q]}", "parser": _PARSER},
            {"name": "b", "prompt": "STAGE-B {input[q]}", "parser": _PARSER},
            {"name": "c", "prompt": "STAGE-C {input[q]} from <{stages[a]}> and <{stages[b]}>", "parser": _PARSER},
        ],
        "examples": [{"id": "0", "inputs": {"q": "what is it?"}}],
    }
)


@st.composite
def stage_graphs(draw: st.DrawFn, stage: str) -> StageGraph:
    """Several solvers drawing concurrently; decided by a vote (early stop or not), a verifier or fusion."""
    solvers = [
        Node(
            id=f"s{i}",
            model=draw(st.sampled_from(sorted(PROPERTY_CATALOG))),
            n=draw(st.integers(1, 4)),
            max_tokens=draw(st.none() | st.integers(2, 48)),
        )
        for i in range(draw(st.integers(1, 3)))
    ]
    decision = draw(st.sampled_from(["vote", "early_stop", "best_of_n", "fusion"]))
    if decision == "early_stop":
        return StageGraph(stage=stage, nodes=tuple(solvers), early_stop=draw(st.integers(2, 3)))
    if decision == "best_of_n":
        verifier = Node(id="v", role=Role.VERIFIER, model=draw(st.sampled_from(sorted(PROPERTY_CATALOG))), max_tokens=8)
        return StageGraph(stage=stage, nodes=(*solvers, verifier), decision=DecisionRule.BEST_OF_N)
    if decision == "fusion":
        fuser = Node(id="z", role=Role.AGGREGATOR, model=draw(st.sampled_from(sorted(PROPERTY_CATALOG))), max_tokens=16)
        edges = tuple((node.id, "z") for node in solvers)
        return StageGraph(stage=stage, nodes=(*solvers, fuser), edges=edges, decision=DecisionRule.FUSION)
    return StageGraph(stage=stage, nodes=tuple(solvers))


def _scripted(delays: list[float], lengths: list[float], answers: list[str]) -> Callable[[CompletionRequest], Any]:
    """Call k waits ``delays[k]`` s and answers each sample with ``lengths[k]`` of its ``max_tokens``
    (a backend never returns more than ``max_tokens``), answers cycling through ``answers``."""
    calls = itertools.count()

    async def handler(request: CompletionRequest) -> list[str]:
        k = next(calls)
        await asyncio.sleep(delays[k % len(delays)])
        cap = request.max_tokens or PROPERTY_TASK.max_tokens
        tokens = max(2, round(cap * lengths[k % len(lengths)]))  # every cap is >= 2
        verifier = "Proposed answer:" in request.messages[-1]["content"]
        heads = [f"Score: {(k + i) % 11}" if verifier else f"ANS={answers[(k + i) % len(answers)]}" for i in range(request.n)]
        return [head.ljust(tokens * 4) for head in heads]  # MockBackend counts len // 4 tokens

    return handler


@given(
    plan=st.builds(lambda a, b, c: Plan(stages=(a, b, c)), stage_graphs("a"), stage_graphs("b"), stage_graphs("c")),
    fraction=st.floats(0.3, 1.2) | st.floats(0.0, 0.3),  # near the worst case mostly
    delays=st.lists(st.sampled_from([0.0, 0.0005, 0.001, 0.002]), min_size=1, max_size=12),
    lengths=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    answers=st.lists(st.sampled_from("xyz"), min_size=1, max_size=4),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_plan_run_never_spends_more_than_its_budget(
    plan: Plan, fraction: float, delays: list[float], lengths: list[float], answers: list[str]
) -> None:
    runner = PlanRunner(PROPERTY_TASK, MockBackend(_scripted(delays, lengths, answers)), PROPERTY_CATALOG)
    example = PROPERTY_TASK.examples[0]
    worst = runner.estimate_cost(plan, example).tokens
    budget = Budget(limit=max(1.0, worst * fraction), unit="tokens")
    meter = BudgetMeter(budget)

    result = asyncio.run(runner.run(plan, example, meter=meter))

    assert meter.spent <= budget.limit and budget.spent(result.cost) <= budget.limit
    assert meter.reserved == 0 and meter.overrun == 0
    assert result.cost.tokens == pytest.approx(meter.spent)  # what the run counts is what the meter charged
    assert result.stopped_at_budget == (meter.refused > 0)  # a refused call marks the run
    if budget.limit >= worst:
        assert not result.stopped_at_budget  # the estimate is a true worst case: a budget at it never stops
    event(f"stopped at the budget: {result.stopped_at_budget}")
    event(f"calls: {'none' if result.llm_calls == 0 else 'some'}")


# -- 5. malformed submissions --------------------------------------------------------------------------------
# (tests/test_jobs.py covers unknown tasks and examples, missing input fields, budgets over the task's or below
# the cheapest plan, unknown plans and versions; tests/test_api.py the REST API's 4xx answers.)


@pytest.fixture(scope="module")
def submissions(postgres_database_factory: Callable[[], str]) -> Iterator[Dispatcher]:
    """One task on one PostgreSQL database for all the malformed submissions (none is stored); sending is
    recorded, not done, so that a message for a refused job would show."""
    storage = SQLStorage(postgres_database_factory())
    make_service(storage)
    dispatcher = Dispatcher(storage, broker_url="redis://127.0.0.1:1/0")
    dispatcher.sent = []  # type: ignore[attr-defined]
    dispatcher.send = lambda ids, **_: dispatcher.sent.extend(ids)  # type: ignore[method-assign,attr-defined]
    try:
        yield dispatcher
    finally:
        clear_runtimes()
        storage.close()


def _example(dispatcher: Dispatcher) -> str:
    return runtime_for(get_service_task(dispatcher.storage, "aime")[1], dispatcher.storage).task.examples[0].id


EXAMPLE = object()  # stands for a real example id of the task


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("task", "payload", "kwargs", "error", "words"),
    [
        pytest.param(None, {"example": EXAMPLE}, {}, UnknownTask, "unknown task None", id="task-none"),
        pytest.param("", {"example": EXAMPLE}, {}, UnknownTask, "unknown task ''", id="task-empty"),
        pytest.param(7, {"example": EXAMPLE}, {}, UnknownTask, "unknown task 7", id="task-number"),
        pytest.param("aime", ["aime24-00"], {}, DataError, "must be an object", id="input-list"),
        pytest.param("aime", "aime24-00", {}, DataError, "must be an object", id="input-string"),
        pytest.param("aime", None, {}, DataError, "must be an object", id="input-none"),
        pytest.param("aime", {}, {}, DataError, "needs example", id="input-empty"),
        pytest.param("aime", {"inputs": []}, {}, DataError, "needs example", id="inputs-list"),
        pytest.param("aime", {"example": EXAMPLE, "inputs": {"question": "q"}}, {}, DataError, "not both", id="both"),
        pytest.param("aime", {"example": ["aime24-00"]}, {}, DataError, "has no example", id="example-list"),
        pytest.param("aime", {"inputs": {"question": b"raw"}}, {}, DataError, "must be JSON", id="input-bytes"),
        pytest.param("aime", {"inputs": {"question": float("nan")}}, {}, DataError, "no NaN", id="input-nan"),
        pytest.param("aime", {"inputs": {"question": "q"}, "reference": 7}, {}, DataError, "reference must be", id="ref"),
        pytest.param("aime", {"example": EXAMPLE}, {"budget_limit": float("nan")}, BudgetError, "invalid budget", id="nan"),
        pytest.param("aime", {"example": EXAMPLE}, {"budget_limit": float("inf")}, BudgetError, "cannot exceed", id="inf"),
        pytest.param("aime", {"example": EXAMPLE}, {"budget_limit": -1.0}, BudgetError, "limit must be > 0", id="neg"),
        pytest.param("aime", {"example": EXAMPLE}, {"budget_limit": 0.0}, BudgetError, "limit must be > 0", id="zero"),
        pytest.param("aime", {"example": EXAMPLE}, {"budget_limit": "lots"}, BudgetError, "invalid budget lots", id="text"),
        pytest.param("aime", {"example": EXAMPLE}, {"budget_unit": "parsecs"}, BudgetError, "parsecs", id="unit"),
        pytest.param("aime", {"example": EXAMPLE}, {"budget_unit": "TOKENS"}, BudgetError, "TOKENS", id="unit-case"),
        pytest.param(
            "aime", {"example": EXAMPLE}, {"budget_limit": 1e30, "budget_unit": "flops"}, BudgetError, "task's unit, tokens",
            id="other-unit-over-the-task's",
        ),
        pytest.param(
            "aime", {"example": EXAMPLE}, {"budget_limit": 1.0, "budget_unit": "usd"}, BudgetError, "task's unit, tokens",
            id="dollars-on-a-token-task",
        ),
        pytest.param("aime", {"example": EXAMPLE}, {"max_concurrent": 0}, ValueError, "max_concurrent", id="max-conc"),
        pytest.param("aime", {"example": EXAMPLE}, {"plan_id": ""}, KeyError, "plan id ''", id="plan-empty"),
        pytest.param("aime", {"example": EXAMPLE}, {"graph_version": 0}, KeyError, "no version 0", id="version-0"),
    ],
)  # fmt: skip
def test_a_malformed_submission_is_refused_by_name_and_nothing_is_stored_or_sent(
    submissions: Dispatcher, task: Any, payload: Any, kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    if isinstance(payload, dict) and payload.get("example") is EXAMPLE:
        payload = {**payload, "example": _example(submissions)}
    stored, sent = sum(submissions.jobs.counts().values()), len(submissions.sent)  # type: ignore[attr-defined]
    with pytest.raises(error) as raised:
        submissions.submit(task, payload, **kwargs)
    message = str(raised.value)
    assert words in message and "\n" not in message
    assert sum(submissions.jobs.counts().values()) == stored
    assert len(submissions.sent) == sent  # type: ignore[attr-defined]


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.mark.postgres
@given(
    payload=st.one_of(
        _JSONISH,
        st.fixed_dictionaries({}, optional={"example": _JSONISH, "inputs": _JSONISH, "reference": _JSONISH}),
        st.fixed_dictionaries({"inputs": st.fixed_dictionaries({"question": _JSONISH})}),
    )
)
@settings(max_examples=60, deadline=None)
def test_any_payload_is_stored_as_given_or_refused_with_nothing_stored(submissions: Dispatcher, payload: Any) -> None:
    before = sum(submissions.jobs.counts().values())
    try:
        job, created = submissions.submit("aime", payload)
    except (AllotError, KeyError, ValueError) as exc:
        assert str(exc) and "\n" not in str(exc)
        assert sum(submissions.jobs.counts().values()) == before
        return
    assert created and job.input == payload and job.state is JobState.QUEUED
    assert sum(submissions.jobs.counts().values()) == before + 1
    assert submissions.sent[-1] == job.id  # type: ignore[attr-defined]
