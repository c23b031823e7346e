"""Live environment: scores a plan by running it on a task's dev set through real models.

``LiveEnvironment(task, catalog, backend=None)`` offers the same interface as the replay and simulated
environments, so any strategy can search a live task:

- ``info``: the task's stages, every catalog model for every stage, up to ``max_samples`` samples per
  model, every role and decision rule, early stop.
- ``check(plan)``: ``InvalidPlan`` unless the plan has the task's stages, ``UnknownModel`` for a model
  the catalog lacks.
- ``estimate_cost(plan)``: a hard upper bound per example, known before anything runs: the worst case
  of ``PlanRunner.estimate_cost`` over the dev set (every node draws its full ``n`` at its
  ``max_tokens``, prompts as long as templates and pasted generations can make them).
- ``evaluate(plan)``: runs every example, ``concurrency`` at a time; the score is the mean of the task
  scorer over examples with a reference, the spread its standard error, the cost the mean realised
  cost per example (samples a store served are counted as if generated, so a plan costs the same
  whether its samples were reused or not). Every run is kept in ``history`` for the recorder
  (``executors.recorder``). With a sample store in front (``CachedBackend``), evaluating a plan again
  reads the same samples: deterministic, and free.
- ``search_cost(plans)``: per example, what evaluating ``plans`` generated (``RunResult.paid``: less than
  the plan's cost where the sample store served samples, nothing for a plan evaluated again) against
  what they would have cost without reuse; plans not evaluated yet count at their estimate.
- ``prefix_scores(plan)``: the last stage's vote over the first 1, 2, 4, ... samples of the plan's recorded run,
  scored as the evaluation was (where that stage gives the task's answer and a text scorer scores it, not a judge
  model or unit tests): what running the smaller plan scores, read off without a call.
- ``spec()`` / ``from_spec``: the task file, the catalog (a file path or the models inline), the settings
  and the sample store's location; the backend is rebuilt from the catalog (``LiteLLMBackend``, behind a
  ``CachedBackend`` when a store is given).

``evaluate`` is synchronous like every environment's; ``aevaluate`` is its coroutine for callers that
already run an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import statistics
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from executors.aggregators import vote
from executors.backends import ModelBackend
from executors.environment import Environment, EnvironmentInfo, Evaluation, last_stage_prefixes
from executors.plan_runner import PlanRunner, RunResult, gather_or_cancel
from executors.tasks import Example, ScorerKind, Task, load_task
from graphs.cost import Cost, ModelSpec
from graphs.errors import DataError
from graphs.plan import DecisionRule, Plan, Role

__all__ = ["LiveEnvironment", "PlanRun"]

T = TypeVar("T")

DEFAULT_MAX_SAMPLES = 16
_SLOW_SCORERS = frozenset({ScorerKind.LLM_JUDGE, ScorerKind.UNIT_TESTS})


@dataclass(frozen=True)
class PlanRun:
    """One evaluation of one plan: the run of every example, in the dev set's order."""

    plan: Plan
    results: tuple[RunResult, ...]


