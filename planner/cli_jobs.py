"""Service commands of the ``allot`` CLI: register tasks, submit and follow jobs, post feedback.

    allot task create NAME (--from-study S | --replay [--data DIR] --benchmark B | --task-file F --catalog C)
    allot task list | show NAME
    allot submit TASK (--example ID | --input JSON) [--priority P] [--idempotency-key K] [--wait]
    allot jobs list | show ID | cancel ID | reap | drain
    allot feedback JOB (--score S | --answer A) [--comment TEXT]

Jobs go through the broker to ``allot worker`` (the embedded broker by default); ``allot jobs drain`` runs
queued jobs in this process instead (no worker needed). Registered on the main app by ``planner.cli``;
errors end with one ``error:`` line and exit code 1, and nothing stored is changed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphs.cost import Budget, BudgetUnit
from graphs.errors import AllotError
from planner.storage import SQLStorage, get_storage

__all__ = ["feedback", "jobs_app", "submit", "task_app"]

task_app = typer.Typer(help="Register the tasks jobs run (task, models, budget, learned graph).", no_args_is_help=True)
jobs_app = typer.Typer(help="Follow, cancel and reap jobs.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

DatabaseOption = Annotated[
    str | None,
    typer.Option("--database", envvar="ALLOT_DATABASE_URL", help="SQLAlchemy URL; default: a SQLite file allot.db."),
]
BrokerOption = Annotated[str | None, typer.Option(envvar="ALLOT_BROKER_URL", help="Broker URL; default: embedded.")]
QueueOption = Annotated[str | None, typer.Option(envvar="ALLOT_QUEUE", help="Queue name; default: allot.")]


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _message(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _sql(database: str | None) -> SQLStorage:
    try:
        storage = get_storage(database)
    except AllotError as exc:
        raise _fail(str(exc)) from None
    if not isinstance(storage, SQLStorage):  # pragma: no cover - get_storage returns SQL for URLs
        raise _fail("jobs need an SQL database")
    return storage


def _dispatcher(database: str | None, broker: str | None = None, queue: str | None = None) -> Any:
    from workers.dispatch import Dispatcher

    try:
        return Dispatcher(_sql(database), broker_url=broker, queue=queue)
    except AllotError as exc:
        raise _fail(str(exc)) from None


# -- tasks ----------------------------------------------------------------------------------------------


def _from_study(storage: SQLStorage, study_name: str) -> tuple[dict[str, Any], Any, dict[str, Any] | None]:
    """(ServiceTask fields, the study's best plan or None, its newest graph state or None)."""
    from planner.study import load_study

    try:
        study = load_study(study_name, storage)
    except KeyError:
        names = ", ".join(s.name for s in storage.list_studies()) or "none"
        raise _fail(f"no study named {study_name!r}: studies are {names}") from None
    env = study.record.environment
    if env.get("kind") != "replay":
        raise _fail(f"study {study_name!r} ran on a {env.get('kind')} environment: --from-study supports replay studies")
    fields = {
        "backend": "replay",
        "data": env.get("data"),
        "benchmark": env.get("benchmark"),
        "catalog": env.get("catalog") or {},
    }
    try:
        best = study.best_trial.plan
    except ValueError:
        best = None
    state = None
    with contextlib.suppress(KeyError):
        state = storage.latest_graph_version(study_name).definition
    return fields, best, state


@task_app.command("create")
def task_create(
    name: Annotated[str, typer.Argument(help="Task name (letters, digits, _ . : -).")],
    from_study: Annotated[str | None, typer.Option(help="Take data, models and the start of the graph from this study.")] = None,
    replay: Annotated[bool, typer.Option("--replay", help="A replay-backed task (recorded samples, no LLM).")] = False,
    data: Annotated[Path | None, typer.Option(help="Replay directory (default: the bundled AIME data).")] = None,
    benchmark: Annotated[str | None, typer.Option(help="Benchmark of the replay directory.")] = None,
    task_file: Annotated[Path | None, typer.Option(help="Task file (YAML) for a live task run through litellm.")] = None,
    catalog: Annotated[Path | None, typer.Option(help="Model catalog (YAML/JSON) of a live task.")] = None,
    budget: Annotated[float | None, typer.Option(help="Hard budget per job, in --unit.")] = None,
    unit: Annotated[str, typer.Option(help="Budget unit: " + ", ".join(u.value for u in BudgetUnit))] = "tokens",
    policy: Annotated[str, typer.Option(help="best (most likely plan) or sample (draw from the graph).")] = "best",
    exploration: Annotated[float, typer.Option(min=0.0, max=1.0, help="With policy best: chance of sampling instead.")] = 0.0,
    learn_every: Annotated[int, typer.Option(min=1, help="Scored results / feedback per graph update.")] = 8,
    graph: Annotated[str | None, typer.Option(help="Learned graph name (default: the task name).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing task of this name.")] = False,
    database: DatabaseOption = None,
) -> None:
    """Register a task for jobs, with its learned graph's first version."""
    from pydantic import ValidationError

    from workers.service import ServiceTask, initial_state, load_task_file, register_task, runtime_for

    storage = _sql(database)
    fields: dict[str, Any]
    best = state = None
    sources = sum([from_study is not None, replay, task_file is not None])
    if sources != 1:
        raise _fail("give exactly one of --from-study STUDY, --replay or --task-file FILE")
    if from_study is not None:
        fields, best, state = _from_study(storage, from_study)
    elif replay:
        fields = {"backend": "replay", "data": None if data is None else str(data.resolve()), "benchmark": benchmark}
    else:
        assert task_file is not None
        if catalog is None:
            raise _fail("a live task needs --catalog FILE: the models it may use, their sizes and routes")
        try:
            from planner.catalog import load_catalog

            specs = load_catalog(catalog)
            fields = {
                "backend": "litellm",
                "task": load_task_file(task_file),
                "catalog": {m: s.model_dump(mode="json", exclude={"name"}) for m, s in specs.items()},
            }
        except (AllotError, OSError, ValueError) as exc:
            raise _fail(_message(exc)) from None
    try:
        limit = budget
        provisional = ServiceTask(
            name=name,
            budget=Budget.parse(limit or 1.0, unit),
            graph=graph or name,
            policy=policy,  # type: ignore[arg-type]
            exploration=exploration,
            learn_every=learn_every,
            **fields,
        )
        runtime = runtime_for(provisional, storage)
        if limit is None:  # the worst case of the study's best plan, else of the cheapest plan x 4
            from workers.service import cheapest_plan

            plan = best if best is not None else cheapest_plan(runtime)
            unit_budget = Budget.parse(1.0, unit)
            worst = max(unit_budget.spent(runtime.runner.estimate_cost(plan, ex)) for ex in runtime.task.examples[:50])
            limit = worst * (1.0 if best is not None else 4.0)
            console.print(
                f"budget per job: {limit:.4g} {unit} (worst case of {'the best plan' if best else '4x the cheapest plan'})"
            )
        spec = provisional.model_copy(update={"budget": Budget.parse(limit, unit)})
        task_id = register_task(storage, spec, replace=replace)
        try:
            existing = storage.get_graph_versions(spec.graph)
        except KeyError:
            existing = []
        if not existing:
            from planner.strategies._reinforce import GraphState

            start = None
            if state is not None:
                try:
                    start = GraphState.from_definition(state)
                    if {g.stage for g in start.graphs} != set(runtime.task.order):
                        start = None
                except AllotError:
                    start = None
            cause = f"copied from study {from_study}'s newest graph" if start is not None else "initial graph"
            if start is None:
                start = initial_state(spec, runtime.task, runtime.catalog, best)
                if best is not None:
                    cause = f"initial graph around study {from_study}'s best plan ({best.summary()})"
            storage.add_graph_version(spec.graph, start.definition(), cause)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error.get("loc", ()))
        raise _fail(f"invalid task {name!r}: {where}: {error['msg']}") from None
    except (AllotError, ValueError, OSError) as exc:
        raise _fail(_message(exc)) from None
    console.print(
        f"task {escape(name)} registered (id {task_id}): {spec.backend}, budget {spec.budget}, graph {escape(spec.graph)}"
    )


