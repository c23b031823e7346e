"""Strategies on data they were not developed on: held-out variants of a replay directory, other simulated tasks.

The bench figures in the README are measured on the bundled AIME data and one simulated task, the data the
strategies were developed against. This script checks that what they found carries over. From any replay
directory (default: the bundled one) it derives, per benchmark, three variants that change what a search
depends on, and adds simulated tasks with other seeds and stage counts:

- ``noprobe``: three quarters of the problems, samples in another order, probes removed (no thinking caps);
- ``moe``: every problem, samples in another order, the largest model made a mixture-of-experts model (a
  fifth of its parameters active per token), so the cheapest way to a good score changes;
- ``dropped``: five sixths of the problems, the middle-sized model removed;
- simulated tasks of 2 to 4 stages with seeds 1 to 14 (``SIMULATED``), beside the bench's own (seed 0).

Those seeds have been looked at while the strategies were developed, and so have 15-29 (half of the 150
simulated settings changes are compared on); ``--simulated-seeds 30-44`` runs simulated tasks of other seeds
instead (and no variants), for a check on tasks nobody has tuned on. Study seeds draw their own evaluation
luck on simulated tasks (``Environment.with_evaluation_seed``).

It runs ``allot bench``'s machinery on them (every strategy given, the same seeds, exhaustive optimum) and
prints, per task and budget, each strategy's regret after ``--trials`` trials / median trials to come
within 0.5 point of the optimum / search cost with sample reuse as a multiple of one run of the optimal
plan, then a summary per strategy.

    python benchmarks/heldout.py [--data DIR] [--strategy insight --strategy tpe ...]
        [--budget 0.02 ...] [--trials 20] [--seeds 5] [--first-seed 0] [--workers 2] [--simulated-seeds 30-44] [--json OUT]

``--json`` writes the bench report, which ``benchmarks/compare.py`` pairs with another run's to say whether a
change helped beyond the luck of move order.

About 3 minutes on 2 cores with the defaults (six strategies, without a planner LLM: the agents run on their
fallbacks); 11 on a slower machine of the same kind.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from executors.environment import Environment
from executors.replay import ReplayEnvironment
from executors.replay_data import bundled_data_dir, list_benchmarks, load_benchmark
from executors.simulated import SimulatedEnvironment
from planner.bench import BenchConfig, BenchResult, run_bench

VARIANTS = ("noprobe", "moe", "dropped")
SIMULATED = ((3, 1), (2, 2), (3, 3), (3, 4), (4, 5), (2, 6), (3, 7), (4, 8), (3, 9), (2, 10), (4, 11), (3, 12), (3, 13), (4, 14))
"""(stages, seed) of the extra simulated tasks: 2 to 4 stages, each seed drawing other curves, so one lucky
task does not decide."""
MOE_ACTIVE_SHARE = 0.2


def simulated_tasks(seeds: str) -> tuple[tuple[int, int], ...]:
    """``"A-B"`` -> (stages, seed) for seeds A..B, 2 to 4 stages (``2 + seed % 3``): tasks nobody has tuned on yet,
    since every seed draws other curves; ``ValueError`` naming the problem for anything else."""
    low, sep, high = seeds.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError(f"--simulated-seeds {seeds!r}: give a seed or a range of seeds, such as 15-29") from None
    if first < 0 or last < first:
        raise ValueError(f"--simulated-seeds {seeds!r}: the range must run from a seed >= 0 up")
    return tuple((2 + seed % 3, seed) for seed in range(first, last + 1))


def _rows(file: Path) -> list[dict[str, Any]]:
    with gzip.open(file, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write(file: Path, rows: Sequence[dict[str, Any]]) -> None:
    with gzip.open(file, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def make_variants(source: Path, target: Path, seed: int = 0) -> list[tuple[Path, str]]:
    """Write the variants of every benchmark of ``source`` under ``target``; return (directory, benchmark)."""
    made: list[tuple[Path, str]] = []
    for benchmark, files in list_benchmarks(source).items():
        data = load_benchmark(source, benchmark)
        by_size = sorted(data.specs, key=lambda m: (data.specs[m].active_params_b or data.specs[m].params_b, m))
        largest, middle = by_size[-1], by_size[len(by_size) // 2]
        ids = [p.id for p in data.problems]
        for variant in VARIANTS:
            rng = random.Random(f"{seed}:{benchmark}:{variant}")
            share = {"noprobe": 0.75, "moe": 1.0, "dropped": 5 / 6}[variant]
            keep = set(rng.sample(ids, max(2, round(share * len(ids)))))
            models = [m for m in by_size if not (variant == "dropped" and m == middle and len(by_size) > 2)]
            directory = target / variant
            directory.mkdir(parents=True, exist_ok=True)
            name = f"{benchmark}-{variant}"
            for file in files:
                model = file.name.split("__", 1)[1].removesuffix(".gz").removesuffix(".jsonl")
                if model not in models:
                    continue
                rows = []
                for row in _rows(file):
                    if str(row["id"]) not in keep:
                        continue
                    samples = list(row["samples"])
                    random.Random(f"{seed}:{row['id']}:{model}:{variant}").shuffle(samples)
                    if variant == "noprobe":
                        samples = [{**s, "probes": []} for s in samples]
                    rows.append(
                        {**row, "benchmark": name, "samples": samples, **({"probe_every": 0} if variant == "noprobe" else {})}
                    )
                _write(directory / f"{name}__{model}.jsonl.gz", rows)
            specs = {}
            for model in models:
                spec = data.specs[model].model_dump(
                    include={"params_b", "active_params_b", "layers", "hidden"}, exclude_none=True
                )
                if variant == "moe" and model == largest:
                    spec["active_params_b"] = round(MOE_ACTIVE_SHARE * spec["params_b"], 3)
                specs[model] = spec
            sizes = directory / "models.json"
            merged = json.loads(sizes.read_text()) if sizes.exists() else {}
            sizes.write_text(json.dumps({**merged, **specs}, indent=1))
            made.append((directory, name))
    return made


def environments(made: Sequence[tuple[Path, str]], simulated: Sequence[tuple[int, int]] = SIMULATED) -> list[Environment]:
    envs: list[Environment] = [ReplayEnvironment(directory, name, orderings=8, seed=0) for directory, name in made]
    envs += [SimulatedEnvironment(stages=stages, seed=seed) for stages, seed in simulated]
    return envs


def summarise(result: BenchResult, strategies: Sequence[str]) -> list[str]:
    """The table and one summary line per strategy."""
    lines = ["| task | budget | optimum | " + " | ".join(strategies) + " |", "|---" * (3 + len(strategies)) + "|"]
    totals: dict[str, dict[str, list[float]]] = {s: {"trials": [], "regret": [], "cost": []} for s in strategies}
    for row in result.results:
        if row["optimum"] is None:
            lines.append(f"| {row['benchmark']} | {row['budget_fraction']:g} | {row['error']} |")
            continue
        cells = []
        for name in strategies:
            agg = row["strategies"][name]
            trials = agg["median_trials_to_half_pt"]
            cost = agg["search_cost_ratio_mean"]["with_reuse"]
            totals[name]["trials"].append(float("inf") if trials is None else trials)
            totals[name]["regret"].append(agg["regret_mean"])
            totals[name]["cost"].append(cost)
            cells.append(f"{agg['regret_mean']:.1f} / {'-' if trials is None else f'{trials:g}'} / {cost:.1f}")
        title = f"| {row['benchmark']} | {100 * row['budget_fraction']:g}% | {row['optimum']['score']:.3f} | "
        lines.append(title + " | ".join(cells) + " |")
    lines.append("")
    simulated = [row for row in result.results if row["kind"] == "simulated" and row["optimum"] is not None]
    if simulated and {"tpe", "random"} <= set(strategies):
        for name in strategies:
            if name in ("tpe", "random"):
                continue
            ahead = sum(
                row["strategies"][name]["regret_mean"]
                < min(row["strategies"]["tpe"]["regret_mean"], row["strategies"]["random"]["regret_mean"])
                for row in simulated
            )
            worst = max(row["strategies"][name]["regret_mean"] for row in simulated)
            lines.append(
                f"{name}: less regret than TPE and random on {ahead}/{len(simulated)} simulated settings (worst {worst:.1f} pt)"
            )
        lines.append("")
    floors = [row["search_cost_floor"] for row in result.results if row.get("search_cost_floor") is not None]
    if floors:
        lines.append(
            f"search cost floor (the optimum and its next larger sample counts that fit, with reuse): <= 1.5x on "
            f"{sum(f <= 1.5 for f in floors)}/{len(floors)} settings (median {statistics.median(floors):.2f}x)"
        )
    for name, t in totals.items():
        n = len(t["trials"])
        lines.append(
            f"{name}: within 0.5 pt in a median of <= 10 trials on {sum(x <= 10 for x in t['trials'])}/{n}; "
            f"mean regret {statistics.mean(t['regret']):.2f} pt; search cost <= 1.5x optimum on "
            f"{sum(c <= 1.5 for c in t['cost'])}/{n} (median {statistics.median(t['cost']):.2f}x)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="replay directory to derive variants from")
    parser.add_argument("--strategy", action="append", default=None)
    parser.add_argument("--budget", type=float, action="append", default=None)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="study seeds run from here (another seed set)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--simulated-seeds",
        default=None,
        help="run simulated tasks of these seeds (e.g. 30-44) instead of the variants and SIMULATED: a fresh check",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the bench report here (for benchmarks/compare.py)")
    args = parser.parse_args(argv)
    strategies = tuple(args.strategy or ("insight", "agenttts", "agent-reinforce", "gptswarm", "tpe", "random"))
    budgets = tuple(args.budget or (0.02, 0.05, 0.1, 0.2, 0.5))
    try:
        fresh = None if args.simulated_seeds is None else simulated_tasks(args.simulated_seeds)
        config = BenchConfig(
            budgets=budgets,
            trials=args.trials,
            seeds=args.seeds,
            first_seed=args.first_seed,
            strategies=strategies,
            workers=args.workers,
        )
    except ValueError as exc:  # the bench's own checks (seeds, budgets, strategies) name the problem
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="allot-heldout-") as tmp:
        made = [] if fresh is not None else make_variants(args.data or bundled_data_dir(), Path(tmp))
        result = run_bench(config, environments=environments(made, SIMULATED if fresh is None else fresh))
    print(f"{args.trials} trials x {args.seeds} seeds; cell: regret (pt) / median trials to 0.5 pt / search cost x optimum")
    print("\n".join(summarise(result, strategies)))
    if args.json is not None:
        print(f"report: {result.write_json(args.json)}")
    print(f"\nfinished in {result.seconds:.0f} s")


if __name__ == "__main__":
    main()
