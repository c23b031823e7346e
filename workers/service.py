"""Service tasks: what a job runs (a task, its models and backend, a budget, a learned graph), and how.

A *service task* is registered once (``allot task create``) and stored in ``allot_tasks``; every job of it
runs one input with a plan taken from the task's learned graph (``GraphState``: one probabilistic graph per
stage, versions in ``allot_graph_versions`` under the task's graph name):

- the plan: the job's pinned plan if it names one; else the graph version the job names, else the graph's
  newest *pinned* version, else its newest; from that, the most likely plan (``policy: best``) or a
  sample (``policy: sample``; with ``exploration`` e, ``best`` also samples with probability e). A plan
  whose worst case does not fit the job's budget is drawn again (seeded by the job id); if none fits, the
  job fails saying so. The budget is then also enforced call by call (``BudgetMeter``).
- the backend: ``replay`` (recorded samples, ``executors.replay_backend``) or ``litellm`` (hosted APIs and
  vLLM / llama.cpp servers), always behind a ``CachedBackend`` on the job database's sample store, so a
  job re-run after a crash regenerates nothing it already generated.

``prepare_job`` and ``run_job`` are what a worker calls; they hold no broker logic (``workers.tasks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import Table, bindparam
from sqlmodel import Session, select

from executors.backends import ModelBackend
from executors.budget import BudgetMeter
from executors.plan_runner import PlanRunner, RunResult
from executors.replay_backend import ReplayBackend, replay_task
from executors.sample_store import CachedBackend, SampleStore
from executors.tasks import Example, Task, load_task
from graphs.cost import Budget, Cost, ModelSpec
from graphs.errors import AllotError, BudgetError, DataError, InvalidPlan, UnknownModel
from graphs.plan import Node, Plan
from graphs.probabilistic import ProbabilisticGraph
from planner.graph_record import GraphVersion
from planner.storage import SQLStorage
from planner.storage._sql import version_record
from planner.storage.tables import GraphVersionRow, TaskRow, strict_json, utcnow
from planner.strategies._reinforce import GraphState

__all__ = [
    "DEFAULT_COUNTS",
    "SPEC_TTL_S",
    "PlanChoice",
    "ServiceTask",
    "TaskRuntime",
    "UnknownTask",
    "budget_of",
    "cached_service_task",
    "cheapest_plan",
    "check_budget_fits",
    "choose_plan",
    "clear_runtimes",
    "current_version",
    "get_service_task",
    "graph_state",
    "graph_version",
    "initial_state",
    "list_service_tasks",
    "load_task_file",
    "register_task",
    "remember_version",
    "resolve_example",
    "runtime_for",
]

DEFAULT_COUNTS = (1, 2, 4, 8)
"""Sample counts a service task's graph may draw per model (unless the task names its own)."""
MAX_DRAWS = 64
"""Plans drawn from the graph before a job gives up finding one within its budget."""
SAMPLES_KEPT = 50_000
"""Stored samples a task's runtime keeps in memory per process once read (they never change)."""
ESTIMATES_KEPT = 20_000
"""Worst-case estimates a task's runtime keeps per process (by plan and input) before starting over."""


