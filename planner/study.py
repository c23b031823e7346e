"""Study: a search for the best plan of a task under a budget, persisted trial by trial.

Shaped like optuna's: ``create_study`` / ``load_study``, ``optimize``, ``best_trial``. A study is a task
environment + a search space + a budget + a strategy + a seed. Every trial is stored before it is
evaluated and finished after, so an interrupted run (Ctrl-C, kill) loses at most the trials in flight,
and those are evaluated again when the study resumes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from executors import environment_from_spec
from executors.environment import Environment
from graphs.cost import Budget, Cost
from graphs.errors import AllotError, BudgetError
from graphs.pareto import pareto_front
from graphs.plan import Plan
from planner.space import SearchSpace, StageChoice
from planner.storage import BaseStorage
from planner.strategies import Proposal, Strategy, StudyContext, make_strategy
from planner.trial import FrozenTrial, StudyRecord, TrialState
from planner.trial_runner import InProcessRunner, TrialRunner

__all__ = ["InvalidStudyName", "Study", "StudyExists", "cheapest_plan", "create_study", "load_study"]

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_REJECTIONS = 200
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,99}$")


class StudyExists(AllotError):
    """A study of that name is already stored."""


class InvalidStudyName(AllotError, ValueError):
    """Study names are identifiers shown in terminals, URLs and file names."""


class Study:
    """A persisted search. Build with ``create_study`` or ``load_study``."""

    def __init__(
        self,
        record: StudyRecord,
        storage: BaseStorage,
        environment: Environment,
        strategy: Strategy,
        space: SearchSpace,
    ) -> None:
        self.record = record
        self.storage = storage
        self.environment = environment
        self.strategy = strategy
        self.space = space

    # -- views -----------------------------------------------------------------------------------

    @property
    def study_id(self) -> int:
        return self.record.study_id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def budget(self) -> Budget:
        return self.record.budget

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.storage.get_trials(self.study_id)

    @property
    def evaluated_trials(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]

    @property
    def best_trial(self) -> FrozenTrial:
        """Highest score; ties go to the cheaper plan, then the earlier trial. ``ValueError`` if none."""
        complete = [t for t in self.trials if t.state is TrialState.COMPLETE and t.score is not None]
        if not complete:
            raise ValueError(f"study {self.name!r} has no complete trial yet")
        return max(complete, key=lambda t: (t.score, -self.budget.spent(t.estimated_cost), -t.number))

    def pareto_trials(self) -> list[FrozenTrial]:
        """Complete trials no other beats on both score and cost, cheapest first."""
        complete = [t for t in self.trials if t.state is TrialState.COMPLETE and t.score is not None]
        points = [(t.score or 0.0, self.budget.spent(t.estimated_cost)) for t in complete]
        return [complete[i] for i in pareto_front(points)]

    def context(self, trials: Sequence[FrozenTrial] | None = None) -> StudyContext:
        known = tuple(self.trials if trials is None else trials)
        return StudyContext(
            space=self.space,
            budget=self.budget,
            info=self.environment.info,
            estimate_cost=self.environment.estimate_cost,
            trials=known,
            seed=self.record.seed,
            prefix_scores=self._prefix_scores(known) if self.environment.votes_over_prefixes else None,
        )

    def _prefix_scores(self, trials: Sequence[FrozenTrial]) -> Callable[[Plan], Mapping[int, float]]:
        """Each trial's prefix votes as stored with it (where it was evaluated: a worker, an earlier process), else
        as the environment shows them."""
        stored = {t.plan_id: t.prefix_scores for t in trials if t.prefix_scores}
        environment = self.environment

        def shown(plan: Plan) -> Mapping[int, float]:
            found = stored.get(plan.plan_id)
            return dict(found) if found is not None else environment.prefix_scores(plan)

        return shown

    # -- running ---------------------------------------------------------------------------------

    def optimize(
        self,
        n_trials: int,
        *,
        batch_size: int = 1,
        runner: TrialRunner | None = None,
        callbacks: Sequence[Callable[[Study, FrozenTrial], None]] = (),
    ) -> None:
        """Evaluate ``n_trials`` more plans (rejected proposals do not count).

        Trials left unfinished by an interrupted run are evaluated first. Proposals over budget or not
        runnable are stored as ``REJECTED`` and never evaluated. Stops early if the strategy has nothing
        left to propose.
        """
        runner = runner or InProcessRunner(self.storage, self.environment)
        leftovers = [t for t in self.trials if not t.state.is_finished]
        if leftovers:
            log.info("resuming %d unfinished trial(s) of study %s", len(leftovers), self.name)
            self._run(runner, leftovers, callbacks)
        done = 0
        rejected_in_a_row = 0
        while done < n_trials:
            trials = self.trials
            proposals = self.strategy.propose(self.context(trials), min(batch_size, n_trials - done))
            if not proposals:
                log.info("strategy %s has nothing left to propose", self.strategy.name)
                break
            accepted: list[FrozenTrial] = []
            for proposal in proposals:
                trial = self._admit(proposal)
                if trial.state is TrialState.REJECTED:
                    rejected_in_a_row += 1
                    self.strategy.tell(trial)
                    for callback in callbacks:
                        callback(self, trial)
                else:
                    rejected_in_a_row = 0
                    accepted.append(trial)
            if rejected_in_a_row >= MAX_CONSECUTIVE_REJECTIONS:
                raise BudgetError(
                    f"strategy {self.strategy.name} proposed {rejected_in_a_row} plans in a row that do not fit "
                    f"the budget {self.budget}: raise the budget or use the random or grid strategy"
                )
            done += len(accepted)
            self._run(runner, accepted, callbacks)

    def _admit(self, proposal: Proposal) -> FrozenTrial:
        """Store a proposal as a trial: WAITING to run, or REJECTED with the reason."""
        plan = proposal.plan
        reason = None
        estimated = Cost()
        try:
            self.environment.check(plan)
            estimated = self.environment.estimate_cost(plan)
            if not self.budget.allows(estimated):
                reason = f"over budget: {self.budget.spent(estimated):.4g} > {self.budget}"
        except AllotError as exc:
            reason = f"not runnable: {exc}"
        rationale = proposal.rationale if reason is None else f"{proposal.rationale} [rejected, {reason}]"
        self._store_graph_version(proposal)
        return self.storage.create_trial(
            self.study_id,
            plan=plan,
            estimated_cost=estimated,
            rationale=rationale,
            strategy_info=proposal.info,
            planner_cost=proposal.planner_cost,
            state=TrialState.REJECTED if reason else TrialState.WAITING,
        )

    def _store_graph_version(self, proposal: Proposal) -> None:
        """A graph strategy's update travels with its next proposal; it becomes the next stored version
        of the study's learned graph (named after the study), with what caused it."""
        update = proposal.info.get("graph_version")
        if not isinstance(update, dict) or "definition" not in update:
            return
        try:
            parent = self.storage.latest_graph_version(self.name).version_id
        except KeyError:
            parent = None
        self.storage.add_graph_version(self.name, update["definition"], str(update.get("cause", "")), parent_id=parent)

    def _run(
        self, runner: TrialRunner, trials: list[FrozenTrial], callbacks: Sequence[Callable[[Study, FrozenTrial], None]]
    ) -> None:
        if not trials:
            return
        finished = runner.run(self.record, trials)
        for trial in sorted(finished, key=lambda t: t.number):
            self.strategy.tell(trial)
            for callback in callbacks:
                callback(self, trial)


