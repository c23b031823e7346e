"""Time of one planner step (propose one candidate, LLM latency excluded) per strategy.

Agents run with an instant scripted planner model that answers with valid JSON, so what is timed is the
agent's own work (prompt building, parsing, snapping, budget checks, graph updates) plus litellm's
dispatch; the scripted model's own time is zero. Prints a table: median, 90th percentile and max ms over
every step of ``--repeats`` studies per strategy (each from cold caches), and the lowest and highest of the
studies' own medians: one 30-step study's median moved by 2x between runs on a shared 2-core VM, so a change is
judged by the pooled median and the spread beside it, not by one study.

    python benchmarks/planner_step.py [--trials 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from rich.console import Console
from rich.table import Table

from executors.environment import Environment
from executors.replay import ReplayEnvironment
from executors.simulated import SimulatedEnvironment
from graphs.cost import Budget
from planner.llm import scripted_model
from planner.report import most_expensive_single_model_cost
from planner.space import SearchSpace, clear_plan_cache
from planner.storage import InMemoryStorage
from planner.strategies import STRATEGIES, make_strategy, strategy_params
from planner.study import Study, create_study


def instant_planner(messages: list[dict[str, str]]) -> str:
    """Valid but uninformed answers: guidelines, an empty candidate list, an empty selection."""
    text = messages[-1]["content"].lower()
    if "guideline" in text:
        return json.dumps({"guidelines": ["probe first", "grow the best model"]})
    return json.dumps({"candidates": [], "choices": [], "selected": [], "graphs": []})


class TimedStudy(Study):
    """Times every ``strategy.propose`` call, per proposed plan."""

    steps: list[float]

    def optimize(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        propose = self.strategy.propose
        self.steps = []

        def timed(context, n):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            out = propose(context, n)
            if out:
                self.steps.append((time.perf_counter() - start) / len(out))
            return out

        self.strategy.propose = timed  # type: ignore[method-assign]
        return super().optimize(*args, **kwargs)


def _timed_steps(env: Environment, space: SearchSpace, budget: Budget, name: str, route: str, trials: int) -> list[float]:
    """One study of ``trials`` trials from cold caches (no plans built by an earlier study): each step's ms."""
    clear_plan_cache()
    strategy = make_strategy(name, 0, strategy_params(name, route, None))
    study = create_study(storage=InMemoryStorage(), environment=env, budget=budget, strategy=strategy, space=space)
    timed = TimedStudy(study.record, study.storage, env, strategy, space)
    timed.optimize(trials)
    return [1000 * s for s in timed.steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="studies per strategy, each from cold caches")
    args = parser.parse_args()
    if args.trials < 1 or args.repeats < 1:
        parser.error("--trials and --repeats must be at least 1")
    route = scripted_model("instant", instant_planner)
    table = Table(title="One planner step (propose one candidate, LLM latency excluded), ms")
    for col in ("task", "strategy", "steps", "median", "p90", "max", "study medians"):
        table.add_column(col, justify="left" if col in ("task", "strategy") else "right")
    tasks = (("aime24 replay", ReplayEnvironment(benchmark="aime24")), ("3-stage simulated", SimulatedEnvironment(stages=3)))
    for task, env in tasks:
        space = SearchSpace.from_info(env.info)
        budget = Budget(limit=0.1 * most_expensive_single_model_cost(env, space, Budget(limit=1, unit="flops")), unit="flops")
        for name in STRATEGIES:
            ms: list[float] = []
            medians: list[float] = []
            for _ in range(args.repeats):
                steps = _timed_steps(env, space, budget, name, route, args.trials)
                ms += steps
                medians.append(statistics.median(steps))
            ms.sort()
            p90 = ms[int(0.9 * (len(ms) - 1))]
            spread = f"{min(medians):.1f}-{max(medians):.1f}"
            table.add_row(task, name, str(len(ms)), f"{statistics.median(ms):.1f}", f"{p90:.1f}", f"{ms[-1]:.1f}", spread)
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
