"""Time of one planner step (propose one candidate, LLM latency excluded) per strategy.

Agents run with an instant scripted planner model that answers with valid JSON, so what is timed is the
agent's own work (prompt building, parsing, snapping, budget checks, graph updates) plus litellm's
dispatch; the scripted model's own time is zero. Prints a table: median, 90th percentile and max ms.

    python benchmarks/planner_step.py [--trials 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from rich.console import Console
from rich.table import Table

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    route = scripted_model("instant", instant_planner)
    table = Table(title="One planner step (propose one candidate, LLM latency excluded), ms")
    for col in ("task", "strategy", "steps", "median", "p90", "max"):
        table.add_column(col, justify="left" if col in ("task", "strategy") else "right")
    tasks = (("aime24 replay", ReplayEnvironment(benchmark="aime24")), ("3-stage simulated", SimulatedEnvironment(stages=3)))
    for task, env in tasks:
        space = SearchSpace.from_info(env.info)
        budget = Budget(limit=0.1 * most_expensive_single_model_cost(env, space, Budget(limit=1, unit="flops")), unit="flops")
        for name in STRATEGIES:
            clear_plan_cache()  # each strategy starts cold: no plans built by the one before
            strategy = make_strategy(name, 0, strategy_params(name, route, None))
            study = create_study(storage=InMemoryStorage(), environment=env, budget=budget, strategy=strategy, space=space)
            timed = TimedStudy(study.record, study.storage, env, strategy, space)
            timed.optimize(args.trials)
            ms = sorted(1000 * s for s in timed.steps)
            p90 = ms[int(0.9 * (len(ms) - 1))]
            table.add_row(task, name, str(len(ms)), f"{statistics.median(ms):.1f}", f"{p90:.1f}", f"{ms[-1]:.1f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
