"""The search space, and a conformance suite run over every registered strategy through a Study."""

from __future__ import annotations

import json
import random
from itertools import combinations, islice, pairwise, product

import pytest

from executors.environment import EnvironmentInfo
from executors.replay import ReplayEnvironment
from graphs.cost import Budget, ModelSpec
from graphs.errors import AllotError, BudgetError
from graphs.plan import Plan
from planner.space import SearchSpace, StageChoice
from planner.storage import InMemoryStorage
from planner.strategies import STRATEGIES, Strategy, make_strategy
from planner.study import StudyExists, cheapest_plan, create_study, load_study
from planner.trial import TrialState

MODELS = ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")
BUDGET = Budget(limit=500)  # agenttts units: roughly a third of the test space fits
NAMES = sorted(STRATEGIES)
EVALUATED = (TrialState.COMPLETE, TrialState.FAIL)


@pytest.fixture(scope="module")
def env() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime24", orderings=2, seed=0)


@pytest.fixture(scope="module")
def space(env: ReplayEnvironment) -> SearchSpace:
    """The full replay space with fewer caps, to keep the suite fast."""
    return SearchSpace.from_info(env.info, caps=(None, 2000, 8000))


@pytest.fixture(scope="module")
def full_space(env: ReplayEnvironment) -> SearchSpace:
    return SearchSpace.from_info(env.info)


def new_study(env, space, strategy, *, seed=0, storage=None, name="study", budget=BUDGET):
    return create_study(
        storage=storage or InMemoryStorage(), environment=env, budget=budget, strategy=strategy, seed=seed, name=name, space=space
    )


def expected_size(n_counts: int, n_caps: int, n_models: int, stops=(2, 3), max_models: int = 2) -> int:
    """Count the space by brute force over sample totals (independent of SearchSpace's code)."""
    counts = [2**i for i in range(n_counts)]
    total = 0
    for k in range(1, max_models + 1):
        for _models in combinations(range(n_models), k):
            for combo in product(counts, repeat=k):
                total += n_caps * (1 + sum(1 for s in stops if sum(combo) > s))
    return total


# -- SearchSpace ----------------------------------------------------------------------------------------


def test_from_info_full_replay_space(full_space: SearchSpace, env: ReplayEnvironment) -> None:
    assert full_space.stages == ("answer",)
    assert full_space.stage_models == {"answer": MODELS}
    assert full_space.n_choices == dict.fromkeys(MODELS, (1, 2, 4, 8, 16, 32, 64, 128))
    assert full_space.caps == env.info.caps
    assert full_space.early_stop == (None, 2, 3)
    assert full_space.max_models == 2
    assert full_space.size() == expected_size(8, len(env.info.caps), 4) == 8456


def test_from_info_sizes_with_options(env: ReplayEnvironment) -> None:
    one = SearchSpace.from_info(env.info, max_models=1, caps=(None,), early_stop=(None,))
    assert one.size() == 4 * 8
    three = SearchSpace.from_info(env.info, max_models=3, caps=(None, 4000), early_stop=(None, 2))
    assert three.size() == expected_size(8, 2, 4, stops=(2,), max_models=3)


def test_from_info_multi_stage_defaults() -> None:
    models = {m: ModelSpec(name=m, params_b=float(m.split("-")[1][:-1])) for m in ("sim-1B", "sim-8B", "sim-70B")}
    info = EnvironmentInfo(
        name="multi",
        stages=("plan", "solve"),
        models=models,
        stage_models={"plan": ("sim-1B", "sim-8B"), "solve": ("sim-1B", "sim-8B", "sim-70B")},
        max_samples={"sim-1B": 100, "sim-8B": 16, "sim-70B": 1},
        early_stop=False,
    )
    space = SearchSpace.from_info(info)
    assert space.max_models == 1  # mixtures only for single-stage tasks
    assert space.early_stop == (None,)
    assert space.n_choices == {"sim-1B": (1, 2, 4, 8, 16, 32, 64), "sim-8B": (1, 2, 4, 8, 16), "sim-70B": (1,)}
    assert space.size() == (7 + 5) * (7 + 5 + 1)
    plans = list(space.enumerate())
    assert len(plans) == space.size()
    assert all([s.stage for s in p.stages] == ["plan", "solve"] for p in plans)


