"""The ``allot`` command line: run and review studies, inspect plans, run workers.

Every user error (bad data, unknown model, budget too small, database or broker down) ends with one
``error:`` line naming the problem and the fix, and a non-zero exit code; nothing stored is changed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from executors.environment import Environment
from graphs.cost import Budget, BudgetUnit
from graphs.errors import AllotError, BudgetError
from graphs.plan import Plan
from planner.cli_jobs import feedback, jobs_app, submit, task_app
from planner.cli_review import graph_app, serve
from planner.cli_tokens import token_app
from planner.report import best_single_model_baseline, most_expensive_single_model_cost
from planner.space import SearchSpace
from planner.storage import BaseStorage, get_storage
from planner.strategies import STRATEGIES, strategy_params
from planner.trial import FrozenTrial, TrialState

app = typer.Typer(help="Allot: find and run compute-optimal test-time plans for multi-stage LLM tasks.", no_args_is_help=True)
study_app = typer.Typer(help="Run and review studies.", no_args_is_help=True)
plan_app = typer.Typer(help="Inspect plans.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)
app.add_typer(study_app, name="study")
app.add_typer(plan_app, name="plan")
app.add_typer(db_app, name="db")
app.add_typer(graph_app, name="graph")  # review commands: planner/cli_review.py
app.add_typer(task_app, name="task")  # service commands: planner/cli_jobs.py
app.add_typer(jobs_app, name="jobs")
app.add_typer(token_app, name="token")  # API tokens: planner/cli_tokens.py
app.command("submit")(submit)
app.command("feedback")(feedback)
app.command("serve")(serve)

DEFAULT_STRATEGY = "insight"  # needs no planner LLM
console = Console()
err_console = Console(stderr=True)

DatabaseOption = Annotated[
    str | None,
    typer.Option("--database", envvar="ALLOT_DATABASE_URL", help="SQLAlchemy URL; default: a SQLite file allot.db."),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _storage(database: str | None) -> BaseStorage:
    return get_storage(database)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


# -- study run -------------------------------------------------------------------------------------


def _environment(
    data: Path | None, benchmark: str | None, simulated: int, orderings: int, seed: int, catalog: Path | None
) -> Environment:
    from planner.catalog import load_catalog

    specs = load_catalog(catalog) if catalog is not None else None
    if simulated:
        from executors.simulated import SimulatedEnvironment

        return SimulatedEnvironment(stages=simulated, seed=seed, models=specs)
    from executors.replay import ReplayEnvironment

    return ReplayEnvironment(data, benchmark, orderings=orderings, seed=seed, catalog=specs)


@study_app.command("run")
def study_run(
    data: Annotated[
        Path | None, typer.Option(help="Replay directory (<benchmark>__<model>.jsonl.gz); default: bundled AIME data.")
    ] = None,
    benchmark: Annotated[str | None, typer.Option(help="Benchmark in the replay directory (default: the first).")] = None,
    simulated: Annotated[int, typer.Option(help="Use a simulated task with this many stages instead of replay data.")] = 0,
    catalog: Annotated[Path | None, typer.Option(help="Model catalog (YAML/JSON): sizes, prices, routes per model.")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated models to search over (default: all).")] = None,
    budget: Annotated[float | None, typer.Option(help="Budget per task input, in --unit.")] = None,
    unit: Annotated[str, typer.Option(help="Budget unit: " + ", ".join(u.value for u in BudgetUnit))] = "agenttts",
    budget_fraction: Annotated[
        float | None, typer.Option(help="Budget as a fraction of the most expensive single-model plan (any data).")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Search strategy: " + ", ".join(STRATEGIES) + " (default: insight)")
    ] = None,
    planner_model: Annotated[
        str | None,
        typer.Option(envvar="ALLOT_PLANNER_MODEL", help="litellm route of the agents' planner LLM (key from the environment)."),
    ] = None,
    api_base: Annotated[str | None, typer.Option(help="API base URL of the planner model (e.g. a vLLM server).")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Evaluated trials the study should have in total.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the strategy and of the sample orderings.")] = 0,
    name: Annotated[str | None, typer.Option(help="Study name; an existing study of this name is resumed.")] = None,
    orderings: Annotated[int, typer.Option(min=1, help="Replay: sample orderings each plan is scored over.")] = 8,
    queue: Annotated[bool, typer.Option("--queue", help="Evaluate trials on Celery workers (see `allot worker`).")] = False,
    broker: Annotated[
        str | None, typer.Option(envvar="ALLOT_BROKER_URL", help="Broker URL for --queue; default: embedded.")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Trials proposed and evaluated per round.")] = 1,
    top: Annotated[int, typer.Option(min=1, help="Rows in the table of best plans.")] = 5,
    database: DatabaseOption = None,
) -> None:
    """Search for the best plan under a budget; resume the study if NAME exists."""
    from planner.study import create_study, load_study

    try:
        storage = _storage(database)
        existing = None
        if name is not None:
            try:
                existing = load_study(name, storage)
            except KeyError:
                existing = None
        if existing is not None:
            study = existing
            console.print(
                f"Resuming study [bold]{escape(study.name)}[/] ({len(study.evaluated_trials)} evaluated trials stored)."
            )
            ignored = [flag for flag, given in (("--budget", budget), ("--budget-fraction", budget_fraction)) if given]
            if strategy is not None and strategy != study.record.strategy:
                ignored.append("--strategy")
            if ignored:
                err_console.print(
                    f"[yellow]note:[/] a stored study keeps its configuration ({study.record.strategy}, budget "
                    f"{study.budget}); {', '.join(ignored)} ignored. Use another --name for a new study.",
                    highlight=False,
                )
        else:
            environment = _environment(data, benchmark, simulated, orderings, seed, catalog)
            pool = [m.strip() for m in models.split(",") if m.strip()] if models else None
            space = SearchSpace.from_info(environment.info, models=pool)
            if budget_fraction is not None:
                if not 0 < budget_fraction <= 1:
                    raise BudgetError(f"--budget-fraction {budget_fraction} must be in (0, 1]")
                scale = Budget.parse(1.0, unit)
                limit = budget_fraction * most_expensive_single_model_cost(environment, space, scale)
                the_budget = Budget.parse(limit, unit)
            elif budget is not None:
                the_budget = Budget.parse(budget, unit)
            else:
                raise BudgetError("no budget given: pass --budget X [--unit U] or --budget-fraction F")
            study = create_study(
                storage=storage,
                environment=environment,
                budget=the_budget,
                strategy=_check_strategy(strategy or DEFAULT_STRATEGY),
                strategy_params=strategy_params(strategy or DEFAULT_STRATEGY, planner_model, api_base),
                seed=seed,
                name=name,
                space=space,
            )
            console.print(
                f"Study [bold]{study.name}[/]: {environment.info.name}, {study.space.size():,} plans in the space, "
                f"budget {study.budget} per input, strategy {study.strategy.name}, seed {seed}."
            )
        runner = None
        if queue:
            from workers.queue_runner import CeleryRunner

            runner = CeleryRunner(storage, database_url=_database_url(database), broker_url=broker)
        # Unfinished trials of an interrupted run are evaluated first and count toward --trials (a total).
        unfinished = len([t for t in study.trials if not t.state.is_finished])
        remaining = max(0, trials - len(study.evaluated_trials) - unfinished)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("best {task.fields[best]}"),
            console=console,
            transient=False,
        ) as progress:
            bar = progress.add_task("trials", total=remaining + unfinished, best="-")

            def on_trial(study_: object, trial: FrozenTrial) -> None:
                if trial.state is not TrialState.REJECTED:
                    progress.advance(bar)
                if trial.state is TrialState.COMPLETE:
                    best = study.best_trial
                    progress.update(bar, best=f"{best.score:.3f} (trial {best.number})")

            study.optimize(remaining, batch_size=batch, runner=runner, callbacks=[on_trial])
        _print_results(study, top)
    except KeyboardInterrupt:
        name_hint = f" --name {study.name}" if "study" in locals() else ""
        raise _fail(f"interrupted; every finished trial is stored. Resume with: allot study run{name_hint}", 130) from None
    except AllotError as exc:
        raise _fail(str(exc)) from None


class UnknownStrategy(AllotError):
    """The strategy name is not registered."""


def _check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise UnknownStrategy(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    return name


def _database_url(database: str | None) -> str:
    from planner.storage import default_database_url

    return database or default_database_url()


def _print_results(study: object, top: int) -> None:
    from planner.study import Study

    assert isinstance(study, Study)
    budget = study.budget
    complete = [t for t in study.trials if t.state is TrialState.COMPLETE]
    if not complete:
        console.print("No complete trial yet.")
        return
    ranked = sorted(complete, key=lambda t: (-(t.score or 0), budget.spent(t.estimated_cost), t.number))
    table = Table(title=f"Best plans of {study.name} (budget {budget} per input)")
    for col in ("trial", "score", "± spread", f"cost ({budget.unit.value})", "plan"):
        table.add_column(col, justify="right" if col != "plan" else "left")
    for t in ranked[:top]:
        table.add_row(
            str(t.number), f"{t.score:.3f}", f"{t.spread or 0:.3f}", _fmt(budget.spent(t.estimated_cost)), Text(t.plan.summary())
        )
    console.print(table)
    front = Table(title="Pareto front (score vs cost)")
    for col in ("trial", "score", f"cost ({budget.unit.value})", "plan"):
        front.add_column(col, justify="right" if col != "plan" else "left")
    for t in study.pareto_trials():
        front.add_row(str(t.number), f"{t.score:.3f}", _fmt(budget.spent(t.estimated_cost)), Text(t.plan.summary()))
    console.print(front)
    best = study.best_trial
    spent = budget.spent(best.estimated_cost)
    baseline = best_single_model_baseline(study.environment, study.space, budget, spent)
    versus = Table(title="Best plan found vs the best single-model plan of equal or lower cost")
    for col in ("", "score", f"cost ({budget.unit.value})", "plan"):
        versus.add_column(col, justify="right" if col not in ("", "plan") else "left")
    versus.add_row("Allot", f"{best.score:.3f}", _fmt(spent), Text(best.plan.summary()))
    if baseline is None:
        versus.add_row("single model", "-", "-", "no single-model plan is this cheap")
    else:
        versus.add_row("single model", f"{baseline.evaluation.score:.3f}", _fmt(baseline.spent), Text(baseline.plan.summary()))
    console.print(versus)
    if baseline is not None:
        gain = (best.score or 0) - baseline.evaluation.score
        console.print(f"Gain over the single-model baseline at equal cost: {gain * 100:+.1f} accuracy points.")
    console.print(f"Show the winning graph: allot plan show {best.plan_id[:12]}")


# -- study list / show -----------------------------------------------------------------------------


@study_app.command("list")
def study_list(database: DatabaseOption = None) -> None:
    """List stored studies."""
    try:
        storage = _storage(database)
        table = Table(title="Studies")
        for col in ("name", "task", "strategy", "budget", "seed", "trials", "best score", "created"):
            table.add_column(col)
        for record in storage.list_studies():
            trials = storage.get_trials(record.study_id)
            scores = [t.score for t in trials if t.state is TrialState.COMPLETE and t.score is not None]
            table.add_row(
                record.name,
                str(record.environment.get("benchmark") or record.environment.get("kind")),
                record.strategy,
                str(record.budget),
                str(record.seed),
                str(len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)])),
                f"{max(scores):.3f}" if scores else "-",
                record.created_at.strftime("%Y-%m-%d %H:%M"),
            )
        console.print(table)
    except AllotError as exc:
        raise _fail(str(exc)) from None


@study_app.command("show")
def study_show(
    name: Annotated[str, typer.Argument(help="Study name.")],
    limit: Annotated[int, typer.Option(help="Trials shown (most recent).")] = 50,
    database: DatabaseOption = None,
) -> None:
    """Show a study's configuration, trials, best plans and Pareto front."""
    from planner.study import load_study

    try:
        storage = _storage(database)
        try:
            study = load_study(name, storage)
        except KeyError:
            known = ", ".join(s.name for s in storage.list_studies()) or "none"
            raise _fail(f"no study named {name!r}: known studies are {known}") from None
        record = study.record
        console.print(
            f"[bold]{record.name}[/]: strategy {record.strategy} (seed {record.seed}), budget {record.budget} per input, "
            f"environment {record.environment}"
        )
        table = Table(title="Trials")
        for col in ("#", "state", "score", "cost", "planner cost", "plan", "rationale"):
            table.add_column(col)
        for t in study.trials[-limit:]:
            table.add_row(
                str(t.number),
                t.state.value,
                _fmt(t.score, 3),
                _fmt(study.budget.spent(t.estimated_cost)),
                _fmt(t.planner_cost.tokens) if t.planner_cost.tokens else "0",
                Text(t.plan.summary()),
                Text((t.rationale or "")[:80] + (f" ({t.error})" if t.error else "")),
            )
        console.print(table)
        _print_results(study, 5)
    except AllotError as exc:
        raise _fail(str(exc)) from None


