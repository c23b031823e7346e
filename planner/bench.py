"""``allot bench``: every registered strategy against the exact optimum, on every benchmark, per budget.

For each benchmark (every benchmark of a replay directory, plus simulated N-stage tasks) and each budget
(a fraction of the costliest single-model plan of the space, resolved into FLOPs per task input):

1. the optimum: every plan of the search space the strategies search (``SearchSpace.from_info``) is
   enumerated, the feasible ones scored, the best kept (ties: the cheaper plan). Scores and costs are
   computed once per benchmark and shared by all budgets. A space too large to enumerate falls back to
   the environment's own exact ``optimum(budget)`` where it has one and it searches the same space.
2. per strategy and seed, a study in an ``InMemoryStorage`` runs ``trials`` evaluated trials; the
   best-so-far score after each evaluated trial is the curve. From it: best score, regret in accuracy
   points against the optimum, trials until within 1 and 0.5 points, what the search generated with and
   without sample reuse (absolute over the dev set, and as a multiple of one evaluation of the optimal
   plan), and what the planner LLM cost.
   Beside the optimum, its search-cost floor (``search_cost_floor``): what evaluating the optimal plan and each
   of its neighbours with one node at the next larger sample count that fits generates, with reuse, as a multiple
   of one run of the optimal plan. A search that shows by evaluation that more samples do not help there
   generates at least that, so where the floor is above 1.5 the search-cost target is out of reach of any search
   that checks its answer.
3. aggregates over seeds: mean and standard deviation of best score and regret, median trials to within
   1 / 0.5 points (a seed that never got there counts as infinitely slow), mean cost ratios, planner cost.

Scores are what the environment calls the plan's true score where it has one (the simulated task's
noiseless curve: its optimum is exact, so regret measures the search, not evaluation noise), else the
evaluated score (replay: deterministic). Regret is not clipped: a strategy that proposes a plan outside
the enumerated space and beats the optimum shows a negative regret.

Nothing here prints. ``run_bench`` returns a ``BenchResult``: ``to_json()`` is the machine-independent
report, ``rows()`` the flat table the CLI prints, ``write_plot`` draws the curves.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executors.environment import Environment, EnvironmentInfo, Evaluation
from graphs.cost import Budget, BudgetUnit, Cost
from graphs.errors import AllotError, BudgetError, DataError
from graphs.plan import Plan
from planner.report import most_expensive_single_model_cost
from planner.space import SearchSpace
from planner.storage._memory import InMemoryStorage
from planner.strategies import STRATEGIES, make_strategy, strategy_params
from planner.trial import FrozenTrial, TrialState

__all__ = [
    "DEFAULT_BUDGETS",
    "BenchConfig",
    "BenchResult",
    "Optimum",
    "TableRow",
    "aggregate_seeds",
    "bench_environments",
    "find_optimum",
    "run_bench",
    "search_cost_floor",
    "write_plot",
]

DEFAULT_BUDGETS = (0.02, 0.1, 0.5)
ENUMERATION_LIMIT = 200_000
"""Largest space the optimum is found by enumeration; beyond, the environment's ``optimum`` is used."""
UNIT = BudgetUnit.FLOPS
WITHIN = (("1pt", 0.01), ("half_pt", 0.005))
"""Targets of "trials until within x points of the optimum": (key suffix, score gap)."""
_EPS = 1e-9
_TIE = 1e-12


