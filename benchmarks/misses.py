"""Where a strategy's misses are: why it is not within half a point of the optimum by a given trial.

A mean regret says how far a search ends up, not what it failed to find. For every simulated setting (task x
budget) and study seed, this runs the strategy and sorts each setting not within 0.5 point of the exhaustive
optimum by trial ``--by`` (10: the issue's target) into one of four kinds, by what the trials up to then ran:

- ``counts``: the best plan so far runs the optimum's models on every stage, at other sample counts;
- ``lost``: a plan with the optimum's models on every stage ran, at other counts, and scored below the best;
- ``apart``: every stage's optimal models ran on that stage, but never all in one plan;
- ``unseen``: some stage's optimal models never ran on it (the probes or the search never got there).

Usage: ``python benchmarks/misses.py [--strategy insight] [--simulated-seeds 0-29] [--budget 0.02 ...] [--by 10]
[--trials 20] [--seeds 1] [--first-seed 0] [--list]``. It prints a table (kinds by budget and by stage count)
and, with ``--list``, one line per miss: the optimum, the best plan by then and how far it is.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from executors.simulated import SimulatedEnvironment
from graphs.cost import Budget
from graphs.plan import Plan
from planner.bench import UNIT, find_optimum
from planner.report import most_expensive_single_model_cost
from planner.space import SearchSpace
from planner.storage import InMemoryStorage
from planner.strategies import make_strategy, strategy_params
from planner.study import create_study
from planner.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))  # heldout.py beside this script, however it is loaded
from heldout import simulated_tasks

KINDS = ("reached", "counts", "lost", "apart", "unseen")
BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.5)
HALF_POINT = 0.005


def models(plan: Plan) -> tuple[frozenset[str], ...]:
    """The models each stage runs, counts aside."""
    return tuple(frozenset(node.model for node in stage.nodes) for stage in plan.stages)


def classify(optimum: Plan, optimum_score: float, ran: Sequence[tuple[Plan, float]]) -> str:
    """The kind (``KINDS``) of the trials ``ran`` (plan, true score, in order) against the optimum."""
    if not ran:
        return "unseen"
    best, best_score = max(ran, key=lambda item: item[1])
    if best_score >= optimum_score - HALF_POINT - 1e-9:
        return "reached"
    wanted = models(optimum)
    if models(best) == wanted:
        return "counts"
    if any(models(plan) == wanted for plan, _ in ran):
        return "lost"
    every_stage_seen = all(any(want <= models(plan)[i] for plan, _ in ran) for i, want in enumerate(wanted))
    return "apart" if every_stage_seen else "unseen"


@dataclass(frozen=True)
class Miss:
    task: str
    stages: int
    budget: float
    seed: int
    kind: str
    optimum: str
    best: str
    regret: float
    """Points below the optimum by trial ``by``."""


def run(
    strategy: str, tasks: Sequence[tuple[int, int]], budgets: Sequence[float], seeds: Sequence[int], trials: int, by: int
) -> list[Miss]:
    """One study per task, budget and seed; every outcome, ``reached`` ones included."""
    out: list[Miss] = []
    for stages, task_seed in tasks:
        task = SimulatedEnvironment(stages=stages, seed=task_seed)
        space = SearchSpace.from_info(task.info)
        scale = most_expensive_single_model_cost(task, space, Budget(limit=1.0, unit=UNIT))
        for fraction in budgets:
            budget = Budget(limit=fraction * scale, unit=UNIT)
            optimum = find_optimum(task, space, budget)
            for seed in seeds:
                env = task.with_evaluation_seed(seed)
                storage = InMemoryStorage()
                study = create_study(
                    storage=storage,
                    environment=env,
                    budget=budget,
                    strategy=make_strategy(strategy, seed, strategy_params(strategy, None, None)),
                    seed=seed,
                    name=f"misses-{strategy}-{seed}",
                    space=space,
                )
                study.optimize(trials)
                evaluated = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)][:by]
                ran = [(t.plan, task.true_score(t.plan)) for t in evaluated if t.state is TrialState.COMPLETE]
                kind = classify(optimum.plan, optimum.score, ran)
                best_plan, best_score = max(ran, key=lambda item: item[1]) if ran else (None, 0.0)
                out.append(
                    Miss(
                        task.info.name,
                        stages,
                        fraction,
                        seed,
                        kind,
                        optimum.plan.summary(),
                        "-" if best_plan is None else best_plan.summary(),
                        100.0 * (optimum.score - best_score),
                    )
                )
    return out


def table(outcomes: Sequence[Miss]) -> list[str]:
    """Counts of each kind by budget, by stage count and in all."""
    lines = ["| group | settings | " + " | ".join(KINDS) + " |", "|---" * (2 + len(KINDS)) + "|"]
    groups: list[tuple[str, list[Miss]]] = [(f"{100 * b:g}%", [m for m in outcomes if m.budget == b]) for b in BUDGETS]
    groups = [g for g in groups if g[1]]
    groups += [(f"{s} stages", [m for m in outcomes if m.stages == s]) for s in sorted({m.stages for m in outcomes})]
    groups.append(("all", list(outcomes)))
    for name, members in groups:
        counts = Counter(m.kind for m in members)
        lines.append(f"| {name} | {len(members)} | " + " | ".join(str(counts[k]) for k in KINDS) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="insight")
    parser.add_argument("--simulated-seeds", default="0-29", help="simulated tasks of these seeds (2 + seed %% 3 stages)")
    parser.add_argument("--budget", type=float, action="append", help="fraction of the costliest single-model plan")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--by", type=int, default=10, help="the trial by which a setting should be within 0.5 point")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="also print one line per miss")
    args = parser.parse_args(argv)
    try:
        tasks = simulated_tasks(args.simulated_seeds)
    except ValueError as exc:
        parser.error(str(exc))
    if args.by < 1 or args.trials < args.by or args.seeds < 1:
        parser.error("need 1 <= --by <= --trials and --seeds >= 1")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    outcomes = run(args.strategy, tasks, args.budget or BUDGETS, seeds, args.trials, args.by)
    print(f"{args.strategy}: by trial {args.by} of {args.trials}, {len(seeds)} study seed(s); kinds: see the module docstring")
    print("\n".join(table(outcomes)))
    if args.list:
        for m in outcomes:
            if m.kind != "reached":
                where = f"{m.task} {100 * m.budget:g}% seed {m.seed}"
                print(f"{where}: {m.kind}, {m.regret:.1f} pt | optimum {m.optimum} | best {m.best}")


if __name__ == "__main__":
    main()