# -- plan show -------------------------------------------------------------------------------------


def plan_tree(plan: Plan) -> Tree:
    """The plan's collaboration graphs as a terminal tree: stage -> nodes -> edges and decision."""
    tree = Tree(f"[bold]plan {plan.plan_id[:12]}[/]")
    for stage in plan.stages:
        branch = tree.add(
            f"[bold cyan]stage {stage.stage}[/] decides by {stage.decision.value}"
            + (f", stopping once {stage.early_stop} answers agree" if stage.early_stop else "")
        )
        incoming = {node.id: [src for src, dst in stage.edges if dst == node.id] for node in stage.nodes}
        answer_ids = {n.id for n in stage.answer_nodes}
        for node in stage.nodes:
            cap = f", max {node.max_tokens} tokens" if node.max_tokens else ""
            label = f"{node.id}: [green]{node.role.value}[/] {node.model} x {node.n} (T={node.temperature}{cap})"
            if incoming[node.id]:
                label += f"  ← {', '.join(incoming[node.id])}"
            if node.id in answer_ids:
                label += "  → decision"
            branch.add(label)
    return tree


@plan_app.command("show")
def plan_show(
    plan_id: Annotated[str, typer.Argument(help="Plan id or a unique prefix (6+ characters).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print canonical JSON instead.")] = False,
    database: DatabaseOption = None,
) -> None:
    """Show a stored plan's collaboration graph per stage."""
    try:
        storage = _storage(database)
        try:
            plan = storage.get_plan(plan_id)
        except KeyError:
            raise _fail(f"no stored plan with id {plan_id!r}: copy an id from `allot study show`") from None
        if as_json:
            typer.echo(plan.canonical_json())
        else:
            console.print(plan_tree(plan))
    except AllotError as exc:
        raise _fail(str(exc)) from None


