"""Running one claimed job: choose its plan, run it within its budget, heartbeat, store the outcome once.

``execute(queue, claim)`` is the whole life of one attempt; ``drain(queue, worker)`` claims and executes
jobs until none is eligible (what a worker does for each queue message it receives).

- Failures that are the job's (bad input, no plan fits the budget, a model unknown to the catalog, a
  backend that fails: server down, missing API key, timeout) fail the job with that one-line reason.
- Failures of the database are not the job's: calls to it are retried with backoff for up to
  ``DB_RETRY_S``; if it stays away the attempt is abandoned (its heartbeat stops, so the reaper re-queues
  the job once the database is back), never left ``running`` for good.
- One heartbeat thread per process beats every ``heartbeat_s`` for all the attempts running in it (one
  statement per database); when a beat finds a job no longer held by its attempt (cancelled, or re-queued
  because it looked dead) that run is cancelled and nothing is written.

``drain`` claims jobs in batches sized to run in about ``BATCH_S`` (so a job that calls a model is claimed
alone, and replayed jobs of a few milliseconds share their transactions): per batch, one transaction claims
the jobs and chooses and records their plans (the task from a per-process cache, one query for the graph's
current version; definitions, parsed graphs, plan choices and worst-case estimates are cached per process,
since versions are immutable), and one transaction finishes them (each only if its attempt still holds
it), records their scored results as evidence, claims the next batch and stores the graph versions their
results complete, the only commit that waits for the disk. Stored samples that a process has read are
served from its memory. The event loop is kept per thread from one job to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from executors.backends import BackendError
from executors.plan_runner import RunResult
from executors.tasks import Example
from graphs.cost import Budget
from graphs.errors import AllotError, StorageError
from graphs.plan import Plan
from planner.graph_record import GraphVersion
from planner.storage import SQLStorage
from planner.storage.database import relax_commit
from planner.strategies._reinforce import GraphState
from workers.jobs import Claim, Job, JobQueue, JobState
from workers.learning import learn, learn_in, pending_count
from workers.service import (
    ServiceTask,
    TaskRuntime,
    budget_of,
    cached_service_task,
    choose_plan,
    current_version,
    remember_version,
    runtime_for,
)

__all__ = ["DB_RETRY_S", "HEARTBEAT_S", "drain", "execute", "retrying", "worker_name"]

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_S = 2.0
"""Seconds between heartbeats; the reaper's ``stale_after_s`` must be several of these."""
DB_RETRY_S = 60.0
"""How long a worker keeps retrying a database that stopped answering before it gives up the attempt."""


class AttemptLost(Exception):
    """The job is no longer this attempt's (cancelled or re-queued): stop without writing."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def retrying(call: Callable[..., T], *args: Any, budget_s: float = DB_RETRY_S, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, retried with backoff (0.2 s doubling to 5 s) while the database is away."""
    deadline = time.monotonic() + budget_s
    delay = 0.2
    while True:
        try:
            return call(*args, **kwargs)
        except StorageError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _Watch:
    """One attempt the process's heartbeat thread beats for; ``lost`` is set when it is no longer held."""

    def __init__(self, beats: _Beats, queue: JobQueue, claim: Claim, every_s: float) -> None:
        self.beats, self.queue, self.claim, self.every_s = beats, queue, claim, every_s
        self.due = time.monotonic() + every_s
        self.lost = threading.Event()

    def __enter__(self) -> _Watch:
        self.beats.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.beats.remove(self)


