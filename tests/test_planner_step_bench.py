"""benchmarks/planner_step.py: each repeat is a whole study from cold caches, timed once per proposed plan."""

from __future__ import annotations

from benchmark_scripts import load_script

from executors.simulated import SimulatedEnvironment
from graphs.cost import Budget
from planner.llm import scripted_model
from planner.report import most_expensive_single_model_cost
from planner.space import SearchSpace

planner_step = load_script("planner_step")


def test_a_study_is_timed_once_per_trial_and_repeats_time_the_same_work() -> None:
    env = SimulatedEnvironment(stages=2, seed=3)
    space = SearchSpace.from_info(env.info)
    budget = Budget(limit=0.1 * most_expensive_single_model_cost(env, space, Budget(limit=1, unit="flops")), unit="flops")
    route = scripted_model("instant-test", planner_step.instant_planner)
    first = planner_step._timed_steps(env, space, budget, "insight", route, 6)
    again = planner_step._timed_steps(env, space, budget, "insight", route, 6)
    assert len(first) == len(again) == 6  # one timing per proposed plan, each study starting over
    assert all(ms > 0 for ms in first + again)