class LiveEnvironment(Environment):
    """Runs plans of ``task`` on its dev set through ``backend``. See the module docstring.

    Args:
        task: a ``Task`` or the path of a task file.
        catalog: model name -> ``ModelSpec``, a catalog file path (``planner.catalog``), or a mapping of
            model names to catalog fields.
        backend: the model backend; default ``LiteLLMBackend(catalog)`` (behind a ``CachedBackend`` on
            ``store`` when one is given).
        max_samples: the most samples a node may draw (``info.max_samples``).
        concurrency: examples run at once during ``evaluate``.
        caps: ``max_tokens`` caps a search may set on nodes (``None``: the task's own limits).
        limit: evaluate only the first ``limit`` examples of the dev set.
        store: where the sample store lives (a path or database URL), used when the backend is built here.
    """

    kind = "live"

    def __init__(
        self,
        task: Task | str | Path,
        catalog: Mapping[str, ModelSpec] | Mapping[str, Mapping[str, Any]] | str | Path,
        backend: ModelBackend | None = None,
        *,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        concurrency: int = 4,
        caps: Sequence[int | None] = (None,),
        limit: int | None = None,
        store: str | None = None,
    ) -> None:
        if max_samples < 1 or concurrency < 1:
            raise ValueError("max_samples and concurrency must be >= 1")
        self.task = task if isinstance(task, Task) else load_task(task)
        self._catalog_source = catalog if isinstance(catalog, str | Path) else None
        self.catalog = _catalog(catalog)
        if not self.catalog:
            raise DataError("the live environment needs a catalog with at least one model")
        self.store = store
        self._owns_backend = backend is None
        self.backend = backend if backend is not None else _default_backend(self.catalog, store)
        self.max_samples = max_samples
        self.concurrency = concurrency
        self.caps = tuple(caps)
        self.limit = limit
        self.examples: tuple[Example, ...] = self.task.examples[:limit] if limit else self.task.examples
        if not self.examples:
            raise DataError(f"task {self.task.name} has no examples to evaluate on: give its task file a dataset")
        self.runner = PlanRunner(self.task, self.backend, self.catalog)
        self.history: list[PlanRun] = []
        """Every evaluation so far, oldest first (what ``executors.recorder`` exports)."""
        self._votes_by_run: dict[int, dict[int, float]] = {}
        """``prefix_scores`` per ``history`` index: a run's votes are read once."""
        self._estimates: dict[str, Cost] = {}
        models = tuple(self.catalog)
        self._info = EnvironmentInfo(
            name=self.task.name,
            stages=self.task.order,
            models=dict(self.catalog),
            stage_models={stage: models for stage in self.task.order},
            max_samples={model: max_samples for model in models},
            caps=self.caps,
            decisions=tuple(DecisionRule),
            roles=tuple(Role),
            early_stop=True,
            n_examples=len(self.examples),
        )

    # -- Environment -------------------------------------------------------------------------------------

    @property
    def info(self) -> EnvironmentInfo:
        return self._info

    def spec(self) -> dict[str, Any]:
        if self.task.source is None:
            raise DataError(f"task {self.task.name} was not loaded from a file: a live environment's spec needs the file")
        catalog: str | dict[str, Any]
        if self._catalog_source is not None:
            catalog = str(Path(self._catalog_source).resolve())
        else:
            catalog = {
                name: spec.model_dump(mode="json", exclude={"name"}, exclude_none=True) for name, spec in self.catalog.items()
            }
        return {
            "kind": self.kind,
            "task": self.task.source,
            "catalog": catalog,
            "max_samples": self.max_samples,
            "concurrency": self.concurrency,
            "caps": list(self.caps),
            "limit": self.limit,
            "store": self.store,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> LiveEnvironment:
        return cls(
            spec["task"],
            spec["catalog"],
            max_samples=int(spec.get("max_samples", DEFAULT_MAX_SAMPLES)),
            concurrency=int(spec.get("concurrency", 4)),
            caps=tuple(spec.get("caps") or (None,)),
            limit=spec.get("limit"),
            store=spec.get("store"),
        )

    def check(self, plan: Plan) -> None:
        self.runner.check(plan)

    def estimate_cost(self, plan: Plan) -> Cost:
        """The worst case per example over the dev set, in every unit at once."""
        if plan.plan_id not in self._estimates:
            worst = Cost()
            for example in self.examples:
                worst = _upper(worst, self.runner.estimate_cost(plan, example))
            self._estimates[plan.plan_id] = worst
        return self._estimates[plan.plan_id]

    def evaluate(self, plan: Plan) -> Evaluation:
        return _run_sync(self.aevaluate(plan))

    async def aevaluate(self, plan: Plan) -> Evaluation:
        results = await self.run_all(plan)
        scored = [r.score for r in results if r.score is not None]
        score = statistics.fmean(scored) if scored else 0.0
        spread = statistics.stdev(scored) / math.sqrt(len(scored)) if len(scored) > 1 else 0.0
        return Evaluation(
            score=score,
            spread=spread,
            cost=_mean([result.cost for result in results]),
            scores=(score,),
            n_examples=len(results),
            llm_calls=sum(r.llm_calls for r in results),
            per_example=tuple(r.score if r.score is not None else 0.0 for r in results),
        )

    async def run_all(self, plan: Plan) -> list[RunResult]:
        """Run ``plan`` on every example, ``concurrency`` at a time; record it in ``history``."""
        self.check(plan)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(example: Example) -> RunResult:
            async with gate:
                return await self.runner.run(plan, example)

        results = await gather_or_cancel([asyncio.ensure_future(one(example)) for example in self.examples])
        self.history.append(PlanRun(plan, tuple(results)))
        return results

    @property
    def votes_over_prefixes(self) -> bool:  # type: ignore[override]
        """The last stage's vote over fewer samples can be read off a run where that stage gives the task's answer and
        a text scorer scores it: a judge model's calls would be new, unmetered generation, and unit tests would run
        code for every new answer inside a planner step."""
        return self.task.final_stage == self.task.order[-1] and self.task.scorer.kind not in _SLOW_SCORERS

    def prefix_scores(self, plan: Plan) -> dict[int, float]:
        """Read off the plan's latest recorded run (``history``): per example the last stage's first ``k`` samples, in
        draw order, voted on as the plan runner votes and scored by the task's scorer; nothing is generated. A run
        with ``k`` samples draws those same first ``k`` from a sample store (and, without one, ``k`` samples of the
        same model and prompt). Empty for a plan not run in this process (a resumed study's older trials), a run that
        stopped at its budget, and wherever ``last_stage_prefixes`` offers none."""
        if not self.votes_over_prefixes or plan.stages[-1].stage != self.task.final_stage:
            return {}
        at = next((i for i in range(len(self.history) - 1, -1, -1) if self.history[i].plan.plan_id == plan.plan_id), None)
        counts = [k for k, _ in last_stage_prefixes(plan)]
        if at is None or not counts or any(r.stopped_at_budget for r in self.history[at].results):
            return {}
        if at not in self._votes_by_run:  # keyed by the run: a plan evaluated again without a sample store drew new samples
            self._votes_by_run[at] = _run_sync(self._prefix_scores(self.history[at], counts))
        return dict(self._votes_by_run[at])

    async def _prefix_scores(self, run: PlanRun, counts: Sequence[int]) -> dict[int, float]:
        final = self.task.final_stage
        scores: dict[int, list[float]] = {k: [] for k in counts}
        for example, result in zip(self.examples, run.results, strict=True):
            if result.score is None:
                continue  # no reference: not scored in the evaluation either
            stage = result.stages[final]
            samples = sorted(stage.candidates, key=lambda s: s.index)
            for k in counts:
                winner = vote(samples[:k])
                stages = {**result.stages, final: replace(stage, answer=winner.answer if winner is not None else None)}
                answer, _ = self.runner.final_answer(stages)
                score = result.score if answer == result.answer else await self.task.scorer.score(answer, example)
                scores[k].append(score or 0.0)
        return {k: statistics.fmean(values) if values else 0.0 for k, values in scores.items()}

    def search_cost(self, plans: Sequence[Plan]) -> tuple[Cost, Cost]:
        """The i-th occurrence of a plan in ``plans`` is its i-th recorded evaluation (what it generated,
        ``paid``, against its cost); occurrences not evaluated yet count at ``estimate_cost``."""
        runs: dict[str, list[PlanRun]] = {}
        for run in self.history:
            runs.setdefault(run.plan.plan_id, []).append(run)
        seen: dict[str, int] = {}
        with_reuse, without = Cost(), Cost()
        for plan in plans:
            index = seen[plan.plan_id] = seen.get(plan.plan_id, -1) + 1
            recorded = runs.get(plan.plan_id, [])
            if index >= len(recorded):
                estimate = self.estimate_cost(plan)
                with_reuse, without = with_reuse + estimate, without + estimate
                continue
            results = recorded[index].results
            with_reuse = with_reuse + _mean([result.paid for result in results])
            without = without + _mean([result.cost for result in results])
        return with_reuse, without

    def close(self) -> None:
        if self._owns_backend:
            _run_sync(self.backend.aclose())


def _catalog(catalog: Mapping[str, Any] | str | Path) -> dict[str, ModelSpec]:
    if isinstance(catalog, str | Path):
        from planner.catalog import load_catalog

        return load_catalog(catalog)
    specs: dict[str, ModelSpec] = {}
    for name, entry in catalog.items():
        if isinstance(entry, ModelSpec):
            specs[name] = entry
        elif isinstance(entry, Mapping):
            specs[name] = ModelSpec(name=name, **{k: v for k, v in entry.items() if k != "name"})
        else:
            raise DataError(f"catalog entry {name!r} must be a ModelSpec or a mapping of its fields")
    return specs


def _default_backend(catalog: Mapping[str, ModelSpec], store: str | None) -> ModelBackend:
    from executors.litellm_backend import LiteLLMBackend

    backend: ModelBackend = LiteLLMBackend(catalog)
    if store is not None:
        from executors.sample_store import CachedBackend, SampleStore

        backend = CachedBackend(backend, SampleStore(store))
    return backend


def _mean(costs: Sequence[Cost]) -> Cost:
    total = Cost()
    for cost in costs:
        total = total + cost
    return total.scaled(1 / len(costs))


def _upper(a: Cost, b: Cost) -> Cost:
    usd = None if a.usd is None or b.usd is None else max(a.usd, b.usd)
    return Cost(max(a.flops, b.flops), max(a.prompt_tokens, b.prompt_tokens), max(a.output_tokens, b.output_tokens), usd)


def _run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, also when an event loop is running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