class UnknownTask(AllotError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown task"


class ServiceTask(BaseModel):
    """A registered task: stored as JSON in ``allot_tasks.definition``; the API shows it as is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    backend: Literal["replay", "litellm"]
    task: dict[str, Any] | None = None
    """The task definition (``executors.tasks.Task`` as JSON) for a ``litellm`` task."""
    data: str | None = None
    """The replay directory of a ``replay`` task (its benchmark: ``benchmark``)."""
    benchmark: str | None = None
    catalog: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Model name -> ``ModelSpec`` fields. A replay task's default: the data's models."""
    budget: Budget
    graph: str
    """The learned graph's name (versions in ``allot_graph_versions``)."""
    policy: Literal["best", "sample"] = "best"
    exploration: float = Field(default=0.0, ge=0.0, le=1.0)
    learn_every: int = Field(default=8, ge=1)
    """Pieces of evidence (scored results, user feedback) per graph update."""
    learning_rate: float = Field(default=0.5, gt=0.0, le=10.0)
    latency_s: float = Field(default=0.0, ge=0.0)
    """Replay only: seconds each model call waits (stands in for a slow model in tests)."""

    @model_validator(mode="after")
    def _check(self) -> ServiceTask:
        if self.backend == "litellm" and not self.task:
            raise ValueError("a litellm task needs its task definition (a task file)")
        if self.backend == "litellm" and not self.catalog:
            raise ValueError("a litellm task needs a catalog of models")
        return self


def _catalog_of(spec: ServiceTask) -> dict[str, ModelSpec]:
    try:
        return {
            name: ModelSpec(name=name, **{k: v for k, v in fields.items() if k != "name"})
            for name, fields in spec.catalog.items()
        }
    except ValidationError as exc:
        raise DataError(f"task {spec.name}: invalid catalog: {exc.errors()[0]['msg']}") from None


# -- the registry (allot_tasks) ----------------------------------------------------------------------------


def register_task(storage: SQLStorage, spec: ServiceTask, *, replace: bool = False) -> int:
    """Store ``spec``; returns its task id. An existing name is an error unless ``replace``."""
    definition = strict_json(spec.model_dump(mode="json"), "a task definition")
    with storage.transaction(write=True) as session:
        row = session.exec(select(TaskRow).where(TaskRow.name == spec.name)).first()
        if row is not None and not replace:
            raise ValueError(f"task {spec.name!r} already exists: pick another name, or replace it")
        if row is None:
            row = TaskRow(name=spec.name, kind=spec.backend, definition=definition, created_at=utcnow())
        else:
            row.kind, row.definition = spec.backend, definition
        session.add(row)
        session.flush()
        session.refresh(row)
        assert row.id is not None
        task_id = row.id
    _forget_spec(storage, spec)
    return task_id


def get_service_task(storage: SQLStorage, name: str | int, *, session: Session | None = None) -> tuple[int, ServiceTask]:
    """``(task id, spec)`` by name or id; ``UnknownTask`` naming what exists. In ``session``'s transaction
    if given, else in one of its own."""
    if session is None:
        with storage.transaction() as own:
            return get_service_task(storage, name, session=own)
    if isinstance(name, int):
        row = session.get(TaskRow, name)
    else:
        row = session.exec(select(TaskRow).where(TaskRow.name == name)).first()
    if row is None:
        names = sorted(session.exec(select(TaskRow.name)).all())
        raise UnknownTask(f"unknown task {name!r}: registered tasks are {', '.join(names) or 'none (allot task create)'}")
    assert row.id is not None
    return row.id, ServiceTask.model_validate(row.definition)


SPEC_TTL_S = 2.0
"""How long a process reuses a task definition it read (``cached_service_task``): a task re-registered
with ``replace`` reaches other processes' new jobs within this time (this process's at once)."""

_specs: dict[tuple[str, str | int], tuple[float, int, ServiceTask]] = {}


def cached_service_task(
    storage: SQLStorage, name: str | int, *, ttl_s: float = SPEC_TTL_S, session: Session | None = None
) -> tuple[int, ServiceTask]:
    """``get_service_task``, read from the database at most once per ``ttl_s`` per task (by name or id)."""
    key = (storage.url, name)
    now = time.monotonic()
    found = _specs.get(key)
    if found is not None and now - found[0] < ttl_s:
        return found[1], found[2]
    task_id, spec = get_service_task(storage, name, session=session)
    _specs[key] = _specs[(storage.url, task_id)] = _specs[(storage.url, spec.name)] = (now, task_id, spec)
    return task_id, spec


def _forget_spec(storage: SQLStorage, spec: ServiceTask) -> None:
    for key, (_, task_id, cached) in list(_specs.items()):
        if key[0] == storage.url and cached.name == spec.name:
            _specs.pop(key, None)
            _specs.pop((storage.url, task_id), None)


def list_service_tasks(storage: SQLStorage) -> list[ServiceTask]:
    with storage.transaction() as session:
        rows = session.exec(select(TaskRow).order_by(TaskRow.name)).all()
    specs = []
    for row in rows:
        try:
            specs.append(ServiceTask.model_validate(row.definition))
        except ValidationError:  # a row some other writer stored: not a service task
            continue
    return specs


# -- runtime: the task, its catalog and backend, built once per process -------------------------------------


class TaskRuntime:
    """What running a service task's jobs needs in one process: the task, catalog and a cached backend."""

    def __init__(self, spec: ServiceTask, storage: SQLStorage | None = None, *, backend: ModelBackend | None = None) -> None:
        self.spec = spec
        if spec.backend == "replay":
            replay = ReplayBackend(spec.data, spec.benchmark, latency_s=spec.latency_s)
            self.task: Task = replay_task(replay.data)
            catalog = _catalog_of(spec) or dict(replay.data.specs)
            replay.catalog = catalog
            inner: ModelBackend = replay
        else:
            try:
                self.task = Task.model_validate(spec.task)
            except ValidationError as exc:
                raise DataError(f"task {spec.name}: invalid task definition: {exc.errors()[0]['msg']}") from None
            catalog = _catalog_of(spec)
            from executors.litellm_backend import LiteLLMBackend

            inner = LiteLLMBackend(catalog)
        self.catalog: dict[str, ModelSpec] = catalog
        inner = backend if backend is not None else inner
        self.storage_url = storage.url if storage is not None else None
        self.store = SampleStore(storage, memory=SAMPLES_KEPT) if storage is not None else SampleStore()
        self.backend = CachedBackend(inner, self.store, catalog=catalog)
        self.runner = PlanRunner(self.task, self.backend, catalog)
        self._examples = {example.id: example for example in self.task.examples}
        self._estimates: dict[tuple[str, str, str], Cost] = {}
        self._cheapest: Plan | None = None
        self.choices: dict[tuple[int | None, str, str, str], PlanChoice] = {}
        """(graph version id, input, budget) -> the plan chosen without exploring (``choose_plan``)."""
        self.states: dict[int | None, GraphState] = {}
        """Graph version id -> its parsed state (versions are immutable)."""
        self.likeliest: dict[int | None, Plan] = {}
        """Graph version id -> its most likely plan."""

    def example(self, job_input: Mapping[str, Any]) -> Example:
        return resolve_example(self.task, job_input, self._examples)

    def estimate_cost(self, plan: Plan, example: Example) -> Cost:
        """``runner.estimate_cost``, computed once per plan and input (both are values: the worst case
        depends on nothing else). Errors (``InvalidPlan``, ``UnknownModel``) are raised every time."""
        inputs = ""
        if example.id.startswith("input-"):  # a job's own inputs: keyed by all of them, not the id's short digest
            inputs = hashlib.sha256(repr(sorted(example.inputs.items())).encode()).hexdigest()
        key = (plan.plan_id, example.id, inputs)
        cost = self._estimates.get(key)
        if cost is None:
            cost = self.runner.estimate_cost(plan, example)
            if len(self._estimates) >= ESTIMATES_KEPT:
                self._estimates.clear()
            self._estimates[key] = cost
        return cost

    def cheapest_plan(self) -> Plan:
        if self._cheapest is None:
            self._cheapest = cheapest_plan(self)
        return self._cheapest

    def run(self, plan: Plan, example: Example, budget: Budget) -> RunResult:
        """Run ``plan`` on ``example`` within ``budget`` (a hard limit: calls that could pass it are refused)."""
        meter = BudgetMeter(budget)
        return asyncio.run(self.runner.run(plan, example, meter=meter))

    def close(self) -> None:
        self.store.close() if hasattr(self.store, "close") else None


def resolve_example(task: Task, job_input: Mapping[str, Any], examples: Mapping[str, Example] | None = None) -> Example:
    """A job's input as an ``Example``: ``{"example": id}`` (a dataset row) or ``{"inputs": {...},
    "reference": ...}``; ``DataError`` naming what is wrong."""
    if not isinstance(job_input, Mapping):
        raise DataError('a job\'s input must be an object: {"example": id} or {"inputs": {...}}')
    unknown = set(job_input) - {"example", "inputs", "reference"}
    if unknown:
        raise DataError(
            f"unknown field(s) in the job's input: {', '.join(_printable(name) for name in sorted(unknown))} "
            "(allowed: example, inputs, reference)"
        )
    if "example" in job_input:
        if "inputs" in job_input:
            raise DataError("give either example (an id of the task's dataset) or inputs, not both")
        examples = examples if examples is not None else {example.id: example for example in task.examples}
        example = examples.get(str(job_input["example"]))
        if example is None:
            sample = ", ".join(list(examples)[:5])
            raise DataError(f"task {task.name} has no example {job_input['example']!r} (e.g. {sample})")
        return example
    inputs = job_input.get("inputs")
    if not isinstance(inputs, Mapping) or not inputs:
        raise DataError("a job's input needs example (a dataset id) or inputs (the fields its prompts read)")
    needed = sorted({key for stage in task.stages for key in stage.template.inputs})
    missing = [key for key in needed if key not in inputs]
    if missing:
        raise DataError(f"task {task.name} reads input field(s) {', '.join(missing)}, which the job's inputs lack")
    reference = job_input.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise DataError("reference must be a string")
    digest = hashlib.sha256(repr(sorted(inputs.items())).encode()).hexdigest()[:12]
    return Example(id=f"input-{digest}", inputs=dict(inputs), reference=reference)


def _printable(name: str) -> str:
    """A user's field name as one line of an error message (control characters escaped)."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


_runtimes: dict[tuple[str, str], TaskRuntime] = {}
_runtimes_lock = threading.Lock()
_by_spec: dict[tuple[str, int], tuple[ServiceTask, TaskRuntime]] = {}
"""(database URL, id of a spec object) -> that spec and its runtime: the same cached spec object (see
``cached_service_task``) finds its runtime without serialising the spec again."""


def runtime_for(spec: ServiceTask, storage: SQLStorage) -> TaskRuntime:
    """The process's runtime of ``spec`` (rebuilt when the task is re-registered with a new definition)."""
    fast = _by_spec.get((storage.url, id(spec)))
    if fast is not None and fast[0] is spec:
        return fast[1]
    key = (storage.url, spec.model_dump_json())
    with _runtimes_lock:
        runtime = _runtimes.get(key)
        if runtime is None:
            runtime = _runtimes[key] = TaskRuntime(spec, storage)
        if len(_by_spec) > 256:
            _by_spec.clear()
        _by_spec[(storage.url, id(spec))] = (spec, runtime)
        return runtime


def clear_runtimes() -> None:
    """Forget built runtimes and cached task definitions and graph versions (after a fork: a child must
    not share its parent's database connections; in tests)."""
    with _runtimes_lock:
        _runtimes.clear()
        _by_spec.clear()
    _specs.clear()
    _versions.clear()
    _parsed.clear()


def _forget_in_child() -> None:
    global _runtimes_lock
    _runtimes_lock = threading.Lock()  # another thread may have held it at the fork
    _runtimes.clear()
    _by_spec.clear()
    _specs.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


# -- the learned graph --------------------------------------------------------------------------------------


def initial_state(spec: ServiceTask, task: Task, catalog: Mapping[str, ModelSpec], best: Plan | None = None) -> GraphState:
    """The first version of a task's graph: solver slots for every model and stage, biased toward
    ``best`` (e.g. a study's best plan) when given, so its most likely plan is ``best``'s allocation."""
    graphs = []
    models = tuple(catalog)
    for stage in task.order:
        chosen: dict[str, Node] = {}
        cap = None
        if best is not None and stage in {graph.stage for graph in best.stages}:
            for node in best.stage(stage).nodes:
                chosen.setdefault(node.model, node)
                cap = cap or node.max_tokens
        counts = {m: tuple(sorted({*DEFAULT_COUNTS, *((chosen[m].n,) if m in chosen else ())})) for m in models}
        weights = {m: {n: (0.7 if n == chosen[m].n else 0.3 / (len(counts[m]) - 1 or 1)) for n in counts[m]} for m in chosen}
        graph = ProbabilisticGraph.template(
            stage,
            counts,
            solver_probability=0.5,
            count_weights=weights or None,
            max_solvers=max(1, min(2, len(models))),
            max_tokens=cap,
        )
        if chosen:
            slots = tuple(
                slot.model_copy(update={"include_logit": 2.2 if slot.model in chosen else -2.2}) for slot in graph.slots
            )
            graph = ProbabilisticGraph(
                stage=graph.stage,
                slots=slots,
                edges=graph.edges,
                max_in_degree=graph.max_in_degree,
                max_solvers=graph.max_solvers,
            )
        graphs.append(graph)
    return GraphState(strategy="service", iteration=0, graphs=tuple(graphs), baseline=None)


VERSIONS_KEPT = 256
"""Graph versions (definitions, parsed states, plan choices) a process keeps, by version id."""

_versions: dict[tuple[str, int], GraphVersion] = {}
_parsed: dict[tuple[str, int], GraphState] = {}


def graph_state(storage_url: str, version: GraphVersion) -> GraphState:
    """The parsed ``GraphState`` of a stored version, parsed once per process (versions are immutable)."""
    key = (storage_url, version.version_id)
    state = _parsed.get(key)
    if state is None:
        state = GraphState.from_definition(version.definition)
        _keep(_parsed, key, state)
    return state


def remember_version(storage_url: str, version: GraphVersion, state: GraphState | None = None) -> None:
    """Keep a version this process has just stored (and its parsed state): later jobs need not read it."""
    _keep(_versions, (storage_url, version.version_id), version)
    if state is not None:
        _keep(_parsed, (storage_url, version.version_id), state)


def _keep(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= VERSIONS_KEPT:
        with contextlib.suppress(RuntimeError, StopIteration):  # another thread changed it meanwhile
            cache.pop(next(iter(cache)), None)  # the oldest entry (dicts keep insertion order)
    cache[key] = value


_VERSIONS: Table = GraphVersionRow.__table__  # type: ignore[attr-defined]
_PINNED = select(_VERSIONS.c.pinned).where(_VERSIONS.c.id == bindparam("version_id"))
_CURRENT = (
    select(_VERSIONS.c.id, _VERSIONS.c.pinned)
    .where(_VERSIONS.c.graph == bindparam("graph"))
    .order_by(_VERSIONS.c.pinned.desc(), _VERSIONS.c.version.desc())
    .limit(1)
)
"""The id of the version new jobs follow: the newest pinned, else the newest (one row, no definition)."""


def graph_version(
    storage: SQLStorage, version_id: int, *, pinned: bool | None = None, session: Session | None = None
) -> GraphVersion:
    """Version ``version_id``, read once per process: versions are immutable except ``pinned``, which is
    read again unless the caller knows it (``pinned``). In ``session``'s transaction if given."""
    if session is None:
        with storage.transaction() as own:
            return graph_version(storage, version_id, pinned=pinned, session=own)
    key = (storage.url, version_id)
    version = _versions.get(key)
    if version is None:
        row = session.get(GraphVersionRow, version_id)
        if row is None:
            raise KeyError(f"no graph version with id {version_id}")
        version = version_record(row)
        _keep(_versions, key, version)
        return version
    if pinned is None:
        pinned = session.connection().execute(_PINNED, {"version_id": version_id}).scalar()
        if pinned is None:  # deleted since: forget it
            _versions.pop(key, None)
            raise KeyError(f"no graph version with id {version_id}")
    return version if version.pinned == bool(pinned) else replace(version, pinned=bool(pinned))


def current_version(
    storage: SQLStorage, graph: str, version_id: int | None = None, *, session: Session | None = None
) -> GraphVersion:
    """The version a new job follows: ``version_id`` if given, else the newest pinned, else the newest.

    One small query (the version's id); definitions are read once per process (they never change). In
    ``session``'s transaction if given, else in one of its own."""
    if session is None:
        with storage.transaction() as own:
            return current_version(storage, graph, version_id, session=own)
    if version_id is not None:
        version = graph_version(storage, version_id, session=session)
        if version.graph != graph:
            raise InvalidPlan(f"graph version {version_id} belongs to graph {version.graph!r}, not {graph!r}")
        return version
    found = session.connection().execute(_CURRENT, {"graph": graph}).first()
    if found is None:
        raise KeyError(f"no graph named {graph!r}")
    return graph_version(storage, int(found[0]), pinned=bool(found[1]), session=session)


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    graph_version_id: int | None
    how: str
    """``pinned plan``, ``most likely``, ``sampled`` (with the draw count), for the job's record."""


def _stage_state(state: GraphState, task: Task) -> GraphState:
    stages = {graph.stage for graph in state.graphs}
    if stages != set(task.order):
        raise InvalidPlan(f"the graph has stages {', '.join(sorted(stages))}; the task has {', '.join(task.order)}")
    return state


def choose_plan(
    runtime: TaskRuntime,
    version: GraphVersion,
    example: Example,
    budget: Budget,
    *,
    seed: int,
) -> PlanChoice:
    """A plan from ``version`` that fits ``budget`` in the worst case (see the module docstring)."""
    spec = runtime.spec
    rng = random.Random(seed)
    explore = spec.policy == "sample" or rng.random() < spec.exploration
    # Without exploration the most likely plan depends only on the version, the input and the budget: when
    # it fits, it is chosen once per process (a fallback drawn with the job's seed is not remembered).
    key = (version.version_id, example.id, budget.unit.value, repr(budget.limit))
    cacheable = not explore and not example.id.startswith("input-")
    if cacheable:
        known = runtime.choices.get(key)
        if known is not None:
            return known
    state = runtime.states.get(version.version_id)
    if state is None:
        url = runtime.storage_url
        state = _stage_state(graph_state(url, version) if url else GraphState.from_definition(version.definition), runtime.task)
        _keep(runtime.states, version.version_id, state)
    if explore:
        first = state.sample(rng)
    else:  # the version's most likely plan, the same for every input
        first = runtime.likeliest.get(version.version_id)  # type: ignore[assignment]
        if first is None:
            first = Plan(stages=tuple(graph.most_likely() for graph in state.graphs))
            _keep(runtime.likeliest, version.version_id, first)
    candidates = itertools.chain(
        [(first, "sampled" if explore else "most likely")],
        ((state.sample(rng), "sampled (the first choice exceeded the budget)") for _ in range(MAX_DRAWS)),
    )
    for plan, how in candidates:
        try:
            worst = runtime.estimate_cost(plan, example)
        except (InvalidPlan, UnknownModel):
            continue
        if budget.allows(worst):
            choice = PlanChoice(plan, version.version_id, how)
            if cacheable and plan is first:
                _keep(runtime.choices, key, choice)
            return choice
    cheapest = runtime.cheapest_plan()
    floor = budget.spent(runtime.estimate_cost(cheapest, example))
    raise BudgetError(
        f"no plan of graph {spec.graph!r} v{version.version} fits the budget of {budget} in the worst case "
        f"({MAX_DRAWS + 1} drawn); the cheapest possible plan needs {floor:.4g} {budget.unit.value}"
    )


def cheapest_plan(runtime: TaskRuntime) -> Plan:
    """One sample of the smallest model per stage, at the smallest cap: the least any plan can cost."""
    model = min(runtime.catalog, key=lambda m: (runtime.catalog[m].active_params, m))
    return Plan.allocation({stage: (model, 1) for stage in runtime.task.order})


def check_budget_fits(runtime: TaskRuntime, example: Example, budget: Budget) -> None:
    """``BudgetError`` at submission if not even the cheapest plan fits ``budget``."""
    floor = runtime.estimate_cost(runtime.cheapest_plan(), example)
    if not budget.allows(floor):
        raise BudgetError(
            f"a budget of {budget} is too small for any plan of task {runtime.spec.name}: the cheapest "
            f"(one sample of {cheapest_plan(runtime).models[0]} per stage) needs {budget.spent(floor):.4g} {budget.unit.value}"
        )


def budget_of(spec: ServiceTask, limit: float | None, unit: str | None) -> Budget:
    """A job's budget: the task's, or a smaller one the job asks for (never more than the task's)."""
    if limit is None and unit is None:
        return spec.budget
    wanted = Budget.parse(limit if limit is not None else spec.budget.limit, unit or spec.budget.unit.value)
    if wanted.unit is not spec.budget.unit:  # not comparable with the task's: it could pass it
        raise BudgetError(f"a job's budget must be in its task's unit, {spec.budget.unit.value} (its budget: {spec.budget})")
    if wanted.limit > spec.budget.limit:
        raise BudgetError(f"a job's budget ({wanted}) cannot exceed its task's ({spec.budget})")
    return wanted


def load_task_file(path: str | Path) -> dict[str, Any]:
    """A task file as the JSON a ``litellm`` service task stores."""
    return load_task(path).model_dump(mode="json", exclude={"source"})
