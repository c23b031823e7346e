"""The sample-reuse saving of a real study: tokens generated with the sample store against without it.

A study evaluates many plans that share work: a plan drawing 8 samples repeats the 4 an earlier plan
drew, and plans that agree on the first stages send the later stages the same prompts. With a sample
store in front of the model (``CachedBackend``) that shared work is generated once. This script measures
how much that saves on a real search, not on replay data:

1. starts the llama.cpp server of the end-to-end tests (Gemma 3 270M Q4_K_M on the CPU, loopback only);
2. runs a ``--trials`` study (default strategy ``insight``, seeded) with ``LiveEnvironment`` on the
   bundled ``qa_chain`` task (decompose -> answer -> verify) over its first ``--examples`` questions,
   every node capped at ``--max-tokens``, behind a sample store in the study's own SQLite database;
3. prints, per trial and in total, what was generated (with reuse) against what the same evaluations
   would have generated with no store (without reuse), in output tokens, prompt tokens and FLOPs.

The figures are cross-checked, and the script fails if they disagree: "with reuse" is
``LiveEnvironment.search_cost`` (``RunResult.paid`` of every evaluation), which must equal both the
store's own count and a counter wrapped around the backend that talks to the server; "without reuse" is
``search_cost``'s full cost of every evaluation, which must equal the store's ``without_reuse`` and the
output tokens of every sample each evaluation received, served or generated. The output tokens the
server itself logged during the study are shown beside them (a check of the backend's token counting).

    python benchmarks/sample_reuse.py [--trials 20] [--examples 4] [--max-tokens 16] [--seed 0]

About 3 to 6 minutes on 2 CPU cores with the defaults; lower ``--examples`` or ``--max-tokens`` (not
``--trials``) if the server is slower. Needs the ``llm-test`` extra (``make test`` installs it).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from rich.console import Console  # after the environment litellm reads at import
from rich.table import Table
from rich.text import Text

from executors.backends import BackendError, CompletionRequest, CompletionResult, ModelBackend
from executors.live import LiveEnvironment
from executors.sample_store import CachedBackend
from graphs.cost import Budget, Cost
from graphs.plan import Plan
from planner.space import SearchSpace, StageChoice
from planner.storage import BaseStorage
from planner.study import Study, create_study
from planner.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parent.parent
QA_CHAIN = ROOT / "examples" / "tasks" / "qa_chain"


class CountingBackend(ModelBackend):
    """Counts every call that reaches the inner backend: what was really generated, measured where it is
    paid rather than where the plan runner and the sample store account for it."""

    def __init__(self, inner: ModelBackend) -> None:
        self.inner = inner
        self.calls = 0
        self.samples = 0
        self.cost = Cost()

    def __getattr__(self, name: str) -> Any:  # catalog, estimate, count_prompt_tokens: the inner backend's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        try:
            result = await self.inner.complete(request)
        except BackendError as exc:
            if exc.partial is not None:  # a split call that failed half-way still generated its first part
                self._count(exc.partial)
            raise
        self._count(result)
        return result

    def _count(self, result: CompletionResult) -> None:
        self.calls += 1
        self.samples += len(result.generations)
        self.cost = self.cost + result.cost

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True)
class TrialFigures:
    """One evaluated trial: what it generated now against what its evaluation cost in full."""

    number: int
    plan: Plan
    score: float | None
    paid: Cost
    cost: Cost
    reused_samples: int
    wall_s: float


@dataclass(frozen=True)
class ReuseFigures:
    """A study's totals over every example (not per example, unlike ``search_cost``)."""

    trials: tuple[TrialFigures, ...]
    examples: int
    with_reuse: Cost
    """``search_cost``'s with-reuse figure times the examples: what the evaluations generated."""
    without_reuse: Cost
    """``search_cost``'s without-reuse figure times the examples: every evaluation at its full cost."""
    counted: Cost
    """What the counter around the inner backend saw generated."""
    counted_calls: int
    counted_samples: int
    store_generated: Cost
    store_without_reuse: Cost
    store_generated_samples: int
    store_reused_samples: int
    received_output_tokens: float
    """Output tokens of every sample each evaluation received, served or generated."""
    wall_s: float

    @property
    def distinct_plans(self) -> int:
        return len({t.plan.plan_id for t in self.trials})

    @property
    def saved_fraction(self) -> float:
        total = self.without_reuse.output_tokens
        return 1 - self.with_reuse.output_tokens / total if total else 0.0