def cheapest_plan(environment: Environment, space: SearchSpace, budget: Budget) -> tuple[Plan, Cost]:
    """The least costly plan of the space in the budget's unit: the cheapest single sample per stage."""
    per_stage = []
    for stage in space.stages:
        options = []
        for model in space.stage_models[stage]:
            for cap in space.caps:
                options.append(StageChoice(((model, min(space.n_choices[model])),), cap))
        per_stage.append(options)
    # Costs add across stages, so the cheapest plan takes each stage's cheapest option.
    choices = []
    for stage, options in zip(space.stages, per_stage, strict=True):

        def stage_cost(choice: StageChoice, stage: str = stage) -> float:
            probe = [choice if s == stage else per_stage[i][0] for i, s in enumerate(space.stages)]
            return budget.spent(environment.estimate_cost(space.plan(probe)))

        choices.append(min(options, key=stage_cost))
    plan = space.plan(choices)
    return plan, environment.estimate_cost(plan)


def create_study(
    *,
    storage: BaseStorage,
    environment: Environment,
    budget: Budget,
    strategy: str | Strategy = "random",
    seed: int = 0,
    name: str | None = None,
    space: SearchSpace | None = None,
    strategy_params: dict[str, Any] | None = None,
    load_if_exists: bool = False,
) -> Study:
    """Create (or, with ``load_if_exists``, resume) a study. ``BudgetError`` if no plan fits the budget."""
    from planner.storage import DuplicateStudy

    if name is not None and load_if_exists:
        try:
            return load_study(name, storage, environment=environment)
        except KeyError:
            pass
    space = space or SearchSpace.from_info(environment.info)
    plan, cost = cheapest_plan(environment, space, budget)
    if not budget.allows(cost):
        raise BudgetError(
            f"budget {budget} is below the cheapest plan ({plan.summary()} costs "
            f"{budget.spent(cost):.4g} {budget.unit.value}): raise the budget"
        )
    if isinstance(strategy, str):
        strategy = make_strategy(strategy, seed, strategy_params)
    name = name or _fresh_name(storage, environment)
    if not _STUDY_NAME.match(name):
        raise InvalidStudyName(f"invalid study name {name!r}: use letters, digits and _ . : @ + - (at most 100 characters)")
    try:
        record = storage.create_study(
            name=name,
            strategy=strategy.name,
            strategy_params=strategy.params(),
            environment=environment.spec(),
            budget=budget,
            seed=strategy.seed,
            space=space.spec(),
        )
    except DuplicateStudy:
        raise StudyExists(f"a study named {name!r} exists already: resume it (--resume) or choose another --name") from None
    return Study(record, storage, environment, strategy, space)


def load_study(name: str, storage: BaseStorage, *, environment: Environment | None = None) -> Study:
    """Resume a stored study by name: environment, space and strategy are rebuilt from what was stored."""
    record = storage.get_study_by_name(name)
    environment = environment or environment_from_spec(record.environment)
    strategy = make_strategy(record.strategy, record.seed, record.strategy_params)
    return Study(record, storage, environment, strategy, SearchSpace.from_spec(record.space))


def _fresh_name(storage: BaseStorage, environment: Environment) -> str:
    taken = {s.name for s in storage.list_studies()}
    base = environment.info.name
    index = 1
    while f"{base}-{index}" in taken:
        index += 1
    return f"{base}-{index}"