# -- db, worker ------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(database: DatabaseOption = None) -> None:
    """Create or upgrade Allot's tables to the latest schema."""
    from planner.storage import upgrade

    try:
        url = _database_url(database)
        upgrade(url)
        console.print("Database schema is up to date.")
    except AllotError as exc:
        raise _fail(str(exc)) from None


@app.command("worker")
def worker(
    broker: Annotated[str | None, typer.Option(envvar="ALLOT_BROKER_URL", help="Broker URL; default: embedded.")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
    database: DatabaseOption = None,
    pool: Annotated[str, typer.Option(help="prefork (default), solo or threads.")] = "prefork",
    queue: Annotated[str | None, typer.Option(envvar="ALLOT_QUEUE", help="Queue to consume; default: allot.")] = None,
    reap_every: Annotated[float, typer.Option(min=0, help="Seconds between job reaper rounds (0: no reaper).")] = 5.0,
    stale_after: Annotated[float, typer.Option(min=0.1, help="Re-queue running jobs whose heartbeat is this old.")] = 30.0,
    redispatch_after: Annotated[float, typer.Option(min=0.1, help="Re-send messages of jobs queued this long.")] = 60.0,
) -> None:
    """Start a Celery worker that evaluates queued trials and runs jobs (and reaps the database's jobs)."""
    from planner.storage import default_database_url
    from workers.worker import run_worker

    if database:
        os.environ["ALLOT_DATABASE_URL"] = database
    try:
        run_worker(
            broker_url=broker,
            concurrency=concurrency,
            pool=pool,
            queue=queue,
            database_url=database or default_database_url(),
            reap_every_s=reap_every,
            stale_after_s=stale_after,
            redispatch_after_s=redispatch_after,
        )
    except AllotError as exc:
        raise _fail(str(exc)) from None


# -- bench -----------------------------------------------------------------------------------------


@app.command("bench")
def bench(
    data: Annotated[
        Path | None, typer.Option(help="Replay directory; every benchmark in it is run. Default: bundled AIME data.")
    ] = None,
    benchmark: Annotated[
        list[str] | None, typer.Option("--benchmark", help="Only this benchmark of the replay directory (repeatable).")
    ] = None,
    simulated: Annotated[
        list[int] | None, typer.Option("--simulated", min=1, help="Add a simulated task with N stages (repeatable).")
    ] = None,
    no_replay: Annotated[bool, typer.Option("--no-replay", help="Skip the replay directory (simulated tasks only).")] = False,
    budget: Annotated[
        list[float] | None,
        typer.Option(
            "--budget", help="Budget as a fraction of the costliest single-model plan (repeatable; default: 0.02 0.1 0.5)."
        ),
    ] = None,
    trials: Annotated[int, typer.Option(min=1, help="Evaluated trials per study.")] = 20,
    seeds: Annotated[
        int, typer.Option(min=1, help="Seeds per strategy and budget (F..F+S-1); each draws its own simulated evaluation noise.")
    ] = 3,
    first_seed: Annotated[int, typer.Option(min=0, help="First seed F: another seed set checks a change on other luck.")] = 0,
    strategy: Annotated[
        list[str] | None, typer.Option("--strategy", help="Strategy to run (repeatable; default: every one registered).")
    ] = None,
    planner_model: Annotated[
        str | None, typer.Option(help="litellm route of the planner LLM, for strategies that take one.")
    ] = None,
    api_base: Annotated[str | None, typer.Option(help="API base URL of the planner LLM (e.g. a vLLM server).")] = None,
    orderings: Annotated[int, typer.Option(min=1, help="Replay: sample orderings each plan is scored over.")] = 8,
    workers: Annotated[int, typer.Option(min=1, help="Processes running studies; results do not depend on it.")] = (
        os.cpu_count() or 1
    ),
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full results (JSON) here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write best-so-far curves (HTML) here.")] = None,
) -> None:
    """Compare search strategies against the exact optimum on every benchmark and budget."""
    from planner.bench import DEFAULT_BUDGETS, BenchConfig, run_bench, write_plot

    try:
        for name in strategy or ():
            _check_strategy(name)
        if no_replay and not simulated:
            raise BudgetError("--no-replay leaves nothing to bench: add --simulated N")
        config = BenchConfig(
            data=data,
            benchmarks=() if no_replay else (tuple(benchmark) if benchmark else None),
            simulated=tuple(simulated or ()),
            budgets=tuple(budget) if budget else DEFAULT_BUDGETS,
            trials=trials,
            seeds=seeds,
            first_seed=first_seed,
            strategies=tuple(strategy) if strategy else None,
            planner_model=planner_model,
            api_base=api_base,
            orderings=orderings,
            workers=workers,
        )
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as progress:
            bar = progress.add_task("optimum, then studies", total=None)

            def on_study(done: int, total: int) -> None:
                progress.update(bar, completed=done, total=total, description="studies")

            result = run_bench(config, progress=on_study)
    except (AllotError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _print_bench(result)
    if json_out is not None:
        result.write_json(json_out)
        console.print(f"Results: {json_out}")
    if plot is not None:
        write_plot(result, plot)
        console.print(f"Curves: {plot}")


def _print_bench(result: object) -> None:
    from planner.bench import BenchResult

    assert isinstance(result, BenchResult)
    meta = result.meta
    table = Table(
        title=f"allot bench: {meta['trials']} trials x {len(meta['seeds'])} seeds per strategy "
        "(regret in accuracy points vs the exact optimum; search cost as multiples of one run of the optimal plan; "
        "floor: the least a search that checks its answer generates)"
    )
    columns = (
        "benchmark",
        "budget",
        "optimum",
        "floor x opt",
        "strategy",
        "best (mean±sd)",
        "regret (pts)",
        "trials to 1pt",
        "to 0.5pt",
        "search x opt, reuse",
        "no reuse",
        "planner tokens",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("benchmark", "strategy") else "right")
    previous = None
    for row in result.rows():
        group = (row.benchmark, row.budget_fraction)
        first = group != previous
        if first and previous is not None:
            table.add_section()
        previous = group

        def pm(mean: float | None, sd: float | None, digits: int, scale: float = 1.0) -> str:
            if mean is None:
                return "-"
            return f"{mean * scale:.{digits}f}±{(sd or 0.0) * scale:.{digits}f}"

        def trials_to(value: float | None) -> str:
            return "never" if value is None else f"{value:g}"

        def ratio(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        table.add_row(
            row.benchmark if first else "",
            f"{row.budget_fraction:g}" if first else "",
            ("-" if row.optimum is None else f"{row.optimum:.3f}") if first else "",
            ratio(row.search_cost_floor) if first else "",
            row.strategy + (" [red](errors)[/]" if row.errors else ""),
            pm(row.best_mean, row.best_std, 3),
            pm(row.regret_mean, row.regret_std, 1),
            trials_to(row.median_trials_to_1pt),
            trials_to(row.median_trials_to_half_pt),
            ratio(row.search_ratio_with_reuse),
            ratio(row.search_ratio_without_reuse),
            _fmt(row.planner_tokens, 3) if row.planner_tokens else "0",
        )
    console.print(table)
    for error in result.errors:
        err_console.print(f"[yellow]warning:[/] {escape(error)}", highlight=False, soft_wrap=True)
    console.print(f"Bench finished in {result.seconds:.1f} s.")


def main() -> None:  # pragma: no cover - console entry point
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