@task_app.command("list")
def task_list(database: DatabaseOption = None) -> None:
    """Registered tasks."""
    from workers.service import list_service_tasks

    table = Table("task", "backend", "budget", "graph", "policy", "learn every")
    for spec in list_service_tasks(_sql(database)):
        table.add_row(escape(spec.name), spec.backend, str(spec.budget), escape(spec.graph), spec.policy, str(spec.learn_every))
    console.print(table)


@task_app.command("show")
def task_show(name: str, database: DatabaseOption = None) -> None:
    """A task's definition (JSON)."""
    from workers.service import UnknownTask, get_service_task

    try:
        _, spec = get_service_task(_sql(database), name)
    except UnknownTask as exc:
        raise _fail(str(exc)) from None
    console.print_json(spec.model_dump_json())


# -- jobs -----------------------------------------------------------------------------------------------


def _input(example: str | None, input_json: str | None) -> dict[str, Any]:
    if (example is None) == (input_json is None):
        raise _fail("give either --example ID (a dataset row of the task) or --input JSON")
    if example is not None:
        return {"example": example}
    try:
        value = json.loads(input_json or "")
    except json.JSONDecodeError as exc:
        raise _fail(f"--input is not JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise _fail('--input must be a JSON object, e.g. \'{"inputs": {"question": "..."}}\'')
    return value if "inputs" in value or "example" in value else {"inputs": value}


def _job_row(table: Table, job: Any) -> None:
    cost = job.cost or {}
    table.add_row(
        str(job.id),
        escape(job.task or "-"),
        job.state.value,
        "-" if job.score is None else f"{job.score:.3f}",
        escape(str((job.result or {}).get("answer", "-"))[:24]),
        "-" if not cost else f"{(cost.get('prompt_tokens') or 0) + (cost.get('output_tokens') or 0):.0f}",
        "-" if job.latency_s is None else f"{job.latency_s:.2f}",
        escape((job.error or "")[:60]),
    )


def _job_table() -> Table:
    return Table("job", "task", "state", "score", "answer", "tokens", "latency s", "error")


def submit(
    task: Annotated[str, typer.Argument(help="Registered task name.")],
    example: Annotated[str | None, typer.Option(help="Id of a row of the task's dataset.")] = None,
    input_json: Annotated[
        str | None, typer.Option("--input", help='The input as JSON: {"inputs": {...}, "reference": ...}.')
    ] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    idempotency_key: Annotated[str | None, typer.Option(help="Submitting again with this key returns the same job.")] = None,
    budget: Annotated[float | None, typer.Option(help="A smaller hard budget than the task's, in --unit.")] = None,
    unit: Annotated[str | None, typer.Option(help="Unit of --budget: must be the task's (its default).")] = None,
    plan: Annotated[str | None, typer.Option(help="Run this stored plan (id) instead of the learned graph's.")] = None,
    graph_version: Annotated[int | None, typer.Option(help="Follow this version of the task's graph.")] = None,
    owner: Annotated[str | None, typer.Option(help="Whose job it is (the REST API sets it from the token).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result (needs a worker, or use --drain).")] = False,
    drain: Annotated[bool, typer.Option("--drain", help="Run queued jobs in this process (no worker needed).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 300.0,
    broker: BrokerOption = None,
    queue: QueueOption = None,
    database: DatabaseOption = None,
) -> None:
    """Submit one job: one input of a task, run with the task's learned plan."""
    dispatcher = _dispatcher(database, broker, queue)
    payload = _input(example, input_json)
    try:
        job, created = dispatcher.submit(
            task,
            payload,
            owner=owner,
            priority=priority,
            idempotency_key=idempotency_key,
            budget_limit=budget,
            budget_unit=unit,
            plan_id=plan,
            graph_version=graph_version,
            send=not drain,
        )
    except (AllotError, KeyError, ValueError) as exc:
        raise _fail(_message(exc)) from None
    console.print(f"job {job.id} {'submitted' if created else 'already submitted with this idempotency key'} ({job.state.value})")
    if drain:
        from workers.execution import drain as run_queued

        run_queued(dispatcher.jobs)
    if wait or drain:
        try:
            (job,) = dispatcher.wait([job.id], timeout_s=timeout)
        except TimeoutError as exc:
            raise _fail(f"{exc}: is a worker running (`allot worker`)? Or submit with --drain") from None
        table = _job_table()
        _job_row(table, job)
        console.print(table)
        if job.state.value != "succeeded":
            raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed or cancelled.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task's jobs.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    database: DatabaseOption = None,
) -> None:
    """Newest jobs first."""
    from workers.jobs import JobQueue

    try:
        jobs = JobQueue(_sql(database)).list(state=state, task=task, limit=limit)
    except ValueError as exc:
        raise _fail(f"{exc}: states are queued, running, succeeded, failed, cancelled") from None
    table = _job_table()
    for job in jobs:
        _job_row(table, job)
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: int, database: DatabaseOption = None) -> None:
    """One job as JSON: state, plan, per-stage outputs, cost, feedback."""
    from workers.jobs import JobNotFound, JobQueue

    queue = JobQueue(_sql(database))
    try:
        job = queue.get(job_id)
    except JobNotFound as exc:
        raise _fail(str(exc)) from None
    data = job.model_dump(mode="json")
    data["feedback"] = [f.model_dump(mode="json") for f in queue.feedback(job_id)]
    console.print_json(json.dumps(data))


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, database: DatabaseOption = None) -> None:
    """Cancel a queued or running job."""
    from workers.jobs import JobQueue

    try:
        job = JobQueue(_sql(database)).cancel(job_id)
    except (AllotError, KeyError) as exc:
        raise _fail(_message(exc)) from None
    console.print(f"job {job.id} {job.state.value}")