class _Beats:
    """The process's heartbeat thread: beats for every watched attempt when its ``every_s`` is due, the
    attempts of one database in one statement (``JobQueue.heartbeat_many``). Started on first use in each
    process (a forked child starts its own); idle while nothing runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watched: dict[int, _Watch] = {}
        self._thread: threading.Thread | None = None

    def watch(self, queue: JobQueue, claim: Claim, every_s: float) -> _Watch:
        return _Watch(self, queue, claim, every_s)

    def add(self, watch: _Watch) -> None:
        with self._lock:
            self._watched[id(watch)] = watch
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="allot-heartbeat", daemon=True)
                self._thread.start()
            self._changed.notify()

    def remove(self, watch: _Watch) -> None:
        with self._lock:
            self._watched.pop(id(watch), None)

    def _due(self) -> list[_Watch]:
        """Wait until some watched attempt is due; those attempts (their next beat scheduled)."""
        with self._lock:
            while True:
                now = time.monotonic()
                soonest = min((watch.due for watch in self._watched.values()), default=None)
                if soonest is not None and soonest <= now:
                    due = [watch for watch in self._watched.values() if watch.due <= now]
                    for watch in due:
                        watch.due = now + watch.every_s
                    return due
                self._changed.wait(None if soonest is None else soonest - now)

    def _run(self) -> None:
        while True:
            due = self._due()
            by_queue: dict[int, list[_Watch]] = {}
            for watch in due:
                by_queue.setdefault(id(watch.queue), []).append(watch)
            for watches in by_queue.values():
                try:
                    held = watches[0].queue.heartbeat_many([watch.claim for watch in watches])
                except StorageError as exc:  # the database blinked: keep running, beat again later
                    log.warning("heartbeat of %d job(s) failed: %s", len(watches), exc)
                    continue
                except Exception:  # never let the thread die: the next round tries again
                    log.exception("heartbeat of %d job(s) failed", len(watches))
                    continue
                kept = {id(claim) for claim in held}
                for watch in watches:
                    if id(watch.claim) not in kept:
                        watch.lost.set()
                        self.remove(watch)


_beats = _Beats()


def _new_beats_in_child() -> None:
    global _beats
    _beats = _Beats()  # the parent's thread does not exist here, and its lock may have been held at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_beats_in_child)


_loops = threading.local()


def _run_async(coroutine: Any) -> Any:
    """``asyncio.run``, on an event loop kept per thread (and process) from one job to the next: making
    and closing one per job costs more than a replayed run. What a run leaves behind is cancelled."""
    runner = getattr(_loops, "runner", None)
    if runner is None or _loops.pid != os.getpid():
        runner = _loops.runner = asyncio.Runner()
        _loops.pid = os.getpid()
    try:
        return runner.run(coroutine)
    finally:
        loop = runner.get_loop()
        left = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in left:
            task.cancel()
        if left:
            runner.run(_settle(left))


async def _settle(tasks: list[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


async def _run_watched(runtime: TaskRuntime, plan: Plan, example: Any, budget: Any, lost: threading.Event) -> RunResult:
    """The plan run, cancelled as soon as ``lost`` is set."""
    from executors.budget import BudgetMeter

    run = asyncio.ensure_future(runtime.runner.run(plan, example, meter=BudgetMeter(budget)))
    while not run.done():
        await asyncio.wait({run}, timeout=0.05)
        if lost.is_set() and not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            raise AttemptLost()
    return run.result()


_JOB_ERRORS = (AllotError, BackendError, ValueError, KeyError)
"""Failures that are the job's (bad input, no plan within the budget, unknown model, a backend that fails):
the job fails with the reason. ``StorageError`` is an ``AllotError`` too, but never the job's."""


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class _Prepared:
    """What a claimed job runs, settled in its claim's transaction, or why it cannot run."""

    spec: ServiceTask | None = None
    runtime: TaskRuntime | None = None
    example: Example | None = None
    budget: Budget | None = None
    plan: Plan | None = None
    version_id: int | None = None
    how: str = ""
    error: str | None = None
    """The job's own failure: it fails with this reason."""
    stored_plan: bool = False
    """The job names its plan (pinned, or drawn by an earlier attempt): read and checked after the claim."""
    lost: bool = False


