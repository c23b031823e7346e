"""Trials evaluated by real Celery workers give the same results as in-process, on every broker.

Worker tests (marked ``slow``) start ``python -m workers.worker`` as a subprocess and run a study through
``CeleryRunner`` on the embedded filesystem broker, Redis (127.0.0.1:6379/15) and RabbitMQ (127.0.0.1:5672);
a server broker that does not answer fails the test. Every run uses a queue of its own, deleted afterwards, so
other runs on the same servers cannot take or leave messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from executors.replay import ReplayEnvironment
from graphs import Budget
from graphs.errors import BrokerError
from planner.storage import InMemoryStorage, SQLStorage
from planner.study import create_study, load_study
from planner.trial import FrozenTrial, TrialState
from planner.trial_runner import InProcessRunner
from workers.celery_app import broker_folder, describe_broker, make_celery
from workers.queue_runner import CeleryRunner

REPO = Path(__file__).resolve().parent.parent
BUDGET = Budget(limit=1500, unit="agenttts")
WORKER_START_S = 60.0  # a worker that has not finished a trial by then is broken
STOP_S = 20.0

BROKERS = [
    pytest.param("filesystem://", id="embedded"),
    pytest.param("redis://127.0.0.1:6379/15", id="redis"),
    pytest.param("amqp://guest:guest@127.0.0.1:5672//", id="rabbitmq"),
]


def _server_answers(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "filesystem":
        return True
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=1.0):
            return True
    except OSError:
        return False


def _delete_queue(broker_url: str, queue: str) -> None:
    """Remove a test's queue and exchange from a server broker (best effort)."""
    from kombu import Exchange, Queue

    app = make_celery(broker_url, queue=queue)
    with suppress(Exception), app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.default_channel
        exchange = Exchange(queue, "direct")
        bound = Queue(queue, exchange, routing_key=queue)(channel)
        bound.declare()  # virtual transports (Redis) delete only what this connection has bound
        bound.delete()
        exchange(channel).delete()