# -- configuration -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What to run. ``strategies=None`` runs every registered strategy; ``benchmarks`` filters the replay
    directory's benchmarks (``None``: all of them; an empty tuple: none, e.g. simulated tasks only)."""

    data: Path | None = None
    benchmarks: tuple[str, ...] | None = None
    simulated: tuple[int, ...] = ()
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    trials: int = 20
    seeds: int = 3
    first_seed: int = 0
    """Studies run seeds ``first_seed .. first_seed + seeds - 1``: another seed set checks a change on other luck."""
    strategies: tuple[str, ...] | None = None
    planner_model: str | None = None
    api_base: str | None = None
    orderings: int = 8
    workers: int = 1
    """Processes running studies (1: in this process). Results do not depend on it."""

    def __post_init__(self) -> None:
        if not self.budgets:
            raise BudgetError("no budget fraction given: pass --budget F (e.g. --budget 0.1)")
        bad = [b for b in self.budgets if not 0 < b <= 1]
        if bad:
            raise BudgetError(f"budget fraction {bad[0]} must be in (0, 1]: it is a share of the costliest single-model plan")
        if self.trials < 1 or self.seeds < 1:
            raise ValueError("trials and seeds must be >= 1")
        if self.first_seed < 0:
            raise ValueError(f"first seed must be >= 0, got {self.first_seed}")
        unknown = [s for s in self.strategy_names if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}: choose one of {', '.join(STRATEGIES)}")
        if any(n < 1 for n in self.simulated):
            raise ValueError("a simulated task needs at least 1 stage")

    @property
    def seed_numbers(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)

    @property
    def strategy_names(self) -> tuple[str, ...]:
        return tuple(STRATEGIES) if self.strategies is None else tuple(dict.fromkeys(self.strategies))

    def meta(self) -> dict[str, Any]:
        """The settings, without anything that depends on the machine (paths, timings)."""
        return {
            "data": "bundled" if self.data is None else Path(self.data).name,
            "benchmarks": None if self.benchmarks is None else list(self.benchmarks),
            "simulated": list(self.simulated),
            "budget_fractions": list(self.budgets),
            "budget_scale": "cost of the most expensive single-model plan of the space, per task input",
            "budget_unit": UNIT.value,
            "trials": self.trials,
            "seeds": list(self.seed_numbers),
            "strategies": list(self.strategy_names),
            "planner_model": self.planner_model,
            "api_base": self.api_base,
            "replay_orderings": self.orderings,
            "environment_seed": 0,
            "evaluation_luck": "drawn per study seed where the environment has noise of its own (simulated tasks); "
            "every strategy's study of a seed meets the same",
            "score": "true score where the environment has one (simulated, noiseless), else the evaluated score",
            "within_points": {f"trials_to_{key}": round(gap * 100, 6) for key, gap in WITHIN},
        }


def bench_environments(config: BenchConfig) -> list[Environment]:
    """Every benchmark of the replay directory (filtered by ``config.benchmarks``), then the simulated tasks."""
    from executors.replay import ReplayEnvironment
    from executors.replay_data import bundled_data_dir, list_benchmarks
    from executors.simulated import SimulatedEnvironment

    envs: list[Environment] = []
    wanted = config.benchmarks
    if wanted is None or wanted:
        directory = config.data if config.data is not None else bundled_data_dir()
        found = list_benchmarks(directory)
        if wanted is not None:
            missing = [b for b in wanted if b not in found]
            if missing:
                raise DataError(f"benchmark {missing[0]!r} is not in {directory}: it holds {', '.join(found)}")
        for name in found:
            if wanted is None or name in wanted:
                envs.append(ReplayEnvironment(config.data, name, orderings=config.orderings, seed=0))
    for stages in config.simulated:
        envs.append(SimulatedEnvironment(stages=stages, seed=0))
    if not envs:
        raise DataError("nothing to bench: pass a replay directory with --data, a --benchmark in it, or --simulated N")
    return envs


# -- a memoising view of an environment ----------------------------------------------------------------


