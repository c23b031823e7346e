"""The stage-additive model: its fit recovers an additive truth, and its best plans respect the budget exactly."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from executors.simulated import SimulatedEnvironment
from planner.space import SearchSpace, StageChoice
from planner.strategies._surrogate import FeatureLayout, StageAdditiveModel, best_choices, fit_stage_additive


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_info(SimulatedEnvironment(stages=3, seed=2).info)


def sizes(space: SearchSpace) -> dict[str, float]:
    models = sorted({m for s in space.stages for m in space.stage_models[s]})
    return {m: float(i) for i, m in enumerate(models)}


def truth(space: SearchSpace, seed: int) -> StageAdditiveModel:
    """An additive model with random weights: scores that the fitted form can represent exactly."""
    layout = FeatureLayout(space, sizes(space))
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 0.2, layout.width)
    for at in layout.offsets:
        weights[at + 3] = -abs(weights[at + 3]) / 8  # curves bend down, as sampling gains saturate
    return StageAdditiveModel(layout, weights)


def random_choices(space: SearchSpace, rng: random.Random) -> list[StageChoice]:
    return space.choices_of(space.sample(rng))


def test_the_fit_recovers_the_ranking_of_an_additive_truth(space: SearchSpace) -> None:
    true = truth(space, seed=0)
    rng = random.Random(0)
    train = [random_choices(space, rng) for _ in range(150)]
    fitted = fit_stage_additive(FeatureLayout(space, sizes(space)), [(c, true.predict(c)) for c in train])
    assert fitted is not None
    test = [random_choices(space, rng) for _ in range(300)]
    predicted = np.array([fitted.predict(c) for c in test])
    actual = np.array([true.predict(c) for c in test])
    ranks = np.corrcoef(np.argsort(np.argsort(predicted)), np.argsort(np.argsort(actual)))[0, 1]
    assert ranks > 0.95
    assert float(np.median(np.abs(predicted - actual))) < 0.02  # scores past 1% or 99% are clipped before the fit


def test_a_stage_measured_through_weak_others_is_still_ranked(space: SearchSpace) -> None:
    """Two trials that differ on one stage only say what that stage's choice does, whatever the others are."""
    first, second = space.stages[0], space.stages[1]
    weak = [StageChoice(((space.stage_models[s][0], 1),)) for s in space.stages]
    strong_model = space.stage_models[first][-1]
    better = [StageChoice(((strong_model, 1),)), *weak[1:]]
    other = [weak[0], StageChoice(((space.stage_models[second][-1], 1),)), *weak[2:]]
    observations = [(weak, 0.10), (better, 0.20), (other, 0.10)]
    fitted = fit_stage_additive(FeatureLayout(space, sizes(space)), observations)
    assert fitted is not None
    assert fitted.predict(better) > fitted.predict(weak) + 0.05
    combined_with_strong = [better[0], *weak[1:-1], StageChoice(((space.stage_models[space.stages[-1]][-1], 1),))]
    combined_with_weak = [weak[0], *combined_with_strong[1:]]
    assert fitted.predict(combined_with_strong) > fitted.predict(combined_with_weak)


def test_no_fit_from_fewer_than_two_observations_and_extreme_scores_stay_finite(space: SearchSpace) -> None:
    plan = random_choices(space, random.Random(1))
    assert fit_stage_additive(FeatureLayout(space, sizes(space)), []) is None
    assert fit_stage_additive(FeatureLayout(space, sizes(space)), [(plan, 0.5)]) is None
    other = random_choices(space, random.Random(2))
    fitted = fit_stage_additive(FeatureLayout(space, sizes(space)), [(plan, 0.0), (other, 1.0)])
    assert fitted is not None and np.all(np.isfinite(fitted.weights))
    assert 0.0 < fitted.predict(plan) < fitted.predict(other) < 1.0


@pytest.mark.parametrize("seed", range(6))
def test_best_choices_are_the_exact_best_plans_within_the_limit(space: SearchSpace, seed: int) -> None:
    model = truth(space, seed)
    rng = random.Random(seed)
    options = []
    for stage in space.stages:
        choices = list(space.stage_choices(stage))
        rng.shuffle(choices)
        options.append([(c, round(rng.uniform(0.0, 10.0), 1)) for c in choices[:9]])
    limit = rng.uniform(5.0, 20.0)
    found = best_choices(model, options, limit, keep=4)
    every = [
        (sum(c for _, c in combo), sum(float(model.stage_terms(i, [choice])[0]) for i, (choice, _) in enumerate(combo)), combo)
        for combo in itertools.product(*options)
    ]
    feasible = [item for item in every if item[0] <= limit]
    best = max(term for _, term, _ in feasible)
    cost_of = {tuple(choice for choice, _ in combo): cost for cost, _, combo in every}
    assert found, "a feasible plan exists, so one is returned"
    assert all(cost_of[choices] <= limit for choices in found)
    terms = [sum(float(model.stage_terms(i, [c])[0]) for i, c in enumerate(choices)) for choices in found]
    assert math.isclose(terms[0], best, rel_tol=0, abs_tol=1e-9)
    assert terms == sorted(terms, reverse=True)


def test_best_choices_is_empty_when_nothing_fits(space: SearchSpace) -> None:
    model = truth(space, 0)
    options = [[(c, 5.0) for c in itertools.islice(space.stage_choices(s), 3)] for s in space.stages]
    assert best_choices(model, options, limit=10.0) == []