def space_and_budget(env: LiveEnvironment, max_tokens: int, budget_fraction: float) -> tuple[SearchSpace, Budget]:
    """Every node capped at ``max_tokens``; the budget (tokens per input) ``budget_fraction`` of the way from
    the space's cheapest plan to its largest, so the search must choose where the samples go."""
    space = SearchSpace.from_info(env.info, caps=(max_tokens,))

    def uniform(n_of: Callable[[str], int]) -> Plan:
        return space.plan(
            [StageChoice(((space.stage_models[s][0], n_of(space.stage_models[s][0])),), max_tokens) for s in space.stages]
        )

    cheapest = env.estimate_cost(uniform(lambda m: min(space.n_choices[m]))).tokens
    largest = env.estimate_cost(uniform(lambda m: max(space.n_choices[m]))).tokens
    return space, Budget.parse(cheapest + budget_fraction * (largest - cheapest), "tokens")


def run_study(
    env: LiveEnvironment,
    storage: BaseStorage,
    *,
    trials: int,
    seed: int,
    strategy: str,
    space: SearchSpace,
    budget: Budget,
    name: str = "sample-reuse",
) -> tuple[Study, dict[int, float]]:
    """Run the study in-process, one trial at a time; returns it and each evaluated trial's wall time."""
    study = create_study(storage=storage, environment=env, budget=budget, strategy=strategy, seed=seed, name=name, space=space)
    walls: dict[int, float] = {}
    last = time.perf_counter()

    def on_trial(_study: Study, trial: FrozenTrial) -> None:
        nonlocal last
        now = time.perf_counter()
        if trial.state is not TrialState.REJECTED:
            walls[trial.number] = now - last
        last = now

    study.optimize(trials, callbacks=[on_trial])
    return study, walls


def measure(
    env: LiveEnvironment,
    study: Study,
    counter: CountingBackend,
    cached: CachedBackend,
    walls: dict[int, float],
    wall_s: float,
) -> ReuseFigures:
    """Totals of the study's evaluations, from the environment's accounting and the two counters."""
    evaluated = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    failed = [t for t in evaluated if t.state is TrialState.FAIL]
    if failed:
        raise AssertionError(f"trial {failed[0].number} failed: {failed[0].error}")
    runs = env.history
    if [r.plan.plan_id for r in runs] != [t.plan.plan_id for t in evaluated]:
        raise AssertionError("the environment's evaluations are not the study's evaluated trials, one each, in order")
    n = len(env.examples)
    with_mean, without_mean = env.search_cost([t.plan for t in evaluated])
    per_trial = tuple(
        TrialFigures(
            number=t.number,
            plan=t.plan,
            score=t.score,
            paid=_total([r.paid for r in run.results]),
            cost=_total([r.cost for r in run.results]),
            reused_samples=sum(r.reused_samples for r in run.results),
            wall_s=walls.get(t.number, 0.0),
        )
        for t, run in zip(evaluated, runs, strict=True)
    )
    received = sum(s.output_tokens for run in runs for r in run.results for stage in r.stages.values() for s in stage.samples)
    return ReuseFigures(
        trials=per_trial,
        examples=n,
        with_reuse=with_mean.scaled(n),
        without_reuse=without_mean.scaled(n),
        counted=counter.cost,
        counted_calls=counter.calls,
        counted_samples=counter.samples,
        store_generated=cached.stats.generated,
        store_without_reuse=cached.stats.without_reuse,
        store_generated_samples=cached.stats.generated_samples,
        store_reused_samples=cached.stats.reused_samples,
        received_output_tokens=float(received),
        wall_s=wall_s,
    )


