"""benchmarks/heldout.py: the variants it derives really differ from the source in what they claim, and
the bench runs on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_script

from executors.replay_data import bundled_data_dir, load_benchmark
from planner.bench import BenchConfig, run_bench

heldout = load_script("heldout")


def test_variants_change_problems_probes_costs_and_models(tmp_path: Path) -> None:
    source = bundled_data_dir()
    made = heldout.make_variants(source, tmp_path)
    assert {name for _, name in made} == {f"{b}-{v}" for b in ("aime24", "aime25") for v in heldout.VARIANTS}
    original = load_benchmark(source, "aime24")
    n = len(original.problems)
    by_size = sorted(original.specs, key=lambda m: original.specs[m].params_b)

    noprobe = load_benchmark(tmp_path / "noprobe", "aime24-noprobe")
    assert noprobe.probe_every == 0 and original.probe_every > 0
    assert len(noprobe.problems) == round(0.75 * n)
    assert {p.id for p in noprobe.problems} < {p.id for p in original.problems}

    moe = load_benchmark(tmp_path / "moe", "aime24-moe")
    largest = moe.specs[by_size[-1]]
    assert largest.active_params_b == round(heldout.MOE_ACTIVE_SHARE * largest.params_b, 3)
    assert moe.specs[by_size[0]].active_params == original.specs[by_size[0]].active_params
    # The same samples, in another order: the per-problem answer multisets agree, the sequences do not.
    model = by_size[-1]
    assert [sorted(a) for a in moe.records[model].answers] == [sorted(a) for a in original.records[model].answers]
    assert moe.records[model].answers != original.records[model].answers

    dropped = load_benchmark(tmp_path / "dropped", "aime24-dropped")
    assert set(dropped.records) == set(original.records) - {by_size[len(by_size) // 2]}


def test_bench_runs_on_the_variants_and_summarises(tmp_path: Path) -> None:
    made = [m for m in heldout.make_variants(bundled_data_dir(), tmp_path) if m[1].startswith("aime25")]
    envs = heldout.environments(made)
    assert len(envs) == len(made) + len(heldout.SIMULATED) == 3 + len(heldout.SIMULATED)
    assert {e.info.name for e in envs[len(made) :]} == {f"simulated-{n}x4-seed{seed}" for n, seed in heldout.SIMULATED}
    envs = envs[: len(made) + 2]  # the variants and two simulated tasks run: enough to check the summary
    config = BenchConfig(budgets=(0.1,), trials=6, seeds=1, strategies=("insight", "tpe", "random"))
    result = run_bench(config, environments=envs)
    assert not result.errors, result.errors
    lines = heldout.summarise(result, ("insight", "tpe", "random"))
    rows = [line for line in lines if line.startswith("| aime25-") or line.startswith("| simulated")]
    assert len(rows) == len(envs) == 5
    assert lines[-3].startswith("insight: within 0.5 pt") and lines[-1].startswith("random: within 0.5 pt")
    # on the simulated tasks, the regret each strategy has against TPE's and random's, counted
    simulated = [r for r in result.results if r["kind"] == "simulated"]
    ahead = sum(
        r["strategies"]["insight"]["regret_mean"]
        < min(r["strategies"]["tpe"]["regret_mean"], r["strategies"]["random"]["regret_mean"])
        for r in simulated
    )
    (line,) = [line for line in lines if "less regret than TPE and random" in line]
    assert line.startswith(f"insight: less regret than TPE and random on {ahead}/2 simulated settings")
    floors = [r["search_cost_floor"] for r in result.results]
    (line,) = [line for line in lines if line.startswith("search cost floor")]
    assert f"<= 1.5x on {sum(f <= 1.5 for f in floors)}/{len(floors)} settings" in line
    for row in result.results:
        assert row["optimum"] is not None
        assert row["strategies"]["insight"]["regret_mean"] >= -1e-9  # nothing beats the exhaustive optimum


def test_simulated_seeds_name_fresh_tasks_of_two_to_four_stages_and_bad_ranges_are_refused() -> None:
    assert heldout.simulated_tasks("15-17") == ((2, 15), (3, 16), (4, 17))
    assert heldout.simulated_tasks("30") == ((2, 30),)
    envs = heldout.environments([], heldout.simulated_tasks("15-16"))
    assert [e.info.name for e in envs] == ["simulated-2x4-seed15", "simulated-3x4-seed16"]
    for bad in ("x", "9-3", "1-b", "-4"):
        with pytest.raises(ValueError, match="--simulated-seeds"):
            heldout.simulated_tasks(bad)
    with pytest.raises(SystemExit):
        heldout.main(["--first-seed", "-1", "--simulated-seeds", "15"])


def test_json_report_of_a_fresh_check_is_what_compare_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fresh.json"
    heldout.main(
        [
            "--simulated-seeds",
            "15",
            "--budget",
            "0.1",
            "--trials",
            "4",
            "--seeds",
            "1",
            "--workers",
            "1",
            "--strategy",
            "insight",
            "--strategy",
            "random",
            "--json",
            str(out),
        ]
    )
    assert f"report: {out}" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [(r["benchmark"], r["budget_fraction"]) for r in rows] == [("simulated-2x4-seed15", 0.1)]
    assert set(rows[0]["strategies"]) == {"insight", "random"} and rows[0]["optimum"]["score"] > 0
