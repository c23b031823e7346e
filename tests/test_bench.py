"""``allot bench``: optimum by independent enumeration, per-seed metrics, aggregates, JSON, plot and CLI."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import multiprocessing
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from executors.environment import Evaluation
from executors.replay import ReplayEnvironment
from executors.simulated import SimulatedEnvironment
from graphs.cost import Budget, Cost
from graphs.plan import Plan
from planner.bench import (
    BenchConfig,
    BenchResult,
    Optimum,
    _ListedSpace,
    _Memo,
    find_optimum,
    run_bench,
    search_cost_floor,
    write_plot,
)
from planner.cli import app
from planner.report import most_expensive_single_model_cost
from planner.space import SearchSpace
from planner.strategies import STRATEGIES, Proposal, StudyContext, strategy_params
from planner.strategies._random import RandomStrategy

BENCHMARKS = ("alpha", "beta")
BUDGETS = (0.1, 0.3, 1.0)
TRIALS = 10  # >= the 9 plans that fit 0.1 of the tiny data, so grid must find the optimum there
SEEDS = 2


def write_tiny_replay(directory: Path, benchmarks: tuple[str, ...] = BENCHMARKS) -> Path:
    """Two benchmarks, three models (sizes from their names), six problems, four samples, no probes."""
    skill = {"M-1B": 0.35, "M-3B": 0.55, "M-8B": 0.75}
    length = {"M-1B": 300, "M-3B": 500, "M-8B": 800}
    directory.mkdir(parents=True, exist_ok=True)
    for index, bench in enumerate(benchmarks):
        rng = random.Random(index)
        for model, accuracy in skill.items():
            rows = []
            for i in range(6):
                gold = str(10 + i)
                samples = [
                    {
                        "answer": gold if rng.random() < accuracy else str(rng.choice([1, 2, 3])),
                        "tokens": length[model] + rng.randint(0, 200),
                        "probes": [],
                    }
                    for _ in range(4)
                ]
                rows.append({"id": f"{bench}-{i}", "question": f"Problem {i} of {bench}?", "gold": gold, "samples": samples})
            with gzip.open(directory / f"{bench}__{model}.jsonl.gz", "wt", encoding="utf-8") as handle:
                handle.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_replay(tmp_path_factory.mktemp("tiny-replay"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> BenchResult:
    return run_bench(BenchConfig(data=tiny_dir, budgets=BUDGETS, trials=TRIALS, seeds=SEEDS))


@pytest.fixture(scope="module")
def bundled() -> BenchResult:
    return run_bench(BenchConfig(benchmarks=("aime24",), budgets=(0.02, 0.5), trials=5, seeds=2))


def independent_optimum(env: Any, fraction: float) -> tuple[float, float, int, float]:
    """(limit in flops, best score, feasible count, cost of the cheapest best plan) by plain enumeration."""
    space = SearchSpace.from_info(env.info)
    flops = Budget(limit=1.0, unit="flops")
    limit = fraction * max(flops.spent(env.estimate_cost(p)) for p in space.single_model_plans())
    budget = Budget(limit=limit, unit="flops")
    scored = [
        (env.evaluate(p).score, budget.spent(env.estimate_cost(p)))
        for p in space.enumerate()
        if budget.allows(env.estimate_cost(p))
    ]
    best = max(score for score, _ in scored)
    cheapest = min(spent for score, spent in scored if score >= best - 1e-12)
    return limit, best, len(scored), cheapest


def check_invariants(result: BenchResult, trials: int, seeds: int) -> None:
    for entry in result.results:
        optimum = entry["optimum"]["score"]
        assert set(entry["strategies"]) == set(result.meta["strategies"])
        for name, agg in entry["strategies"].items():
            where = f"{entry['benchmark']} @ {entry['budget_fraction']} {name}"
            assert len(agg["per_seed"]) == seeds, where
            assert [r["seed"] for r in agg["per_seed"]] == list(range(seeds))
            assert len(agg["curve_mean"]) == trials
            assert agg["errors"] == [], where
            for run in agg["per_seed"]:
                curve = run["curve"]
                assert len(curve) == trials, where
                assert all(b >= a for a, b in itertools.pairwise(curve)), f"{where}: curve decreases"
                assert curve[-1] == run["best_score"]
                assert run["best_score"] <= optimum + 1e-12, f"{where}: beats the optimum"
                assert run["regret"] >= -1e-9
                assert math.isclose(run["regret"], 100 * (optimum - run["best_score"]), abs_tol=1e-9)
                for key in ("trials_to_1pt", "trials_to_half_pt"):
                    assert run[key] is None or 1 <= run[key] <= trials, where
                if run["trials_to_half_pt"] is not None:
                    assert run["trials_to_1pt"] is not None and run["trials_to_1pt"] <= run["trials_to_half_pt"]
                if run["trials_to_1pt"] is not None:
                    assert curve[run["trials_to_1pt"] - 1] >= optimum - 0.01 - 1e-9
                    assert run["trials_to_1pt"] == 1 or curve[run["trials_to_1pt"] - 2] < optimum - 0.01
                cost, ratio = run["search_cost"], run["search_cost_ratio"]
                assert cost["unit"] == "flops"
                assert 0 < cost["with_reuse"] <= cost["without_reuse"] * (1 + 1e-9), where
                assert 0 < ratio["with_reuse"] <= ratio["without_reuse"] * (1 + 1e-9), where
                one_run = entry["optimum"]["cost"] * entry["n_examples"]
                assert math.isclose(ratio["with_reuse"], cost["with_reuse"] / one_run, rel_tol=1e-9)
                assert run["planner_cost"]["tokens"] >= 0
                assert 1 <= run["evaluated"] <= trials
            bests = [r["best_score"] for r in agg["per_seed"]]
            assert math.isclose(agg["best_mean"], sum(bests) / seeds, abs_tol=1e-12)
            assert agg["regret_mean"] >= -1e-9 and agg["regret_std"] >= 0
            for key in ("median_trials_to_1pt", "median_trials_to_half_pt"):
                assert agg[key] is None or 1 <= agg[key] <= trials
            mean_curve = [sum(c) / seeds for c in zip(*(r["curve"] for r in agg["per_seed"]), strict=True)]
            assert agg["curve_mean"] == pytest.approx(mean_curve)


# -- a small generated replay directory -----------------------------------------------------------------


def test_tiny_json_has_every_benchmark_budget_and_strategy(tiny: BenchResult) -> None:
    doc = json.loads(json.dumps(tiny.to_json(), allow_nan=False))
    assert set(doc) == {"meta", "results"}
    assert doc["meta"]["strategies"] == list(STRATEGIES)
    assert doc["meta"]["trials"] == TRIALS and doc["meta"]["seeds"] == list(range(SEEDS))
    assert "seconds" not in json.dumps(doc["meta"])
    pairs = [(e["benchmark"], e["budget_fraction"]) for e in doc["results"]]
    assert pairs == [(b, f) for b in BENCHMARKS for f in BUDGETS]
    for entry in doc["results"]:
        assert entry["budget"]["unit"] == "flops" and entry["budget"]["limit"] > 0
        assert set(entry["optimum"]) >= {"score", "plan", "plan_id"}
        assert entry["search_cost_floor"] >= 1.0 - 1e-9
        assert entry["error"] is None
    assert tiny.errors == []


def test_tiny_optimum_equals_independent_enumeration(tiny: BenchResult, tiny_dir: Path) -> None:
    for entry in tiny.results:
        env = ReplayEnvironment(tiny_dir, entry["benchmark"], orderings=8, seed=0)
        limit, best, feasible, cheapest = independent_optimum(env, entry["budget_fraction"])
        assert entry["budget"]["limit"] == pytest.approx(limit, rel=1e-12)
        optimum = entry["optimum"]
        assert optimum["score"] == pytest.approx(best, abs=1e-12)
        assert optimum["feasible_plans"] == feasible
        assert optimum["cost"] == pytest.approx(cheapest, rel=1e-12)  # ties go to the cheaper plan
        from graphs.plan import Plan

        plan = Plan.from_json(optimum["plan"])
        assert plan.plan_id == optimum["plan_id"]
        assert env.evaluate(plan).score == pytest.approx(best)
        assert Budget(limit=limit, unit="flops").allows(env.estimate_cost(plan))


def test_tiny_invariants(tiny: BenchResult) -> None:
    check_invariants(tiny, TRIALS, SEEDS)


def test_grid_with_enough_trials_finds_the_optimum(tiny: BenchResult) -> None:
    hits = 0
    for entry in tiny.results:
        if entry["optimum"]["feasible_plans"] <= TRIALS:
            hits += 1
            grid = entry["strategies"]["grid"]
            assert grid["regret_mean"] == pytest.approx(0.0, abs=1e-9)
            assert grid["reached_1pt"] == 1.0
            for run in grid["per_seed"]:
                assert run["evaluated"] == entry["optimum"]["feasible_plans"]  # then it had nothing left
                assert run["stopped_early"] is (run["evaluated"] < TRIALS)
                assert run["trials_to_1pt"] <= entry["optimum"]["feasible_plans"]
    assert hits == len(BENCHMARKS)  # budget 0.1 of every benchmark


def test_grid_exhausting_a_larger_budget(tiny_dir: Path) -> None:
    result = run_bench(BenchConfig(data=tiny_dir, benchmarks=("beta",), budgets=(0.3,), trials=40, seeds=1, strategies=("grid",)))
    entry = result.results[0]
    assert entry["optimum"]["feasible_plans"] <= 40
    run = entry["strategies"]["grid"]["per_seed"][0]
    assert run["regret"] == pytest.approx(0.0, abs=1e-9)
    assert run["evaluated"] == entry["optimum"]["feasible_plans"]


def test_results_do_not_depend_on_workers(tiny_dir: Path) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("parallel bench needs fork")
    config = {"data": tiny_dir, "benchmarks": ("alpha",), "budgets": (0.3,), "trials": 4, "seeds": 2}
    one = run_bench(BenchConfig(**config, workers=1)).to_json()
    two = run_bench(BenchConfig(**config, workers=2)).to_json()
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


# -- the bundled data, tiny settings --------------------------------------------------------------------


def test_bundled_aime24(bundled: BenchResult) -> None:
    assert [(e["benchmark"], e["budget_fraction"]) for e in bundled.results] == [("aime24", 0.02), ("aime24", 0.5)]
    check_invariants(bundled, 5, 2)
    env = ReplayEnvironment(None, "aime24", orderings=8, seed=0)
    entry = bundled.results[0]
    limit, best, feasible, _ = independent_optimum(env, 0.02)
    assert entry["budget"]["limit"] == pytest.approx(limit, rel=1e-12)
    assert entry["optimum"]["score"] == pytest.approx(best, abs=1e-12)
    assert entry["optimum"]["feasible_plans"] == feasible
    assert bundled.results[1]["optimum"]["score"] >= entry["optimum"]["score"]  # more budget, never worse


# -- simulated tasks ------------------------------------------------------------------------------------


def test_search_cost_floor_pays_each_larger_count_that_fits_with_reuse() -> None:
    env = SimulatedEnvironment(stages=2, seed=0)
    space = SearchSpace.from_info(env.info)
    plan = space.plan(space.choices_of(Plan.allocation({"stage1": ("sim-3B", 4), "stage2": ("sim-8B", 2)})))
    budget_of = Budget(limit=1.0, unit="flops")
    spent = budget_of.spent(env.estimate_cost(plan))
    optimum = Optimum(plan, env.true_score(plan), spent, "enumeration", None)
    # Room for both larger counts: stage1 at 8 changes stage2's prompts, so stage2's 2 samples are paid again
    # under the new upstream; stage2 at 4 under the old one pays only 2 samples more than the plan's own.
    generous = Budget(limit=10 * spent, unit="flops")
    expected = (
        env.stage_cost("stage1", "sim-3B", 8).flops
        + env.stage_cost("stage2", "sim-8B", 2).flops
        + env.stage_cost("stage2", "sim-8B", 4).flops
    )
    assert search_cost_floor(env, space, generous, optimum) == pytest.approx(expected / env.estimate_cost(plan).flops)
    # A budget the plan spends in full leaves no larger count: the plan alone is the floor.
    tight = Budget(limit=spent, unit="flops")
    assert search_cost_floor(env, space, tight, optimum) == pytest.approx(1.0)


def test_simulated_enumeration_matches_the_environment_optimum() -> None:
    env = SimulatedEnvironment(stages=2, seed=0)
    space = SearchSpace.from_info(env.info)
    scale = most_expensive_single_model_cost(env, space, Budget(limit=1.0, unit="flops"))
    for fraction in (0.05, 0.2, 0.6):
        budget = Budget(limit=fraction * scale, unit="flops")
        found = find_optimum(env, space, budget)
        assert found.method == "enumeration"
        _, score = env.optimum(budget, n_choices=space.n_choices["sim-1B"])
        assert found.score == pytest.approx(score, abs=1e-12)  # noiseless scores on both sides
        # The environment's own optimum, mapped into the space, is the same answer.
        from planner.bench import _environment_optimum

        other = _environment_optimum(_Memo(env), space, budget)
        assert other.method == "environment"
        assert other.score == pytest.approx(found.score, abs=1e-12)
        assert other.plan.plan_id in {p.plan_id for p in space.enumerate()}


def test_simulated_tasks_in_the_bench() -> None:
    result = run_bench(
        BenchConfig(benchmarks=(), simulated=(2,), budgets=(0.2,), trials=6, seeds=2, strategies=("random", "tpe"))
    )
    (entry,) = result.results
    assert entry["benchmark"].startswith("simulated-2x")
    assert entry["kind"] == "simulated"
    env = SimulatedEnvironment(stages=2, seed=0)
    budget = Budget(limit=entry["budget"]["limit"], unit="flops")
    assert entry["optimum"]["score"] == pytest.approx(env.optimum(budget)[1], abs=1e-12)
    check_invariants(result, 6, 2)


# -- strategy parameters, planner cost, failures ---------------------------------------------------------


class PlannerStrategy(RandomStrategy):
    """Random search that says it asked a planner LLM (10 prompt + 5 output tokens per proposal)."""

    name = "fake-planner"
    seen: list[tuple[str | None, str | None]] = []

    def __init__(self, seed: int | None = None, planner_model: str | None = None, api_base: str | None = None) -> None:
        self.planner_model, self.api_base = planner_model, api_base
        PlannerStrategy.seen.append((planner_model, api_base))
        super().__init__(seed)

    def params(self) -> dict[str, Any]:
        return {"planner_model": self.planner_model, "api_base": self.api_base}

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        return [Proposal(p.plan, p.rationale, planner_cost=Cost(0.0, 10.0, 5.0, 0.001)) for p in super().propose(context, n)]


class BrokenStrategy(RandomStrategy):
    name = "broken"

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        if len(context.trials) >= 2:
            raise RuntimeError("planner exploded")
        return super().propose(context, n)


def test_strategy_params_go_only_to_constructors_that_name_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STRATEGIES, PlannerStrategy.name, PlannerStrategy)
    assert strategy_params("fake-planner", "openai/gpt-x", "http://h:8000/v1") == {
        "planner_model": "openai/gpt-x",
        "api_base": "http://h:8000/v1",
    }
    assert strategy_params("fake-planner", None, None) == {}
    assert strategy_params("tpe", "openai/gpt-x", "http://h:8000/v1") == {}  # **sampler_args does not count
    assert strategy_params("random", "openai/gpt-x", None) == {}


def test_planner_cost_and_failures_are_recorded(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> None:
    monkeypatch.setitem(STRATEGIES, PlannerStrategy.name, PlannerStrategy)
    monkeypatch.setitem(STRATEGIES, BrokenStrategy.name, BrokenStrategy)
    PlannerStrategy.seen.clear()
    result = run_bench(
        BenchConfig(
            data=tiny_dir,
            benchmarks=("alpha",),
            budgets=(0.3,),
            trials=4,
            seeds=2,
            strategies=("fake-planner", "broken"),
            planner_model="allot-scripted/x",
            api_base="http://localhost:1/v1",
        )
    )
    assert PlannerStrategy.seen == [("allot-scripted/x", "http://localhost:1/v1")] * 2
    planner = result.results[0]["strategies"]["fake-planner"]
    for run in planner["per_seed"]:
        proposals = run["evaluated"] + run["rejected"]
        assert run["planner_cost"]["tokens"] == pytest.approx(15.0 * proposals)
        assert run["planner_cost"]["usd"] == pytest.approx(0.001 * proposals)
    assert planner["planner_cost_mean"]["tokens"] == pytest.approx(60.0)
    broken = result.results[0]["strategies"]["broken"]
    assert broken["errors"] and all("planner exploded" in e for e in broken["errors"])
    for run in broken["per_seed"]:
        assert run["evaluated"] == 2 and run["stopped_early"] and len(run["curve"]) == 4
    assert any("broken" in e for e in result.errors)


def test_another_seed_set_runs_those_seeds_and_gets_the_same_studies_for_them() -> None:
    env = SimulatedEnvironment(stages=2, seed=4)
    config = {"budgets": (0.1,), "trials": 5, "strategies": ("insight", "random"), "workers": 1}
    later = run_bench(BenchConfig(**config, seeds=2, first_seed=3), environments=[env]).to_json()
    assert later["meta"]["seeds"] == [3, 4]
    (row,) = later["results"]
    assert [r["seed"] for r in row["strategies"]["random"]["per_seed"]] == [3, 4]
    whole = run_bench(BenchConfig(**config, seeds=5), environments=[env]).to_json()
    for name in ("insight", "random"):
        assert row["strategies"][name]["per_seed"] == whole["results"][0]["strategies"][name]["per_seed"][3:]
    with pytest.raises(ValueError, match="first seed must be >= 0"):
        BenchConfig(first_seed=-1)


class _LuckRecorder(SimulatedEnvironment):
    """A simulated task that records the noise seed of every environment a study evaluates on."""

    evaluated: set[int | None] = set()

    def evaluate(self, plan: Plan) -> Evaluation:
        _LuckRecorder.evaluated.add(self.noise_seed)
        return super().evaluate(plan)


def test_each_study_seed_evaluates_on_its_own_evaluation_luck(tiny_dir: Path) -> None:
    _LuckRecorder.evaluated.clear()
    config = BenchConfig(budgets=(0.1,), trials=5, seeds=2, first_seed=3, strategies=("insight", "random"), workers=1)
    result = run_bench(config, environments=[_LuckRecorder(stages=2, seed=4)]).to_json()
    assert _LuckRecorder.evaluated == {3, 4}  # never the unseeded task: every study ran on its seed's luck
    assert "per study seed" in result["meta"]["evaluation_luck"]
    # a replay's luck is its recording: the studies share the benchmark's environment
    replay = ReplayEnvironment(tiny_dir, "alpha", orderings=2, seed=0)
    assert replay.with_evaluation_seed(7) is replay


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        BenchConfig(strategies=("nope",))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        BenchConfig(budgets=(1.5,))
    with pytest.raises(ValueError, match="nothing to bench"):
        run_bench(BenchConfig(benchmarks=()))


def test_listed_space_is_the_same_space() -> None:
    env = SimulatedEnvironment(stages=2, seed=0)
    space = SearchSpace.from_info(env.info)
    listed = _ListedSpace.of(space)
    assert listed == space and listed.spec() == space.spec() and listed.size() == space.size()
    assert [p.plan_id for p in listed.enumerate()] == [p.plan_id for p in space.enumerate()]
    assert next(iter(listed.enumerate())) is next(iter(listed.enumerate()))  # built once


# -- plot and CLI ---------------------------------------------------------------------------------------


def test_svg_plot_is_self_contained(tiny: BenchResult, tmp_path: Path) -> None:
    path = write_plot(tiny, tmp_path / "curves.html", use_plotly=False)
    text = path.read_text()
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    svgs = re.findall(r"<svg.*?</svg>", text, re.S)
    assert len(svgs) == len(tiny.results)
    for svg in svgs:
        root = ET.fromstring(svg)
        lines = root.findall("{http://www.w3.org/2000/svg}polyline")
        assert len(lines) == len(STRATEGIES)
    assert "optimum" in text


def test_plotly_plot(tiny: BenchResult, tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    text = write_plot(tiny, tmp_path / "curves.html", use_plotly=True).read_text()
    assert "plotly" in text.lower()
    for name in STRATEGIES:
        assert f'"name":"{name}"' in text


def test_cli_bench_end_to_end(tiny_dir: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.html"
    args = ["bench", "--data", str(tiny_dir), "--budget", "0.1", "--budget", "0.3", "--trials", "3", "--seeds", "2"]
    args += ["--strategy", "random", "--strategy", "grid", "--json", str(out), "--plot", str(plot), "--workers", "1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    for needle in ("alpha", "beta", "random", "grid", "regret", "floor x opt"):
        assert needle in result.output
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 4
    for entry in doc["results"]:  # the table's floor column is the JSON's
        assert f"{entry['search_cost_floor']:.1f}" in result.output
    assert all(set(e["strategies"]) == {"random", "grid"} for e in doc["results"])
    assert doc["meta"]["budget_fractions"] == [0.1, 0.3]
    assert plot.exists() and "<html" in plot.read_text().lower()


def test_cli_bench_simulated_only(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    args = ["bench", "--no-replay", "--simulated", "2", "--budget", "0.2", "--trials", "3", "--seeds", "1"]
    args += ["--strategy", "tpe", "--json", str(out), "--workers", "1", "--first-seed", "7"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["kind"] == "simulated"
    assert [r["seed"] for r in entry["strategies"]["tpe"]["per_seed"]] == [7]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--strategy", "nope"], "unknown strategy"),
        (["--budget", "1.5"], "(0, 1]"),
        (["--benchmark", "gamma"], "gamma"),
        (["--no-replay"], "--simulated"),
    ],
)
def test_cli_bench_errors(tiny_dir: Path, extra: list[str], needle: str) -> None:
    result = CliRunner().invoke(app, ["bench", "--data", str(tiny_dir), "--trials", "1", "--seeds", "1", *extra])
    assert result.exit_code != 0
    assert "error:" in result.output and needle in result.output, result.output
