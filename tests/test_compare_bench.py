"""benchmarks/compare.py: two bench reports paired by setting, the difference's interval and the verdict."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from benchmark_scripts import load_script

from executors.simulated import SimulatedEnvironment
from planner.bench import BenchConfig, run_bench

compare_bench = load_script("compare")


def report(cells: dict[tuple[str, float], dict[str, tuple[float, float | None]]]) -> dict[str, Any]:
    """A bench report: (benchmark, budget) -> strategy -> (regret, median trials to 0.5 pt)."""
    return {
        "meta": {},
        "results": [
            {
                "benchmark": benchmark,
                "budget_fraction": fraction,
                "optimum": {"score": 0.8},
                "strategies": {
                    name: {"regret_mean": regret, "median_trials_to_half_pt": trials}
                    for name, (regret, trials) in strategies.items()
                },
            }
            for (benchmark, fraction), strategies in cells.items()
        ],
    }


SETTINGS = [(f"task{i}", f) for i in range(6) for f in (0.02, 0.1, 0.5)]


def test_a_run_better_on_every_setting_is_better_with_an_interval_below_zero() -> None:
    base = report({k: {"insight": (2.0 + i % 3, 15.0)} for i, k in enumerate(SETTINGS)})
    new = report({k: {"insight": (1.0 + i % 3 - 0.1 * (i % 2), 8.0 if i < 4 else None)} for i, k in enumerate(SETTINGS)})
    result = compare_bench.compare(base, new)
    assert result.settings == len(SETTINGS) and result.unpaired == 0
    assert result.difference == pytest.approx(statistics.fmean(-1.0 - 0.1 * (i % 2) for i in range(len(SETTINGS))))
    assert result.low <= result.difference <= result.high < 0
    assert result.verdict == "better"
    assert (result.won, result.lost) == (len(SETTINGS), 0)
    assert (result.base_within, result.new_within) == (0, 4)
    assert result.base_worst[0] == 4.0 and result.new_worst[0] == pytest.approx(3.0)
    lines = result.lines(10, 0.5)
    assert lines[-1].endswith(f"better; won {len(SETTINGS)}, lost 0 by more than 0.5 pt")


def test_gains_and_losses_that_cancel_are_no_clear_difference_and_the_interval_is_seeded() -> None:
    base = report({k: {"insight": (3.0, 12.0)} for k in SETTINGS})
    swings = [2.0, -1.0, 0.1, -0.1, 1.5, -2.0, 0.8, -0.2, -0.4, 0.3, -1.2, 0.2, -0.9, 1.1, 0.0, -0.6, 0.4, 0.0]
    new = report({k: {"insight": (3.0 + s, 12.0)} for k, s in zip(SETTINGS, swings, strict=True)})
    result = compare_bench.compare(base, new)
    assert result.difference == pytest.approx(statistics.fmean(swings))
    assert result.low < 0 < result.high and result.verdict == "no clear difference"
    assert (result.won, result.lost) == (5, 4)  # the moves of 0.5 point or less are under the margin
    assert compare_bench.compare(base, new) == result
    assert (compare_bench.compare(base, new, seed=1).low, compare_bench.compare(base, new, seed=1).high) != (
        result.low,
        result.high,
    )


def with_seeds(regrets: dict[tuple[str, float], list[float]]) -> dict[str, Any]:
    """A bench report whose settings carry per-seed regrets (seeds 0, 1, ...), their mean as the aggregate."""
    out = report({k: {"insight": (statistics.fmean(r), None)} for k, r in regrets.items()})
    for row in out["results"]:
        seeds = regrets[(row["benchmark"], row["budget_fraction"])]
        row["strategies"]["insight"]["per_seed"] = [{"seed": i, "regret": r} for i, r in enumerate(seeds)]
    return out


def test_seed_noise_within_settings_widens_the_interval() -> None:
    # Every setting moves by +0.5 on average, but its seeds scatter from -3 to +4: five seeds do not show a change.
    base = with_seeds({k: [2.0] * 5 for k in SETTINGS})
    new = with_seeds({k: [5.0, 0.0, 6.0, -1.0, 2.5] for k in SETTINGS})
    result = compare_bench.compare(base, new)
    assert result.difference == pytest.approx(0.5)
    assert result.low < 0 < result.high and result.verdict == "no clear difference"
    # The same mean change with quiet seeds is a clear one.
    quiet = with_seeds({k: [2.4, 2.6, 2.5, 2.5, 2.5] for k in SETTINGS})
    assert compare_bench.compare(base, quiet).verdict == "worse"
    # Seeds are paired by number: a run against itself has no spread at all.
    assert (compare_bench.compare(new, new).low, compare_bench.compare(new, new).high) == (0.0, 0.0)
    assert compare_bench.seed_deltas({"per_seed": [{"seed": 0, "regret": 1.0}, {"seed": 1, "regret": None}]}, {}) == []


def test_runs_with_other_seeds_pool_into_one_report_per_side() -> None:
    first = with_seeds({k: [1.0, 3.0] for k in SETTINGS})
    second = with_seeds({k: [2.0, 6.0] for k in SETTINGS})
    for row in second["results"]:
        for result in row["strategies"]["insight"]["per_seed"]:
            result["seed"] += 2
    for result in [r for row in first["results"] + second["results"] for r in row["strategies"]["insight"]["per_seed"]]:
        result.update(best_score=0.8 - result["regret"] / 100, curve=[None], error=None)
        result.update({f"trials_to_{k}": None for k in ("1pt", "half_pt")})
        cost = {"with_reuse": 1.0, "without_reuse": 2.0}
        result.update(search_cost=cost, search_cost_ratio=cost)
        result.update(planner_cost={"tokens": 0, "usd": 0.0})
    pooled = compare_bench.pool_reports([("a.json", first), ("b.json", second)])
    assert pooled["meta"]["pooled"] == ["a.json", "b.json"]
    for row in pooled["results"]:
        agg = row["strategies"]["insight"]
        assert [r["seed"] for r in agg["per_seed"]] == [0, 1, 2, 3] and agg["regret_mean"] == pytest.approx(3.0)
    together = with_seeds({k: [1.0, 3.0, 2.0, 6.0] for k in SETTINGS})
    assert compare_bench.compare(together, pooled).difference == pytest.approx(0.0)
    assert compare_bench.pool_reports([("a.json", first)]) == first
    with pytest.raises(ValueError, match=r"b\.json: seed 0 of insight on task0 at 0\.02 is also in a\.json"):
        compare_bench.pool_reports([("a.json", first), ("b.json", first)])
    with pytest.raises(ValueError, match=r"b\.json: insight on task0 at 0\.02 has no per-seed results to pool"):
        compare_bench.pool_reports([("a.json", first), ("b.json", report({k: {"insight": (1.0, None)} for k in SETTINGS}))])


def test_the_budgets_of_one_task_are_drawn_together() -> None:
    # Two tasks are 2 points worse at all three budgets, four are unchanged: two tasks, not six settings, of evidence
    # (drawn as 18 independent settings, the interval would exclude zero).
    base = report({k: {"insight": (1.0, None)} for k in SETTINGS})
    new = report({k: {"insight": (3.0 if k[0] in ("task0", "task1") else 1.0, None)} for k in SETTINGS})
    result = compare_bench.compare(base, new)
    assert result.difference == pytest.approx(2.0 / 3)
    assert result.low <= 0 < result.high and result.verdict == "no clear difference"


def test_one_strategy_against_another_on_the_shared_settings_only() -> None:
    base = report({**{k: {"tpe": (5.0, None)} for k in SETTINGS}, ("extra", 0.2): {"tpe": (9.0, None)}})
    new = report({k: {"insight": (1.0, 6.0)} for k in SETTINGS[:-1]})
    new["results"].append({"benchmark": "bad", "budget_fraction": 0.1, "optimum": None, "strategies": {}})
    result = compare_bench.compare(base, new, "insight", "tpe")
    assert (result.base, result.new) == ("tpe", "insight")
    assert result.settings == len(SETTINGS) - 1
    assert result.unpaired == 2  # the last of SETTINGS and "extra" are in one report only
    assert result.base_mean == 5.0 and result.new_mean == 1.0 and result.verdict == "better"


def test_bad_reports_and_names_are_refused_naming_the_problem(tmp_path: Path) -> None:
    base = report({k: {"insight": (1.0, 5.0)} for k in SETTINGS[:3]})
    with pytest.raises(ValueError, match=r"no setting has results for strategy 'insigt' \(strategies there: insight\)"):
        compare_bench.compare(base, base, "insigt")
    other = report({("elsewhere", 0.1): {"insight": (1.0, 5.0)}})
    with pytest.raises(ValueError, match="share no setting"):
        compare_bench.compare(base, other)
    garbage = tmp_path / "x.json"
    garbage.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"x\.json: not a bench report"):
        compare_bench.load_report(garbage)
    broken = tmp_path / "y.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"y\.json: not a readable JSON bench report"):
        compare_bench.load_report(broken)
    with pytest.raises(SystemExit):
        compare_bench.main([str(garbage), str(garbage)])


def test_real_bench_reports_compare_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = BenchConfig(budgets=(0.05, 0.2), trials=5, seeds=1, strategies=("insight", "random"))
    result = run_bench(config, environments=[SimulatedEnvironment(stages=2, seed=3)])
    path = result.write_json(tmp_path / "run.json")
    rows = json.loads(path.read_text())["results"]
    deltas = [r["strategies"]["insight"]["regret_mean"] - r["strategies"]["random"]["regret_mean"] for r in rows]
    compare_bench.main([str(path), str(path), "--strategy", "insight", "--against", "random"])
    out = capsys.readouterr().out
    assert out.startswith("insight (new) against random (base), 2 paired settings")
    assert f"difference {statistics.fmean(deltas):+.3f} pt" in out
    compare_bench.main([str(path), str(path)])  # a run against itself: no difference at all
    assert "difference +0.000 pt, 95% interval [+0.000, +0.000]: no clear difference; won 0, lost 0" in capsys.readouterr().out