def test_enumerate_yields_unique_runnable_plans(space: SearchSpace, env: ReplayEnvironment) -> None:
    plans = list(space.enumerate())
    assert len(plans) == space.size() == expected_size(8, 3, 4)
    assert len({p.plan_id for p in plans}) == len(plans)
    for plan in plans[::37]:
        env.check(plan)
    # every early-stop threshold is below the samples drawn
    assert all(p.stages[0].early_stop is None or sum(n.n for n in p.stages[0].nodes) > p.stages[0].early_stop for p in plans)


def test_spec_round_trip(space: SearchSpace, full_space: SearchSpace) -> None:
    for original in (space, full_space):
        again = SearchSpace.from_spec(json.loads(json.dumps(original.spec())))
        assert again == original
        assert again.size() == original.size()
        assert [p.plan_id for p in islice(again.enumerate(), 50)] == [p.plan_id for p in islice(original.enumerate(), 50)]


def test_choices_of_inverts_plan(space: SearchSpace) -> None:
    for plan in space.enumerate():
        choices = space.choices_of(plan)
        assert space.plan(choices) == plan
    choice = StageChoice((("Qwen3-1.7B", 8), ("Qwen3-8B", 2)), 2000, 3)
    assert space.choices_of(space.plan([choice])) == [choice]


def test_sample_stays_in_the_space(space: SearchSpace) -> None:
    ids = {p.plan_id for p in space.enumerate()}
    rng = random.Random(5)
    drawn = [space.sample(rng) for _ in range(300)]
    assert all(p.plan_id in ids for p in drawn)
    assert len({p.plan_id for p in drawn}) > 200
    again = random.Random(5)
    assert [space.sample(again).plan_id for _ in range(300)] == [p.plan_id for p in drawn]


# -- strategy conformance -------------------------------------------------------------------------------


def test_registry_and_factory() -> None:
    assert {"random", "grid", "tpe", "nsga2"} <= set(STRATEGIES)
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy)
        strategy = make_strategy(name, 7)
        assert strategy.name == name
        assert strategy.seed == 7
        json.dumps(strategy.params())
    with pytest.raises(ValueError, match="random") as info:
        make_strategy("simulated-annealing", 0)
    assert "simulated-annealing" in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_never_evaluates_over_budget(name: str, env, space) -> None:
    study = new_study(env, space, name)
    study.optimize(12)
    trials = study.trials
    evaluated = [t for t in trials if t.state in EVALUATED]
    assert len(evaluated) == 12
    assert all(t.state is TrialState.COMPLETE for t in evaluated)
    for trial in evaluated:
        assert BUDGET.allows(trial.estimated_cost), trial.plan.summary()
        assert BUDGET.allows(env.estimate_cost(trial.plan)), trial.plan.summary()
        assert trial.score is not None and 0.0 <= trial.score <= 1.0
        assert trial.cost is not None and trial.cost.flops > 0
    rejected = [t for t in trials if t.state is TrialState.REJECTED]
    for trial in rejected:
        assert trial.score is None and trial.cost is None  # never evaluated
        assert "over budget" in trial.rationale or "not runnable" in trial.rationale
        assert not BUDGET.allows(env.estimate_cost(trial.plan))
    if name in ("random", "grid"):
        assert rejected == []  # they filter to the budget before proposing
        assert len({t.plan_id for t in trials}) == len(trials)  # and never repeat a plan
    assert [t.number for t in trials] == list(range(len(trials)))


@pytest.mark.parametrize("name", NAMES)
def test_batches_evaluate_exactly_n(name: str, env, space) -> None:
    study = new_study(env, space, name, seed=3)
    study.optimize(10, batch_size=4)
    assert len(study.evaluated_trials) == 10


def test_random_filters_by_rejection_sampling_in_huge_spaces(env, space, monkeypatch) -> None:
    import planner.strategies._random as random_module

    monkeypatch.setattr(random_module, "ENUMERATION_LIMIT", 10)
    study = new_study(env, space, "random", seed=1)
    study.optimize(10)
    trials = study.trials
    assert len(trials) == 10
    assert all(t.state is TrialState.COMPLETE for t in trials)
    assert len({t.plan_id for t in trials}) == 10
    with pytest.raises(ValueError, match="random"):
        new_study(env, space, "grid").optimize(1)


