"""``CeleryRunner``: evaluate a study's trials on Celery workers instead of in this process.

The runner sends one ``allot.evaluate_trial`` message per trial and watches the SQL database (the source of
truth, there is no result backend) until every trial is finished. Trials are stored before they are sent,
so a broker that is down, or a run that is interrupted, loses nothing: the trials stay unfinished and are
evaluated first when the study resumes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import KombuError

from graphs.errors import BrokerError
from planner.storage import BaseStorage
from planner.trial import FrozenTrial, StudyRecord, TrialState
from planner.trial_runner import TrialRunner
from workers.celery_app import describe_broker, make_celery, prune_processed
from workers.tasks import EVALUATE_TRIAL

__all__ = ["CeleryRunner"]

_CONNECT_RETRIES = 2
_CONNECT_TIMEOUT_S = 10.0
_MAX_POLL_S = 1.0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _mask_database(url: str) -> str:
    from planner.storage.database import mask_url

    return mask_url(url)


def _is_memory_sqlite(url: str) -> bool:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return False
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


class CeleryRunner(TrialRunner):
    """Sends each trial to a Celery worker and waits for the database to show it finished.

    ``timeout_s`` bounds how long the runner waits *without progress* (no trial started or finished): a
    queue nobody consumes fails after ``timeout_s``, while a long batch that workers are getting through is
    not cut short. ``poll_s`` is the first interval between database polls; it backs off to 1 s while
    nothing changes.
    """

    def __init__(
        self,
        storage: BaseStorage,
        database_url: str | None = None,
        *,
        app: Celery | None = None,
        broker_url: str | None = None,
        queue: str | None = None,
        timeout_s: float = 600.0,
        poll_s: float = 0.1,
    ) -> None:
        if app is not None and broker_url is not None:
            raise ValueError("pass either app or broker_url, not both")
        database_url = database_url or getattr(storage, "url", None)
        if not database_url:
            raise ValueError(
                f"{type(storage).__name__} lives in this process only; workers need a database: "
                "use an SQLStorage (a SQLite file or PostgreSQL URL)"
            )
        if _is_memory_sqlite(database_url):
            raise ValueError("an in-memory SQLite database cannot be shared with workers: use a SQLite file")
        self.storage = storage
        self.database_url = database_url
        self.app = app if app is not None else make_celery(broker_url, queue=queue)
        self.queue = queue
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    @property
    def broker(self) -> str:
        """The broker URL, masked: what may appear in logs and errors."""
        return describe_broker(self.app.conf.broker_url)

    def run(self, study: StudyRecord, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        if not trials:
            return []
        self._send(trials)
        finished = self._wait(study, trials)
        prune_processed(self.app.conf.broker_url)
        return finished

    def _send(self, trials: Sequence[FrozenTrial]) -> None:
        """Publish one message per trial; a broker that does not answer raises ``BrokerError`` in seconds."""
        task = self.app.tasks[EVALUATE_TRIAL]
        options = {"queue": self.queue} if self.queue else {}
        masked_db = _mask_database(self.database_url)
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(
                    max_retries=_CONNECT_RETRIES,
                    interval_start=0.2,
                    interval_step=0.5,
                    interval_max=1.0,
                    timeout=_CONNECT_TIMEOUT_S,
                )
                for trial in trials:
                    task.apply_async(
                        args=(trial.trial_id, self.database_url),
                        argsrepr=repr((trial.trial_id, masked_db)),  # never put the DB password in logs
                        connection=connection,
                        **options,
                    )
        except (KombuError, OSError, ConnectionError, TimeoutError) as exc:
            raise BrokerError(
                f"cannot reach the Celery broker at {self.broker} ({_one_line(exc)}): "
                "start it, or run `allot worker` / omit --queue"
            ) from None

    def _wait(self, study: StudyRecord, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """Poll the database until every trial is finished; ``BrokerError`` after ``timeout_s`` without progress."""
        wanted = {t.trial_id for t in trials}
        last_states: dict[int, TrialState] = {t.trial_id: t.state for t in trials}
        last_progress = time.monotonic()
        interval = self.poll_s
        while True:
            current = {t.trial_id: t for t in self.storage.get_trials(study.study_id) if t.trial_id in wanted}
            missing = wanted - current.keys()
            if missing:  # deleted under us: nothing will ever finish them
                raise KeyError(f"trial ids {sorted(missing)} are no longer stored")
            if all(t.state.is_finished for t in current.values()):
                return [current[t.trial_id] for t in trials]
            states = {trial_id: t.state for trial_id, t in current.items()}
            now = time.monotonic()
            if states != last_states:
                last_states, last_progress, interval = states, now, self.poll_s
            elif now - last_progress > self.timeout_s:
                raise self._timeout_error(study, list(current.values()))
            time.sleep(interval)
            interval = min(max(self.poll_s, _MAX_POLL_S), interval * 1.5)

    def _timeout_error(self, study: StudyRecord, trials: list[FrozenTrial]) -> BrokerError:
        waiting = sum(t.state is TrialState.WAITING for t in trials)
        running = sum(t.state is TrialState.RUNNING for t in trials)
        if waiting and not running:
            return BrokerError(
                f"no worker took {waiting} trial(s) of study {study.name!r} from {self.broker} in {self.timeout_s:g} s: "
                "start `allot worker` with the same broker and database (or omit --queue); "
                "the trials are stored and run first when the study resumes"
            )
        return BrokerError(
            f"{waiting + running} trial(s) of study {study.name!r} made no progress in {self.timeout_s:g} s "
            f"({running} running, {waiting} waiting) on {self.broker}: check the workers' logs, "
            "raise the timeout, or start more `allot worker`s; the trials run first when the study resumes"
        )
