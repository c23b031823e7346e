"""A stage-additive model of a plan's score, fitted to the trials, and the plans it predicts best under a budget.

The insight heuristic's moves change one stage at a time, so a plan whose stages each did well in different trials
(each stage's best model ran there, but never all together) or at other counts is reached only through a chain of
moves, a trial each. A model that scores a plan as a sum of per-stage terms on the log-odds scale separates what each
stage's choice did from what the others did, and can propose the plan that combines them at once.

Per stage, with ``x = log2(samples)`` and ``z`` the model's log active parameters (centred on the stage's models),
the term is ``b1 x + b2 z + b3 x z + b4 x^2`` (a curve that rises with samples, more or less for small models, and
may bend down) plus each model's own offset and slope in ``x``, plus an offset per cap and per early-stop rule; a
mixture's features are its nodes', weighted by their share of the samples. A Gaussian prior per group of weights
(loose on the shared shape, tight on what is one model's own) keeps ten trials from fitting noise: the fit is the
posterior mean of a Bayesian linear regression (ridge regression with one penalty per group). The best plan of the
fit under the budget is found stage by stage over cost/score Pareto fronts (costs add over stages), not by
enumerating the space. Pure numpy, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from planner.space import SearchSpace, StageChoice

__all__ = ["FeatureLayout", "StageAdditiveModel", "best_choices", "fit_stage_additive"]

SHARED_PRIOR = 2.0
"""Prior standard deviation (log-odds) of a stage's shared shape: its slopes in samples, size and their product."""
CURVE_PRIOR = 0.05
"""Of a stage's curvature in ``x^2``: ``x`` runs to 6 or 7, so 0.05 bends a curve by up to 2 logits."""
MODEL_PRIOR = 0.5
"""Of a model's own offset on a stage and its own slope in samples."""
RULE_PRIOR = 0.5
"""Of a cap's or an early-stop rule's offset."""
INTERCEPT_PRIOR = 10.0
NOISE = 0.15
"""Standard deviation (log-odds) of what the stage-additive form does not say: evaluation noise, stage coupling."""
CLIP = 0.01
"""Scores are clipped to ``[CLIP, 1 - CLIP]`` before the log-odds: a 0 or 1 would weigh infinitely."""


def _logit(p: float) -> float:
    p = min(max(p, CLIP), 1 - CLIP)
    return math.log(p / (1 - p))


class FeatureLayout:
    """Where each stage's features sit in the weight vector (position 0 is the intercept), and each stage choice's
    features, computed once: a study asks for the same choices at every step."""

    def __init__(self, space: SearchSpace, sizes: Mapping[str, float]) -> None:
        self.space = space
        self.sizes = dict(sizes)
        offsets, at = [], 1
        for stage in space.stages:
            offsets.append(at)
            at += 4 + 2 * len(space.stage_models[stage]) + len(space.caps) + len(space.early_stop)
        self.offsets = tuple(offsets)
        self.width = at
        self._features: dict[tuple[int, StageChoice], np.ndarray] = {}

    def prior_variances(self) -> np.ndarray:
        var = np.empty(self.width)
        var[0] = INTERCEPT_PRIOR**2
        for index, stage in enumerate(self.space.stages):
            at, models = self.offsets[index], len(self.space.stage_models[stage])
            end = self.offsets[index + 1] if index + 1 < len(self.offsets) else self.width
            var[at : at + 3] = SHARED_PRIOR**2
            var[at + 3] = CURVE_PRIOR**2
            var[at + 4 : at + 4 + 2 * models] = MODEL_PRIOR**2
            var[at + 4 + 2 * models : end] = RULE_PRIOR**2
        return var

    def knows(self, index: int, choice: StageChoice) -> bool:
        """Whether the choice is one of this space's on that stage (its models, cap and rule): a trial stored under
        another space (a study whose model list changed) is not."""
        models = self.space.stage_models[self.space.stages[index]]
        return (
            all(model in models and n >= 1 for model, n in choice.samples)
            and bool(choice.samples)
            and choice.cap in self.space.caps
            and choice.early_stop in self.space.early_stop
        )

    def stage_features(self, index: int, choice: StageChoice) -> np.ndarray:
        """One stage's choice as a full-width feature vector (zero outside the stage's block)."""
        key = (index, choice)
        features = self._features.get(key)
        if features is None:
            features = self._features[key] = self._compute(index, choice)
        return features

    def _compute(self, index: int, choice: StageChoice) -> np.ndarray:
        models = self.space.stage_models[self.space.stages[index]]
        centre = sum(self.sizes[m] for m in models) / len(models)
        at = self.offsets[index]
        total = sum(n for _, n in choice.samples)
        out = np.zeros(self.width)
        for model, n in choice.samples:
            share, x, z, j = n / total, math.log2(n), self.sizes[model] - centre, models.index(model)
            out[at : at + 4] += share * np.array([x, z, x * z, x * x])
            out[at + 4 + j] += share
            out[at + 4 + len(models) + j] += share * x
        rules = at + 4 + 2 * len(models)
        out[rules + self.space.caps.index(choice.cap)] = 1.0
        out[rules + len(self.space.caps) + self.space.early_stop.index(choice.early_stop)] = 1.0
        return out

    def row(self, choices: Sequence[StageChoice]) -> np.ndarray:
        row = np.zeros(self.width)
        row[0] = 1.0
        for index, choice in enumerate(choices):
            row += self.stage_features(index, choice)
        return row