def proposed_ids(env, space, name: str, seed: int) -> list[str]:
    study = new_study(env, space, name, seed=seed)
    study.optimize(8)
    return [t.plan_id for t in study.trials]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_proposals(name: str, env, space) -> None:
    first = proposed_ids(env, space, name, seed=42)
    assert len(first) >= 8
    assert proposed_ids(env, space, name, seed=42) == first
    # other seeds, other proposals (a heuristic's seed only orders its probes, so two seeds may agree)
    others = {tuple(proposed_ids(env, space, name, seed=seed)) for seed in (43, 44, 45)}
    assert others - {tuple(first)}


@pytest.mark.parametrize("name", NAMES)
def test_resume_with_load_study(name: str, env, space) -> None:
    storage = InMemoryStorage()
    study = new_study(env, space, name, seed=5, storage=storage, name="resumable")
    study.optimize(10)
    assert len(study.evaluated_trials) == 10
    before = {t.trial_id: t for t in study.trials}

    resumed = load_study("resumable", storage)  # environment and space rebuilt from what was stored
    assert resumed.study_id == study.study_id
    assert resumed.strategy.name == name
    assert resumed.strategy.seed == 5
    assert resumed.space == space
    assert resumed.budget == BUDGET
    resumed.optimize(10)

    trials = resumed.trials
    assert len([t for t in trials if t.state in EVALUATED]) == 20
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))
    assert len({t.trial_id for t in trials}) == len(trials)
    for trial in trials:  # finished trials were not touched by the resumed run
        if trial.trial_id in before:
            assert trial == before[trial.trial_id]
    assert all(BUDGET.allows(t.estimated_cost) for t in trials if t.state in EVALUATED)
    if name in ("random", "grid"):
        assert len({t.plan_id for t in trials}) == 20  # the resumed strategy skips plans already tried


@pytest.mark.parametrize("name", ["random", "grid"])
def test_resume_continues_the_uninterrupted_sequence(name: str, env, space) -> None:
    straight = new_study(env, space, name, seed=8)
    straight.optimize(16)
    storage = InMemoryStorage()
    new_study(env, space, name, seed=8, storage=storage, name="halves").optimize(8)
    load_study("halves", storage, environment=env).optimize(8)
    assert [t.plan_id for t in load_study("halves", storage, environment=env).trials] == [t.plan_id for t in straight.trials]


@pytest.mark.parametrize("name", NAMES)
def test_seed_of_a_strategy_instance_is_stored(name: str, env, space) -> None:
    storage = InMemoryStorage()
    study = create_study(
        storage=storage, environment=env, budget=BUDGET, strategy=make_strategy(name, 7), name="seeded", space=space
    )
    assert study.strategy.seed == 7
    assert study.record.seed == 7  # the seed that drives the strategy is the one stored with the study
    assert load_study("seeded", storage, environment=env).strategy.seed == 7


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("state", [TrialState.WAITING, TrialState.RUNNING])
def test_unfinished_trial_is_evaluated_first_on_resume(name: str, state: TrialState, env, space) -> None:
    storage = InMemoryStorage()
    study = new_study(env, space, name, seed=1, storage=storage, name="interrupted")
    study.optimize(3)
    plan = Plan.allocation({"answer": ("Qwen3-4B", 2)})
    estimate = env.estimate_cost(plan)
    assert BUDGET.allows(estimate)
    left = storage.create_trial(study.study_id, plan=plan, estimated_cost=estimate, rationale="interrupted", state=state)
    assert not storage.get_trial(left.trial_id).state.is_finished

    resumed = load_study("interrupted", storage, environment=env)
    order: list[int] = []
    resumed.optimize(2, callbacks=[lambda _study, trial: order.append(trial.trial_id)])
    assert order[0] == left.trial_id
    finished = storage.get_trial(left.trial_id)
    assert finished.state is TrialState.COMPLETE
    assert finished.score == pytest.approx(env.evaluate(plan).score)
    assert len(resumed.evaluated_trials) == 3 + 1 + 2
    assert all(t.state.is_finished for t in resumed.trials)


