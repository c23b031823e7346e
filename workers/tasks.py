"""Celery tasks. Each is idempotent by the id of the row it works on, so a re-delivered message is harmless.

``allot.evaluate_trial`` evaluates one stored trial with ``planner.trial_runner.run_trial``: the same code
path as the in-process runner, so a trial is stored the same way whoever evaluates it, and a trial already
finished is returned untouched.

Storages (one engine per database URL) and environments (building one from a study's spec costs ~0.1 s and
its caches make later evaluations fast) are cached per worker process; the caches are dropped in a forked
child, which must not share its parent's database connections.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from celery import shared_task

from executors import environment_from_spec
from executors.environment import Environment
from graphs.errors import AllotError, StorageError
from planner.storage import BaseStorage, get_storage
from planner.trial import TrialState
from planner.trial_runner import run_trial

__all__ = ["EVALUATE_TRIAL", "RUN_JOB", "clear_caches", "evaluate_trial", "run_job"]

log = logging.getLogger(__name__)

EVALUATE_TRIAL = "allot.evaluate_trial"

_lock = threading.Lock()
_storages: dict[str, BaseStorage] = {}
_environments: dict[str, Environment] = {}
_study_specs: dict[tuple[str, int], str] = {}  # (database url, study id) -> canonical environment spec


def clear_caches() -> None:
    """Forget cached storages and environments (after a fork, or in tests)."""
    with _lock:
        _storages.clear()
        _environments.clear()
        _study_specs.clear()
        _queues.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=clear_caches)


def _storage(database_url: str) -> BaseStorage:
    with _lock:
        storage = _storages.get(database_url)
        if storage is None:
            storage = _storages[database_url] = get_storage(database_url)
        return storage


def _environment(storage: BaseStorage, database_url: str, study_id: int) -> Environment:
    """The study's environment, built once per process per distinct spec (studies may share one)."""
    key = (database_url, study_id)
    with _lock:
        spec_text = _study_specs.get(key)
    if spec_text is None:
        spec_text = json.dumps(storage.get_study(study_id).environment, sort_keys=True)
        with _lock:
            _study_specs[key] = spec_text
    with _lock:
        environment = _environments.get(spec_text)
        if environment is None:
            environment = _environments[spec_text] = environment_from_spec(json.loads(spec_text))
        return environment


@shared_task(
    name=EVALUATE_TRIAL,
    ignore_result=True,
    acks_late=True,
    autoretry_for=(StorageError,),  # the database blinked: try again rather than lose the trial
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def evaluate_trial(trial_id: int, database_url: str) -> dict[str, Any] | None:
    """Evaluate stored trial ``trial_id`` of the database at ``database_url`` and store its result.

    Returns a small summary (the database has the full record); ``None`` for a trial that is not stored
    there (a stale message from another database is dropped, not retried).
    """
    storage = _storage(database_url)
    try:
        trial = storage.get_trial(trial_id)
    except KeyError:
        log.warning("trial id %d is not in this database; message dropped", trial_id)
        return None
    if not trial.state.is_finished:
        try:
            environment = _environment(storage, database_url, trial.study_id)
        except (AllotError, OSError, ValueError) as exc:
            # The worker cannot build the study's environment (e.g. its data directory is missing on this
            # machine): store that as the trial's failure, so the study sees it now instead of timing out.
            log.warning("trial %d: cannot build the environment: %s", trial.number, exc)
            try:
                trial = storage.finish_trial(trial_id, state=TrialState.FAIL, error=f"worker cannot build the environment: {exc}")
            except RuntimeError:
                trial = storage.get_trial(trial_id)
        else:
            trial = run_trial(storage, environment, trial_id)
    return {"trial_id": trial.trial_id, "number": trial.number, "state": trial.state.value, "score": trial.score}


# -- jobs -------------------------------------------------------------------------------------------------

RUN_JOB = "allot.run_job"

_queues: dict[str, Any] = {}


def _job_queue(database_url: str) -> Any:
    from workers.jobs import JobQueue

    storage = _storage(database_url)
    with _lock:
        queue = _queues.get(database_url)
        if queue is None:
            queue = _queues[database_url] = JobQueue(storage)  # type: ignore[arg-type]
        return queue


@shared_task(name=RUN_JOB, ignore_result=True, acks_late=True)
def run_job(database_url: str, job_id: int | None = None) -> list[int]:
    """Wake-up for jobs of the database at ``database_url``: claim and run eligible jobs until none is
    left (``job_id`` only names the job this message was sent for; the database decides what runs, by
    priority and per-user limits). Idempotent: a message whose job is taken or finished runs nothing."""
    from workers.execution import drain

    queue = _job_queue(database_url)
    return drain(queue)