def verify(figures: ReuseFigures) -> None:
    """``AssertionError`` unless every account of the study's generations agrees (see the module docstring)."""
    paid = _total([t.paid for t in figures.trials])
    full = _total([t.cost for t in figures.trials])
    checks = [
        ("with reuse: search_cost vs the evaluations' RunResult.paid", figures.with_reuse, paid),
        ("with reuse: search_cost vs the counter around the inner backend", figures.with_reuse, figures.counted),
        ("with reuse: search_cost vs the sample store's generated", figures.with_reuse, figures.store_generated),
        ("without reuse: search_cost vs the evaluations' RunResult.cost", figures.without_reuse, full),
        ("without reuse: search_cost vs the sample store's without_reuse", figures.without_reuse, figures.store_without_reuse),
    ]
    for what, a, b in checks:
        for field in ("flops", "prompt_tokens", "output_tokens"):
            x, y = getattr(a, field), getattr(b, field)
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-6):
                raise AssertionError(f"{what}: {field} {x:.6g} != {y:.6g}")
    if not math.isclose(figures.without_reuse.output_tokens, figures.received_output_tokens, abs_tol=1e-6):
        raise AssertionError(
            f"without reuse: {figures.without_reuse.output_tokens:.0f} output tokens, but the samples the evaluations "
            f"received hold {figures.received_output_tokens:.0f}"
        )
    if figures.counted_samples != figures.store_generated_samples:
        raise AssertionError(
            f"{figures.counted_samples} samples reached the backend, the store generated {figures.store_generated_samples}"
        )


def server_output_tokens(log: Path, start: int) -> tuple[int, int]:
    """Output tokens and completed requests that llama-server logged after byte ``start`` of its log
    (its per-completion timing lines: ``slot print_timing: id 0 | task 7 |  eval time = ... ms / N tokens``)."""
    with open(log, "rb") as handle:
        handle.seek(start)
        text = handle.read().decode("utf-8", errors="replace")
    counts = [int(m) for m in re.findall(r"\|\s+eval time\s*=\s*[\d.]+ ms\s*/\s*(\d+) tokens", text)]
    return sum(counts), len(counts)


def _total(costs: Sequence[Cost]) -> Cost:
    total = Cost()
    for cost in costs:
        total = total + cost
    return total


def _ratio(without: float, with_: float) -> str:
    return f"{without / with_:.2f}x" if with_ else "-"