def test_grid_exhausts_a_tiny_space_then_stops(env) -> None:
    tiny = SearchSpace(
        stages=("answer",),
        stage_models={"answer": ("Qwen3-0.6B", "Qwen3-1.7B")},
        n_choices={"Qwen3-0.6B": (1, 2), "Qwen3-1.7B": (1, 2)},
        caps=(None,),
        early_stop=(None,),
        max_models=1,
    )
    assert tiny.size() == 4
    study = new_study(env, tiny, "grid")
    study.optimize(10)
    trials = study.trials
    assert len(trials) == 4
    assert all(t.state is TrialState.COMPLETE for t in trials)
    assert {t.plan_id for t in trials} == {p.plan_id for p in tiny.enumerate()}
    study.optimize(5)  # nothing left: no new trials, no error
    assert len(study.trials) == 4
    resumed = load_study(study.name, study.storage, environment=env)
    resumed.optimize(5)
    assert len(resumed.trials) == 4


SMALL_BUDGET = Budget(limit=250)


def small_space_and_feasible(env) -> tuple[SearchSpace, list[str]]:  # type: ignore[no-untyped-def]
    """One stage, every model at 1, 2 or 4 samples, and the ids of its plans within ``SMALL_BUDGET``."""
    small = SearchSpace(
        stages=("answer",),
        stage_models={"answer": MODELS},
        n_choices=dict.fromkeys(MODELS, (1, 2, 4)),
        caps=(None,),
        early_stop=(None,),
        max_models=1,
    )
    return small, [p.plan_id for p in small.enumerate() if SMALL_BUDGET.allows(env.estimate_cost(p))]


def test_grid_covers_only_the_feasible_plans(env) -> None:
    small, feasible = small_space_and_feasible(env)
    assert 0 < len(feasible) < small.size()
    study = new_study(env, small, "grid", budget=SMALL_BUDGET)
    study.optimize(100)
    assert {t.plan_id for t in study.trials} == set(feasible)
    assert all(t.state is TrialState.COMPLETE for t in study.trials)


def test_random_draws_without_listing_the_space_and_uniformly_over_the_feasible_plans(env, monkeypatch) -> None:
    small, feasible = small_space_and_feasible(env)
    listed = []
    original = SearchSpace.enumerate
    monkeypatch.setattr(SearchSpace, "enumerate", lambda self: listed.append(1) or original(self))
    firsts = []
    for seed in range(300):
        study = new_study(env, small, "random", seed=seed, budget=SMALL_BUDGET)
        study.optimize(1)
        firsts.append(study.trials[0].plan_id)
    assert not listed, "a first draw needs no list of the space"
    assert set(firsts) == set(feasible)  # every feasible plan can come first, nothing else does
    # roughly uniform: each of the k feasible plans comes first about 300 / k times
    counts = [firsts.count(p) for p in feasible]
    assert max(counts) < 3 * 300 / len(feasible) and min(counts) > 300 / len(feasible) / 3
    # once draws keep missing (every feasible plan tried), the plans are listed and the search stops
    study = new_study(env, small, "random", budget=SMALL_BUDGET)
    study.optimize(len(feasible) + 5)
    assert sorted(t.plan_id for t in study.trials) == sorted(feasible)
    assert listed


# -- create_study ---------------------------------------------------------------------------------------


def test_budget_below_the_cheapest_plan(env, space) -> None:
    storage = InMemoryStorage()
    plan, cost = cheapest_plan(env, space, BUDGET)
    costs = [BUDGET.spent(env.estimate_cost(p)) for p in space.enumerate()]
    assert BUDGET.spent(cost) == pytest.approx(min(costs))
    with pytest.raises(BudgetError) as info:
        create_study(storage=storage, environment=env, budget=Budget(limit=0.5 * BUDGET.spent(cost)), space=space, name="poor")
    message = str(info.value)
    assert plan.summary() in message
    assert "\n" not in message
    assert storage.list_studies() == []
    with pytest.raises(KeyError):
        storage.get_study_by_name("poor")
    # just enough is fine
    create_study(storage=storage, environment=env, budget=Budget(limit=BUDGET.spent(cost) * 1.0001), space=space)
    assert len(storage.list_studies()) == 1