@dataclass(frozen=True)
class StageAdditiveModel:
    """The fitted weights: each stage's term and the intercept, on the log-odds scale."""

    layout: FeatureLayout
    weights: np.ndarray

    def stage_terms(self, index: int, choices: Sequence[StageChoice]) -> np.ndarray:
        """Stage ``index``'s term (log-odds) for each of ``choices``, in one matrix product."""
        return np.array([self.layout.stage_features(index, choice) for choice in choices]) @ self.weights

    def predict(self, choices: Sequence[StageChoice]) -> float:
        """The predicted score (0..1) of a plan given by its stage choices."""
        return 1.0 / (1.0 + math.exp(-float(self.layout.row(choices) @ self.weights)))


def fit_stage_additive(
    layout: FeatureLayout, observations: Iterable[tuple[Sequence[StageChoice], float]]
) -> StageAdditiveModel | None:
    """The fit to ``observations`` (a plan's stage choices, its score 0..1). ``None`` with fewer than two."""
    rows, targets = [], []
    for choices, score in observations:
        rows.append(layout.row(choices))
        targets.append(_logit(score))
    if len(rows) < 2:
        return None
    x, y = np.array(rows), np.array(targets)
    precision = x.T @ x / NOISE**2 + np.diag(1.0 / layout.prior_variances())
    return StageAdditiveModel(layout, np.linalg.solve(precision, x.T @ y / NOISE**2))


def best_choices(
    model: StageAdditiveModel, options: Sequence[Sequence[tuple[StageChoice, float]]], limit: float, keep: int = 8
) -> list[tuple[StageChoice, ...]]:
    """The ``keep`` plans (as stage choices) the model scores highest whose stage costs add up to at most ``limit``,
    best first. ``options`` holds per stage each allowed choice with its cost. A Pareto front of (cost, predicted
    log-odds) grows one stage at a time, a partial plan dropped where a cheaper one scores as high: its size stays
    near the number of distinct costs, where the space has their product."""
    front: list[tuple[float, float, tuple[StageChoice, ...]]] = [(0.0, 0.0, ())]
    bound = limit * (1 + 1e-9)
    for index, stage_options in enumerate(options):
        if not stage_options:
            return []
        terms = model.stage_terms(index, [choice for choice, _ in stage_options])
        scored = [(cost, float(t), choice) for (choice, cost), t in zip(stage_options, terms, strict=True)]
        grown = [
            (cost + c, term + t, (*choices, choice))
            for cost, term, choices in front
            for c, t, choice in scored
            if cost + c <= bound
        ]
        grown.sort(key=lambda item: (item[0], -item[1]))
        front, best = [], -math.inf
        for item in grown:
            if item[1] > best:
                front.append(item)
                best = item[1]
    front.sort(key=lambda item: -item[1])
    return [choices for _, _, choices in front[:keep]]
