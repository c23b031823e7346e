"""Is a change to a strategy an improvement, or the luck of which moves came first? Two bench runs, paired.

A heuristic's regret on one setting moves by points when a change reorders its moves, so a difference of
the mean regret over a set of settings says little by itself. This script pairs the settings (benchmark and
budget) of two JSON reports of ``allot bench --json`` or ``benchmarks/heldout.py --json`` and prints, for one
strategy (or one strategy against another): the mean regret of each run and their difference with a paired
bootstrap 95% interval, the settings won and lost by more than ``--margin`` points, how many settings each came
within 0.5 point of the optimum in a median of ``--within`` trials or fewer, and the worst.

The interval is a two-level bootstrap: tasks (benchmarks) are drawn with replacement, with all their budgets,
since one task's budgets share its curves and move together; then, within each setting, its seeds' paired
differences (the same study seed in both runs) are drawn with replacement, since five seeds leave each
setting's mean regret noisy. A change that only reorders ties (the same heuristic, another tie-break stream)
moved the mean regret of 150 simulated settings by +0.13 pt; resampling settings alone called that "worse"
([+0.01, +0.29]), this interval does not ([-0.04, +0.40]). Reports without per-seed results are resampled by
task only.

    python benchmarks/compare.py BASE.json[,MORE.json] NEW.json[,MORE.json] [--strategy insight] [--against tpe]

Several reports on one side (comma-separated) are pooled: runs of the same tasks with other study seeds
(``--first-seed``), whose per-seed results are joined setting by setting, so a change can be checked on more
luck than one run holds.

The verdict says "better" or "worse" only where the interval excludes zero, else "no clear difference".
Seeded: the same files give the same interval.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.bench import aggregate_seeds

__all__ = ["Comparison", "compare", "load_report", "main", "paired_regrets", "pool_reports", "seed_deltas"]

Setting = tuple[str, float]


@dataclass(frozen=True)
class Comparison:
    """The paired comparison of ``new`` (strategy in the second report) against ``base`` (the first)."""

    base: str
    new: str
    settings: int
    unpaired: int
    """Settings in only one report, or without an optimum in one of them: left out."""
    base_mean: float
    new_mean: float
    difference: float
    """Mean of the per-setting differences, new minus base, in points (negative: the new one has less regret)."""
    low: float
    high: float
    """The bootstrap 95% interval of ``difference``: tasks drawn with all their budgets, then each setting's seeds."""
    won: int
    lost: int
    base_within: int
    new_within: int
    base_worst: tuple[float, Setting]
    new_worst: tuple[float, Setting]

    @property
    def verdict(self) -> str:
        if self.high < 0:
            return "better"
        if self.low > 0:
            return "worse"
        return "no clear difference"

    def lines(self, within: int, margin: float) -> list[str]:
        def worst(value: tuple[float, Setting]) -> str:
            return f"{value[0]:.1f} pt ({value[1][0]} at {100 * value[1][1]:g}%)"

        return [
            f"{self.new} (new) against {self.base} (base), {self.settings} paired settings"
            + (f" ({self.unpaired} unpaired, left out)" if self.unpaired else ""),
            "| | base | new |",
            "|---|---|---|",
            f"| mean regret (pt) | {self.base_mean:.3f} | {self.new_mean:.3f} |",
            f"| within 0.5 pt in a median of <= {within} trials | {self.base_within} | {self.new_within} |",
            f"| worst regret | {worst(self.base_worst)} | {worst(self.new_worst)} |",
            f"difference {self.difference:+.3f} pt, 95% interval [{self.low:+.3f}, {self.high:+.3f}]: {self.verdict}; "
            f"won {self.won}, lost {self.lost} by more than {margin:g} pt",
        ]


def load_report(path: str | Path) -> dict[str, Any]:
    """A bench report, checked for the shape this script reads; ``ValueError`` naming the file otherwise."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON bench report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise ValueError(f"{path}: not a bench report (no 'results' list): write one with allot bench --json")
    return report


def pool_reports(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One report from runs of the same tasks with other seeds: per setting and strategy, the runs' per-seed
    results joined and aggregated again. ``ValueError`` naming the file and setting where a seed is in two runs
    or a run has no per-seed results."""
    if len(reports) == 1:
        return dict(reports[0][1])
    rows: dict[Setting, dict[str, Any]] = {}
    seeds: dict[tuple[Setting, str], dict[Any, str]] = {}
    for label, report in reports:
        for row in report["results"]:
            key = (str(row["benchmark"]), float(row["budget_fraction"]))
            pooled = rows.setdefault(key, {**row, "strategies": {}})
            if pooled.get("optimum") is None:
                pooled["optimum"] = row.get("optimum")
            for name, agg in (row.get("strategies") or {}).items():
                per_seed = agg.get("per_seed")
                if not per_seed:
                    raise ValueError(f"{label}: {name} on {key[0]} at {key[1]:g} has no per-seed results to pool")
                owners = seeds.setdefault((key, name), {})
                for number in (result.get("seed") for result in per_seed):
                    if number in owners:
                        raise ValueError(
                            f"{label}: seed {number} of {name} on {key[0]} at {key[1]:g} is also in {owners[number]}: "
                            "run one of them with other seeds (--first-seed)"
                        )
                    owners[number] = label
                pooled["strategies"].setdefault(name, []).extend(per_seed)
    for row in rows.values():
        row["strategies"] = {name: aggregate_seeds(per_seed) for name, per_seed in row["strategies"].items()}
    return {"meta": {"pooled": [label for label, _ in reports]}, "results": list(rows.values())}