def _prepare(queue: JobQueue, session: Session, claims: list[Claim], *, claimed_here: bool = True) -> list[_Prepared]:
    """Choose the plans of just-claimed jobs and record them, in the claim's transaction (``claim_many``):
    each task from the process's cache, one query per graph for its current version, each choice from cache
    unless the version is new, one statement per distinct plan to record them. A failure that is a job's is
    returned, never raised (that would undo the claim and leave the job queued, to fail again)."""
    storage = queue.storage
    versions: dict[tuple[str, int | None], GraphVersion] = {}
    chosen: list[tuple[Claim, Plan, int | None]] = []
    out = []
    for claim in claims:
        job, prepared = claim.job, _Prepared()
        try:
            _, prepared.spec = cached_service_task(storage, job.task if job.task is not None else -1, session=session)
            prepared.runtime = runtime = runtime_for(prepared.spec, storage)
            prepared.example = runtime.example(job.input)
            prepared.budget = budget_of(prepared.spec, job.budget_limit, job.budget_unit)
            if job.plan_id is not None:  # pinned, or drawn from the graph by an earlier attempt (keep its version)
                prepared.stored_plan = True
            else:
                key = (prepared.spec.graph, job.graph_version_id)
                version = versions.get(key)
                if version is None:
                    version = versions[key] = current_version(storage, key[0], key[1], session=session)
                choice = choose_plan(runtime, version, prepared.example, prepared.budget, seed=job.id)
                prepared.plan, prepared.version_id, prepared.how = choice.plan, choice.graph_version_id, choice.how
                if claimed_here:  # held by this transaction: recorded together below
                    chosen.append((claim, choice.plan, choice.graph_version_id))
                else:
                    prepared.lost = not queue.record_plan(claim, choice.plan, choice.graph_version_id, session=session)
        except StorageError:
            raise
        except _JOB_ERRORS as exc:
            prepared.error = _reason(exc)
        except SQLAlchemyError:
            raise
        except Exception as exc:  # a bug: the job fails saying so, rather than stay queued to fail again
            log.exception("job %d: cannot prepare its run", job.id)
            prepared.error = f"internal error: {_reason(exc)}"
        out.append(prepared)
    if chosen:
        queue.record_plans(session, chosen)
    return out


def _prepare_alone(queue: JobQueue, claim: Claim) -> _Prepared:
    """``_prepare`` for a claim taken elsewhere (``execute``): its own transaction, and the plan is recorded
    only if the claim still holds."""
    with queue.storage.transaction(write=True) as session:
        relax_commit(session)  # as the claim's: a lost plan record is followed by a failing finish
        return _prepare(queue, session, [claim], claimed_here=False)[0]


def _outcome(queue: JobQueue, claim: Claim, prepared: _Prepared, lost: threading.Event) -> dict[str, Any] | None:
    """Run a prepared job: the keyword arguments of its finish (succeeded, or failed with the reason), or
    ``None`` if the attempt was lost. ``StorageError`` if the database stays away."""
    job, storage, spec = claim.job, queue.storage, prepared.spec
    started = time.perf_counter()
    try:
        if prepared.lost or lost.is_set():
            raise AttemptLost()
        if prepared.error is not None:
            raise AllotError(prepared.error)
        runtime, example, budget = prepared.runtime, prepared.example, prepared.budget
        assert runtime is not None and example is not None and budget is not None
        plan, version_id, how = prepared.plan, prepared.version_id, prepared.how
        if prepared.stored_plan:
            assert job.plan_id is not None
            plan, version_id = retrying(storage.get_plan, job.plan_id), job.graph_version_id
            how = "pinned plan" if version_id is None else "drawn by an earlier attempt"
            worst = runtime.estimate_cost(plan, example)
            if not budget.allows(worst):
                need = f"{budget.spent(worst):.4g} {budget.unit.value}"
                raise AllotError(f"the pinned plan {job.plan_id[:12]} needs up to {need}, over the budget of {budget}")
            if not retrying(queue.record_plan, claim, plan, version_id):
                raise AttemptLost()
        assert plan is not None
        result = _run_async(_run_watched(runtime, plan, example, budget, lost))
    except AttemptLost:
        log.info("job %d: attempt %d lost (cancelled or re-queued); result dropped", job.id, claim.attempt)
        return None
    except StorageError:
        raise
    except _JOB_ERRORS as exc:
        reason = _reason(exc)
        log.info("job %d failed: %s", job.id, reason)
        return {"state": JobState.FAILED, "error": reason[:2000], "latency_s": time.perf_counter() - started}
    summary = result.as_dict()
    summary["plan"] = {"plan_id": plan.plan_id, "summary": plan.summary(), "chosen": how}
    return {
        "state": JobState.SUCCEEDED,
        "result": summary,
        "cost": result.cost,
        "score": result.score,
        "latency_s": time.perf_counter() - started,
        "feedback_graph": spec.graph if spec is not None and version_id is not None else None,
    }


