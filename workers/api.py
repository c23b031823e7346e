"""The REST API: jobs, tasks, studies and learned graphs over HTTP, with bearer tokens and an accurate spec.

``install_api(app, storage, ...)`` adds it to the review app (``workers.review.create_review_app``, what
``allot serve`` runs), so one server serves the pages and the API. Routes live under ``/api/v1``; the same
routes answer under ``/api`` (the current version, and the paths the review app always had). The OpenAPI
spec is ``/openapi.json`` (request and response bodies are the pydantic models below, ``Job`` and
``Feedback`` from ``workers.jobs``); ``/docs`` renders it on this server, with no CDN.

- Auth: ``Authorization: Bearer <token>`` (``allot token create``; ``workers.tokens``) on every route but
  ``/health`` and ``/ready``: none, an unknown or a revoked token is 401; a read-scope token on a write
  route is 403. Jobs are their submitter's (the token's owner): another owner's job id is 404, as if it
  did not exist, so ids reveal nothing. Pin and roll back also take the server's legacy write token.
- Limits: a body over ``max_body_bytes`` (64 KiB) is 413 before anything parses it; a body or parameter
  that does not fit its model is 422 naming the field. No 4xx stores anything.
- Submission stores the job, then sends its message; a broker that is down does not fail the request:
  the job is stored (``dispatched: false``, an ``X-Allot-Warning`` header) and a reaper sends it later.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at runtime, and they
# name dependencies defined inside ``api_router``, which a string annotation could not resolve.

import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graphs.cost import BudgetUnit
from graphs.errors import AllotError, BrokerError, StorageError
from planner import views
from planner.graph_record import GraphVersion
from planner.storage import BaseStorage, SQLStorage
from workers.jobs import MAX_JOB_ID, Feedback, Job, JobConflict, JobNotFound, JobState
from workers.service import ServiceTask, UnknownTask
from workers.tokens import ApiToken, TokenScope, TokenStore

if TYPE_CHECKING:  # importing it loads Celery: only when a job is submitted
    from workers.dispatch import Dispatcher

__all__ = [
    "API_VERSION",
    "DEFAULT_MAX_BODY_BYTES",
    "BodyLimit",
    "Caller",
    "JobService",
    "api_router",
    "describe_operations",
    "install_api",
]

log = logging.getLogger(__name__)

API_VERSION = "1"
DEFAULT_MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted (a job's input is a prompt's fields, not a data set)."""
MAX_ID = 2**63 - 1
"""Ids beyond a signed 64-bit integer cannot exist (SQLite would refuse to compare them)."""
INT32 = 2**31 - 1
MAX_INPUT_DEPTH = 32
BROKER_RETRY_S = 5.0
"""After a failed send, submissions skip the broker this long (the reaper sends their messages later)."""
NO_NUL = r"^[^\x00]*$"
"""Text the database can store: PostgreSQL refuses NUL characters in strings."""
KEY = r"^[!-~]+$"
"""Idempotency keys: visible ASCII (they may also come as a header)."""


# -- models ----------------------------------------------------------------------------------------------------


class FieldError(BaseModel):
    field: str = Field(description="Where: body.budget.limit, query.limit, path.job_id, header.idempotency-key, ...")
    message: str
    type: str


class ApiError(BaseModel):
    """Every error: ``detail`` says what is wrong (and, for a validation error, which field)."""

    detail: str
    errors: list[FieldError] | None = None


class Health(BaseModel):
    status: str = "ok"
    version: str = API_VERSION


class Readiness(BaseModel):
    ready: bool
    database: str = Field(description="ok, or why not")
    schema_revision: str | None = Field(default=None, description="The database's migration revision.")
    broker: str = Field(description="ok, not checked (no job queue), or why not")
    reason: str | None = Field(default=None, description="Why the server is not ready (null when it is).")


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: float = Field(gt=0, allow_inf_nan=False, description="Hard limit for this job (at most the task's).")
    unit: BudgetUnit | None = Field(default=None, description="Default: the task's unit.")