class _Memo(Environment):
    """Delegates to an environment, remembering costs and evaluations by plan id.

    Every study of a benchmark and evaluation seed shares one, so a strategy that lists the feasible plans (grid,
    random) or re-evaluates a plan another study tried pays nothing; deterministic environments make this exact.
    """

    def __init__(self, inner: Environment) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.votes_over_prefixes = inner.votes_over_prefixes
        self._costs: dict[str, Cost] = {}
        self._evaluations: dict[str, Evaluation] = {}
        true_score = getattr(inner, "true_score", None)
        self._true_score: Callable[[Plan], float] | None = true_score if callable(true_score) else None

    @property
    def info(self) -> EnvironmentInfo:
        return self.inner.info

    def spec(self) -> dict[str, Any]:
        return self.inner.spec()

    def check(self, plan: Plan) -> None:
        if plan.plan_id not in self._costs:
            self.inner.check(plan)

    def estimate_cost(self, plan: Plan) -> Cost:
        key = plan.plan_id
        cost = self._costs.get(key)
        if cost is None:
            cost = self._costs[key] = self.inner.estimate_cost(plan)
        return cost

    def evaluate(self, plan: Plan) -> Evaluation:
        key = plan.plan_id
        evaluation = self._evaluations.get(key)
        if evaluation is None:
            evaluation = self._evaluations[key] = self.inner.evaluate(plan)
        return evaluation

    def search_cost(self, plans: Sequence[Plan]) -> tuple[Cost, Cost]:
        return self.inner.search_cost(plans)

    def score(self, plan: Plan) -> float:
        """The score the bench compares: the true score where the environment knows it, else evaluated."""
        if self._true_score is not None:
            return float(self._true_score(plan))
        return self.evaluate(plan).score

    def close(self) -> None:
        self.inner.close()