def _learn_due(storage: SQLStorage, spec: ServiceTask, pending: int) -> None:
    """Learn if the graph's pending evidence reached its task's ``learn_every`` (in a transaction of its own).
    ``pending`` is the count its finish saw; results that other workers stored at the same moment were not
    in it, so below ``learn_every`` it is counted again now that they are committed."""
    if pending < spec.learn_every:
        pending = retrying(pending_count, storage, spec.graph)
    if pending < spec.learn_every:
        return
    try:
        version = retrying(learn, storage, spec)
        if version is not None:
            log.info("graph %s: v%d from feedback", spec.graph, version.version)
    except AllotError as exc:  # learning is best effort: the job's own result is already stored
        log.warning("graph %s: update failed: %s", spec.graph, exc)


def _learn_in_batch(
    storage: SQLStorage, specs: dict[str, ServiceTask], session: Session, pending: dict[str, int]
) -> list[tuple[GraphVersion, GraphState]]:
    """In the transaction that stores a batch's results: a new version of each graph for every
    ``learn_every`` results pending (``learn_in``), committed with them. A failed update is rolled back
    alone (a savepoint) and logged: the results are stored whatever happens to learning."""
    made: list[tuple[GraphVersion, GraphState]] = []
    for graph, count in pending.items():
        spec = specs.get(graph)
        if spec is None:
            continue
        last = None
        for _ in range(count // spec.learn_every):
            try:
                with session.begin_nested():
                    learned = learn_in(session, storage, spec, after=last)
            except AllotError as exc:
                log.warning("graph %s: update failed: %s", graph, exc)
                break
            if learned is None:
                break
            made.append(learned)
            last = learned
    return made


def _abandoned(what: str, exc: StorageError) -> None:
    log.warning("%s: database unavailable for %.0f s, abandoned (the reaper re-queues what it held): %s", what, DB_RETRY_S, exc)


def execute(queue: JobQueue, claim: Claim, *, heartbeat_s: float = HEARTBEAT_S) -> Job | None:
    """Run ``claim``'s job to its end; the stored job, or ``None`` if the attempt was lost."""
    try:
        prepared = retrying(_prepare_alone, queue, claim)
        with _beats.watch(queue, claim, heartbeat_s) as heart:
            outcome = _outcome(queue, claim, prepared, heart.lost)
        if outcome is None:
            return None
        stored, pending = retrying(queue.complete, claim, **outcome)
    except StorageError as exc:
        _abandoned(f"job {claim.job.id}", exc)
        return None
    if stored is None:
        log.info("job %d: attempt %d lost (cancelled or re-queued); result dropped", claim.job.id, claim.attempt)
        return None
    if prepared.spec is not None and pending is not None:
        _learn_due(queue.storage, prepared.spec, pending)
    return stored


BATCH_S = 0.04
"""A worker claims as many jobs at once as it expects to run in this time (at least one): replayed jobs of
a few milliseconds share one claim and one finish transaction; a job that calls a model is claimed alone.
A batch's results become visible together, so this is about the most a fast job's result waits for its
batch; a batch still running after twice this gives its unstarted jobs back to the queue."""
MAX_BATCH = 32


class _Pace:
    """How long this worker's jobs take (moving average): how many to claim at once."""

    def __init__(self) -> None:
        self.seconds: float | None = None

    def add(self, seconds: float) -> None:
        self.seconds = seconds if self.seconds is None else 0.8 * self.seconds + 0.2 * seconds

    def batch(self, left: int) -> int:
        """How many to claim next (``left`` at most)."""
        if left <= 0:
            return 0
        if self.seconds is None:
            return 1
        return max(1, min(MAX_BATCH, left, int(BATCH_S / max(self.seconds, 1e-4))))


_pace = _Pace()
"""How long this process's jobs take (kept from one drain, i.e. one queue message, to the next)."""


def drain(queue: JobQueue, worker: str | None = None, *, limit: int = 1000, heartbeat_s: float = HEARTBEAT_S) -> list[int]:
    """Claim and execute eligible jobs until none is left (at most ``limit``); the ids executed.

    Jobs are claimed in batches sized to take about ``BATCH_S`` (one job at a time for jobs that call
    models), run one after the other under the process's heartbeat, and finished in one transaction that
    also claims the next batch and stores the graph versions their results complete (``learn_in``): per
    batch one commit, and on PostgreSQL one statement to claim, one per distinct plan to record the plans,
    one per job to finish it. A batch claimed with the results that complete a version runs on the version
    before it (it was claimed first); the next batch on the new one."""
    worker = worker or worker_name()
    prepare = functools.partial(_prepare, queue)
    storage, pace = queue.storage, _pace
    done: list[int] = []
    try:
        batch = retrying(queue.claim_many, worker, pace.batch(limit), prepare)
    except StorageError as exc:
        _abandoned("claim", exc)
        return done
    while batch:
        finishes: list[tuple[Claim, dict[str, Any]]] = []
        unstarted: list[Claim] = []
        specs = {prepared.spec.graph: prepared.spec for _, prepared in batch if prepared is not None and prepared.spec}
        batch_started = time.perf_counter()
        with contextlib.ExitStack() as watching:
            watches = [watching.enter_context(_beats.watch(queue, claim, heartbeat_s)) for claim, _ in batch]
            for (claim, prepared), watch in zip(batch, watches, strict=True):
                assert prepared is not None
                started = time.perf_counter()
                if finishes and started - batch_started > 2 * BATCH_S:  # slower than expected: the rest go back
                    unstarted.append(claim)
                    continue
                try:
                    outcome = _outcome(queue, claim, prepared, watch.lost)
                except StorageError as exc:
                    _abandoned(f"job {claim.job.id}", exc)
                    outcome = None
                pace.add(time.perf_counter() - started)
                done.append(claim.job.id)
                if outcome is not None:
                    finishes.append((claim, outcome))
        try:
            finished, pending, versions, batch = retrying(
                queue.complete_many_and_claim,
                finishes,
                worker=worker,
                limit=pace.batch(limit - len(done)),
                prepare=prepare,
                then=functools.partial(_learn_in_batch, storage, specs),
                unstarted=unstarted,
            )
        except StorageError as exc:
            _abandoned(f"finishing job(s) {', '.join(str(claim.job.id) for claim, _ in finishes)}", exc)
            return done
        for (claim, _), ok in zip(finishes, finished, strict=True):
            if not ok:
                log.info("job %d: attempt %d lost (cancelled or re-queued); result dropped", claim.job.id, claim.attempt)
        for version, state in versions or ():  # committed now: this process's next jobs need not read them
            remember_version(storage.url, version, state)
            log.info("graph %s: v%d from feedback", version.graph, version.version)
        for graph, count in pending.items():  # counts that missed results committed at the same moment
            if graph in specs and count < specs[graph].learn_every:
                _learn_due(storage, specs[graph], count)
    return done
