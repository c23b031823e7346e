"""``Environment.prefix_scores``: what an evaluation showed of its last stage's vote over fewer samples."""

from __future__ import annotations

import pytest

from executors.environment import Environment, last_stage_prefixes
from executors.replay import ReplayEnvironment
from executors.simulated import SimulatedEnvironment
from graphs.plan import Plan


def sim_plan(env: SimulatedEnvironment, last: dict[str, int], early_stop: int | None = None) -> Plan:
    stages = [{"stage": s, "nodes": [{"id": "n0", "model": "sim-8B", "n": 4}]} for s in env.info.stages[:-1]]
    nodes = [{"id": f"n{i}", "model": m, "n": n} for i, (m, n) in enumerate(last.items())]
    stages.append({"stage": env.info.stages[-1], "nodes": nodes, "early_stop": early_stop})
    return Plan.build(stages=stages)


@pytest.fixture(scope="module")
def sim() -> SimulatedEnvironment:
    return SimulatedEnvironment(stages=3, seed=4)


def test_each_power_of_two_below_the_count_scores_as_evaluating_that_plan_would(sim: SimulatedEnvironment) -> None:
    plan = sim_plan(sim, {"sim-3B": 16})
    scores = sim.prefix_scores(plan)
    assert sorted(scores) == [1, 2, 4, 8]
    for k, prefix in last_stage_prefixes(plan):
        assert prefix.stages[:-1] == plan.stages[:-1] and prefix.stages[-1].nodes[0].n == k
        assert prefix.plan_id != plan.plan_id
        assert scores[k] == sim.evaluate(prefix).score  # what a trial of the smaller plan will score, exactly


def test_replay_prefixes_are_the_first_samples_of_the_same_orderings() -> None:
    replay = ReplayEnvironment(benchmark="aime24", orderings=4, seed=0)
    plan = Plan.allocation({"answer": ("Qwen3-4B", 8)})
    scores = replay.prefix_scores(plan)
    assert sorted(scores) == [1, 2, 4]
    assert scores == {k: replay.evaluate(Plan.allocation({"answer": ("Qwen3-4B", k)})).score for k in (1, 2, 4)}


def test_no_prefix_where_the_vote_over_fewer_samples_is_not_a_prefix(sim: SimulatedEnvironment) -> None:
    assert sim.prefix_scores(sim_plan(sim, {"sim-3B": 8, "sim-8B": 2})) == {}, "a mixture's votes pool two models"
    assert sim.prefix_scores(sim_plan(sim, {"sim-3B": 8}, early_stop=3)) == {}, "an early stop is not a plain vote"
    assert sim.prefix_scores(sim_plan(sim, {"sim-3B": 1})) == {}, "nothing below one sample"


def test_an_environment_that_does_not_keep_samples_shows_nothing(sim: SimulatedEnvironment) -> None:
    class Forgetful(SimulatedEnvironment):
        votes_over_prefixes = False

    assert Environment.votes_over_prefixes is False
    forgetful = Forgetful(stages=3, seed=4)
    assert forgetful.prefix_scores(sim_plan(forgetful, {"sim-3B": 16})) == {}