@jobs_app.command("reap")
def jobs_reap(
    stale_after: Annotated[float, typer.Option(min=0.1, help="Re-queue running jobs whose heartbeat is this old (s).")] = 30.0,
    redispatch_after: Annotated[float, typer.Option(min=0.1, help="Re-send messages of jobs queued this long (s).")] = 60.0,
    broker: BrokerOption = None,
    queue: QueueOption = None,
    database: DatabaseOption = None,
) -> None:
    """One reaper round: re-queue dead workers' jobs, re-send lost messages."""
    dispatcher = _dispatcher(database, broker, queue)
    dispatcher.stale_after_s, dispatcher.redispatch_after_s = stale_after, redispatch_after
    try:
        report = dispatcher.reap()
    except AllotError as exc:
        raise _fail(str(exc)) from None
    console.print(f"re-queued {len(report.requeued)} job(s), re-sent {len(report.redispatch)} message(s)")


@jobs_app.command("drain")
def jobs_drain(
    limit: Annotated[int, typer.Option(min=1, help="Most jobs to run.")] = 1000,
    database: DatabaseOption = None,
) -> None:
    """Run queued jobs in this process until none is left (no worker or broker needed)."""
    from workers.execution import drain
    from workers.jobs import JobQueue

    done = drain(JobQueue(_sql(database)), limit=limit)
    console.print(f"ran {len(done)} job(s)")


def feedback(
    job_id: Annotated[int, typer.Argument(help="A succeeded job.")],
    score: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Your score of its answer, 0..1.")] = None,
    answer: Annotated[str | None, typer.Option(help="The correct answer (scored with the task's scorer).")] = None,
    comment: Annotated[str | None, typer.Option(help="A note kept with the feedback.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only if the job is this owner's.")] = None,
    database: DatabaseOption = None,
) -> None:
    """Tell Allot how good a job's answer was; the task's graph learns from it."""
    dispatcher = _dispatcher(database)
    try:
        record, version = dispatcher.feedback(job_id, score=score, answer=answer, comment=comment, owner=owner)
    except (AllotError, KeyError, ValueError) as exc:
        raise _fail(_message(exc)) from None
    line = f"feedback {record.id} on job {job_id}: score {record.score:.3f}"
    if version is not None:
        line += f"; graph {version.graph} is now v{version.version} ({version.cause[:80]})"
    console.print(escape(line))
