"""The AgentTTS agent: probes, guidelines and JSON candidates from scripted planners through litellm."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from executors.replay import ReplayEnvironment
from executors.simulated import SimulatedEnvironment
from graphs.cost import Budget, Cost
from planner.agents.agenttts import AgentTTSStrategy
from planner.llm import scripted_model
from planner.space import SearchSpace
from planner.storage import InMemoryStorage
from planner.strategies import STRATEGIES
from planner.study import Study, create_study, load_study
from planner.trial import FrozenTrial, TrialState

SIM_BUDGET = Budget(limit=300)
REPLAY_BUDGET = Budget(limit=500)
SIM_MODELS = ("sim-1B", "sim-3B", "sim-8B", "sim-70B")
REPLAY_MODELS = ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")
SIM_PROBES = 1 + 3
"""The all-default plan (each stage's cheapest model) and each stage's costliest model: on a multi-stage task the
middle models are not probed (``probes_every_model``)."""
SIM_PROBED_PAIRS = 3 + 3
GUIDELINES = ["stage3 wants a large model", "stage1 and stage2 do well with small models sampled a few times"]
Messages = list[dict[str, str]]


@pytest.fixture(scope="module")
def sim() -> SimulatedEnvironment:
    return SimulatedEnvironment(stages=3, seed=0)


@pytest.fixture(scope="module")
def replay() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime24", orderings=2, seed=0)


@pytest.fixture(scope="module")
def replay_space(replay: ReplayEnvironment) -> SearchSpace:
    return SearchSpace.from_info(replay.info, caps=(None, 2000, 8000))


@pytest.fixture(scope="module")
def sim_allocations(sim: SimulatedEnvironment) -> list[tuple[tuple[str, int], ...]]:
    """Distinct, non-probe allocations within the budget, in a fixed order: what the good planner proposes."""
    options = [(m, n) for m in SIM_MODELS[:3] for n in (2, 4, 8, 16)]
    out = []
    for combo in itertools.product(options, repeat=3):
        cost = sum(SIM_BUDGET.spent(sim.stage_cost(f"stage{i + 1}", m, n)) for i, (m, n) in enumerate(combo))
        if cost <= 0.9 * SIM_BUDGET.limit:
            out.append(combo)
    return out[::7]


def asks_guidelines(messages: Messages) -> bool:
    return '{"guidelines"' in messages[1]["content"]


def trials_so_far(messages: Messages) -> int:
    return int(re.search(r"Trials so far: (\d+)", messages[1]["content"]).group(1))


def candidates_json(allocations: list[tuple[tuple[str, int], ...]], start: int, k: int = 3) -> str:
    chosen = [allocations[(start + i) % len(allocations)] for i in range(k)]
    return json.dumps(
        {
            "candidates": [
                {
                    "stages": {f"stage{i + 1}": {"samples": [{"model": m, "n": n}]} for i, (m, n) in enumerate(combo)},
                    "reason": f"allocation {start + j}",
                }
                for j, combo in enumerate(chosen)
            ]
        }
    )


def good_planner(name: str, allocations, calls: list[Messages] | None = None) -> str:
    """A planner answering valid JSON: fresh in-budget allocations that depend only on the trials so far."""

    def script(messages: Messages) -> str:
        if calls is not None:
            calls.append(messages)
        if asks_guidelines(messages):
            return json.dumps({"guidelines": GUIDELINES})
        return candidates_json(allocations, 3 * trials_so_far(messages))

    return scripted_model(name, script)


def new_study(env, strategy, *, storage=None, name="agent", budget=None, space=None) -> Study:
    budget = budget or (SIM_BUDGET if isinstance(env, SimulatedEnvironment) else REPLAY_BUDGET)
    return create_study(
        storage=storage or InMemoryStorage(), environment=env, budget=budget, strategy=strategy, name=name, space=space
    )


def reload(name: str, storage: InMemoryStorage, env) -> Study:
    """Resume like ``load_study``: a new strategy from the stored name, seed and params."""
    if "agenttts" in STRATEGIES:
        return load_study(name, storage, environment=env)
    record = storage.get_study_by_name(name)
    strategy = AgentTTSStrategy(seed=record.seed, **record.strategy_params)
    return Study(record, storage, env, strategy, SearchSpace.from_spec(record.space))


def is_probe(trial: FrozenTrial) -> bool:
    return "probe" in trial.strategy_info


def covered(trials: list[FrozenTrial]) -> list[tuple[str, str]]:
    return [tuple(pair) for t in trials if is_probe(t) for pair in t.strategy_info["probe"]]


def assert_within_budget(study: Study) -> None:
    for trial in study.trials:
        assert trial.state is not TrialState.REJECTED, trial.rationale  # the agent filters before proposing
        if trial.state is TrialState.COMPLETE:
            assert study.budget.allows(study.environment.estimate_cost(trial.plan)), trial.plan.summary()


# -- probes (insight 1) ---------------------------------------------------------------------------------


def test_probes_come_first_and_cover_each_stages_cheapest_and_costliest_model(sim, sim_allocations) -> None:
    calls: list[Messages] = []
    study = new_study(sim, AgentTTSStrategy(seed=0, planner_model=good_planner("probe-count", sim_allocations, calls)))
    study.optimize(SIM_PROBES)
    trials = study.trials
    assert len(trials) == SIM_PROBES
    assert all(is_probe(t) and t.state is TrialState.COMPLETE for t in trials)
    assert calls == []  # probes need no planner
    assert all(t.planner_cost == Cost() and t.strategy_info["planner_attempts"] == 0 for t in trials)
    pairs = covered(trials)
    assert len(pairs) == len(set(pairs)) == SIM_PROBED_PAIRS  # each pair at most once
    cheapest = {stage: min(SIM_MODELS, key=lambda m, s=stage: sim.stage_cost(s, m, 1).flops) for stage in sim.stage_names}
    costliest = {stage: max(SIM_MODELS, key=lambda m, s=stage: sim.stage_cost(s, m, 1).flops) for stage in sim.stage_names}
    for stage in sim.stage_names:  # a multi-stage task: the ends only, the middle models are left to the search
        assert {m for s, m in pairs if s == stage} == {cheapest[stage], costliest[stage]}
    for trial in trials:
        probed = {stage for stage, _ in trial.strategy_info["probe"]}
        for graph in trial.plan.stages:
            (node,) = graph.nodes
            assert node.n == 1 and node.max_tokens is None
            if graph.stage not in probed:  # other stages stay at the cheap default
                assert node.model == cheapest[graph.stage]
    study.optimize(1)
    assert len(calls) == 2  # one guidelines question, one candidate batch
    assert not is_probe(study.trials[-1])
    table = "\n".join(m["content"] for m in calls[0])  # the planner is told which models were left unprobed
    assert table.count("not probed (multi-stage task") == len(sim.stage_names) * (len(SIM_MODELS) - 2)


def test_probes_on_replay(replay, replay_space) -> None:
    study = new_study(replay, AgentTTSStrategy(seed=0), space=replay_space)
    study.optimize(6)
    trials = study.trials
    assert sorted(t.plan.summary() for t in trials[:4]) == sorted(f"answer: {m}x1" for m in REPLAY_MODELS)
    assert sorted(covered(trials)) == sorted(("answer", m) for m in REPLAY_MODELS)
    assert not any(is_probe(t) for t in trials[4:])


# -- a planner that answers well ------------------------------------------------------------------------


def test_good_planner_candidates_are_evaluated_with_rationale_and_cost(sim, sim_allocations) -> None:
    calls: list[Messages] = []
    strategy = AgentTTSStrategy(seed=0, planner_model=good_planner("good", sim_allocations, calls))
    study = new_study(sim, strategy)
    study.optimize(SIM_PROBES + 9)
    planned = study.trials[SIM_PROBES:]
    assert len(planned) == 9
    assert len(calls) == 2 * 3  # batch=3: one round (guidelines + candidates) serves three trials
    for trial in planned:
        assert trial.state is TrialState.COMPLETE
        assert "fallback" not in trial.strategy_info
        assert trial.rationale.startswith("planner: allocation ")
        assert "guidelines: " + " / ".join(GUIDELINES) in trial.rationale
        assert trial.strategy_info["guidelines"] == GUIDELINES
        assert trial.strategy_info["reason"].startswith("allocation ")
    first_of_round = [t for t in planned if "queued_from_round" not in t.strategy_info]
    assert len(first_of_round) == 3
    for trial in first_of_round:
        assert trial.planner_cost.prompt_tokens > 0 and trial.planner_cost.output_tokens > 0
        assert trial.strategy_info["planner_attempts"] == 2
        assert trial.strategy_info["planner_errors"] == []
    for trial in planned:
        if trial not in first_of_round:
            assert trial.planner_cost == Cost()  # billed with the call that made it
    usage = strategy.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert sum(t.planner_cost.prompt_tokens for t in study.trials) == pytest.approx(usage.prompt_tokens)
    assert sum(t.planner_cost.output_tokens for t in study.trials) == pytest.approx(usage.output_tokens)
    assert_within_budget(study)

    prompt = calls[-1][1]["content"]
    for text in ("stage1 -> stage2 -> stage3", "sim-70B (70.6B parameters)", "1, 2, 4, 8, 16, 32, 64", "300 agenttts units"):
        assert text in prompt
    assert "cap must be null" in prompt and "early_stop must be null" in prompt
    assert "JSON only" in prompt and '"candidates"' in prompt
    assert "stage3 | sim-70B |" in prompt  # the probe table: score and cost of every (stage, model)
    assert f"Trials so far: {SIM_PROBES + 6}" in prompt
    assert "- " + GUIDELINES[0] in prompt
    assert calls[-1][0]["role"] == "system" and "JSON only" in calls[-1][0]["content"]


def test_batches_split_the_round_cost(sim, sim_allocations) -> None:
    calls: list[Messages] = []
    study = new_study(sim, AgentTTSStrategy(seed=0, planner_model=good_planner("split", sim_allocations, calls)))
    study.optimize(SIM_PROBES)
    study.optimize(3, batch_size=3)
    batch = study.trials[SIM_PROBES:]
    assert len(batch) == 3 and len(calls) == 2
    costs = {t.planner_cost for t in batch}
    assert len(costs) == 1  # an even split
    share = costs.pop()
    assert share.tokens > 0
    assert 3 * share.prompt_tokens == pytest.approx(study.strategy.usage.prompt_tokens)


# -- planners that answer badly -------------------------------------------------------------------------


def test_garbage_then_valid_json_is_repaired_by_reasking(sim, sim_allocations) -> None:
    def script(messages: Messages) -> str:
        if len(messages) == 2:  # the first attempt of every question
            return "Let me think about the allocation... stage1 should get the 8B model."
        if asks_guidelines(messages):
            return json.dumps({"guidelines": GUIDELINES})
        return candidates_json(sim_allocations, 3 * trials_so_far(messages))

    study = new_study(sim, AgentTTSStrategy(seed=0, planner_model=scripted_model("reask", script)))
    study.optimize(SIM_PROBES + 3)
    planned = study.trials[SIM_PROBES:]
    assert all("fallback" not in t.strategy_info and t.rationale.startswith("planner: ") for t in planned)
    first = planned[0].strategy_info
    assert first["planner_attempts"] == 4  # two questions, each re-asked once
    assert len(first["planner_errors"]) == 2
    assert planned[0].planner_cost.prompt_tokens > 0


def test_garbage_always_falls_back_to_the_heuristic(sim) -> None:
    route = scripted_model("garbage", lambda messages: "I would use the biggest model everywhere, obviously.")
    study = new_study(sim, AgentTTSStrategy(seed=0, planner_model=route, max_attempts=2))
    study.optimize(SIM_PROBES + 4)
    assert len(study.evaluated_trials) == SIM_PROBES + 4  # the study completes its trials
    planned = study.trials[SIM_PROBES:]
    for trial in planned:
        assert trial.state is TrialState.COMPLETE
        reason = trial.strategy_info["fallback"]
        assert reason.startswith("planner failed: ")
        assert trial.rationale.startswith(f"fallback to insight heuristic: {reason}")
        assert trial.strategy_info["planner_attempts"] == 4  # both questions, max_attempts each
        assert trial.strategy_info["planner_errors"]
        assert trial.planner_cost.prompt_tokens > 0  # failed calls cost tokens too, and are counted
    assert not any(is_probe(t) for t in planned)  # the heuristic does not probe again
    assert len({t.plan_id for t in study.trials}) == len(study.trials)
    assert_within_budget(study)


def test_unreachable_planner_is_asked_once_per_round(sim) -> None:
    def down(messages: Messages) -> str:
        raise ConnectionError("planner endpoint is down")

    study = new_study(sim, AgentTTSStrategy(seed=0, planner_model=scripted_model("down", down)))
    study.optimize(SIM_PROBES + 2)
    for trial in study.trials[SIM_PROBES:]:
        assert trial.strategy_info["fallback"].startswith("planner failed: ")
        assert trial.strategy_info["planner_attempts"] == 1  # no re-asks, no candidate question
        assert trial.planner_cost == Cost()


def test_over_budget_and_unknown_plans_are_never_evaluated(sim) -> None:
    bad = [
        {"stages": {s: {"samples": [{"model": "sim-70B", "n": 64}]} for s in sim.stage_names}, "reason": "spend it all"},
        {"stages": {s: [{"model": "gpt-7", "n": 2}] for s in sim.stage_names}, "reason": "a model we do not have"},
        {"stages": {"stage1": {"model": "sim-1B", "n": 2}, "stage9": {"model": "sim-1B", "n": 2}}, "reason": "wrong stage"},
    ]

    def script(messages: Messages) -> str:
        if asks_guidelines(messages):
            return json.dumps({"guidelines": GUIDELINES})
        return json.dumps({"candidates": bad})

    study = new_study(sim, AgentTTSStrategy(seed=0, planner_model=scripted_model("overspend", script)))
    study.optimize(SIM_PROBES + 3)
    assert_within_budget(study)
    models = {node.model for t in study.trials for stage in t.plan.stages for node in stage.nodes}
    assert "gpt-7" not in models
    assert not any(all(n.model == "sim-70B" and n.n == 64 for s in t.plan.stages for n in s.nodes) for t in study.trials)
    for trial in study.trials[SIM_PROBES:]:
        reason = trial.strategy_info["fallback"]
        assert "over budget x1" in reason and "unknown model x1" in reason and "unknown stage x1" in reason
        discarded = trial.strategy_info["discarded"]
        assert len(discarded) == 3 and "gpt-7" in discarded[1]
        assert trial.rationale.startswith("fallback to insight heuristic: planner proposed no valid new plan")


def test_partly_valid_batch_is_filled_by_the_heuristic(sim, sim_allocations) -> None:
    good = json.loads(candidates_json(sim_allocations, 0, k=1))["candidates"]
    unknown = {"stages": {s: {"model": "sim-405B", "n": 1} for s in sim.stage_names}, "reason": "too big to exist"}

    def script(messages: Messages) -> str:
        if asks_guidelines(messages):
            return json.dumps({"guidelines": GUIDELINES})
        return json.dumps({"candidates": [*good, unknown]})

    study = new_study(sim, AgentTTSStrategy(seed=0, planner_model=scripted_model("partly", script)))
    study.optimize(SIM_PROBES)
    study.optimize(3, batch_size=3)
    batch = study.trials[SIM_PROBES:]
    assert [("fallback" in t.strategy_info) for t in batch] == [False, True, True]
    assert batch[0].rationale == f"planner: allocation 0 | guidelines: {' / '.join(GUIDELINES)}"
    assert "only 1 valid new plan(s) of 3 needed" in batch[1].strategy_info["fallback"]
    assert len({t.planner_cost for t in batch}) == 1 and batch[0].planner_cost.tokens > 0


def test_candidates_snap_to_the_space(replay, replay_space) -> None:
    mixture = {
        "stages": {"answer": {"samples": [{"model": "Qwen3-1.7B", "n": 5}, {"model": "Qwen3-4B", "n": 3}], "cap": 3000}},
        "reason": "a capped mixture",
    }
    mixture["stages"]["answer"]["early_stop"] = 2
    three = {"stages": {"answer": [{"model": m, "n": 1} for m in REPLAY_MODELS[:3]]}, "reason": "three models"}

    def script(messages: Messages) -> str:
        if asks_guidelines(messages):
            return "```json\n" + json.dumps({"guidelines": GUIDELINES})[:-2] + ",]}\n```"  # fenced, trailing comma
        return json.dumps({"candidates": [mixture, three]})

    study = new_study(replay, AgentTTSStrategy(seed=0, planner_model=scripted_model("snap", script)), space=replay_space)
    study.optimize(5)
    trial = study.trials[4]
    assert trial.plan.summary() == "answer: Qwen3-1.7Bx4@2000+Qwen3-4Bx4@2000 (stop@2 agree)"
    assert trial.strategy_info["adjusted"] == [
        "answer: Qwen3-1.7B n 5 -> 4",
        "answer: Qwen3-4B n 3 -> 4",
        "answer: cap 3000 -> 2000",
    ]
    assert trial.strategy_info["guidelines"] == GUIDELINES  # the repaired guidelines
    assert trial.strategy_info["discarded"] == ["candidate 2: too many models (stage 'answer' mixes 3, at most 2)"]
    assert_within_budget(study)


# -- no planner -------------------------------------------------------------------------------------------


def test_without_a_planner_model_it_runs_on_the_heuristic(sim) -> None:
    strategy = AgentTTSStrategy(seed=0)
    assert strategy.usage is None
    study = new_study(sim, strategy)
    study.optimize(SIM_PROBES + 5)
    assert len(study.evaluated_trials) == SIM_PROBES + 5
    assert all(is_probe(t) for t in study.trials[:SIM_PROBES])
    for trial in study.trials[SIM_PROBES:]:
        assert trial.strategy_info["fallback"] == "no planner model configured"
        assert trial.rationale.startswith("fallback to insight heuristic: no planner model configured")
        assert trial.strategy_info["planner_attempts"] == 0
    assert all(t.planner_cost == Cost() for t in study.trials)
    assert_within_budget(study)


# -- resume and reproducibility ---------------------------------------------------------------------------


def test_resume_does_not_probe_again(sim, sim_allocations) -> None:
    calls: list[Messages] = []
    route = good_planner("resume-sim", sim_allocations, calls)
    storage = InMemoryStorage()
    new_study(sim, AgentTTSStrategy(seed=4, planner_model=route), storage=storage, name="half").optimize(3)
    resumed = reload("half", storage, sim)
    assert isinstance(resumed.strategy, AgentTTSStrategy)
    assert resumed.strategy.params() == {
        "planner_model": route,
        "api_base": None,
        "batch": 3,
        "max_attempts": 3,
        "max_tokens": 2048,
        "timeout_s": 60.0,
    }
    assert resumed.strategy.seed == 4
    resumed.optimize(SIM_PROBES - 3 + 3)
    trials = resumed.trials
    assert all(is_probe(t) for t in trials[:SIM_PROBES])
    assert not any(is_probe(t) for t in trials[SIM_PROBES:])
    pairs = covered(trials)
    assert len(pairs) == len(set(pairs)) == SIM_PROBED_PAIRS  # no (stage, model) probed twice across the two runs
    assert len({t.plan_id for t in trials}) == len(trials)


def test_resume_reads_guidelines_back_from_the_trials(replay, replay_space) -> None:
    prompts: list[str] = []

    def script(messages: Messages) -> str:
        prompts.append(messages[1]["content"])
        k = trials_so_far(messages)
        if asks_guidelines(messages):
            return json.dumps({"guidelines": [f"written after {k} trials"]})
        plans = [[("Qwen3-0.6B", 2 ** (i % 4)), ("Qwen3-1.7B", 1 + i // 4)] for i in range(k - 4, k - 1)]
        return json.dumps(
            {"candidates": [{"stages": {"answer": [{"model": m, "n": n} for m, n in p]}, "reason": "mix"} for p in plans]}
        )

    route = scripted_model("resume-replay", script)
    storage = InMemoryStorage()
    study = new_study(replay, AgentTTSStrategy(seed=1, planner_model=route), storage=storage, name="r", space=replay_space)
    study.optimize(6)
    assert study.trials[-1].strategy_info["guidelines"] == ["written after 4 trials"]
    before = len(prompts)

    resumed = reload("r", storage, replay)
    resumed.optimize(4)
    trials = resumed.trials
    assert len(trials) == 10 and not any(is_probe(t) for t in trials[4:])
    assert "Guidelines so far:\n- written after 4 trials" in prompts[before]  # the rebuilt agent remembered them
    assert resumed.strategy.guidelines == trials[-1].strategy_info["guidelines"] != ["written after 4 trials"]
    assert len({t.plan_id for t in trials}) == 10
    assert_within_budget(resumed)


def plan_sequence(env, route: str, *, seed: int, n_trials: int, batch_size: int = 1, space=None) -> list[str]:
    study = new_study(env, AgentTTSStrategy(seed=seed, planner_model=route), space=space)
    study.optimize(n_trials, batch_size=batch_size)
    return [t.plan_id for t in study.trials]


def flaky_planner(name: str, allocations) -> str:
    """Valid JSON on some rounds, garbage on others (a deterministic function of the prompt)."""

    def script(messages: Messages) -> str:
        k = trials_so_far(messages)
        if k % 2:
            return "no JSON today"
        if asks_guidelines(messages):
            return json.dumps({"guidelines": GUIDELINES})
        return candidates_json(allocations, 5 * k, k=2)

    return scripted_model(name, script)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_same_seed_same_planner_same_plans(sim, sim_allocations, batch_size: int) -> None:
    route = flaky_planner("flaky", sim_allocations)
    first = plan_sequence(sim, route, seed=3, n_trials=24, batch_size=batch_size)
    assert len(first) == 24
    assert plan_sequence(sim, route, seed=3, n_trials=24, batch_size=batch_size) == first


def test_reproducible_without_a_planner(replay, replay_space) -> None:
    first = plan_sequence(replay, None, seed=2, n_trials=12, space=replay_space)
    assert plan_sequence(replay, None, seed=2, n_trials=12, space=replay_space) == first


# -- construction -----------------------------------------------------------------------------------------


def test_params_and_validation() -> None:
    strategy = AgentTTSStrategy(
        seed=9, planner_model="openai/gpt-4o-mini", api_base="http://localhost:8000/v1", batch=4, max_tokens=512, timeout_s=20
    )
    assert strategy.name == "agenttts"
    assert strategy.seed == 9
    params = strategy.params()
    assert params == {
        "planner_model": "openai/gpt-4o-mini",
        "api_base": "http://localhost:8000/v1",
        "batch": 4,
        "max_attempts": 3,
        "max_tokens": 512,
        "timeout_s": 20.0,
    }
    assert (strategy._llm.max_tokens, strategy._llm.timeout_s) == (512, 20.0)  # what the planner LLM is given
    assert json.loads(json.dumps(params)) == params
    assert AgentTTSStrategy(seed=9, **params).params() == params
    assert AgentTTSStrategy().params()["planner_model"] is None
    for bad in ({"batch": 0}, {"max_attempts": 0}, {"max_tokens": 0}, {"timeout_s": 0}):
        with pytest.raises(ValueError):
            AgentTTSStrategy(**bad)


def test_nothing_to_propose_for_zero(sim) -> None:
    study = new_study(sim, AgentTTSStrategy(seed=0))
    assert study.strategy.propose(study.context(), 0) == []


def test_random_draws_fill_when_the_heuristic_has_nothing(sim, monkeypatch) -> None:
    strategy = AgentTTSStrategy(seed=0)
    monkeypatch.setattr(strategy._insight, "propose", lambda context, n: [])
    study = new_study(sim, strategy)
    study.optimize(SIM_PROBES + 3)
    assert len(study.evaluated_trials) == SIM_PROBES + 3
    for trial in study.trials[SIM_PROBES:]:
        assert trial.rationale.startswith("fallback to random draw: no planner model configured")
        assert trial.strategy_info["random"] is True
    assert_within_budget(study)


@pytest.mark.parametrize("setting", [{"batch": 0}, {"max_attempts": 0}, {"max_tokens": 0}, {"timeout_s": 0.0}])
@pytest.mark.parametrize("planner", [None, "scripted"])
def test_bad_planner_settings_fail_when_the_agent_is_built(setting: dict, planner: str | None) -> None:
    from planner.agents.agent_reinforce import AgentReinforceStrategy

    model = None if planner is None else scripted_model("settings", lambda messages: "{}")
    (name,) = setting
    for cls in (AgentTTSStrategy, AgentReinforceStrategy):
        with pytest.raises(ValueError, match=name):
            cls(seed=0, planner_model=model, **setting)
