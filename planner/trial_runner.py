"""Running trials: evaluate a stored trial's plan and store the result, here or in a worker.

``run_trial`` is the one place a trial moves WAITING -> RUNNING -> COMPLETE/FAIL; the in-process runner
and the Celery task both call it, so a trial finished by either is stored the same way, and a trial
delivered twice is evaluated at most once to completion (finishing is conditional in storage).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence

from executors.environment import Environment
from planner.storage import BaseStorage
from planner.trial import FrozenTrial, StudyRecord, TrialState

__all__ = ["InProcessRunner", "TrialRunner", "run_trial"]

log = logging.getLogger(__name__)


def run_trial(storage: BaseStorage, environment: Environment, trial_id: int) -> FrozenTrial:
    """Evaluate one trial and store its result; a trial already finished is returned as it is.

    An evaluation error is a result: the trial is stored as FAIL with the error's message.
    """
    trial = storage.get_trial(trial_id)
    if trial.state.is_finished:
        return trial
    if trial.state is TrialState.WAITING:
        try:
            storage.set_trial_running(trial_id)
        except RuntimeError:
            return storage.get_trial(trial_id)
    try:
        evaluation = environment.evaluate(trial.plan)
    except Exception as exc:  # a failure is a stored result, not a crash of the study
        log.warning("trial %d failed: %s", trial.number, exc)
        try:
            return storage.finish_trial(trial_id, state=TrialState.FAIL, error=f"{type(exc).__name__}: {exc}")
        except RuntimeError:
            return storage.get_trial(trial_id)
    try:
        return storage.finish_trial(
            trial_id,
            state=TrialState.COMPLETE,
            score=evaluation.score,
            spread=evaluation.spread,
            scores=evaluation.scores,
            cost=evaluation.cost,
            prefix_scores=_shown(environment, trial),
        )
    except RuntimeError:  # finished meanwhile by another worker: keep the first result
        return storage.get_trial(trial_id)


def _shown(environment: Environment, trial: FrozenTrial) -> dict[int, float]:
    """What the evaluation just run showed of the last stage at fewer samples, read here, where its samples are (a
    worker's live runs are not in the study process); nothing where that fails: the trial's score stands."""
    if not environment.votes_over_prefixes:
        return {}
    try:
        return dict(environment.prefix_scores(trial.plan))
    except Exception as exc:  # an extra, never a reason to lose the evaluation
        log.warning("trial %d: its prefix votes could not be read: %s", trial.number, exc)
        return {}


class TrialRunner(abc.ABC):
    """Evaluates a batch of stored, unfinished trials and returns them finished."""

    @abc.abstractmethod
    def run(self, study: StudyRecord, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """Finish every trial in ``trials`` (COMPLETE or FAIL) and return the finished records."""


class InProcessRunner(TrialRunner):
    """Evaluates trials one after another in this process."""

    def __init__(self, storage: BaseStorage, environment: Environment) -> None:
        self.storage = storage
        self.environment = environment

    def run(self, study: StudyRecord, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        return [run_trial(self.storage, self.environment, t.trial_id) for t in trials]