@contextmanager
def running_worker(home: Path, broker_url: str, queue: str, database_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process (prefork, 2 slots); killed with its pool children whatever happens."""
    env = {
        **os.environ,
        "ALLOT_HOME": str(home),
        "ALLOT_DATABASE_URL": database_url,
        "ALLOT_BROKER_URL": broker_url,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    command = [sys.executable, "-m", "workers.worker", "--broker", broker_url, "--queue", queue, "--concurrency", "2"]
    with open(home / "worker.log", "wb") as log:
        process = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=STOP_S)
            with suppress(ProcessLookupError, PermissionError):  # its own session: the pool children too
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_S)


def _worker_log(home: Path) -> str:
    path = home / "worker.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else "<no worker log>"


def _in_process(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The same plans evaluated by ``InProcessRunner`` with a fresh environment and storage."""
    storage = InMemoryStorage()
    environment = ReplayEnvironment(benchmark="aime24")
    study = storage.create_study(
        name="reference",
        strategy="random",
        strategy_params={},
        environment=environment.spec(),
        budget=BUDGET,
        seed=0,
        space={},
    )
    copies = [
        storage.create_trial(study.study_id, plan=t.plan, estimated_cost=t.estimated_cost, state=TrialState.WAITING)
        for t in trials
    ]
    return InProcessRunner(storage, environment).run(study, copies)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker_url", BROKERS)
def test_worker_evaluates_trials_like_in_process(broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _server_answers(broker_url):
        pytest.fail(f"no broker answers at {describe_broker(broker_url)}: start it (see README)")
    monkeypatch.setenv("ALLOT_HOME", str(tmp_path))  # the embedded broker's folder, here as in the worker
    queue = f"allot-test-{uuid.uuid4().hex[:12]}"
    database_url = f"sqlite:///{tmp_path / 'allot.db'}"
    storage = SQLStorage(database_url)
    study = create_study(
        storage=storage, environment=ReplayEnvironment(benchmark="aime24"), budget=BUDGET, strategy="random", seed=7
    )
    runner = CeleryRunner(storage, database_url, broker_url=broker_url, queue=queue, timeout_s=WORKER_START_S)
    try:
        with running_worker(tmp_path, broker_url, queue, database_url) as worker:
            started = time.monotonic()
            try:
                study.optimize(6, batch_size=3, runner=runner)
            except BrokerError as exc:
                pytest.fail(f"{exc}\n--- worker log ---\n{_worker_log(tmp_path)}")
            elapsed = time.monotonic() - started
            worker.terminate()  # warm shutdown: finishes what it runs, then exits
            assert worker.wait(timeout=STOP_S) == 0, _worker_log(tmp_path)
    finally:
        if not broker_url.startswith("filesystem"):
            _delete_queue(broker_url, queue)

    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6, [t.error for t in trials]
    expected = _in_process(trials)
    for got, want in zip(trials, expected, strict=True):
        assert got.plan_id == want.plan_id
        assert got.score == pytest.approx(want.score, abs=1e-12)
        assert got.scores == pytest.approx(want.scores, abs=1e-12)
        assert got.cost is not None and want.cost is not None
        assert got.cost.flops == pytest.approx(want.cost.flops, rel=1e-9)
    assert elapsed < 120, f"6 trials took {elapsed:.1f} s"
    if broker_url.startswith("filesystem"):  # every message was consumed
        assert not list((broker_folder(broker_url) / "queue").glob("*.msg"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("broker_url", "shown"),
    [
        pytest.param("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0", id="redis"),
        pytest.param("amqp://guest:s3cret@127.0.0.1:1//", "amqp://guest:***@127.0.0.1:1//", id="rabbitmq"),
    ],
)
def test_unreachable_broker_fails_fast_and_keeps_the_trials(broker_url: str, shown: str, tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'allot.db'}"
    storage = SQLStorage(database_url)
    study = create_study(
        storage=storage, environment=ReplayEnvironment(benchmark="aime24"), budget=BUDGET, strategy="random", name="s"
    )
    runner = CeleryRunner(storage, database_url, broker_url=broker_url)

    started = time.monotonic()
    with pytest.raises(BrokerError) as raised:
        study.optimize(3, batch_size=3, runner=runner)
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert elapsed < 15, f"took {elapsed:.1f} s to give up"
    assert shown in message
    assert "s3cret" not in message
    assert "\n" not in message
    assert "allot worker" in message

    left = SQLStorage(database_url).get_trials(study.study_id)
    assert [t.state for t in left] == [TrialState.WAITING] * 3

    resumed = load_study("s", SQLStorage(database_url))
    resumed.optimize(0)  # unfinished trials are evaluated first, in process
    assert [t.state for t in resumed.trials] == [TrialState.COMPLETE] * 3
    assert [t.plan_id for t in resumed.trials] == [t.plan_id for t in left]


@pytest.mark.timeout(60)
def test_no_worker_times_out_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOT_HOME", str(tmp_path))
    database_url = f"sqlite:///{tmp_path / 'allot.db'}"
    storage = SQLStorage(database_url)
    study = create_study(storage=storage, environment=ReplayEnvironment(benchmark="aime24"), budget=BUDGET)
    runner = CeleryRunner(storage, database_url, queue=f"nobody-{uuid.uuid4().hex[:8]}", timeout_s=1.0)

    with pytest.raises(BrokerError, match="no worker took 2 trial") as raised:
        study.optimize(2, batch_size=2, runner=runner)
    assert "allot worker" in str(raised.value)
    assert str(tmp_path) in str(raised.value)  # names the embedded broker's folder
    assert [t.state for t in study.trials] == [TrialState.WAITING] * 2
    assert len(list((tmp_path / ".allot" / "broker" / "queue").glob("*.msg"))) == 2


def test_describe_broker_masks_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOT_HOME", str(tmp_path))
    assert describe_broker("redis://:pw@host:6379/15") == "redis://:***@host:6379/15"
    assert describe_broker("amqp://u:pw@h:5672//;redis://:pw2@h/1") == "amqp://u:***@h:5672//;redis://:***@h/1"
    assert "token" not in describe_broker("rediss://u:pw@h/0?ssl_certfile=token")
    assert describe_broker("filesystem://") == f"filesystem:// (embedded, {tmp_path / '.allot' / 'broker'})"


def test_memory_storage_cannot_feed_workers() -> None:
    with pytest.raises(ValueError, match="SQLStorage"):
        CeleryRunner(InMemoryStorage(), broker_url="filesystem:///nonexistent-never-created")


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker_url", BROKERS)
def test_jobs_run_on_a_worker_through_every_broker(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_postgres_url: str
) -> None:
    """Jobs submitted with ``Dispatcher`` are run by a real worker process: each succeeds once, with the
    learned graph's plan, and the results' scores become a new graph version."""
    from workers.dispatch import Dispatcher
    from workers.jobs import JobState
    from workers.service import ServiceTask, clear_runtimes, initial_state, register_task, runtime_for

    if not _server_answers(broker_url):
        pytest.fail(f"no broker answers at {describe_broker(broker_url)}: start it (see README)")
    monkeypatch.setenv("ALLOT_HOME", str(tmp_path))
    queue = f"allot-test-{uuid.uuid4().hex[:12]}"
    storage = SQLStorage(fresh_postgres_url)
    spec = ServiceTask(
        name="aime",
        backend="replay",
        benchmark="aime24",
        budget=Budget(limit=300_000, unit="tokens"),
        graph="aime",
        learn_every=5,
    )
    register_task(storage, spec)
    runtime = runtime_for(spec, storage)
    storage.add_graph_version("aime", initial_state(spec, runtime.task, runtime.catalog).definition(), "initial")
    dispatcher = Dispatcher(storage, broker_url=broker_url, queue=queue)
    try:
        with running_worker(tmp_path, broker_url, queue, fresh_postgres_url):
            jobs = [
                dispatcher.submit("aime", {"example": ex.id}, priority=i % 3)[0]
                for i, ex in enumerate(runtime.task.examples[:10])
            ]
            try:
                finished = dispatcher.wait([job.id for job in jobs], timeout_s=WORKER_START_S)
            except TimeoutError as exc:
                pytest.fail(f"{exc}\n--- worker log ---\n{_worker_log(tmp_path)}")
    finally:
        clear_runtimes()
        if not broker_url.startswith("filesystem"):
            _delete_queue(broker_url, queue)
    assert [job.state for job in finished] == [JobState.SUCCEEDED] * 10, [job.error for job in finished]
    assert all(job.attempt == 1 and job.plan_id and job.worker for job in finished)
    versions = storage.get_graph_versions("aime")
    assert len(versions) == 3 and all(v.cause.startswith("feedback: 5 scored job(s)") for v in versions[1:])