class JobSubmission(BaseModel):
    """One input of a registered task, run with the plan the task's learned graph chooses."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"task": "aime", "input": {"example": "aime24-03"}},
                {"task": "aime", "input": {"inputs": {"question": "What is 1+1?"}, "reference": "2"}, "priority": 5},
            ]
        },
    )

    task: str = Field(min_length=1, max_length=128, pattern=NO_NUL, description="A registered task (GET /api/v1/tasks).")
    input: dict[str, Any] = Field(
        description='{"example": ID} (a row of the task\'s dataset) or {"inputs": {...}, "reference": "..."}.'
    )
    priority: int = Field(default=0, ge=-INT32, le=INT32, description="Higher runs first.")
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=KEY,
        description="Submitting again with this key returns the job it made (also as an Idempotency-Key header).",
    )
    budget: BudgetIn | None = Field(default=None, description="A smaller budget than the task's.")
    plan_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{6,64}$", description="Run this stored plan.")
    graph_version: int | None = Field(default=None, ge=1, le=INT32, description="Follow this version of the task's graph.")

    @field_validator("input")
    @classmethod
    def _json(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_json(value, "input", 0)
        return value

    @model_validator(mode="after")
    def _one_plan_source(self) -> "JobSubmission":
        if self.plan_id is not None and self.graph_version is not None:
            raise ValueError("give plan_id or graph_version, not both")
        return self


def _check_json(value: Any, where: str, depth: int) -> None:
    if depth > MAX_INPUT_DEPTH:
        raise ValueError(f"{where} is nested deeper than {MAX_INPUT_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}: numbers must be finite")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_json(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", depth + 1)


class SubmittedJob(Job):
    created: bool = Field(description="false: an earlier submission with this idempotency key made this job.")
    dispatched: bool | None = Field(
        description="true: its message went to the broker; false: stored, but the broker did not answer (a reaper "
        "sends it later); null: not sent by this request (the job existed)."
    )


class StageOutput(BaseModel):
    stage: str
    output: Any


class JobDetail(Job):
    stage_outputs: list[StageOutput] = Field(description="The result's per-stage outputs, in stage order.")
    feedback: list[Feedback] = Field(description="Evidence on this job's plan: its scored result, users' feedback.")


class FeedbackIn(BaseModel):
    """A verdict on a succeeded job: a score in [0, 1], or the correct answer (scored by the task's scorer)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"answer": "204"}, {"score": 0.8}]})

    score: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    answer: str | None = Field(default=None, min_length=1, max_length=10_000, pattern=NO_NUL)
    comment: str | None = Field(default=None, max_length=4_000, pattern=NO_NUL)

    @model_validator(mode="after")
    def _score_or_answer(self) -> "FeedbackIn":
        if (self.score is None) == (self.answer is None):
            raise ValueError("give either score (in [0, 1]) or answer, not both and not neither")
        return self


class GraphVersionOut(BaseModel):
    version_id: int
    graph: str
    version: int
    cause: str
    parent_id: int | None = None
    pinned: bool
    created_at: datetime

    @classmethod
    def of(cls, record: GraphVersion) -> "GraphVersionOut":
        return cls(
            version_id=record.version_id,
            graph=record.graph,
            version=record.version,
            cause=record.cause,
            parent_id=record.parent_id,
            pinned=record.pinned,
            created_at=record.created_at,
        )


class FeedbackResult(BaseModel):
    feedback: Feedback
    graph_version: GraphVersionOut | None = Field(description="The graph version this feedback completed, if any.")


class TaskDetail(ServiceTask):
    current_version: GraphVersionOut | None = Field(description="The graph version new jobs follow (newest pinned, else newest).")


class PinIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pinned: bool = True


class _Open(BaseModel):
    """Review views: the fields below are guaranteed; others may be added."""

    model_config = ConfigDict(extra="allow")


class StudyBudget(_Open):
    limit: float
    unit: str
    text: str


class StudyBest(_Open):
    number: int
    score: float | None
    spread: float | None = None
    cost: float | None
    plan_id: str
    plan_summary: str


class StudySummary(_Open):
    name: str
    study_id: int
    task: str
    strategy: str
    strategy_params: dict[str, Any] | None = None
    seed: int | None = None
    budget: StudyBudget
    environment: dict[str, Any] | None = None
    created_at: str | None = None
    trials: int
    evaluated: int
    states: dict[str, int]
    best: StudyBest | None
    evaluation_cost: dict[str, float | None]
    planner_cost: dict[str, float | None]


class StudyDetail(_Open):
    study: StudySummary
    best_so_far: list[dict[str, Any]]
    pareto: list[int]
    best_plans: list[dict[str, Any]]
    stages: list[str]
    graphs: list[str]


class TrialOut(_Open):
    number: int
    trial_id: int
    state: str
    score: float | None = None
    cost: float | None = None
    plan_id: str
    plan_summary: str
    error: str | None = None


class PlanOut(_Open):
    plan_id: str
    summary: str
    models: list[str]
    stages: list[dict[str, Any]]
    plan: dict[str, Any]


class GraphSummary(_Open):
    graph: str
    versions: int
    latest: GraphVersionOut
    pinned: list[int]


class GraphVersionDetail(GraphVersionOut):
    model_config = ConfigDict(extra="allow")

    stages: list[dict[str, Any]] = Field(description="Per stage: slots and edges with their probabilities.")
    definition: dict[str, Any]


class GraphDiff(_Open):
    graph: str
    a: GraphVersionOut
    b: GraphVersionOut
    stages: list[dict[str, Any]]
    between: list[GraphVersionOut]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "The body cannot be read (not UTF-8 text).",
        401: "No token, or an unknown or revoked one.",
        403: "The token's scope does not allow this.",
        404: "Not found (another owner's job is not found either).",
        409: "Conflicts with the job's state or another user's idempotency key.",
        413: "The request body is larger than the server's limit.",
        422: "The request does not fit its model; detail names the field.",
        503: "The database does not answer.",
    }
    return {code: {"model": ApiError, "description": what[code]} for code in codes}