def report(console: Console, figures: ReuseFigures, server: tuple[int, int] | None) -> None:
    """The per-trial table, the totals, and the cross-check of the accounts."""
    table = Table(title=f"Per trial ({figures.examples} examples each): output tokens generated vs the evaluation in full")
    for col in ("trial", "plan", "score", "generated", "in full", "reused samples", "wall s"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    running_with = running_without = 0.0
    for t in figures.trials:
        running_with += t.paid.output_tokens
        running_without += t.cost.output_tokens
        table.add_row(
            str(t.number),
            Text(t.plan.summary()),
            "-" if t.score is None else f"{t.score:.3f}",
            f"{t.paid.output_tokens:,.0f}",
            f"{t.cost.output_tokens:,.0f}",
            str(t.reused_samples),
            f"{t.wall_s:.1f}",
        )
    console.print(table)

    w, wo = figures.with_reuse, figures.without_reuse
    table = Table(
        title=f"Sample reuse over a {len(figures.trials)}-trial study ({figures.distinct_plans} distinct plans, "
        f"{figures.examples} examples, wall time {figures.wall_s:.0f} s)"
    )
    for col in ("", "with reuse (generated)", "without reuse (every evaluation in full)", "saved", "without / with"):
        table.add_column(col, justify="left" if not col else "right")
    rows = [
        ("output tokens", w.output_tokens, wo.output_tokens, "{:,.0f}"),
        ("prompt tokens", w.prompt_tokens, wo.prompt_tokens, "{:,.0f}"),
        ("FLOPs", w.flops, wo.flops, "{:.3e}"),
        (
            "samples",
            float(figures.store_generated_samples),
            float(figures.store_generated_samples + figures.store_reused_samples),
            "{:,.0f}",
        ),
    ]
    for label, a, b, fmt in rows:
        table.add_row(label, fmt.format(a), fmt.format(b), f"{1 - a / b:.1%}" if b else "-", _ratio(b, a))
    console.print(table)

    table = Table(title="Cross-check: output tokens of the study, by who counted them")
    for col in ("account", "with reuse", "without reuse"):
        table.add_column(col, justify="left" if col == "account" else "right")
    table.add_row("LiveEnvironment.search_cost (RunResult.paid / .cost)", f"{w.output_tokens:,.0f}", f"{wo.output_tokens:,.0f}")
    table.add_row(
        "CachedBackend.stats (generated / without_reuse)",
        f"{figures.store_generated.output_tokens:,.0f}",
        f"{figures.store_without_reuse.output_tokens:,.0f}",
    )
    table.add_row(
        f"counter around LiteLLMBackend ({figures.counted_calls} calls, {figures.counted_samples} samples)",
        f"{figures.counted.output_tokens:,.0f}",
        "-",
    )
    table.add_row("samples the evaluations received (served or generated)", "-", f"{figures.received_output_tokens:,.0f}")
    if server is not None:
        agree = (
            "agrees"
            if server[0] == round(figures.counted.output_tokens)
            else f"{server[0] - figures.counted.output_tokens:+,.0f}"
        )
        table.add_row(f"llama-server's own log ({server[1]} completions; {agree} with the counter)", f"{server[0]:,}", "-")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="evaluated trials of the study")
    parser.add_argument("--examples", type=int, default=4, help="dev-set questions each plan is evaluated on")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per sample (every node's cap)")
    parser.add_argument("--max-samples", type=int, default=8, help="most samples a node may draw")
    parser.add_argument(
        "--budget-fraction",
        type=float,
        default=0.5,
        help="budget per input: this fraction of the way from the cheapest plan to the largest",
    )
    parser.add_argument("--strategy", default="insight", help="search strategy (insight, random, tpe, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the strategy and of the sampling")
    args = parser.parse_args()

    from executors.litellm_backend import LiteLLMBackend
    from executors.llama_server import LlamaServer
    from executors.sample_store import SampleStore
    from executors.tasks import load_task
    from planner.catalog import load_catalog
    from planner.storage import get_storage

    console = Console(width=150)
    cache = Path(os.environ.get("ALLOT_CACHE_DIR") or ROOT / ".allot-cache")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "llama-server.log"
        with LlamaServer(cache_dir=cache, log_path=log) as server:
            served = server.model_spec()
            catalog = {
                name: spec.model_copy(update={"api_base": served.api_base, "context": served.context})
                for name, spec in load_catalog(QA_CHAIN / "catalog.yaml").items()
            }
            storage = get_storage(f"sqlite:///{Path(tmp) / 'study.db'}")  # the study and its samples, as `allot` keeps them
            counter = CountingBackend(LiteLLMBackend(catalog, timeout_s=180, seed=args.seed))
            cached = CachedBackend(counter, SampleStore(storage))
            env = LiveEnvironment(
                load_task(QA_CHAIN / "task.yaml"),
                catalog,
                cached,
                max_samples=args.max_samples,
                concurrency=args.examples,
                caps=(args.max_tokens,),
                limit=args.examples,
            )
            space, budget = space_and_budget(env, args.max_tokens, args.budget_fraction)
            console.print(
                f"llama.cpp server at {server.url} (Gemma 3 270M Q4_K_M, {server.parallel} slots), {os.cpu_count()} CPUs; "
                f"qa_chain, {len(env.examples)} examples, max_tokens={args.max_tokens}, {space.size():,} plans, "
                f"budget {budget} per input, strategy {args.strategy}, seed {args.seed}; load average {os.getloadavg()[0]:.1f}"
            )
            log_start = log.stat().st_size
            started = time.perf_counter()
            study, walls = run_study(
                env, storage, trials=args.trials, seed=args.seed, strategy=args.strategy, space=space, budget=budget
            )
            wall_s = time.perf_counter() - started
            console.print(
                f"study done in {wall_s:.0f} s; load average {os.getloadavg()[0]:.1f} (other processes slow the server)"
            )
            figures = measure(env, study, counter, cached, walls, wall_s)
            verify(figures)
            server_count = server_output_tokens(log, log_start)
            report(console, figures, server_count)
            generated, full = figures.with_reuse.output_tokens, figures.without_reuse.output_tokens
            console.print(
                f"Sample-reuse saving of the {len(figures.trials)}-trial study: {generated:,.0f} output tokens generated "
                f"with reuse vs {full:,.0f} without ({figures.saved_fraction:.1%} saved, {_ratio(full, generated)}); "
                f"best score {study.best_trial.score:.3f} ({study.best_trial.plan.summary()})."
            )
            cached.store.close()
            storage.close()


if __name__ == "__main__":
    main()
