"""The accounting behind benchmarks/sample_reuse.py, on the qa_chain task with a mock model (no server).

The benchmark claims two figures: what a study generated with the sample store, and what its evaluations
would have generated without it. These tests check the claims it rests on: a plan evaluated again
generates nothing, a small study generates less than its evaluations cost in full, and every account of
the generated tokens (environment, sample store, a counter at the backend) agrees, or ``verify`` fails.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from benchmark_scripts import load_script

from executors.backends import CompletionRequest, MockBackend
from executors.live import LiveEnvironment
from executors.llama_server import GEMMA_SPEC
from executors.sample_store import CachedBackend, SampleStore
from graphs.cost import Cost
from graphs.plan import Plan
from planner.storage import InMemoryStorage

bench = load_script("sample_reuse")


def answers(request: CompletionRequest) -> list[str]:
    """Deterministic per sample index, different across indices, readable by every stage's parser."""
    return [f"Paris {'is it ' * ((request.offset + i) % 3)}\nAnswer: Paris\nFinal answer: Paris" for i in range(request.n)]


def environment() -> tuple[LiveEnvironment, CachedBackend, object]:
    counter = bench.CountingBackend(MockBackend(answers))
    cached = CachedBackend(counter, SampleStore(), catalog={"gemma": GEMMA_SPEC})
    env = LiveEnvironment(bench.QA_CHAIN / "task.yaml", {"gemma": GEMMA_SPEC}, cached, max_samples=8, limit=3)
    return env, cached, counter


def test_a_plan_evaluated_again_generates_nothing() -> None:
    env, _cached, counter = environment()
    plan = Plan.allocation({"decompose": ("gemma", 1), "answer": ("gemma", 4), "verify": ("gemma", 2)})
    env.evaluate(plan)
    first_calls, first_cost = counter.calls, counter.cost  # type: ignore[attr-defined]
    assert first_calls > 0 and first_cost.output_tokens > 0
    env.evaluate(plan)
    assert counter.calls == first_calls  # type: ignore[attr-defined]
    assert counter.cost == first_cost  # type: ignore[attr-defined]
    with_reuse, without = env.search_cost([plan, plan])
    n = len(env.examples)
    assert with_reuse.scaled(n).output_tokens == pytest.approx(first_cost.output_tokens)
    assert without.output_tokens == pytest.approx(2 * with_reuse.output_tokens)


def test_a_small_study_generates_less_than_its_evaluations_cost_and_every_account_agrees() -> None:
    env, cached, counter = environment()
    space, budget = bench.space_and_budget(env, 32, 0.5)
    study, walls = bench.run_study(env, InMemoryStorage(), trials=8, seed=0, strategy="insight", space=space, budget=budget)
    figures = bench.measure(env, study, counter, cached, walls, wall_s=0.0)
    bench.verify(figures)
    assert len(figures.trials) == 8 == len(walls)
    assert 0 < figures.with_reuse.output_tokens < figures.without_reuse.output_tokens
    assert figures.counted.output_tokens == pytest.approx(figures.with_reuse.output_tokens)
    assert figures.store_reused_samples > 0
    assert 0 < figures.saved_fraction < 1
    # the first trial had nothing to reuse; a later one reused what an earlier plan generated
    assert figures.trials[0].paid == figures.trials[0].cost
    assert any(t.paid.output_tokens < t.cost.output_tokens for t in figures.trials[1:])


def test_verify_rejects_accounts_that_disagree() -> None:
    env, cached, counter = environment()
    space, budget = bench.space_and_budget(env, 32, 0.5)
    study, walls = bench.run_study(env, InMemoryStorage(), trials=3, seed=0, strategy="insight", space=space, budget=budget)
    figures = bench.measure(env, study, counter, cached, walls, wall_s=0.0)
    bench.verify(figures)
    with pytest.raises(AssertionError, match="counter"):
        bench.verify(replace(figures, counted=figures.counted + Cost(output_tokens=1)))
    with pytest.raises(AssertionError, match="without reuse"):
        bench.verify(replace(figures, without_reuse=figures.with_reuse))