class _ListedSpace(SearchSpace):
    """The same space, its plans built once and shared by every study of the benchmark (building and
    validating a plan is what listing the feasible plans costs grid and random most)."""

    @classmethod
    def of(cls, space: SearchSpace) -> _ListedSpace:
        return cls(**{f.name: getattr(space, f.name) for f in dataclasses.fields(space)})

    def size(self) -> int:
        size = self.__dict__.get("_size")
        if size is None:
            size = super().size()
            object.__setattr__(self, "_size", size)
        return size

    def enumerate(self) -> Iterator[Plan]:
        if self.size() > ENUMERATION_LIMIT:
            return super().enumerate()
        listed = self.__dict__.get("_listed")
        if listed is None:
            listed = list(super().enumerate())
            object.__setattr__(self, "_listed", listed)
        return iter(listed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(json.dumps(self.spec(), sort_keys=True))


# -- the optimum ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Optimum:
    plan: Plan
    score: float
    spent: float
    """One evaluation of the plan, per task input, in the budget's unit."""
    method: str
    """``enumeration`` or ``environment``."""
    feasible: int | None
    """Plans of the space within budget (``None`` when not enumerated)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "plan_id": self.plan.plan_id,
            "plan": json.loads(self.plan.canonical_json()),
            "summary": self.plan.summary(),
            "cost": self.spent,
            "method": self.method,
            "feasible_plans": self.feasible,
        }


class _Enumeration:
    """Every plan of a space with its cost and (lazily) score, shared by every budget of a benchmark."""

    def __init__(self, env: _Memo, space: SearchSpace, unit: BudgetUnit) -> None:
        self.env = env
        scale = Budget(limit=1.0, unit=unit)
        plans = list(space.enumerate())
        spent = [scale.spent(env.estimate_cost(p)) for p in plans]
        order = sorted(range(len(plans)), key=lambda i: (spent[i], plans[i].plan_id))
        self.plans = [plans[i] for i in order]
        self.spent = [spent[i] for i in order]
        self.scores: list[float | None] = [None] * len(plans)

    def best(self, budget: Budget) -> Optimum | None:
        limit = budget.limit * (1 + 1e-9)
        best: tuple[float, float, int] | None = None
        feasible = 0
        for i, spent in enumerate(self.spent):
            if spent > limit:
                break  # sorted by cost
            feasible += 1
            score = self.scores[i]
            if score is None:
                score = self.scores[i] = self.env.score(self.plans[i])
            # Highest score; ties (up to float noise) go to the cheaper plan, earlier in cost order.
            if best is None or score > best[0] + _TIE:
                best = (score, spent, i)
        if best is None:
            return None
        return Optimum(self.plans[best[2]], best[0], best[1], "enumeration", feasible)


def search_cost_floor(env: Environment, space: SearchSpace, budget: Budget, optimum: Optimum) -> float | None:
    """What evaluating the optimal plan and its next-larger-count neighbours that fit ``budget`` generates, with
    sample reuse, as a multiple of one run of the optimal plan (``None`` for a free plan).

    Past a model's peak more samples do worse, and short of it better: a search knows it has the optimum only
    once it has seen each node one count further do no better, unless the budget forbids that count. So any
    search that checks its answer by evaluation generates at least this (one that stops short of checking can
    generate less, and come within half a point by luck or by a model of the curves). With reuse a larger count
    on the last stage costs only its extra samples; on an earlier stage it changes every later stage's prompts."""
    if optimum.spent <= 0:
        return None
    choices = space.choices_of(optimum.plan)
    plans = [optimum.plan]
    for index, choice in enumerate(choices):
        counts = dict(choice.samples)
        for model, n in counts.items():
            larger = [v for v in space.n_choices[model] if v > n]
            if not larger:
                continue
            grown = list(choices)
            grown[index] = dataclasses.replace(choice, samples=tuple({**counts, model: min(larger)}.items()))
            try:
                plan = space.plan(grown)
                fits = budget.allows(env.estimate_cost(plan))
            except AllotError:  # the larger count does not run here (it overflows a model's context window)
                continue
            if fits:
                plans.append(plan)
    with_reuse, _ = env.search_cost(plans)
    return budget.spent(with_reuse) / optimum.spent


def _environment_optimum(env: _Memo, space: SearchSpace, budget: Budget) -> Optimum:
    """The environment's own exact optimum, after checking it searches exactly ``space``."""
    inner = env.inner
    optimum = getattr(inner, "optimum", None)
    size = space.size()
    too_large = f"the search space of {env.info.name} has {size:,} plans, too many to enumerate"
    if not callable(optimum):
        raise BudgetError(f"{too_large}, and the environment has no exact optimum: bench a smaller task")
    n_sets = {space.n_choices[m] for s in space.stages for m in space.stage_models[s]}
    every_model = all(set(space.stage_models[s]) == set(env.info.models) for s in space.stages)
    if space.max_models != 1 or space.caps != (None,) or space.early_stop != (None,) or len(n_sets) != 1 or not every_model:
        raise BudgetError(f"{too_large}, and its exact optimum covers one model per stage only: bench a smaller task")
    plan, _ = optimum(budget, n_choices=n_sets.pop())
    plan = space.plan(space.choices_of(plan))  # the space's node ids, so plan ids match the strategies'
    return Optimum(plan, env.score(plan), budget.spent(env.estimate_cost(plan)), "environment", None)


def find_optimum(env: Environment, space: SearchSpace, budget: Budget) -> Optimum:
    """The best feasible plan of ``space`` under ``budget`` (ties: cheaper). ``BudgetError`` if none fits."""
    memo = env if isinstance(env, _Memo) else _Memo(env)
    if space.size() > ENUMERATION_LIMIT:
        return _environment_optimum(memo, space, budget)
    found = _Enumeration(memo, space, budget.unit).best(budget)
    if found is None:
        raise BudgetError(f"no plan of {env.info.name} fits the budget {budget}: raise the budget")
    return found


# -- one study -----------------------------------------------------------------------------------------


def _first_within(curve: Sequence[float | None], target: float) -> int | None:
    for i, value in enumerate(curve):
        if value is not None and value >= target - _EPS:
            return i + 1
    return None


def _run_study(
    env: _Memo,
    space: SearchSpace,
    budget: Budget,
    optimum: Optimum,
    strategy: str,
    seed: int,
    trials: int,
    params: dict[str, Any],
) -> dict[str, Any]:
    """One seeded study of ``trials`` evaluated trials, and what it says about the strategy."""
    from planner.study import create_study

    storage = InMemoryStorage()
    error = None
    try:
        study = create_study(
            storage=storage,
            environment=env,
            budget=budget,
            strategy=make_strategy(strategy, seed, params),
            seed=seed,
            name=f"bench-{strategy}-{seed}",
            space=space,
        )
        study.optimize(trials)
    except Exception as exc:  # a strategy that crashes is a result of the bench, not the end of it
        error = f"{type(exc).__name__}: {exc}"
    records = storage.list_studies()
    history: list[FrozenTrial] = storage.get_trials(records[0].study_id) if records else []
    evaluated = [t for t in history if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    curve: list[float | None] = []
    best: float | None = None
    best_plan: Plan | None = None
    for trial in evaluated[:trials]:
        if trial.state is TrialState.COMPLETE:
            score = env.score(trial.plan)
            if best is None or score > best:
                best, best_plan = score, trial.plan
        curve.append(best)
    stopped_early = len(curve) < trials
    curve += [best] * (trials - len(curve))  # a strategy with nothing left to propose stays where it is
    with_reuse, without = env.search_cost([t.plan for t in evaluated[:trials]])
    n_examples = max(1, env.info.n_examples)
    with_spent = budget.spent(with_reuse) * n_examples
    without_spent = budget.spent(without) * n_examples
    one_run = optimum.spent * n_examples
    planner = Cost()
    for trial in history:
        planner = planner + trial.planner_cost
    out: dict[str, Any] = {
        "seed": seed,
        "evaluated": len(evaluated),
        "rejected": sum(t.state is TrialState.REJECTED for t in history),
        "failed": sum(t.state is TrialState.FAIL for t in evaluated),
        "stopped_early": stopped_early,
        "best_score": best,
        "regret": None if best is None else 100.0 * (optimum.score - best),
        "best_plan_id": None if best_plan is None else best_plan.plan_id,
        "best_plan": None if best_plan is None else best_plan.summary(),
    }
    for key, gap in WITHIN:
        out[f"trials_to_{key}"] = _first_within(curve, optimum.score - gap)
    out.update(
        {
            "search_cost": {"with_reuse": with_spent, "without_reuse": without_spent, "unit": budget.unit.value},
            "search_cost_ratio": {
                "with_reuse": with_spent / one_run if one_run > 0 else None,
                "without_reuse": without_spent / one_run if one_run > 0 else None,
            },
            "planner_cost": {
                "prompt_tokens": planner.prompt_tokens,
                "output_tokens": planner.output_tokens,
                "tokens": planner.tokens,
                "usd": planner.usd,
            },
            "curve": curve,
            "error": error,
        }
    )
    return out


# -- aggregates ----------------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _std(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    return statistics.stdev(kept) if len(kept) > 1 else 0.0


def _median_trials(values: Sequence[int | None]) -> float | None:
    """Median over seeds; a seed that never got there counts as slower than any other (``None`` if the
    median falls on one)."""
    ranked = [math.inf if v is None else float(v) for v in values]
    median = statistics.median(ranked) if ranked else math.inf
    return None if math.isinf(median) else median


def aggregate_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One strategy's results on one setting over its seeds (the report's per-strategy entry), from the per-seed ones."""
    best = [r["best_score"] for r in per_seed]
    regret = [r["regret"] for r in per_seed]
    out: dict[str, Any] = {
        "best_mean": _mean(best),
        "best_std": _std(best),
        "regret_mean": _mean(regret),
        "regret_std": _std(regret),
    }
    for key, _ in WITHIN:
        hits = [r[f"trials_to_{key}"] for r in per_seed]
        out[f"median_trials_to_{key}"] = _median_trials(hits)
        out[f"reached_{key}"] = sum(h is not None for h in hits) / len(hits)
    out["search_cost_ratio_mean"] = {
        kind: _mean([r["search_cost_ratio"][kind] for r in per_seed]) for kind in ("with_reuse", "without_reuse")
    }
    out["search_cost_mean"] = {
        kind: _mean([r["search_cost"][kind] for r in per_seed]) for kind in ("with_reuse", "without_reuse")
    }
    usd = [r["planner_cost"]["usd"] for r in per_seed]
    out["planner_cost_mean"] = {
        "tokens": _mean([r["planner_cost"]["tokens"] for r in per_seed]),
        "usd": None if any(u is None for u in usd) else _mean(usd),
    }
    out["errors"] = [r["error"] for r in per_seed if r["error"]]
    curves = [r["curve"] for r in per_seed]
    out["curve_mean"] = [
        None if any(v is None for v in column) else statistics.fmean(column) for column in zip(*curves, strict=True)
    ]
    out["per_seed"] = per_seed
    return out


# -- the whole bench -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    benchmark: str
    budget_fraction: float
    strategy: str
    best_mean: float | None
    best_std: float | None
    regret_mean: float | None
    regret_std: float | None
    median_trials_to_1pt: float | None
    median_trials_to_half_pt: float | None
    search_ratio_with_reuse: float | None
    search_ratio_without_reuse: float | None
    planner_tokens: float | None
    optimum: float | None
    search_cost_floor: float | None = None
    """The least a search that checks its answer generates (``search_cost_floor``), x one run of the optimal plan."""
    errors: tuple[str, ...] = ()


@dataclass
class BenchResult:
    meta: dict[str, Any]
    results: list[dict[str, Any]]
    seconds: float = 0.0
    """Wall time of the run (not part of the JSON, which stays machine-independent)."""
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "results": self.results}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return path

    def rows(self) -> list[TableRow]:
        rows = []
        for entry in self.results:
            optimum = entry["optimum"]
            for name, agg in entry["strategies"].items():
                rows.append(
                    TableRow(
                        benchmark=entry["benchmark"],
                        budget_fraction=entry["budget_fraction"],
                        strategy=name,
                        best_mean=agg["best_mean"],
                        best_std=agg["best_std"],
                        regret_mean=agg["regret_mean"],
                        regret_std=agg["regret_std"],
                        median_trials_to_1pt=agg["median_trials_to_1pt"],
                        median_trials_to_half_pt=agg["median_trials_to_half_pt"],
                        search_ratio_with_reuse=agg["search_cost_ratio_mean"]["with_reuse"],
                        search_ratio_without_reuse=agg["search_cost_ratio_mean"]["without_reuse"],
                        planner_tokens=agg["planner_cost_mean"]["tokens"],
                        optimum=None if optimum is None else optimum["score"],
                        search_cost_floor=entry.get("search_cost_floor"),
                        errors=tuple(agg["errors"]),
                    )
                )
        return rows


@dataclass
class _Case:
    """One (benchmark, budget) of the bench, ready for studies."""

    env_index: int
    fraction: float
    budget: Budget
    optimum: Optimum | None
    error: str | None = None


# Set in the parent before forking workers, inherited by them (never pickled).
_SHARED: dict[str, Any] = {}


def _job(key: tuple[int, int, str, int]) -> tuple[tuple[int, int, str, int], dict[str, Any]]:
    case_index, _, strategy, seed = key
    envs, spaces, cases, config = _SHARED["envs"], _SHARED["spaces"], _SHARED["cases"], _SHARED["config"]
    case = cases[case_index]
    assert case.optimum is not None
    params = strategy_params(strategy, config.planner_model, config.api_base)
    env = _seeded(envs, case.env_index, seed)
    result = _run_study(env, spaces[case.env_index], case.budget, case.optimum, strategy, seed, config.trials, params)
    return key, result


def _seeded(envs: Sequence[_Memo], index: int, seed: int) -> _Memo:
    """Benchmark ``index`` with its evaluation luck drawn from study seed ``seed``
    (``Environment.with_evaluation_seed``): every strategy's study of that seed meets the same luck, so
    strategies compare paired, and another seed meets other luck. One memo per (benchmark, seed) and process."""
    memos: dict[tuple[int, int], _Memo] = _SHARED.setdefault("seeded", {})
    memo = memos.get((index, seed))
    if memo is None:
        inner = envs[index].inner.with_evaluation_seed(seed)
        memo = memos[(index, seed)] = envs[index] if inner is envs[index].inner else _Memo(inner)
    return memo


def _workers(requested: int, jobs: int) -> int:
    if requested <= 1 or jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return min(requested, jobs, os.cpu_count() or 1)


def run_bench(
    config: BenchConfig,
    *,
    environments: Sequence[Environment] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Run the bench; ``progress(done, total)`` is called after each study. ``environments`` replaces
    the ones ``config`` names (replay directory and simulated tasks)."""
    started = time.perf_counter()
    raw = list(environments) if environments is not None else bench_environments(config)
    envs = [_Memo(env) for env in raw]
    spaces = [_ListedSpace.of(SearchSpace.from_info(env.info)) for env in envs]
    cases: list[_Case] = []
    for index, (env, space) in enumerate(zip(envs, spaces, strict=True)):
        scale = most_expensive_single_model_cost(env, space, Budget(limit=1.0, unit=UNIT))
        enumeration = _Enumeration(env, space, UNIT) if space.size() <= ENUMERATION_LIMIT else None
        for fraction in config.budgets:
            budget = Budget(limit=fraction * scale, unit=UNIT)
            try:
                optimum = enumeration.best(budget) if enumeration is not None else _environment_optimum(env, space, budget)
                if optimum is None:
                    raise BudgetError(f"no plan of {env.info.name} fits {fraction:g} of the costliest single-model plan")
                cases.append(_Case(index, fraction, budget, optimum))
            except BudgetError as exc:
                cases.append(_Case(index, fraction, budget, None, str(exc)))
    names = config.strategy_names
    keys = [
        (c, n, name, seed)
        for c, case in enumerate(cases)
        if case.optimum is not None
        for n, name in enumerate(names)
        for seed in config.seed_numbers
    ]
    _SHARED.update(envs=envs, spaces=spaces, cases=cases, config=config)
    done: dict[tuple[int, int, str, int], dict[str, Any]] = {}
    try:
        workers = _workers(config.workers, len(keys))
        if workers == 1:
            for key in keys:
                done[key] = _job(key)[1]
                if progress:
                    progress(len(done), len(keys))
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for key, result in pool.map(_job, keys, chunksize=1):
                    done[key] = result
                    if progress:
                        progress(len(done), len(keys))
    finally:
        _SHARED.clear()
    results = []
    errors = []
    for c, case in enumerate(cases):
        env = envs[case.env_index]
        strategies = {}
        if case.optimum is not None:
            for n, name in enumerate(names):
                per_seed = [done[(c, n, name, seed)] for seed in config.seed_numbers]
                strategies[name] = aggregate_seeds(per_seed)
                errors += [f"{env.info.name} @ {case.fraction:g}, {name}: {e}" for e in strategies[name]["errors"]]
        else:
            errors.append(f"{env.info.name} @ {case.fraction:g}: {case.error}")
        results.append(
            {
                "benchmark": env.info.name,
                "kind": env.kind,
                "space_size": spaces[case.env_index].size(),
                "n_examples": env.info.n_examples,
                "budget_fraction": case.fraction,
                "budget": {"limit": case.budget.limit, "unit": case.budget.unit.value},
                "optimum": None if case.optimum is None else case.optimum.as_dict(),
                "search_cost_floor": (
                    None if case.optimum is None else search_cost_floor(env, spaces[case.env_index], case.budget, case.optimum)
                ),
                "error": case.error,
                "strategies": strategies,
            }
        )
    return BenchResult(config.meta(), results, time.perf_counter() - started, errors)


# -- the plot ------------------------------------------------------------------------------------------

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _panels(result: BenchResult) -> list[tuple[str, float | None, dict[str, list[float | None]]]]:
    panels = []
    for entry in result.results:
        title = f"{entry['benchmark']} @ {entry['budget_fraction']:g} of the costliest single-model plan"
        optimum = None if entry["optimum"] is None else entry["optimum"]["score"]
        panels.append((title, optimum, {name: agg["curve_mean"] for name, agg in entry["strategies"].items()}))
    return panels


def write_plot(result: BenchResult, path: str | Path, *, use_plotly: bool | None = None) -> Path:
    """An HTML page with each strategy's mean best-so-far curve per (benchmark, budget), and the optimum.

    Uses plotly when it is installed (``use_plotly=None``), else self-contained inline SVG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if use_plotly is None:
        try:
            import plotly  # noqa: F401
        except ImportError:
            use_plotly = False
        else:
            use_plotly = True
    text = _plotly_html(result) if use_plotly else _svg_html(result)
    path.write_text(text, encoding="utf-8")
    return path


def _plotly_html(result: BenchResult) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = _panels(result)
    columns = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / columns))
    figure = make_subplots(rows=rows, cols=columns, subplot_titles=[p[0] for p in panels] or None)
    names = sorted({name for _, _, curves in panels for name in curves})
    colour = {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(names)}
    for i, (_, optimum, curves) in enumerate(panels):
        row, col = i // columns + 1, i % columns + 1
        for name, curve in curves.items():
            figure.add_trace(
                go.Scatter(
                    x=list(range(1, len(curve) + 1)),
                    y=curve,
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=i == 0,
                    line={"color": colour[name]},
                ),
                row=row,
                col=col,
            )
        if optimum is not None:
            figure.add_hline(y=optimum, line_dash="dash", line_color="black", row=row, col=col)
        figure.update_xaxes(title_text="evaluated trials", row=row, col=col)
        figure.update_yaxes(title_text="best score so far", row=row, col=col)
    figure.update_layout(
        title=f"allot bench: mean best-so-far over {len(result.meta['seeds'])} seeds (dashed: optimum)",
        height=360 * rows,
    )
    return figure.to_html(full_html=True, include_plotlyjs=True)


def _legend_line(x: float, y: float, style: str) -> str:
    return f'<line x1="{x + 10}" x2="{x + 28}" y1="{y}" y2="{y}" {style}/>'


def _svg_panel(title: str, optimum: float | None, curves: dict[str, list[float | None]], colour: dict[str, str]) -> str:
    width, height, left, right, top, bottom = 520, 320, 56, 130, 34, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for c in curves.values() for v in c if v is not None] + ([optimum] if optimum is not None else [])
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max((high - low) * 0.08, 0.005)
    low, high = max(0.0, low - pad), min(1.0, high + pad)
    if high <= low:
        high = low + 0.01
    length = max((len(c) for c in curves.values()), default=1)

    def x(i: int) -> float:
        return left + (plot_w * i / (length - 1) if length > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - low) / (high - low if high > low else 1.0))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="12" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for k in range(5):
        v = low + (high - low) * k / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
    for i in sorted({0, length // 2, length - 1}):
        parts.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{i + 1}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">evaluated trials</text>')
    if optimum is not None:
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(optimum):.1f}" y2="{y(optimum):.1f}" '
            'stroke="black" stroke-dasharray="5,4"><title>optimum</title></line>'
        )
    for row, (name, curve) in enumerate(curves.items()):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(curve) if v is not None)
        if points:
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour[name]}" stroke-width="2">'
                f"<title>{html.escape(name)}</title></polyline>"
            )
        ly = top + 12 + 16 * row
        parts.append(_legend_line(width - right, ly, f'stroke="{colour[name]}" stroke-width="2"'))
        parts.append(f'<text x="{width - right + 32}" y="{ly + 4}">{html.escape(name)}</text>')
    if optimum is not None:
        ly = top + 12 + 16 * len(curves)
        parts.append(_legend_line(width - right, ly, 'stroke="black" stroke-dasharray="5,4"'))
        parts.append(f'<text x="{width - right + 32}" y="{ly + 4}">optimum {optimum:.3f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_html(result: BenchResult) -> str:
    panels = _panels(result)
    names = sorted({name for _, _, curves in panels for name in curves})
    colour = {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(names)}
    body = "\n".join(f'<div class="panel">{_svg_panel(t, o, c, colour)}</div>' for t, o, c in panels)
    seeds = len(result.meta["seeds"])
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>allot bench</title>\n'
        "<style>body{font-family:sans-serif;margin:1em}.panel{display:inline-block;margin:6px}</style>\n"
        f"</head><body>\n<h1>allot bench</h1>\n<p>Mean best-so-far score over {seeds} seed(s) per strategy; "
        "dashed: the optimum of the space within the budget.</p>\n"
        f"{body}\n</body></html>\n"
    )
