"""optuna's TPE (score, budget as a constraint) and NSGA-II (score vs cost) behind the Strategy interface.

The plan space becomes define-by-run parameters per stage: the model set (categorical), ``log2`` of
each chosen model's sample count (integer, so the sampler sees the order), the cap as an index into the
caps sorted from smallest to none (integer), and the early-stop threshold (categorical). Over-budget
proposals come back as infeasible trials (``Trial.set_constraint``), so the sampler learns where the
budget bites. On resume, stored trials are replayed into a fresh in-memory optuna study.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import TrialState as OptunaState

from graphs.plan import Plan
from planner.space import SearchSpace, StageChoice
from planner.strategies._base import Proposal, Strategy, StudyContext
from planner.trial import FrozenTrial, TrialState

__all__ = ["NSGAIIStrategy", "TPEStrategy"]

optuna.logging.set_verbosity(optuna.logging.WARNING)
_NO_STOP = 0
MAX_REPEATS = 50


def _caps_order(space: SearchSpace) -> list[int | None]:
    numeric = sorted(c for c in space.caps if c is not None)
    return numeric + ([None] if None in space.caps else [])


def _distribution(name: str, space: SearchSpace) -> BaseDistribution:
    stage, kind, *rest = name.split("|")
    if kind == "models":
        return CategoricalDistribution(["+".join(ms) for ms in space.model_sets(stage)])
    if kind == "log2n":
        top = int(math.log2(max(space.n_choices[rest[0]])))
        return IntDistribution(0, top)
    if kind == "cap":
        return IntDistribution(0, len(space.caps) - 1)
    if kind == "stop":
        return CategoricalDistribution([_NO_STOP if s is None else s for s in space.early_stop])
    raise KeyError(name)


def _suggest(trial: optuna.Trial, space: SearchSpace) -> Plan:
    choices = []
    caps = _caps_order(space)
    for stage in space.stages:

        def pick(kind: str, *rest: str, stage: str = stage) -> Any:
            name = "|".join((stage, kind, *rest))
            dist = _distribution(name, space)
            if isinstance(dist, CategoricalDistribution):
                return trial.suggest_categorical(name, dist.choices)  # type: ignore[arg-type]
            return trial.suggest_int(name, dist.low, dist.high)  # type: ignore[attr-defined]

        models = str(pick("models")).split("+")
        counts = [min(2 ** int(pick("log2n", m)), max(space.n_choices[m])) for m in models]
        cap = caps[int(pick("cap"))] if len(caps) > 1 else caps[0]
        stop = int(pick("stop")) if len(space.early_stop) > 1 else (space.early_stop[0] or _NO_STOP)
        early = None if stop == _NO_STOP or sum(counts) <= stop else stop
        choices.append(StageChoice(tuple(zip(models, counts, strict=True)), cap, early))
    return space.plan(choices)


class _OptunaStrategy(Strategy):
    multi_objective = False

    def __init__(self, seed: int | None = None, **sampler_args: Any) -> None:
        self._sampler_args = sampler_args
        super().__init__(seed)

    def params(self) -> dict[str, Any]:
        return dict(self._sampler_args)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._study: optuna.Study | None = None
        self._asked: dict[int, optuna.Trial] = {}

    def _sampler(self) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def _open(self, context: StudyContext) -> optuna.Study:
        if self._study is None:
            directions = ["maximize", "minimize"] if self.multi_objective else ["maximize"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._study = optuna.create_study(directions=directions, sampler=self._sampler())
            self._space = context.space
            self._budget = context.budget
            for trial in context.trials:
                if trial.state.is_finished and "params" in trial.strategy_info:
                    self._replay(trial)
        return self._study

    def _values(self, trial: FrozenTrial) -> tuple[list[float] | None, dict[str, float]]:
        spent = self._budget.spent(trial.estimated_cost)
        attrs = {"constraint": spent / self._budget.limit - 1.0, "spent": spent}
        if trial.state is TrialState.FAIL:
            return None, attrs
        score = trial.score if trial.state is TrialState.COMPLETE and trial.score is not None else 0.0
        return ([score, spent] if self.multi_objective else [score]), attrs

    def _replay(self, trial: FrozenTrial) -> None:
        params = trial.strategy_info["params"]
        values, attrs = self._values(trial)
        dists = {name: _distribution(name, self._space) for name in params}
        state = OptunaState.FAIL if values is None else OptunaState.COMPLETE
        self._study.add_trial(  # type: ignore[union-attr]
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                values=values,
                user_attrs=attrs,
                state=state,
                constraints={"budget": attrs["constraint"]},
            )
        )

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        """Ask optuna for ``n`` new plans. A plan already tried is not proposed again: its stored
        result is told to optuna at once and another is asked (up to ``MAX_REPEATS`` times per plan)."""
        study = self._open(context)
        known = {t.plan_id: t for t in context.trials if t.state.is_finished}
        proposed: set[str] = set()
        out = []
        for _ in range(n * MAX_REPEATS):
            if len(out) == n:
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                trial = study.ask()
            plan = _suggest(trial, context.space)
            if plan.plan_id in known:
                self._tell(trial, known[plan.plan_id])
                continue
            if plan.plan_id in proposed:
                study.tell(trial, state=OptunaState.PRUNED)
                continue
            proposed.add(plan.plan_id)
            self._asked[trial.number] = trial
            info = {"params": dict(trial.params), "optuna_number": trial.number}
            out.append(Proposal(plan, f"{self.name} sample (optuna trial {trial.number})", info))
        return out

    def tell(self, trial: FrozenTrial) -> None:
        number = trial.strategy_info.get("optuna_number")
        if self._study is None or number not in self._asked:
            return
        self._tell(self._asked.pop(number), trial)

    def _tell(self, asked: optuna.Trial, result: FrozenTrial) -> None:
        values, attrs = self._values(result)
        for key, value in attrs.items():
            asked.set_user_attr(key, value)
        asked.set_constraint("budget", attrs["constraint"])
        if values is None:
            self._study.tell(asked, state=OptunaState.FAIL)  # type: ignore[union-attr]
        else:
            self._study.tell(asked, values)  # type: ignore[union-attr]


class TPEStrategy(_OptunaStrategy):
    """optuna TPE maximising the score, with the budget as a constraint."""

    name = "tpe"

    def _sampler(self) -> optuna.samplers.BaseSampler:
        args = {"n_startup_trials": 8, "multivariate": True, "group": True, **self._sampler_args}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=self.seed, **args)


class NSGAIIStrategy(_OptunaStrategy):
    """optuna NSGA-II on (score up, cost down), the budget as a constraint. The sampler is explicit:
    optuna 5 would default to TPE for multi-objective studies."""

    name = "nsga2"
    multi_objective = True

    def _sampler(self) -> optuna.samplers.BaseSampler:
        args = {"population_size": 16, **self._sampler_args}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.NSGAIISampler(seed=self.seed, **args)