# -- auth ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who is calling: a token's owner and scope (or the legacy write token, for pin and roll back)."""

    owner: str
    scope: TokenScope
    token: str
    max_concurrent: int | None = None

    @classmethod
    def of(cls, token: ApiToken) -> "Caller":
        return cls(owner=token.owner, scope=token.scope, token=token.name, max_concurrent=token.max_concurrent)


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    bearerFormat="allot_...",
    description="An API token from `allot token create NAME --owner USER --scope read|write`.",
)


def _unauthorized(detail: str, error: str | None = None) -> HTTPException:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


def _forbidden(caller: Caller) -> HTTPException:
    return HTTPException(
        403,
        f"token {caller.token!r} has scope {caller.scope.value}: this needs a write-scope token",
        headers={"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="write"'},
    )


# -- the job service: a dispatcher built on first use, and the broker's health ------------------------------------


class JobService:
    """The API's ``Dispatcher`` (built on first use, so a page-only server never touches a broker) and
    a short memory of broker failures, so that while the broker is down a submission does not wait for
    its connection timeout each time."""

    def __init__(
        self,
        storage: SQLStorage,
        *,
        dispatcher: "Dispatcher | None" = None,
        broker_url: str | None = None,
        queue: str | None = None,
        retry_s: float = BROKER_RETRY_S,
    ) -> None:
        self.storage = storage
        self._dispatcher = dispatcher
        self.broker_url, self.queue, self.retry_s = broker_url, queue, retry_s
        self._lock = threading.Lock()
        self._config_error: str | None = None
        self._down_until = 0.0
        self._down_reason: str | None = None

    def dispatcher(self) -> "Dispatcher":
        from workers.dispatch import Dispatcher

        with self._lock:
            if self._dispatcher is None:
                try:
                    self._dispatcher = Dispatcher(self.storage, broker_url=self.broker_url, queue=self.queue)
                except BrokerError as exc:  # e.g. the embedded broker's folder is not writable: store, never send
                    from celery import Celery

                    self._config_error = str(exc)
                    log.error("the API cannot send job messages: %s", exc)
                    self._dispatcher = Dispatcher(self.storage, Celery("allot"), queue=self.queue)
            return self._dispatcher

    def send(self, job: Job) -> str | None:
        """Send ``job``'s message; ``None`` if sent, else why not (the job stays stored for the reaper)."""
        dispatcher = self.dispatcher()
        if self._config_error is not None:
            return self._config_error
        if time.monotonic() < self._down_until:
            return self._down_reason
        try:
            dispatcher.send([job.id], priority=job.priority)
        except BrokerError as exc:
            self._down_until, self._down_reason = time.monotonic() + self.retry_s, str(exc)
            log.warning("job %d stored but not sent (%s): a reaper sends it when the broker is back", job.id, exc)
            return str(exc)
        dispatcher.jobs.mark_dispatched([job.id])
        return None

    def broker_problem(self) -> str | None:
        """``None`` if the broker answers now, else why not."""
        from kombu.exceptions import KombuError

        dispatcher = self.dispatcher()
        if self._config_error is not None:
            return self._config_error
        try:
            with dispatcher.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0.1, interval_step=0.2, interval_max=0.3, timeout=3)
        except (KombuError, OSError, ConnectionError, TimeoutError) as exc:
            from workers.celery_app import describe_broker

            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            return f"cannot reach the broker at {describe_broker(dispatcher.app.conf.broker_url)} ({reason})"
        self._down_until = 0.0
        return None


