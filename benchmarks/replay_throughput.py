"""How many replay candidate evaluations per second: vectorised scorer vs the plain-Python reference.

Both score the same plans (drawn with a fixed seed from the full single-stage search space of the
bundled AIME sets: mixtures, caps, early stop) in the same run, on this machine. Prints a table.

    python benchmarks/replay_throughput.py [--plans 3000] [--reference-plans 150] [--orderings 8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from executors.replay import ReplayEnvironment
from executors.replay_reference import reference_score
from graphs.plan import Plan
from planner.space import SearchSpace


def family(plan: Plan) -> str:
    stage = plan.stages[0]
    kind = "mixture" if len(stage.nodes) > 1 else "single model"
    if stage.early_stop:
        kind += ", early stop"
    return kind


def rate(fn: Callable[[Plan], object], plans: list[Plan]) -> float:
    start = time.perf_counter()
    for plan in plans:
        fn(plan)
    return len(plans) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=3000)
    parser.add_argument("--reference-plans", type=int, default=150)
    parser.add_argument("--orderings", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    table = Table(title=f"Replay candidate evaluations per second ({args.orderings} orderings x 30 problems each)")
    for col in ("benchmark", "plans", "reference loop /s", "vectorised cold /s", "vectorised warm /s", "warm vs reference"):
        table.add_column(col, justify="right" if col not in ("benchmark", "plans") else "left")
    for benchmark in ("aime24", "aime25"):
        env = ReplayEnvironment(benchmark=benchmark, orderings=args.orderings, seed=args.seed)
        space = SearchSpace.from_info(env.info)
        everything = list(space.enumerate())
        rng = random.Random(args.seed)
        plans = rng.sample(everything, min(args.plans, len(everything)))
        reference_plans = plans[: args.reference_plans]
        ref = rate(lambda p, env=env: reference_score(env, p), reference_plans)
        cold = rate(env.evaluate, plans)  # includes building the per-(model, cap) caches
        warm_runs = [rate(env.evaluate, plans) for _ in range(3)]
        warm = statistics.median(warm_runs)
        table.add_row(
            benchmark,
            f"{len(plans)} of {len(everything)} (all families)",
            f"{ref:,.0f}",
            f"{cold:,.0f}",
            f"{warm:,.0f}",
            f"{warm / ref:,.0f}x",
        )
        by_family: dict[str, list[Plan]] = {}
        for plan in plans:
            by_family.setdefault(family(plan), []).append(plan)
        for name, group in sorted(by_family.items()):
            r = rate(lambda p, env=env: reference_score(env, p), group[: max(20, args.reference_plans // 4)])
            w = statistics.median(rate(env.evaluate, group) for _ in range(3))
            table.add_row(f"  {benchmark}", f"{len(group)} {name}", f"{r:,.0f}", "", f"{w:,.0f}", f"{w / r:,.0f}x")
        exhaustive_start = time.perf_counter()
        fresh = ReplayEnvironment(benchmark=benchmark, orderings=args.orderings, seed=args.seed)
        for plan in everything:
            fresh.evaluate(plan)
        seconds = time.perf_counter() - exhaustive_start
        table.add_row(
            f"  {benchmark}",
            f"exhaustive: all {len(everything)} plans from cold",
            "",
            f"{len(everything) / seconds:,.0f}",
            f"({seconds:.2f} s)",
            "",
        )
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
