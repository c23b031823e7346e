"""Submitting jobs and keeping their messages flowing: the one place that both writes jobs and sends.

``Dispatcher(storage, app)`` is the Python API behind ``allot submit``, the REST API and the reaper:

- ``submit(task, input, ...)`` checks the job before storing anything (the task exists, the input is one
  its prompts can read, a pinned plan or graph version exists, the budget fits at least the cheapest
  plan), stores it ``queued`` and sends one ``allot.run_job`` message. A broker that is down does not
  lose the job: it is stored, and the reaper sends its message again later (``redispatch_after_s``).
- ``submit_many(task, inputs, ...)`` does the same for many inputs of one task at once: each distinct
  input checked once, all stored in one transaction (or none), all messages sent through one connection.
- ``reap()`` re-queues jobs of dead workers and re-sends messages the broker may have lost; workers run it
  on a timer (``allot worker``), and ``allot jobs reap`` runs it once.
- ``wait(job_id)`` polls the database (the source of truth; there is no result backend).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError

from graphs.errors import BrokerError, BudgetError, DataError
from planner.graph_record import GraphVersion
from planner.storage import SQLStorage
from planner.storage.tables import strict_json
from workers.celery_app import describe_broker, make_celery
from workers.jobs import Feedback, Job, JobQueue, ReapReport
from workers.learning import learn, pending_count
from workers.service import (
    ServiceTask,
    TaskRuntime,
    budget_of,
    check_budget_fits,
    current_version,
    get_service_task,
    runtime_for,
)
from workers.tasks import RUN_JOB

__all__ = ["RUN_JOB", "Dispatcher"]

log = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


class Dispatcher:
    """Jobs of one database, sent through one Celery app (see the module docstring)."""

    def __init__(
        self,
        storage: SQLStorage,
        app: Celery | None = None,
        *,
        broker_url: str | None = None,
        queue: str | None = None,
        stale_after_s: float = 30.0,
        redispatch_after_s: float = 60.0,
    ) -> None:
        self.storage = storage
        self.jobs = JobQueue(storage)
        self.app = app if app is not None else make_celery(broker_url, queue=queue)
        self.queue_name = queue
        self.stale_after_s = stale_after_s
        self.redispatch_after_s = redispatch_after_s

    # -- submitting ---------------------------------------------------------------------------------------

    def check(
        self,
        task: str,
        input: Mapping[str, Any],
        *,
        budget_limit: float | None = None,
        budget_unit: str | None = None,
        plan_id: str | None = None,
        graph_version: int | None = None,
    ) -> tuple[int, ServiceTask, int | None, str | None]:
        """Validate a submission without storing it: ``(task id, spec, graph version id, plan id)``.
        Raises ``UnknownTask``, ``DataError``, ``BudgetError`` or ``KeyError`` naming the problem."""
        return self._check(
            task, [input], budget_limit=budget_limit, budget_unit=budget_unit, plan_id=plan_id, graph_version=graph_version
        )

    def _check(
        self,
        task: str,
        inputs: Sequence[Mapping[str, Any]],
        *,
        budget_limit: float | None,
        budget_unit: str | None,
        plan_id: str | None,
        graph_version: int | None,
    ) -> tuple[int, ServiceTask, int | None, str | None]:
        """``check`` for several inputs of one submission: the task, budget, plan and version are checked
        once, each distinct input once (an error names the input's position when there are several)."""
        task_id, spec = get_service_task(self.storage, task)
        runtime: TaskRuntime = runtime_for(spec, self.storage)
        budget = budget_of(spec, budget_limit, budget_unit)
        plan = None
        if plan_id is not None:
            plan = self.storage.get_plan(plan_id)  # KeyError names it
            runtime.runner.check(plan)
        seen: set[str] = set()
        for position, input in enumerate(inputs):
            where = f"input {position}: " if len(inputs) > 1 else ""
            try:
                if isinstance(input, Mapping):  # stored as JSON: anything else (bytes, NaN) is refused here, by name
                    try:
                        text = json.dumps(strict_json(dict(input), "a job's input"), sort_keys=True)
                    except ValueError as exc:
                        raise DataError(str(exc)) from None
                    if text in seen:
                        continue
                    seen.add(text)
                example = runtime.example(input)
                check_budget_fits(runtime, example, budget)
                if plan is not None:
                    worst = runtime.estimate_cost(plan, example)
                    if not budget.allows(worst):
                        raise BudgetError(
                            f"plan {plan.plan_id[:12]} needs up to {budget.spent(worst):.4g} {budget.unit.value}, "
                            f"over the budget of {budget}"
                        )
            except (DataError, BudgetError) as exc:
                if not where:
                    raise
                raise type(exc)(where + str(exc)) from None
        version_id = None
        if plan is not None:
            plan_id = plan.plan_id
        elif graph_version is not None:
            versions = {v.version: v for v in self.storage.get_graph_versions(spec.graph)}
            if graph_version not in versions:
                raise KeyError(f"graph {spec.graph!r} has no version {graph_version}")
            version_id = versions[graph_version].version_id
        else:
            current_version(self.storage, spec.graph)  # KeyError if the task has no graph yet
        return task_id, spec, version_id, plan_id

    def submit(
        self,
        task: str,
        input: Mapping[str, Any],
        *,
        owner: str | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
        budget_limit: float | None = None,
        budget_unit: str | None = None,
        plan_id: str | None = None,
        graph_version: int | None = None,
        max_concurrent: int | None = None,
        send: bool = True,
    ) -> tuple[Job, bool]:
        """Check, store and send one job; ``(job, created)`` (an idempotency key seen before: not created)."""
        task_id, spec, version_id, plan_id = self.check(
            task, input, budget_limit=budget_limit, budget_unit=budget_unit, plan_id=plan_id, graph_version=graph_version
        )
        budget = budget_of(spec, budget_limit, budget_unit)
        job, created = self.jobs.submit(
            task_id,
            input,
            owner=owner,
            priority=priority,
            idempotency_key=idempotency_key,
            budget_limit=budget.limit,
            budget_unit=budget.unit.value,
            plan_id=plan_id,
            graph_version_id=version_id,
            max_concurrent=max_concurrent,
            dispatched=send,
        )
        if created and send:
            try:
                self.send([job.id], priority=priority)
            except BrokerError as exc:  # stored; the reaper sends it again
                log.warning("job %d stored but not sent (%s): it is re-sent when the broker is back", job.id, exc)
        return job, created

    def submit_many(
        self,
        task: str,
        inputs: Sequence[Mapping[str, Any]],
        *,
        owner: str | None = None,
        priority: int = 0,
        idempotency_keys: Sequence[str | None] | None = None,
        budget_limit: float | None = None,
        budget_unit: str | None = None,
        plan_id: str | None = None,
        graph_version: int | None = None,
        max_concurrent: int | None = None,
        send: bool = True,
    ) -> list[tuple[Job, bool]]:
        """Check, store and send many jobs of one task at once; ``(job, created)`` per input, in order.

        All or nothing: every input is checked first (``DataError``/``BudgetError`` name the input's
        position), then all are stored in one transaction (``JobQueue.submit_many``; an idempotency key of
        another owner, task or input is a ``JobConflict`` and nothing is stored), then one message per
        created job is sent through one broker connection (a broker that is down does not lose them: the
        reaper sends them later)."""
        task_id, spec, version_id, plan_id = self._check(
            task, inputs, budget_limit=budget_limit, budget_unit=budget_unit, plan_id=plan_id, graph_version=graph_version
        )
        budget = budget_of(spec, budget_limit, budget_unit)
        submitted = self.jobs.submit_many(
            task_id,
            inputs,
            owner=owner,
            priority=priority,
            idempotency_keys=idempotency_keys,
            budget_limit=budget.limit,
            budget_unit=budget.unit.value,
            plan_id=plan_id,
            graph_version_id=version_id,
            max_concurrent=max_concurrent,
            dispatched=send,
        )
        created = [job.id for job, new in submitted if new]
        if created and send:
            try:
                self.send(created, priority=priority)
            except BrokerError as exc:  # stored; the reaper sends them again
                log.warning("%d job(s) stored but not sent (%s): they are re-sent when the broker is back", len(created), exc)
        return submitted

    # -- feedback -----------------------------------------------------------------------------------------

    def feedback(
        self,
        job_id: int,
        *,
        score: float | None = None,
        answer: str | None = None,
        comment: str | None = None,
        owner: str | None = None,
        learn_now: bool = True,
    ) -> tuple[Feedback, GraphVersion | None]:
        """Record a user's verdict on a succeeded job: a ``score`` in [0, 1], or the correct ``answer``
        (scored against the job's answer with the task's scorer). Once the graph has ``learn_every``
        pieces of evidence pending, it is updated (the new version is returned)."""
        if (score is None) == (answer is None):
            raise DataError("give either a score in [0, 1] or the correct answer, not both and not neither")
        job = self.jobs.get(job_id, owner=owner)
        _, spec = get_service_task(self.storage, job.task if job.task is not None else -1)
        if answer is not None:
            runtime = runtime_for(spec, self.storage)
            kind = runtime.task.scorer.kind.value
            if kind not in ("exact", "numeric", "f1", "contains"):
                raise DataError(f"task {spec.name} scores with {kind}: post a score instead of an answer")
            given = (job.result or {}).get("answer")
            score = 0.0 if given is None else runtime.task.scorer.score_text(str(given), answer)
        assert score is not None
        if not 0.0 <= score <= 1.0:
            raise DataError(f"a feedback score must be in [0, 1], got {score}")
        record = self.jobs.add_feedback(job_id, graph=spec.graph, score=score, answer=answer, comment=comment, owner=owner)
        version = None
        if learn_now and pending_count(self.storage, spec.graph) >= spec.learn_every:
            version = learn(self.storage, spec)
        return record, version

    # -- messages -----------------------------------------------------------------------------------------

    def send(self, job_ids: Sequence[int], *, priority: int = 0) -> None:
        """One ``allot.run_job`` message per job id; ``BrokerError`` if the broker does not answer."""
        if not job_ids:
            return
        options: dict[str, Any] = {"queue": self.queue_name} if self.queue_name else {}
        url = self.storage.url
        from planner.storage.database import mask_url

        masked = mask_url(url)
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5, interval_max=1.0, timeout=10)
                for job_id in job_ids:
                    self.app.send_task(
                        RUN_JOB,
                        args=(url, job_id),
                        argsrepr=repr((masked, job_id)),
                        connection=connection,
                        priority=max(0, min(9, priority)),
                        **options,
                    )
        except (KombuError, OSError, ConnectionError, TimeoutError) as exc:
            raise BrokerError(
                f"cannot reach the Celery broker at {describe_broker(self.app.conf.broker_url)} ({_one_line(exc)})"
            ) from None

    def reap(self) -> ReapReport:
        """Re-queue dead workers' jobs and re-send possibly lost messages (see ``JobQueue.reap``)."""
        report = self.jobs.reap(stale_after_s=self.stale_after_s, redispatch_after_s=self.redispatch_after_s)
        ids = [*report.requeued, *report.redispatch]
        if ids:
            log.info("reaper: %d job(s) re-queued, %d message(s) re-sent", len(report.requeued), len(report.redispatch))
            self.send(ids)
        return report

    # -- waiting ------------------------------------------------------------------------------------------

    def wait(self, job_ids: Iterable[int], *, timeout_s: float = 60.0, poll_s: float = 0.05) -> list[Job]:
        """Poll until every job is finished; ``TimeoutError`` naming the ones that are not."""
        ids = list(job_ids)
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = [self.jobs.get(job_id) for job_id in ids]
            if all(job.finished for job in jobs):
                return jobs
            if time.monotonic() > deadline:
                open_jobs = [f"{job.id} ({job.state.value})" for job in jobs if not job.finished]
                raise TimeoutError(f"jobs not finished after {timeout_s:g} s: {', '.join(open_jobs[:10])}")
            time.sleep(poll_s)
