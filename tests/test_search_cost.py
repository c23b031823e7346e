"""Search cost with and without sample reuse: what a search generates versus what it asks for."""

from __future__ import annotations

import pytest

from executors.replay import ReplayEnvironment
from executors.simulated import SimulatedEnvironment
from graphs import Node, Plan, StageGraph


@pytest.fixture(scope="module")
def replay() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime24", orderings=2)


def test_replay_prefix_is_reused(replay: ReplayEnvironment) -> None:
    big = Plan.allocation({"answer": ("Qwen3-4B", 16)})
    small = Plan.allocation({"answer": ("Qwen3-4B", 8)})
    capped = Plan.allocation({"answer": ("Qwen3-4B", 8, 2000)})
    with_reuse, without = replay.search_cost([big, small, capped])
    # The 8-sample and the capped plans read samples the 16-sample plan generated.
    assert with_reuse.flops == pytest.approx(replay.estimate_cost(big).flops)
    assert without.flops == pytest.approx(sum(replay.estimate_cost(p).flops for p in (big, small, capped)))
    assert without.flops > with_reuse.flops


def test_replay_cap_then_longer_pays_only_the_extension(replay: ReplayEnvironment) -> None:
    capped = Plan.allocation({"answer": ("Qwen3-8B", 4, 2000)})
    full = Plan.allocation({"answer": ("Qwen3-8B", 4)})
    with_reuse, _ = replay.search_cost([capped, full])
    assert with_reuse.flops == pytest.approx(replay.estimate_cost(full).flops)
    assert replay.search_cost([capped])[0].flops == pytest.approx(replay.estimate_cost(capped).flops)


def test_replay_models_do_not_share(replay: ReplayEnvironment) -> None:
    a = Plan.allocation({"answer": ("Qwen3-4B", 4)})
    b = Plan.allocation({"answer": ("Qwen3-8B", 4)})
    mix = Plan.build(
        stages=[StageGraph(stage="answer", nodes=(Node(id="a", model="Qwen3-4B", n=2), Node(id="b", model="Qwen3-8B", n=2)))]
    )
    with_reuse, without = replay.search_cost([a, b, mix])
    prompt_once = replay.estimate_cost(a).flops + replay.estimate_cost(b).flops
    assert with_reuse.flops == pytest.approx(prompt_once)
    assert without.flops > with_reuse.flops


def test_simulated_reuse_follows_the_upstream() -> None:
    env = SimulatedEnvironment(stages=3)
    a = Plan.allocation({"stage1": ("sim-8B", 4), "stage2": ("sim-1B", 8), "stage3": ("sim-8B", 2)})
    b = Plan.allocation({"stage1": ("sim-8B", 4), "stage2": ("sim-1B", 16), "stage3": ("sim-8B", 2)})
    with_reuse, without = env.search_cost([a, b])
    # stage1 is shared, stage2 grows from 8 to 16, stage3 sees a new upstream and is paid twice.
    expected = (
        env.stage_cost("stage1", "sim-8B", 4).flops
        + env.stage_cost("stage2", "sim-1B", 16).flops
        + 2 * env.stage_cost("stage3", "sim-8B", 2).flops
    )
    assert with_reuse.flops == pytest.approx(expected)
    assert without.flops == pytest.approx(env.estimate_cost(a).flops + env.estimate_cost(b).flops)
    assert env.search_cost([a])[0].flops == pytest.approx(env.estimate_cost(a).flops)