def test_cheapest_plan_respects_a_token_budget(env) -> None:
    # Without caps the token-cheapest plan (Qwen3-4B x1, ~14.0k tokens) is not the FLOP-cheapest one
    # (Qwen3-0.6B x1, ~15.9k tokens). A 15k-token budget admits a plan, so the study must be created.
    space = SearchSpace.from_info(env.info, caps=(None,))
    budget = Budget(limit=15_000, unit="tokens")
    fitting = [p for p in space.enumerate() if budget.allows(env.estimate_cost(p))]
    assert fitting
    study = create_study(storage=InMemoryStorage(), environment=env, budget=budget, space=space, strategy="grid")
    study.optimize(len(fitting) + 1)
    assert {t.plan_id for t in study.trials} == {p.plan_id for p in fitting}


def test_duplicate_study_name(env, space) -> None:
    storage = InMemoryStorage()
    first = new_study(env, space, "random", storage=storage, name="taken")
    with pytest.raises(StudyExists, match="taken") as info:
        new_study(env, space, "tpe", storage=storage, name="taken")
    assert isinstance(info.value, AllotError)
    assert len(storage.list_studies()) == 1
    assert storage.get_study_by_name("taken").strategy == "random"
    again = create_study(storage=storage, environment=env, budget=BUDGET, name="taken", load_if_exists=True)
    assert again.study_id == first.study_id


def test_generated_names_are_unique(env, space) -> None:
    storage = InMemoryStorage()
    names = {create_study(storage=storage, environment=env, budget=BUDGET, space=space).name for _ in range(3)}
    assert len(names) == 3


# -- best trial and Pareto front ------------------------------------------------------------------------


def test_best_trial_and_pareto_front_are_consistent(env, space) -> None:
    study = new_study(env, space, "random", seed=9)
    with pytest.raises(ValueError):
        _ = study.best_trial
    assert study.pareto_trials() == []
    study.optimize(30)
    complete = [t for t in study.trials if t.state is TrialState.COMPLETE]
    best = study.best_trial
    assert best.score == max(t.score for t in complete)
    front = study.pareto_trials()
    assert front
    costs = [BUDGET.spent(t.estimated_cost) for t in front]
    scores = [t.score for t in front]
    assert all(a < b for a, b in pairwise(costs))
    assert all(a < b for a, b in pairwise(scores))
    assert front[-1].trial_id == best.trial_id  # the best is the cheapest of the top scorers
    best_cost = BUDGET.spent(best.estimated_cost)
    assert all(BUDGET.spent(t.estimated_cost) >= best_cost for t in complete if t.score == best.score)
    front_ids = {t.trial_id for t in front}
    for trial in complete:  # every trial off the front is dominated by a front trial
        if trial.trial_id in front_ids:
            continue
        cost = BUDGET.spent(trial.estimated_cost)
        assert any(f.score >= trial.score and BUDGET.spent(f.estimated_cost) <= cost for f in front)


def test_a_plan_built_twice_from_the_same_choices_is_one_shared_immutable_value() -> None:
    from pydantic import ValidationError

    from executors.simulated import SimulatedEnvironment

    space = SearchSpace.from_info(SimulatedEnvironment(stages=2, seed=0).info)
    choices = [StageChoice((("sim-8B", 4),)), StageChoice((("sim-1B", 4),), None, 3)]
    plan = space.plan(choices)
    assert space.plan(tuple(choices)) is plan, "built once, then reused"
    fresh = Plan(stages=tuple(c.graph(s) for s, c in zip(space.stages, choices, strict=True)))
    assert plan == fresh and plan.plan_id == fresh.plan_id
    assert space.choices_of(plan) == choices
    other = space.plan([StageChoice((("sim-8B", 8),)), choices[1]])
    assert other is not plan and other.plan_id != plan.plan_id
    with pytest.raises(ValidationError):  # frozen: whoever holds it cannot change it for the others
        plan.stages = ()  # type: ignore[misc]
