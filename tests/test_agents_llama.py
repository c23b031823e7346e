"""The planner agents with a real planner LLM: Gemma 3 270M on the local llama.cpp server.

The model is far too small to plan: it mostly echoes the prompt. These tests show the plumbing, not
quality: every planner question reaches the server through litellm (``hosted_vllm/gemma`` as for a vLLM
server, ``openai/gemma`` as for any OpenAI-compatible endpoint), its real token counts are stored with the
trials, every trial either comes from a parsed proposal or records the fallback and why, nothing over
budget is evaluated, and the study finishes. Each ``outcomes`` line is printed (``pytest -s``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from executors.replay import ReplayEnvironment
from graphs.cost import Budget, Cost
from graphs.plan import Role
from planner.agents.agent_reinforce import AgentReinforceStrategy
from planner.agents.agenttts import AgentTTSStrategy
from planner.llm import PlannerLLM
from planner.space import SearchSpace
from planner.storage import InMemoryStorage, get_storage
from planner.strategies._reinforce import GraphState
from planner.study import Study, create_study
from planner.trial import FrozenTrial, TrialState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODELS = ("Qwen3-0.6B", "Qwen3-1.7B")  # two models keep the prompts within a slot's 1024 tokens
BUDGET = Budget(limit=200)  # agenttts units: up to about 8 samples of the 1.7B model
PLANNER_TOKENS = 64  # the planner's output cap per call: a few seconds each on 2 cores


@pytest.fixture(scope="module")
def replay() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime24", orderings=2, seed=0)


@pytest.fixture(scope="module")
def space(replay: ReplayEnvironment) -> SearchSpace:
    return SearchSpace.from_info(replay.info, models=MODELS, caps=(None,))


def study_with(storage: Any, replay: ReplayEnvironment, space: SearchSpace, strategy: Any, name: str) -> Study:
    return create_study(storage=storage, environment=replay, budget=BUDGET, strategy=strategy, name=name, space=space)


def total(trials: list[FrozenTrial]) -> Cost:
    cost = Cost()
    for trial in trials:
        cost = cost + trial.planner_cost
    return cost


def assert_finished_within_budget(study: Study, n: int) -> None:
    trials = study.trials
    assert len(trials) == n and len(study.evaluated_trials) == n
    for trial in trials:
        assert trial.state is TrialState.COMPLETE, (trial.state, trial.error, trial.rationale)
        assert BUDGET.allows(study.environment.estimate_cost(trial.plan)), trial.plan.summary()
        assert BUDGET.allows(trial.estimated_cost)


def assert_errors_are_lines(trial: FrozenTrial) -> None:
    errors = trial.strategy_info.get("planner_errors", [])
    assert all(isinstance(e, str) and e and "\n" not in e and len(e) <= 300 for e in errors), errors


def test_agenttts_with_a_real_planner(llama: Any, replay: ReplayEnvironment, space: SearchSpace) -> None:
    # one attempt per question keeps it to two calls (re-asking: the Agent-REINFORCE test, and scripted planners);
    # a call takes a few seconds, but once took over the default 60 s with two benchmarks loading both cores
    strategy = AgentTTSStrategy(
        seed=0,
        planner_model="hosted_vllm/gemma",
        api_base=llama.api_base,
        max_attempts=1,
        max_tokens=PLANNER_TOKENS,
        timeout_s=120.0,
    )
    study = study_with(InMemoryStorage(), replay, space, strategy, "agenttts-llama")
    started = time.perf_counter()
    study.optimize(3)  # two probes (one per model), then a trial asked of the planner: guidelines, candidates
    seconds = time.perf_counter() - started
    assert_finished_within_budget(study, 3)
    trials = study.trials
    probes = [t for t in trials if "probe" in t.strategy_info]
    assert len(probes) == 2 and all(t.planner_cost == Cost() for t in probes)  # probing needs no planner
    usage = strategy.usage
    assert usage is not None and usage.attempts >= 2 and usage.prompt_tokens > 0 and usage.output_tokens > 0
    assert total(trials) == pytest.approx(usage.cost)  # every token the server counted is on a trial
    outcomes = []
    for trial in trials[2:]:
        info = trial.strategy_info
        assert_errors_are_lines(trial)
        if "queued_from_round" in info:  # a spare candidate of an earlier answer: billed with it
            assert "fallback" not in info and trial.rationale.startswith("planner: ")
            outcomes.append("parsed (queued)")
            continue
        # the planner was asked for this trial: guidelines, then candidates (each re-asked once at most)
        assert 1 <= info["planner_attempts"] <= 2
        assert trial.planner_cost.prompt_tokens > 0 and trial.planner_cost.output_tokens > 0
        assert trial.planner_cost.output_tokens <= info["planner_attempts"] * PLANNER_TOKENS  # the cap held
        if "fallback" in info:
            reason = info["fallback"]
            assert reason.startswith(("planner failed: ", "planner proposed")), reason
            assert trial.rationale.startswith(("fallback to insight heuristic: ", "fallback to random draw: "))
            assert reason in trial.rationale
            assert info["planner_errors"] or "discarded" in reason
            outcomes.append(f"fallback ({reason})")
        else:
            assert trial.rationale.startswith("planner: ") and info["candidate"]["stages"]
            outcomes.append("parsed" + (f", adjusted {info['adjusted']}" if info.get("adjusted") else ""))
    tokens = f"{usage.prompt_tokens}+{usage.output_tokens} tokens"
    print(f"\nagenttts, gemma-3-270m: {seconds:.1f} s, {usage.attempts} calls, {tokens}")
    for trial, outcome in zip(trials[2:], outcomes, strict=True):
        print(f"  trial {trial.number}: {outcome}")


def test_agent_reinforce_with_a_real_planner(
    llama: Any, replay: ReplayEnvironment, space: SearchSpace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-llama")  # openai/ routes need a key; llama.cpp takes any
    strategy = AgentReinforceStrategy(
        seed=0,
        planner_model="openai/gemma",
        api_base=llama.api_base,
        batch=2,
        iterations=1,
        max_attempts=2,
        max_tokens=PLANNER_TOKENS,
    )
    storage = get_storage(f"sqlite:///{tmp_path / 'agents.db'}")
    try:
        study = study_with(storage, replay, space, strategy, "reinforce-llama")
        started = time.perf_counter()
        study.optimize(5)  # select (planner), 2 pre-tests, 2 samples of the initial graph, update (planner), 1 sample
        seconds = time.perf_counter() - started
        assert_finished_within_budget(study, 5)
        trials = study.trials
        tags = [t.strategy_info["agent-reinforce"] for t in trials]
        assert [(tag["role"], tag["iteration"]) for tag in tags] == [("pretest", 0)] * 2 + [("sample", 1)] * 2 + [("sample", 2)]
        usage = strategy.usage
        assert usage is not None and usage.prompt_tokens > 0 and usage.output_tokens > 0
        assert total(trials) == pytest.approx(usage.cost)  # stored in SQL and read back, every token
        outcomes = []

        # (b) select: its call rides with the first pre-test
        first = trials[0]
        selection = tags[0]
        assert first.planner_cost.prompt_tokens > 0 and first.planner_cost.output_tokens > 0
        assert 1 <= first.strategy_info["planner_attempts"] <= 2
        assert_errors_are_lines(first)
        if selection["source"] == "planner":
            assert "fallback" not in first.strategy_info and "chosen by the planner" in first.rationale
            outcomes.append(f"select: parsed, picks {[p['stages'][0]['nodes'][0]['model'] for p in selection['chosen']]}")
        else:
            reason = first.strategy_info["fallback"]
            assert selection["source"] == "coverage" and reason.startswith("planner ")
            assert first.strategy_info["planner_errors"] and reason in first.rationale
            outcomes.append(f"select: fallback ({reason})")
        assert all(t.planner_cost == Cost() for t in trials[1:4])  # pre-test 2 and the first samples asked nothing

        # (e) update: its call rides with the first sample of version 2
        updated = trials[4]
        version = updated.strategy_info["graph_version"]
        update = version["definition"]["update"]
        assert updated.planner_cost.prompt_tokens > 0 and updated.planner_cost.output_tokens > 0
        assert 1 <= updated.strategy_info["planner_attempts"] <= 2
        assert_errors_are_lines(updated)
        if update["method"] == "planner":
            assert update["fallback"] is None and "by planner rewrite" in version["cause"]
            outcomes.append(f"update: parsed ({update['violation_count']} violations clipped)")
        else:
            assert update["fallback"] and update["fallback"] == updated.strategy_info["fallback"]
            assert f"numeric REINFORCE step ({update['fallback']})" in version["cause"]
            outcomes.append(f"update: fallback ({update['fallback']})")

        # every stored graph version is a valid, acyclic probabilistic graph, derived from the one before
        versions = storage.get_graph_versions("reinforce-llama")
        assert [v.version for v in versions] == [1, 2]
        assert versions[1].parent_id == versions[0].version_id and versions[1].cause == version["cause"]
        for stored in versions:
            state = GraphState.from_definition(stored.definition)  # validates every stage's graph
            for graph in state.graphs:
                position = {slot.id: i for i, slot in enumerate(graph.slots)}
                for edge in graph.edges:
                    assert position[edge.source] < position[edge.target]  # forward in slot order: acyclic
                assert {slot.model for slot in graph.slots} <= set(MODELS)
                assert any(slot.role is Role.SOLVER for slot in graph.slots)
        tokens = f"{usage.prompt_tokens}+{usage.output_tokens} tokens"
        print(f"\nagent-reinforce, gemma-3-270m: {seconds:.1f} s, {usage.attempts} calls, {tokens}")
        for line, trial in zip(outcomes, (first, updated), strict=True):
            print(f"  {line}; errors {trial.strategy_info['planner_errors']}")
    finally:
        storage.close()


class Anything(BaseModel):
    answer: str


def test_the_real_server_honours_the_timeout_and_the_token_cap(
    llama: Any, replay: ReplayEnvironment, space: SearchSpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-llama")
    cut = PlannerLLM("hosted_vllm/gemma", api_base=llama.api_base, max_tokens=4, max_attempts=1)
    answer, call = cut.ask_json([{"role": "user", "content": "Write a long poem about the sea."}], Anything)
    assert answer is None and call.output_tokens == 4 and call.prompt_tokens > 0  # the server's counts
    assert call.errors == ["no JSON object found in the reply (the reply was cut off at max_tokens=4)"]

    # 160 tokens take about 4 s here; before the fix the OpenAI client waited out the timeout three times
    slow = PlannerLLM("openai/gemma", api_base=llama.api_base, max_tokens=160, timeout_s=1.0, max_attempts=3)
    started = time.perf_counter()
    answer, call = slow.ask_json([{"role": "user", "content": "Tell a very long story about a dragon."}], Anything)
    assert answer is None and call.attempts == 1  # a timeout is not re-asked
    assert time.perf_counter() - started < 2.5  # one timeout, not three inside the client
    assert call.errors and call.errors[0].startswith("Timeout: no answer within 1 s")

    strategy = AgentTTSStrategy(seed=0, planner_model="hosted_vllm/gemma", api_base=llama.api_base, max_tokens=48, timeout_s=0.3)
    study = study_with(InMemoryStorage(), replay, space, strategy, "agenttts-timeout")
    study.optimize(3)
    assert_finished_within_budget(study, 3)
    planned = study.trials[2]
    assert planned.strategy_info["fallback"].startswith("planner failed: Timeout: no answer within 0.3 s")
    assert planned.strategy_info["planner_attempts"] == 1 and planned.planner_cost == Cost()  # no answer, no tokens