# -- the routes ---------------------------------------------------------------------------------------------------

JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="A job id.")]
Name = Annotated[str, Path(min_length=1, max_length=512, pattern=NO_NUL)]


def _stage_outputs(result: Mapping[str, Any] | None) -> list[StageOutput]:
    stages = (result or {}).get("stages") if isinstance(result, Mapping) else None
    if isinstance(stages, Mapping):
        return [StageOutput(stage=str(name), output=output) for name, output in stages.items()]
    if isinstance(stages, list):
        return [
            StageOutput(stage=str(s.get("stage", i)) if isinstance(s, Mapping) else str(i), output=s)
            for i, s in enumerate(stages)
        ]
    return []


def _message(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def api_router(storage: BaseStorage, *, service: JobService | None, write_token: str | None = None) -> APIRouter:
    """Every API route, relative to the version prefix (see the module docstring)."""
    router = APIRouter()
    tokens = TokenStore(storage) if isinstance(storage, SQLStorage) else None
    legacy = write_token or None

    def authenticate(credentials: HTTPAuthorizationCredentials | None) -> Caller:
        if credentials is None or not credentials.credentials:
            raise _unauthorized("an API token is required: Authorization: Bearer <token> (allot token create)")
        token = tokens.verify(credentials.credentials) if tokens is not None else None
        if token is None:
            raise _unauthorized("invalid or revoked token", "invalid_token")
        return Caller.of(token)

    def reader(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Caller:
        return authenticate(credentials)

    def writer(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Caller:
        caller = authenticate(credentials)
        if not caller.scope.allows(TokenScope.WRITE):
            raise _forbidden(caller)
        return caller

    def reviewer(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Caller:
        """Pin and roll back: a write-scope token, or the server's legacy write token."""
        given = credentials.credentials if credentials is not None else ""
        if legacy is not None and given and hmac.compare_digest(given.encode(), legacy.encode()):
            return Caller(owner="(write token)", scope=TokenScope.WRITE, token="(write token)")
        return writer(credentials)

    Reader = Annotated[Caller, Depends(reader)]
    Writer = Annotated[Caller, Depends(writer)]
    Reviewer = Annotated[Caller, Depends(reviewer)]

    def jobs_service() -> JobService:
        if service is None:  # an in-memory review store: no job table (and no tokens, so never reached)
            raise HTTPException(404, "this server has no job queue (it runs on an in-memory store)")
        return service

    def found(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except StorageError:
            raise
        except KeyError as exc:
            raise HTTPException(404, _message(exc)) from None
        except AllotError as exc:
            raise HTTPException(422, _message(exc)) from None

    # -- health -----------------------------------------------------------------------------------------------

    @router.get("/health", response_model=Health, tags=["health"], summary="Liveness (no token)")
    def health() -> Health:
        return Health()

    @router.get(
        "/ready",
        response_model=Readiness,
        tags=["health"],
        summary="Readiness (no token)",
        responses={503: {"model": Readiness, "description": "Not ready: the database or the broker does not answer."}},
    )
    def ready() -> Any:
        from planner.storage.database import current_revision, head_revision

        out = Readiness(ready=True, database="ok", broker="not checked (no job queue)")
        reasons = []
        if isinstance(storage, SQLStorage):
            try:
                out.schema_revision = current_revision(storage.engine)
                head = head_revision()
                if out.schema_revision != head:
                    out.database = f"schema at {out.schema_revision or 'nothing'}, not at head {head}: run `allot db upgrade`"
            except AllotError as exc:
                out.database = _message(exc)
            if out.database != "ok":
                reasons.append(f"database: {out.database}")
        else:
            out.database = "ok (in-memory)"
        if service is not None:
            problem = service.broker_problem()
            out.broker = problem or "ok"
            if problem:
                reasons.append(f"broker: {problem}")
        if reasons:
            out.ready, out.reason = False, "; ".join(reasons)
            return JSONResponse(out.model_dump(mode="json"), status_code=503)
        return out

    # -- tasks ------------------------------------------------------------------------------------------------

    @router.get("/tasks", response_model=list[ServiceTask], tags=["tasks"], responses=_errors(401, 503))
    def list_tasks(caller: Reader) -> list[ServiceTask]:
        from workers.service import list_service_tasks

        return list_service_tasks(jobs_service().storage)

    @router.get("/tasks/{name}", response_model=TaskDetail, tags=["tasks"], responses=_errors(401, 404, 422, 503))
    def get_task(caller: Reader, name: Name) -> TaskDetail:
        from workers.service import current_version, get_service_task

        try:
            _, spec = get_service_task(jobs_service().storage, name)
        except UnknownTask as exc:
            raise HTTPException(404, str(exc)) from None
        try:
            version: GraphVersionOut | None = GraphVersionOut.of(current_version(jobs_service().storage, spec.graph))
        except KeyError:
            version = None
        return TaskDetail(**spec.model_dump(), current_version=version)

    # -- jobs -------------------------------------------------------------------------------------------------

    @router.post(
        "/jobs",
        response_model=SubmittedJob,
        status_code=201,
        tags=["jobs"],
        summary="Submit a job",
        responses={
            200: {"model": SubmittedJob, "description": "The idempotency key was used before: the job it made."},
            **_errors(400, 401, 403, 404, 409, 413, 422, 503),
        },
    )
    def submit_job(
        caller: Writer,
        body: JobSubmission,
        response: Response,
        idempotency_key: Annotated[
            str | None,
            Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=KEY, description="Same as the body's."),
        ] = None,
    ) -> SubmittedJob:
        jobs = jobs_service()
        key = body.idempotency_key
        if idempotency_key is not None and key is not None and idempotency_key != key:
            raise HTTPException(422, "the Idempotency-Key header and the body's idempotency_key differ")
        key = key or idempotency_key
        budget = body.budget
        try:
            job, created = jobs.dispatcher().submit(
                body.task,
                body.input,
                owner=caller.owner,
                priority=body.priority,
                idempotency_key=key,
                budget_limit=None if budget is None else budget.limit,
                budget_unit=None if budget is None or budget.unit is None else budget.unit.value,
                plan_id=body.plan_id,
                graph_version=body.graph_version,
                max_concurrent=caller.max_concurrent,
                send=False,
            )
        except UnknownTask as exc:
            raise HTTPException(404, _message(exc)) from None
        except JobConflict as exc:
            raise HTTPException(409, _message(exc)) from None
        except StorageError:
            raise
        except (AllotError, KeyError, ValueError) as exc:  # bad input, budget, plan or graph version
            raise HTTPException(422, _message(exc)) from None
        dispatched = None
        if created:
            problem = jobs.send(job)
            dispatched = problem is None
            if problem is not None:
                response.headers["X-Allot-Warning"] = "job stored but not sent: the broker did not answer; it is re-sent later"
            log.info("job %d submitted by %s (task %s)", job.id, caller.owner, job.task)
        else:
            response.status_code = 200
        return SubmittedJob(**job.model_dump(), created=created, dispatched=dispatched)

    @router.get(
        "/jobs", response_model=list[Job], tags=["jobs"], summary="Your jobs, newest first", responses=_errors(401, 422, 503)
    )
    def list_jobs(
        caller: Reader,
        state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
        task: Annotated[
            str | None, Query(min_length=1, max_length=128, pattern=NO_NUL, description="Only this task's jobs.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        before_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Page back: jobs older than this id.")] = None,
    ) -> list[Job]:
        if before_id is not None and before_id > MAX_JOB_ID:  # every job is older: the column holds no larger id
            before_id = None
        return jobs_service().dispatcher().jobs.list(owner=caller.owner, state=state, task=task, limit=limit, before_id=before_id)

    @router.get("/jobs/{job_id}", response_model=JobDetail, tags=["jobs"], responses=_errors(401, 404, 422, 503))
    def get_job(caller: Reader, job_id: JobId) -> JobDetail:
        queue = jobs_service().dispatcher().jobs
        try:
            job = queue.get(job_id, owner=caller.owner)
        except JobNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return JobDetail(**job.model_dump(), stage_outputs=_stage_outputs(job.result), feedback=queue.feedback(job_id))

    @router.post("/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"], responses=_errors(401, 403, 404, 409, 413, 422, 503))
    def cancel_job(caller: Writer, job_id: JobId) -> Job:
        try:
            job = jobs_service().dispatcher().jobs.cancel(job_id, owner=caller.owner)
        except JobNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None
        log.info("job %d cancelled by %s", job.id, caller.owner)
        return job

    @router.post(
        "/jobs/{job_id}/feedback",
        response_model=FeedbackResult,
        status_code=201,
        tags=["jobs"],
        summary="Score a succeeded job: the task's graph learns from it",
        responses=_errors(400, 401, 403, 404, 409, 413, 422, 503),
    )
    def post_feedback(caller: Writer, job_id: JobId, body: FeedbackIn) -> FeedbackResult:
        from workers.learning import learn, pending_count
        from workers.service import get_service_task

        dispatcher = jobs_service().dispatcher()
        try:
            record, _ = dispatcher.feedback(
                job_id, score=body.score, answer=body.answer, comment=body.comment, owner=caller.owner, learn_now=False
            )
        except JobNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None
        except StorageError:
            raise
        except (AllotError, KeyError, ValueError) as exc:
            raise HTTPException(422, _message(exc)) from None
        version = None
        try:  # best effort: the feedback is stored whatever happens here, and the next one retries
            task = dispatcher.jobs.get(job_id).task
            _, spec = get_service_task(dispatcher.storage, task if task is not None else -1)
            if pending_count(dispatcher.storage, spec.graph) >= spec.learn_every:
                version = learn(dispatcher.storage, spec)
        except (AllotError, KeyError) as exc:
            log.warning("job %d: feedback stored, graph update failed: %s", job_id, _message(exc))
        return FeedbackResult(feedback=record, graph_version=None if version is None else GraphVersionOut.of(version))

    # -- studies, plans, learned graphs (what the review pages show) ---------------------------------------------

    @router.get("/studies", response_model=list[StudySummary], tags=["studies"], responses=_errors(401, 503))
    def list_studies(caller: Reader) -> list[dict[str, Any]]:
        return views.study_summaries(storage)

    @router.get("/studies/{name}", response_model=StudyDetail, tags=["studies"], responses=_errors(401, 404, 422, 503))
    def get_study(caller: Reader, name: Name) -> dict[str, Any]:
        detail = found(views.study_detail, storage, name)
        return {key: value for key, value in detail.items() if key != "trials"}

    @router.get("/studies/{name}/trials", response_model=list[TrialOut], tags=["studies"], responses=_errors(401, 404, 422, 503))
    def get_trials(caller: Reader, name: Name) -> list[dict[str, Any]]:
        return found(views.study_detail, storage, name)["trials"]

    @router.get("/plans/{plan_id}", response_model=PlanOut, tags=["studies"], responses=_errors(401, 404, 422, 503))
    def get_plan(caller: Reader, plan_id: Annotated[str, Path(min_length=1, max_length=64, pattern=NO_NUL)]) -> dict[str, Any]:
        return found(views.plan_view, storage, plan_id)

    @router.get("/graphs", response_model=list[GraphSummary], tags=["graphs"], responses=_errors(401, 503))
    def list_graphs(caller: Reader) -> list[dict[str, Any]]:
        return views.graph_list(storage)

    @router.get(
        "/graphs/{graph}/versions", response_model=list[GraphVersionOut], tags=["graphs"], responses=_errors(401, 404, 422, 503)
    )
    def list_versions(caller: Reader, graph: Name) -> list[GraphVersionOut]:
        return [GraphVersionOut.of(v) for v in found(storage.get_graph_versions, graph)]

    @router.get(
        "/graphs/{graph}/versions/{version}",
        response_model=GraphVersionDetail,
        tags=["graphs"],
        responses=_errors(401, 404, 422, 503),
    )
    def get_version(caller: Reader, graph: Name, version: Annotated[int, Path(ge=1, le=INT32)]) -> dict[str, Any]:
        out = found(views.version_view, storage, graph, version)
        out["definition"] = views.graph_version(storage, graph, version).definition
        return out

    @router.get("/graphs/{graph}/diff", response_model=GraphDiff, tags=["graphs"], responses=_errors(401, 404, 422, 503))
    def diff_versions(
        caller: Reader, graph: Name, a: Annotated[int, Query(ge=1, le=INT32)], b: Annotated[int, Query(ge=1, le=INT32)]
    ) -> dict[str, Any]:
        return found(views.version_diff, storage, graph, a, b)

    @router.post(
        "/graphs/{graph}/versions/{version}/pin",
        response_model=GraphVersionOut,
        tags=["graphs"],
        summary="Pin or unpin a version (new jobs follow the newest pinned one)",
        responses=_errors(400, 401, 403, 404, 413, 422, 503),
    )
    def pin_version(
        caller: Reviewer,
        graph: Name,
        version: Annotated[int, Path(ge=1, le=INT32)],
        body: Annotated[PinIn | None, Body()] = None,
    ) -> GraphVersionOut:
        pinned = True if body is None else body.pinned
        record = found(views.set_pinned, storage, graph, version, pinned)
        log.info("graph %s v%d %s by %s", graph, version, "pinned" if pinned else "unpinned", caller.owner)
        return GraphVersionOut.of(record)

    @router.post(
        "/graphs/{graph}/versions/{version}/rollback",
        response_model=GraphVersionOut,
        tags=["graphs"],
        summary="Make a version current again (a new version copying it)",
        responses=_errors(401, 403, 404, 413, 422, 503),
    )
    def rollback_version(caller: Reviewer, graph: Name, version: Annotated[int, Path(ge=1, le=INT32)]) -> GraphVersionOut:
        record = found(views.rollback, storage, graph, version)
        log.info("graph %s rolled back to v%d by %s", graph, version, caller.owner)
        return GraphVersionOut.of(record)

    return router


# -- limits and errors --------------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before the app reads any of it
    (by its Content-Length, or, when it is streamed without one, as soon as it passes the limit)."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0 or declared > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE") and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        # A streamed body: read it (at most the limit) before the app sees any of it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body too large: at most {self.max_bytes} bytes"},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in loc]
    return ".".join(parts) or "request"


async def validation_error(request: Request, exc: Exception) -> Response:
    """422 naming the field(s): ``{"detail": "body.task: Field required", "errors": [...]}`` (inputs are
    not echoed: they may be large or private)."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(field=_field(error.get("loc", ())), message=str(error.get("msg", "invalid")), type=str(error.get("type", "")))
        for error in exc.errors()
    ]
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors[:5]) or "invalid request"
    if len(errors) > 5:
        detail += f"; and {len(errors) - 5} more"
    return JSONResponse(ApiError(detail=detail, errors=errors).model_dump(mode="json"), status_code=422)


async def storage_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": f"database unavailable: {_message(exc)}"}, status_code=503, headers={"Retry-After": "5"})


def install_api(
    app: FastAPI,
    storage: BaseStorage,
    *,
    write_token: str | None = None,
    dispatcher: Any | None = None,
    broker_url: str | None = None,
    queue: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> JobService | None:
    """Add the API to ``app`` under ``/api/v1`` and ``/api``, with its body limit and error handlers;
    returns its job service (``None`` for an in-memory store, which has no job table)."""
    service = (
        JobService(storage, dispatcher=dispatcher, broker_url=broker_url, queue=queue)
        if isinstance(storage, SQLStorage)
        else None
    )
    router = api_router(storage, service=service, write_token=write_token)
    app.include_router(router, prefix="/api/v1")
    app.include_router(router, prefix="/api", include_in_schema=False)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StorageError, storage_unavailable)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi_alias() -> dict[str, Any]:
        return app.openapi()

    app.state.jobs = service
    return service


# -- /docs: the spec as a page of this server (Swagger UI would load from a CDN) -------------------------------------


def _schema_type(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return " | ".join(_schema_type(s) for s in schema[key])
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_schema_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), Mapping):
        return f"object of {_schema_type(schema['additionalProperties'])}"
    return str(kind)


def describe_operations(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The spec's operations, flattened for the ``/docs`` page: method, path, parameters, body, responses."""
    out = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            out.append(
                {
                    "id": op.get("operationId", f"{method}-{path}"),
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "description": op.get("description", ""),
                    "tags": op.get("tags", []),
                    "auth": bool(op.get("security")),
                    "parameters": [
                        {
                            "name": p["name"],
                            "in": p["in"],
                            "type": _schema_type(p.get("schema", {})),
                            "required": p.get("required", False),
                            "description": p.get("description") or p.get("schema", {}).get("description", ""),
                        }
                        for p in op.get("parameters", [])
                    ],
                    "body": None if body is None else _schema_type(body),
                    "responses": [
                        {
                            "code": code,
                            "description": r.get("description", ""),
                            "schema": _schema_type(r["content"]["application/json"]["schema"])
                            if "application/json" in r.get("content", {})
                            else None,
                        }
                        for code, r in sorted(op.get("responses", {}).items())
                    ],
                }
            )
    return out
