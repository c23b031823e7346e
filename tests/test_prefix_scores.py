"""``Environment.prefix_scores``: what an evaluation showed of its last stage's vote over fewer samples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from executors.backends import CompletionRequest, MockBackend
from executors.environment import Environment, last_stage_prefixes
from executors.live import LiveEnvironment
from executors.replay import ReplayEnvironment
from executors.simulated import SimulatedEnvironment
from executors.tasks import Scorer, ScorerKind, load_task
from graphs.cost import Budget
from graphs.plan import Plan
from planner.catalog import load_catalog
from planner.storage import InMemoryStorage
from planner.strategies import InsightStrategy
from planner.study import create_study
from planner.trial import TrialState
from planner.trial_runner import InProcessRunner

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"


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


# -- the live environment: read off its recorded runs ---------------------------------------------------------------


def live_env(**kwargs) -> LiveEnvironment:
    """The bundled qa_chain task on a fake model whose verify stage's sample ``i`` on question ``j`` is right when
    ``(i + j) % 3 == 0`` and otherwise wrong, each wrong sample differently: a vote over 8 samples beats one over 4."""
    task = load_task(EXAMPLES / "qa_chain" / "task.yaml")
    position = {str(example.inputs["question"]): j for j, example in enumerate(task.examples)}
    reference = {str(example.inputs["question"]): example.references[0] for example in task.examples}

    def handler(request: CompletionRequest) -> list[str]:
        text = request.messages[-1]["content"]
        question = re.search(r"Question: (.*)", text).group(1)  # type: ignore[union-attr]
        if "Final answer" not in text:
            return ["Some notes.\nAnswer: something"] * request.n
        j = position[question]
        indices = range(request.offset, request.offset + request.n)
        return [f"Final answer: {reference[question] if (i + j) % 3 == 0 else f'wrong{i}'}" for i in indices]

    catalog = load_catalog(EXAMPLES / "qa_chain" / "catalog.yaml")
    return LiveEnvironment(task, catalog, MockBackend(handler), **kwargs)


def live_plan(n: int) -> Plan:
    return Plan.allocation({"decompose": ("gemma", 1), "answer": ("gemma", 1), "verify": ("gemma", n)})


def test_live_prefixes_score_what_running_that_plan_scores() -> None:
    env = live_env()
    assert env.votes_over_prefixes
    assert env.prefix_scores(live_plan(8)) == {}, "nothing before the plan has run"
    evaluation = env.evaluate(live_plan(8))
    calls = len(env.backend.requests)  # type: ignore[attr-defined]
    scores = env.prefix_scores(live_plan(8))
    assert len(env.backend.requests) == calls and len(env.history) == 1, "read off the run: nothing generated or recorded"
    assert sorted(scores) == [1, 2, 4]
    assert len({*scores.values(), evaluation.score}) > 1, "the votes over fewer samples differ (else this test shows nothing)"
    for k, score in scores.items():
        assert score == pytest.approx(env.evaluate(live_plan(k)).score, abs=1e-12)


def test_live_prefixes_need_a_plain_vote_on_the_answer_stage_and_a_text_scorer() -> None:
    env = live_env()
    early = Plan.allocation({"decompose": ("gemma", 1), "answer": ("gemma", 1), "verify": ("gemma", 8)}, early_stop=3)
    env.evaluate(early)
    assert env.prefix_scores(early) == {}, "an early stop's vote is not a prefix's"
    judged = env.task.model_copy(update={"scorer": Scorer(kind=ScorerKind.LLM_JUDGE, model="gemma")})
    assert not LiveEnvironment(judged, env.catalog, env.backend).votes_over_prefixes, "a judge's calls are generation"
    tested = env.task.model_copy(update={"scorer": Scorer(kind=ScorerKind.UNIT_TESTS)})
    assert not LiveEnvironment(tested, env.catalog, env.backend).votes_over_prefixes, "unit tests run code per answer"


def test_a_study_on_a_live_task_hands_its_strategy_the_prefix_votes() -> None:
    env = live_env()
    study = create_study(
        storage=InMemoryStorage(),
        environment=env,
        budget=Budget(limit=1e16, unit="flops"),
        strategy=InsightStrategy(seed=0),
        seed=0,
    )
    study.optimize(3)
    context = study.context()
    assert context.prefix_scores is not None
    complete = [t for t in study.trials if t.state is TrialState.COMPLETE]
    shown = [context.prefix_scores(t.plan) for t in complete]
    assert any(shown) and all(s == env.prefix_scores(t.plan) for s, t in zip(shown, complete, strict=True))


def test_a_trial_keeps_the_votes_its_evaluation_showed_for_a_study_whose_environment_never_ran_it() -> None:
    """A worker (here: a runner with its own environment) evaluates the trial; the study's own live environment never
    ran the plan and shows nothing, yet the study hands its strategy the votes stored with the trial."""
    studying, working = live_env(), live_env()
    study = create_study(
        storage=InMemoryStorage(), environment=studying, budget=Budget(limit=1e16, unit="flops"), strategy=InsightStrategy(0)
    )
    study.optimize(2, runner=InProcessRunner(study.storage, working))
    assert studying.history == [] and len(working.history) == 2
    trials = [t for t in study.trials if t.state is TrialState.COMPLETE]
    assert trials and all(t.prefix_scores == working.prefix_scores(t.plan) for t in trials)
    assert any(t.prefix_scores for t in trials), "the plan's last stage ran several samples"
    context = study.context()
    assert context.prefix_scores is not None
    for t in trials:
        assert studying.prefix_scores(t.plan) == {} and context.prefix_scores(t.plan) == t.prefix_scores