def paired_regrets(report: Mapping[str, Any], strategy: str, label: str) -> dict[Setting, dict[str, Any]]:
    """(benchmark, budget fraction) -> the strategy's aggregate, for every setting with an optimum."""
    out: dict[Setting, dict[str, Any]] = {}
    seen: set[str] = set()
    for row in report["results"]:
        seen |= set(row.get("strategies", {}))
        if row.get("optimum") is None or strategy not in row.get("strategies", {}):
            continue
        agg = row["strategies"][strategy]
        if agg.get("regret_mean") is not None:
            out[(str(row["benchmark"]), float(row["budget_fraction"]))] = agg
    if not out:
        known = ", ".join(sorted(seen)) or "none"
        raise ValueError(f"{label}: no setting has results for strategy {strategy!r} (strategies there: {known})")
    return out


def seed_deltas(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[float]:
    """New minus base regret per study seed both aggregates ran (``per_seed``); empty where they share none."""

    def by_seed(agg: Mapping[str, Any]) -> dict[Any, float]:
        return {
            row.get("seed"): float(row["regret"])
            for row in agg.get("per_seed") or []
            if isinstance(row, Mapping) and row.get("regret") is not None
        }

    left, right = by_seed(base), by_seed(new)
    return [right[s] - left[s] for s in sorted(left.keys() & right.keys(), key=str)]


def compare(
    base: Mapping[str, Any],
    new: Mapping[str, Any],
    strategy: str = "insight",
    against: str | None = None,
    *,
    within: int = 10,
    margin: float = 0.5,
    resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """Pair the settings of two reports and compare ``strategy`` of ``new`` with ``against`` (default the same
    strategy) of ``base``. Regrets are in points (the reports' ``regret_mean``)."""
    against = against or strategy
    left = paired_regrets(base, against, "base")
    right = paired_regrets(new, strategy, "new")
    keys = sorted(left.keys() & right.keys())
    if not keys:
        raise ValueError("the two reports share no setting (benchmark and budget): compare runs of the same tasks")
    before = [float(left[k]["regret_mean"]) for k in keys]
    after = [float(right[k]["regret_mean"]) for k in keys]
    deltas = [b - a for a, b in zip(before, after, strict=True)]
    tasks: dict[str, list[list[float]]] = {}
    for key, delta in zip(keys, deltas, strict=True):
        tasks.setdefault(key[0], []).append(seed_deltas(left[key], right[key]) or [delta])
    clusters = list(tasks.values())
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn = [
            statistics.fmean(rng.choices(seeds, k=len(seeds))) if len(seeds) > 1 else seeds[0]
            for cluster in rng.choices(clusters, k=len(clusters))
            for seeds in cluster
        ]
        means.append(statistics.fmean(drawn))
    means.sort()
    low, high = means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]

    def fast(agg: Mapping[str, Any]) -> bool:
        trials = agg.get("median_trials_to_half_pt")
        return trials is not None and trials <= within

    return Comparison(
        base=against,
        new=strategy,
        settings=len(keys),
        unpaired=len(left.keys() ^ right.keys()),
        base_mean=statistics.fmean(before),
        new_mean=statistics.fmean(after),
        difference=statistics.fmean(deltas),
        low=low,
        high=high,
        won=sum(d < -margin for d in deltas),
        lost=sum(d > margin for d in deltas),
        base_within=sum(fast(left[k]) for k in keys),
        new_within=sum(fast(right[k]) for k in keys),
        base_worst=max(zip(before, keys, strict=True)),
        new_worst=max(zip(after, keys, strict=True)),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the bench report to compare against (several, comma-separated: pooled)")
    parser.add_argument("new", help="the bench report of the change (several, comma-separated: pooled)")
    parser.add_argument("--strategy", default="insight", help="the strategy compared (in the new report)")
    parser.add_argument("--against", default=None, help="the base report's strategy (default: the same)")
    parser.add_argument("--within", type=int, default=10, help="trials of the 'within 0.5 pt' count")
    parser.add_argument("--margin", type=float, default=0.5, help="points a setting must move by to count as won or lost")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = compare(
            pool_reports([(path, load_report(path)) for path in args.base.split(",")]),
            pool_reports([(path, load_report(path)) for path in args.new.split(",")]),
            args.strategy,
            args.against,
            within=args.within,
            margin=args.margin,
            resamples=args.resamples,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print("\n".join(result.lines(args.within, args.margin)))


if __name__ == "__main__":
    main()
