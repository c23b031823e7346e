"""The insight heuristic: AgentTTS's three insights as rules, needing no planner LLM.

1. Stages prefer different models. On a single-stage task every model is probed once, at the smallest sample
   count. On a multi-stage task whose budget gives every stage's costliest model ``IN_CONTEXT_MIN_SAMPLES``
   samples, the models are compared in context and at scale (``in_context_probes``): one plan runs every stage's
   costliest model, then each stage in turn tries a smaller model at the same spend (the middle one by size,
   then smaller while the smaller does as well). On a tighter budget each stage's cheapest and costliest model
   are probed once with the other stages at their cheapest (``probes_every_model``). Unprobed models are scored
   between the probed ones. A stage whose probes differ by less than the noise is unresolved, and the assembly
   starts it from its costliest model (``TIE_Z``).
2. More samples help up to a point: grow the best models' sample counts toward the budget, and stop
   growing a node of the best plan once its last doubling gained less than ``plateau`` (score, 0..1).
3. Stages interact: after the probes, moves change one stage at a time (and trade budget between two
   stages), judged by the whole plan's score, so an earlier stage's allocation is re-tuned when a later
   stage changes what it needs.

After the probes come two assembled plans, each stage's best-probed model at a floor of samples scaled to the
budget (``assembly_floors``); on a multi-stage task where the first of them cannot keep the best model of the stage
whose probes lie furthest apart, a third that keeps it beside the others' cheapest models at many samples
(``_focused_assembly``); then a best-first local search around the incumbent (the best plan so far), on a
multi-stage task with one trial in ``MODEL_EVERY`` given to the plan a stage-additive model fitted to the trials
predicts best (``model``, below).

Where the environment keeps an evaluation's samples (``Environment.prefix_scores``), a plan whose last stage runs one
model at ``n`` samples also shows that stage's vote over its first 1, 2, 4, ... samples, at no extra generation. The
in-context descent compares the last stage's models at those peaks (at equal spend a model a tenth the size gets ten
times the samples, often past where its vote peaks, and lost there to a larger model it beats at its own best
count) and tries that stage's cheapest model even after a step down lost, the probes rank them so, and a count an
evaluation showed to beat every plan run is proposed next (``peak``) before any move. The search counts every plan an
evaluation showed as tried, and judges a trade that halves or doubles the last stage by what the samples showed of
that (``_last_stage_doublings``).
Its moves:

- grow or shrink: double or halve a node's samples; halving a node whose count a jump set (a move other
  than a doubling, or the assembly) is a ``check``: nothing has shown that half as many samples do worse,
  and past a model's plateau they do better and free budget;
- swap a model for a better-probed one at a count that fits, or paid for by fewer samples on the other stages;
- downsize to a cheaper model that probed about as well, at the samples the same spend buys (and again with
  the saving spent on doubling a node of another stage, where that fits); on a multi-stage task also to a
  cheaper model that probed worse (``resample``; ranked with a swap once ``RESAMPLE_AFTER`` search moves are
  tried, below a downsize before): a probe there is measured through the other stages at their weakest, and
  one sample does not show what a model gains from many, which on a stage that gains most from samples of a
  small model misses the plan's largest gain. A resample draws the count halfway, in doublings, between the
  incumbent's and the most the same spend buys: where a small model's votes peak is unknown, and the middle
  is at most half the doublings away from it (grows and checks go on from there) and generates less;
- mix a model in at its smallest count (or paid for by fewer samples of the others), or drop one;
- step the thinking cap to the next tighter or looser one; change the early-stop rule;
- trade budget between two stages (where the last stage gives or takes, judged also by what its samples showed of
  half or twice its count);
- model (insight 3, multi-stage tasks): the plan a fit of every trial's score as a sum of per-stage terms
  (``_surrogate``) predicts best under the budget, among those whose stages run models that ran there at counts
  within ``MODEL_REACH`` doublings of ones that ran; proposed, where it predicts more than the best so far, before
  the ranked moves and at most once in ``MODEL_EVERY`` trials. One-stage moves reach a plan combining what several
  trials showed only through a chain of trials; the fit separates what each stage's choice did from the others'.

Each move gets a predicted gain from what the same kind of move gained before in this study, refined by what
it gained on the same model, rule or cap direction (each mean shrunk toward the level above, so one trial
does not decide), plus a bonus for using more of the budget, since compute helps until it plateaus (a downsize
that leaves budget free gets its parent's bonus: freeing budget is its point, and past a plateau it gains).
Everything is derived from the stored trials, so the strategy resumes without state of its own.
The default strategy when no planner LLM is configured, and every agent's fallback.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from graphs.errors import AllotError
from graphs.plan import Plan
from planner.space import SearchSpace, StageChoice
from planner.strategies._base import Proposal, Strategy, StudyContext
from planner.strategies._surrogate import FeatureLayout, best_choices, fit_stage_additive
from planner.trial import FrozenTrial, TrialState

__all__ = ["InsightStrategy", "assembly_floors", "in_context_probes", "probes_every_model"]

# Prior gain (score points, 0..1 scale) of each kind of move before the study has tried it.
PRIOR_GAIN = {
    "fill": 0.03,
    "grow": 0.02,
    "mix": 0.015,
    "swap": 0.01,
    "trade": 0.008,
    "stop": 0.004,
    "cap": 0.002,
    "downsize": -0.003,
    "resample": 0.01,
    "check": 0.01,
    "shrink": -0.005,
    "drop": -0.005,
}
RESAMPLE_AFTER = 3
"""Search trials before an untried resample is ranked with a swap; until then it ranks below a downsize. The first
moves around the assembled plan (checks, grows) finish many searches, and a resample tried first would delay them."""
PRIOR_WEIGHT = 1.0
"""How many observations the prior of a move's gain weighs against the study's own evidence."""
LOSS_CAP = 0.01
"""A move that lost counts as having lost at most this much (score, 0..1) in its kind's evidence. The search keeps
its best plan, so a failed trial costs one trial whatever it scored; uncapped, one bold move that lost 20 points
outweighed several that gained, and its kind stopped being tried on every stage and model after one failure
(150 simulated settings, 20 study seeds: regret 1.82 -> 1.63 points, [-0.41, -0.01]; fresh seeds 30-44: 1.89 ->
1.72; settings within 0.5 point in 10 trials 46-51 -> 44-47 per seed set, 17 -> 17 on the fresh ones)."""
TIE_Z = 2.0
"""On a multi-stage task, a stage whose probes all differ by less than this many standard errors (of a difference,
from the probes' own spread) is unresolved, and the assembly ranks its models costliest first. There a probe is
measured through the other stages at their weakest, which shrinks what a stage's model changes toward zero (most on
the first stages, whose answers the weak later stages spoil), so a difference within the noise does not show that
the cheaper model does as well at scale, and the larger one is the better bet, as scaling goes. The cheaper ones
stay next in line: the assembly downgrades to them where the costlier does not fit, and the search downsizes to
them. On a single-stage task each probe measures its model directly, and of two models that probed alike the
cheaper, with more samples, is the better bet (insight 1)."""
SINGLE_STAGE_FLOORS = (1, 4)
MULTI_STAGE_FLOORS = (4, 16)
"""The sample counts every stage of an assembled plan affords at least, one assembly per floor (``assembly_floors``)."""
IN_CONTEXT_MIN_SAMPLES = 2
"""On a multi-stage task, the samples every stage's costliest model must afford at once for the probes to compare
each stage's models in context and at scale (``in_context_probes``); below it, one-sample probes. A one-sample
probe is measured through the other stages at their weakest and hides what a model gains from samples, so it
ranked the small models below where they win at scale, and after the probes the search first ran the optimal small
model on such a stage at the 10th trial or later (docs/insight-heuristic-history.md, stop 21). In context a
stage's models meet the others at their best and each other at the same spend, which is the comparison a plan
makes. With a single sample each the costliest models are too weak a context (studies at 2% budgets lost up to
30 points), hence two."""
MODEL_EVERY = 3
"""On a multi-stage task, once the assembled plans are tried, at most one trial in this many is the plan a
stage-additive model fitted to every trial (and every vote an evaluation showed) predicts best under the budget
(``_surrogate``), where it predicts more than the best score so far: the moves change a stage at a time, and a plan
whose stages did well in different trials is reached only through a chain of them. One in three: on the 150 simulated
settings (study seeds 0-4 / 5-9) regret 0.99 / 1.09 to 0.73 / 0.80 points; one in two 0.81, one in four 0.73 (seeds
0-4); the model's move before the assembled plans 0.86, with 62 of 150 within 0.5 point in 10 trials against 69."""
MODEL_REACH = 1
"""The model may propose a stage choice only where its models ran on that stage at a count within this many doublings
of one that ran there. Beyond the evidence an additive fit extrapolates wildly (unrestricted, its first proposals
ran 64 samples of the smallest model on three stages of four): 0 doublings 0.86 points, 2 doublings 0.75, 1 0.73."""
NARROW = 0.25
"""Two models of a stage whose probes differ by less than this share of the widest stage's spread count as about as
good: the cheaper one is worth a downsize."""


@dataclass(frozen=True)
class _Move:
    kind: str
    choices: tuple[StageChoice, ...]
    note: str
    detail: str = ""
    """What the move acts on (a model, a rule, a direction): evidence is pooled per kind and per detail."""
    frees: bool = False
    """A cheaper model at the same spend or less, the saving left for later moves: its spend bonus is its parent's,
    so leaving budget free does not rank it below moves that only keep spending."""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.detail}" if self.detail else self.kind


class InsightStrategy(Strategy):
    """Probe, then grow and mix the best models within the budget; see the module docstring."""

    name = "insight"
    parents = 1
    """How many of the best plans so far have their neighbourhoods ranked together (more once those run dry).
    One: the best plan's neighbourhood is tried out first, whose plans share most samples with it (cheap
    with sample reuse); ranking several together found plans in fewer trials on some tasks but generated
    more new samples on the multi-stage simulated task."""

    def __init__(
        self, seed: int | None = None, plateau: float = 0.005, spend_bonus: float = 0.01, model_every: int = MODEL_EVERY
    ) -> None:
        self.plateau = plateau
        self.spend_bonus = spend_bonus
        self.model_every = int(model_every)
        """0: no model moves."""
        self._stage_costs: dict[tuple[int, float, str], tuple[list[list[tuple[StageChoice, float]]], float, FeatureLayout]] = {}
        super().__init__(seed)

    def params(self) -> dict[str, float]:
        return {"plateau": self.plateau, "spend_bonus": self.spend_bonus, "model_every": self.model_every}

    def reseed(self, seed: int) -> None:
        self._rng = random.Random(seed)

    # -- proposing -------------------------------------------------------------------------------

    def propose(self, context: StudyContext, n: int) -> list[Proposal]:
        space = context.space
        tried = context.tried()
        out: list[Proposal] = []
        in_context = in_context_probes(space, context)
        probes = self._probes(context) if in_context is None else in_context
        for plan, covers in probes:
            if len(out) == n:
                return out
            if plan.plan_id not in tried:
                tried.add(plan.plan_id)
                stage, model = covers[0]
                measured = ", ".join(f"{m} on stage {s}" for s, m in covers)
                how = "at its smallest sample count" if in_context is None else "in context, at the same spend"
                why = f"probe (insight 1): {measured} {how}"
                info = {"phase": "probe", "stage": stage, "model": model, "probe": [list(c) for c in covers]}
                if in_context is not None:
                    info["in_context"] = True
                out.append(Proposal(plan, why, info))
        complete = [t for t in context.trials if t.state is TrialState.COMPLETE and t.score is not None]
        if not complete or len(out) == n:
            return out
        ranking = _assembly_ranking(space, context)
        assembled_at: dict[int, Plan | None] = {}
        for floor in assembly_floors(space):
            assembled = assembled_at[floor] = None if ranking is None else _assemble(space, context, floor, ranking)
            if assembled is not None and assembled.plan_id not in tried and len(out) < n:
                tried.add(assembled.plan_id)
                why = (
                    f"assemble: each stage's best-probed model that affords {floor}+ samples, scaled to the "
                    "budget, weakest stages first"
                )
                out.append(Proposal(assembled, why, {"phase": "assemble"}))
        usual = assembled_at.get(MULTI_STAGE_FLOORS[0])
        focused = None if ranking is None else _focused_assembly(space, context, ranking, usual)
        if focused is not None and focused.plan_id not in tried and len(out) < n:
            tried.add(focused.plan_id)
            why = (
                "assemble around one stage: the stage whose models probed furthest apart keeps its best model, "
                f"at the most samples that fit beside the others' cheapest models at {MULTI_STAGE_FLOORS[-1]}+ "
                f"({MULTI_STAGE_FLOORS[0]}+ or 1+ where that leaves no room)"
            )
            out.append(Proposal(focused, why, {"phase": "assemble"}))
        if len(out) == n:
            return out  # the batch is full: the search's neighbourhood is not needed yet
        best_score = max(t.score or 0.0 for t in complete)
        shown = list(_prefix_plans(space, context))
        for score, plan, source, k in sorted(shown, key=lambda item: (-item[0], item[3])):
            if len(out) == n:
                return out
            if plan.plan_id in tried or score <= best_score + 1e-9 or not context.fits(plan):
                continue
            tried.add(plan.plan_id)
            why = (
                f"peak (insight 2): trial {source.number}'s last stage voting over its first {k} samples scored "
                f"{100 * score:.1f}, above the best so far"
            )
            out.append(Proposal(plan, why, {"phase": "search", "move": "peak", "parent": source.number}))
            best_score = score
        if len(out) == n:
            return out
        # A plan an evaluation's samples showed is known: a trial of it would tell nothing new.
        tried |= {plan.plan_id for _, plan, _, _ in shown}
        modelled = self._modelled(space, context, complete, shown, tried, best_score)
        if modelled is not None:
            plan, predicted = modelled
            tried.add(plan.plan_id)
            parent = max(complete, key=lambda t: (t.score or 0.0, -t.number))
            why = (
                f"model (insight 3): a stage-additive fit of every trial so far predicts {100 * predicted:.1f} for this "
                "plan, the best under the budget of those whose stages ran these models at about these counts"
            )
            out.append(Proposal(plan, why, {"phase": "search", "move": "model", "parent": parent.number}))
            if len(out) == n:
                return out
        known = {p.plan_id: s for s, p, _, _ in shown} | {t.plan_id: t.score or 0.0 for t in complete}
        gains = _resample_held_back(_observed_gains(context.trials, space), context.trials)
        incumbents = sorted(complete, key=lambda t: (-(t.score or 0.0), context.spent(t.plan), t.number))
        by_number = {t.number: t for t in context.trials}
        # Best-first over the neighbourhoods of the ``parents`` best plans so far (the next ones once those
        # are tried out): a move is ranked by the score it is predicted to reach, its parent's score plus
        # what moves of its kind, and of its kind on the same model, rule or cap direction, gained so far.
        candidates: dict[str, tuple[float, _Move, Plan, FrozenTrial]] = {}
        for rank, incumbent in enumerate(incumbents):
            if rank >= self.parents and len(candidates) >= n - len(out):
                break
            base = tuple(space.choices_of(incumbent.plan))
            parent_share = context.spent(incumbent.plan) / context.budget.limit
            halving, doubling = _last_stage_doublings(space, incumbent, base, known)
            for move in self._moves(space, base, context, _jumped(space, incumbent, by_number)):
                plan = space.plan(move.choices)
                if plan.plan_id in tried or not context.fits(plan):
                    continue
                gain = _predicted_gain(gains, move)
                if move.kind == "trade":  # what the last stage's own samples showed of its counts
                    giver, receiver = move.detail.split(">")
                    if giver == space.stages[-1] and halving is not None:
                        gain += halving
                    elif receiver == space.stages[-1] and doubling is not None:
                        gain += doubling
                spend = _spend_share(context, move, plan, parent_share)
                priority = (incumbent.score or 0.0) + gain + self.spend_bonus * spend + 1e-6 * self._rng.random()
                if plan.plan_id not in candidates or priority > candidates[plan.plan_id][0]:
                    candidates[plan.plan_id] = (priority, move, plan, incumbent)
        ranked = sorted(candidates.values(), key=lambda item: -item[0])
        for priority, move, plan, incumbent in ranked[: n - len(out)]:
            tried.add(plan.plan_id)
            predicted = priority - (incumbent.score or 0.0)
            rationale = f"{move.note} (from trial {incumbent.number}, predicted gain {100 * predicted:+.1f} pts)"
            info = {"phase": "search", "move": move.kind, "key": move.key, "parent": incumbent.number}
            out.append(Proposal(plan, rationale, info))
        for _ in range(200 * n):  # every neighbourhood explored: keep going with random feasible plans
            if len(out) == n:
                break
            plan = space.sample(self._rng)
            if plan.plan_id not in tried and context.fits(plan):
                tried.add(plan.plan_id)
                out.append(Proposal(plan, "explore: every neighbour of the tried plans is tried", {"phase": "explore"}))
        return out

    def _modelled(
        self,
        space: SearchSpace,
        context: StudyContext,
        complete: Sequence[FrozenTrial],
        shown: Sequence[tuple[float, Plan, FrozenTrial, int]],
        tried: set[str],
        best_score: float,
    ) -> tuple[Plan, float] | None:
        """The plan the stage-additive model fitted to the trials predicts best, and its prediction (``MODEL_EVERY``,
        ``MODEL_REACH``); ``None`` on a single-stage task (each probe measures its model directly there), before the
        assembled plans, within ``model_every`` trials of the last such move, or where no untried plan the model may
        propose is predicted above ``best_score``."""
        if self.model_every <= 0 or len(space.stages) < 2:
            return None
        if not any(t.strategy_info.get("phase") in ("assemble", "search") for t in context.trials):
            return None
        recent = [t.strategy_info.get("move") for t in context.trials[-(self.model_every - 1) :]] if self.model_every > 1 else []
        if "model" in recent:
            return None
        observations: list[tuple[Sequence[StageChoice], float]] = []
        for trial in complete:
            try:
                observations.append((space.choices_of(trial.plan), trial.score or 0.0))
            except (KeyError, ValueError, AllotError):
                continue  # not a plan of this space (an agent's graph)
        observations += [(space.choices_of(plan), score) for score, plan, _, _ in shown]
        options, limit, layout = self._stage_options(space, context)
        observations = [(c, y) for c, y in observations if all(layout.knows(i, choice) for i, choice in enumerate(c))]
        model = fit_stage_additive(layout, observations)
        if model is None:
            return None
        ran: dict[tuple[int, str], set[int]] = {}
        for choices, _ in observations:
            for index, choice in enumerate(choices):
                for m, k in choice.samples:
                    ran.setdefault((index, m), set()).add(round(math.log2(k)))

        def near(index: int, choice: StageChoice) -> bool:
            return all(
                any(abs(round(math.log2(k)) - x) <= MODEL_REACH for x in ran.get((index, m), ())) for m, k in choice.samples
            )

        allowed = [[(c, cost) for c, cost in stage if near(i, c)] for i, stage in enumerate(options)]
        for choices in best_choices(model, allowed, limit):
            plan = space.plan(choices)
            if plan.plan_id in tried or not context.fits(plan):
                continue
            predicted = model.predict(choices)
            return (plan, predicted) if predicted > best_score else None
        return None

    def _stage_options(
        self, space: SearchSpace, context: StudyContext
    ) -> tuple[list[list[tuple[StageChoice, float]]], float, FeatureLayout]:
        """Every stage's choices with their cost (budget units) beside the other stages at their cheapest, the budget
        left for the stages' costs over that cheapest plan (a plan's cost is the cheapest plan's plus each stage's
        excess), and the model's features of the space. Computed once per study (a strategy serves one)."""
        key = (id(space), context.budget.limit, str(context.budget.unit))
        if key not in self._stage_costs:
            anchor = [_cheapest_fitting(space, s, context) for s in space.stages]
            floor = _spent(context, space.plan(anchor))
            options: list[list[tuple[StageChoice, float]]] = []
            for index, stage in enumerate(space.stages):
                costed = []
                for choice in space.stage_choices(stage):
                    excess = _spent(context, space.plan([choice if i == index else c for i, c in enumerate(anchor)])) - floor
                    if math.isfinite(excess):
                        costed.append((choice, excess))
                options.append(costed)
            sizes = {m: _log_size(context, m) for stage in space.stages for m in space.stage_models[stage]}
            self._stage_costs[key] = (options, context.budget.limit - floor, FeatureLayout(space, sizes))
        return self._stage_costs[key]

    def _probes(self, context: StudyContext) -> Iterator[tuple[Plan, list[tuple[str, str]]]]:
        """Insight 1: models probed one stage at a time at their smallest count, the other stages at the
        anchor (each stage's cheapest model, as AgentTTS's cheap default); yields each probe plan with the
        (stage, model) pairs it measures (the anchor plan measures the anchor model on every stage).

        First each stage's cheapest and costliest model; then, on a single-stage task only, the others
        (``probes_every_model``)."""
        space = context.space
        anchor = [_cheapest_fitting(space, s, context) for s in space.stages]
        order = random.Random(self.seed)  # the seed decides the probing order, nothing else
        plans: dict[tuple[str, str], Plan] = {}
        first: list[tuple[str, str]] = []
        later: list[tuple[str, str]] = []
        for index, stage in enumerate(space.stages):
            models = list(space.stage_models[stage])
            order.shuffle(models)
            for model in models:
                choice = _smallest(space, model, context, anchor, index)
                if choice is not None:
                    choices = list(anchor)
                    choices[index] = choice
                    plans[(stage, model)] = space.plan(choices)
            probed = [m for m in models if (stage, m) in plans]
            if not probed:
                continue
            by_cost = sorted(probed, key=lambda m, s=stage: context.spent(plans[(s, m)]))
            ends = {by_cost[0], by_cost[-1], anchor[index].samples[0][0]}
            first += [(stage, m) for m in probed if m in ends]
            later += [(stage, m) for m in probed if m not in ends]
        covers: dict[str, list[tuple[str, str]]] = {}
        for key, plan in plans.items():
            covers.setdefault(plan.plan_id, []).append(key)
        yielded: set[str] = set()

        def emit(keys: list[tuple[str, str]]) -> Iterator[tuple[Plan, list[tuple[str, str]]]]:
            for key in keys:
                plan = plans[key]
                if plan.plan_id not in yielded:
                    yielded.add(plan.plan_id)
                    yield plan, covers[plan.plan_id]

        yield from emit(first)
        if probes_every_model(space):
            yield from emit(later)

    def _moves(
        self, space: SearchSpace, base: tuple[StageChoice, ...], context: StudyContext, jumped: frozenset[int] = frozenset()
    ) -> Iterator[_Move]:
        probe = _probe_scores(context, space)
        # A stage's model choice matters as much as its probes differ: models that probed within ``NARROW`` of
        # the widest stage's spread of the current one count as equally good (worth a cheaper model there).
        spread = _stage_spreads(space, probe)
        tolerance = NARROW * max(spread.values(), default=0.0)
        for index in range(len(space.stages)):
            _impute(space, base, index, probe, context)
        scored = {t.plan_id: t.score for t in context.trials if t.state is TrialState.COMPLETE and t.score is not None}
        incumbent = space.plan(base)
        here, here_score = _spent(context, incumbent), scored.get(incumbent.plan_id)
        for index, stage in enumerate(space.stages):
            choice = base[index]
            counts = dict(choice.samples)
            ranked_models = sorted(space.stage_models[stage], key=lambda m: -probe.get((stage, m), 0.0))

            def with_stage(new: StageChoice, index: int = index) -> tuple[StageChoice, ...]:
                return tuple(new if i == index else c for i, c in enumerate(base))

            def rebuilt(samples: dict[str, int], stage: str = stage, choice: StageChoice = choice) -> StageChoice:
                order = space.stage_models[stage]
                return _with_samples(choice, dict(sorted(samples.items(), key=lambda mn: order.index(mn[0]))))

            def fits(samples: dict[str, int]) -> bool:
                return context.fits(space.plan(with_stage(rebuilt(samples))))

            plateaued = False  # insight 2: the last doubling of a node gained under ``plateau``, so stop growing it
            for model, n in counts.items():
                rest = {k: v for k, v in counts.items() if k != model}
                bigger = _next(space.n_choices[model], n, +1)
                smaller = _next(space.n_choices[model], n, -1)
                halved = None if smaller is None else space.plan(with_stage(rebuilt({**counts, model: smaller})))
                half = None if halved is None else scored.get(halved.plan_id)
                flat = here_score is not None and half is not None and here_score - half < self.plateau
                plateaued = plateaued or flat
                if bigger is not None and not flat:
                    note = f"grow {model} to {bigger} samples"
                    yield _Move("grow", with_stage(rebuilt({**counts, model: bigger})), note, model)
                if smaller is not None:
                    kind, note = (
                        ("check", f"check {model} at {smaller}: a jump set its count")
                        if index in jumped
                        else ("shrink", f"shrink {model} to {smaller}")
                    )
                    yield _Move(kind, with_stage(rebuilt({**counts, model: smaller})), note, model)
                paid_for = False
                for other in ranked_models:
                    if other in counts or probe.get((stage, other), 0.0) < probe.get((stage, model), 0.0):
                        continue
                    # The better model at the most samples (up to the current count) the budget allows: a
                    # better model usually costs more per sample, so keeping the count would not fit.
                    fitting = [c for c in sorted(space.n_choices[other], reverse=True) if c <= max(n, 1)]
                    count = next((c for c in fitting if fits({**rest, other: c})), None)
                    if count is not None:
                        note = f"swap {model} for better-probed {other} x{count}"
                        yield _Move("swap", with_stage(rebuilt({**rest, other: count})), note, other)
                        break
                    if paid_for:
                        continue  # the next better model that fits as it is, if any
                    paid_for = True
                    # Insight 3: the best model does not fit beside the other stages as they are, so they pay
                    # for it with fewer samples (the largest nodes halved first), at its two smallest counts.
                    for count in sorted(space.n_choices[other])[:2]:
                        paid = _paid(space, with_stage(rebuilt({**rest, other: count})), (index, other), context)
                        if paid is not None:
                            note = f"swap {model} for better-probed {other} x{count}, paid for by fewer samples elsewhere"
                            yield _Move("swap", paid, note, other)
                # Insight 1 at equal cost: a cheaper model with more samples (as many as the same spend buys, or
                # its most, which frees budget for the other stages) can beat a better-probed one.
                for other in ranked_models:
                    if other in counts or _spent(context, space.plan(with_stage(rebuilt({**rest, other: n})))) >= here:
                        continue
                    kind = "downsize"
                    if probe.get((stage, other), 0.0) < probe.get((stage, model), 0.0) - tolerance:
                        if len(space.stages) < 2:
                            continue
                        # A one-sample probe cannot show how a model gains from samples, and on a multi-stage task
                        # it is measured through the other stages at their weakest, which damps and hides what a
                        # stage's model does: there it does not veto the cheaper model. Ranked with a swap once the first
                        # search moves are tried: it is the one move that tests what many samples of a cheaper model do.
                        kind = "resample"
                    more = [
                        c
                        for c in sorted(space.n_choices[other], reverse=True)
                        if (c > n or c == max(space.n_choices[other]))
                        and _spent(context, space.plan(with_stage(rebuilt({**rest, other: c})))) <= here * (1 + 1e-9)
                    ]
                    if more:
                        count = more[0]
                        if kind == "resample":  # halfway in doublings: see the module docstring
                            count = _closest(space.n_choices[other], round(math.sqrt(max(n, 1) * more[0])))
                        note = f"{kind} {model} to cheaper {other} x{count}"
                        downsized = with_stage(rebuilt({**rest, other: count}))
                        yield _Move(kind, downsized, note, other, frees=True)
                        # Counts come in doublings, so the same spend is seldom matched: what is left over
                        # doubles a node of another stage where that now fits (insight 3).
                        for grown, where in _reinvested(space, downsized, index, context):
                            yield _Move(kind, grown, f"{note}, the saving spent on {where}", other)
                if len(counts) > 1:
                    yield _Move("drop", with_stage(rebuilt(rest)), f"drop {model} from the mixture", model)
            # Insight 2, boldly: scale every node of the stage by the largest power of two that fits.
            filled = None if plateaued else _fill(space, base, index, counts, context, rebuilt)
            if filled is not None:
                yield _Move("fill", filled[0], f"scale stage {stage} up x{filled[1]} to use the budget")
            if len(counts) < space.max_models:
                for other in ranked_models:
                    if other not in counts:
                        # Insights 1 and 2: a second model enters at its smallest count (the cheapest test of
                        # the mixture; grow moves scale it), at the current count, and, where the smallest
                        # does not fit, paid for by halving the incumbent's largest node. A few tie-breaking
                        # samples and an equal share are different ideas: their evidence is kept apart.
                        low = min(space.n_choices[other])
                        n = _closest(space.n_choices[other], min(counts.values()))
                        yield _Move("mix", with_stage(rebuilt({**counts, other: low})), f"mix in {other} x{low}", f"{other} low")
                        mixed = {**counts, other: n}
                        if n != low:
                            yield _Move("mix", with_stage(rebuilt(mixed)), f"mix in {other} x{n}", f"{other} matched")
                        filled = None if plateaued else _fill(space, with_stage(rebuilt(mixed)), index, mixed, context, rebuilt)
                        if filled is not None:
                            yield _Move("fill", filled[0], f"mix in {other} and scale up x{filled[1]} to use the budget")
                        paid = dict(counts)
                        while not fits({**paid, other: low}):
                            top = max(paid, key=lambda m: paid[m])
                            smaller = _next(space.n_choices[top], paid[top], -1)
                            if smaller is None:
                                break
                            paid[top] = smaller
                        if paid != counts and fits({**paid, other: low}):
                            note = f"mix in {other} x{low}, paid for by fewer samples of {', '.join(paid)}"
                            yield _Move("mix", with_stage(rebuilt({**paid, other: low})), note, f"{other} low")
                        break
            for stop in space.early_stop:
                if stop != choice.early_stop and (stop is None or sum(counts.values()) > stop):
                    label = "no early stop" if stop is None else f"stop once {stop} answers agree"
                    yield _Move("stop", with_stage(replace(choice, early_stop=stop)), label, str(stop))
            # Caps in order of how much they allow (no cap is the widest): a move steps to a neighbour.
            caps = sorted(space.caps, key=_cap_order)
            if choice.cap in caps:
                position = caps.index(choice.cap)
                for step in (-1, +1):
                    if 0 <= position + step < len(caps):
                        cap = caps[position + step]
                        note = f"thinking cap {cap or 'none'}"
                        yield _Move("cap", with_stage(replace(choice, cap=cap)), note, "tighter" if step < 0 else "looser")
            # Insight 3: trade budget between stages.
            for other_index, other_stage in enumerate(space.stages):
                if other_index == index:
                    continue
                giver = dict(base[other_index].samples)
                model, n = max(giver.items(), key=lambda mn: mn[1])
                smaller = _next(space.n_choices[model], n, -1)
                top = max(counts, key=lambda m: probe.get((stage, m), 0.0))
                bigger = _next(space.n_choices[top], counts[top], +1)
                if smaller is None or bigger is None:
                    continue
                traded = list(base)
                traded[index] = rebuilt({**counts, top: bigger})
                traded[other_index] = replace(base[other_index], samples=tuple({**giver, model: smaller}.items()))
                note = f"move budget from stage {other_stage} to stage {stage}"
                yield _Move("trade", tuple(traded), note, f"{other_stage}>{stage}")


def _last_stage_doublings(
    space: SearchSpace, trial: FrozenTrial, base: Sequence[StageChoice], known: Mapping[str, float]
) -> tuple[float | None, float | None]:
    """What halving and what doubling the last stage's single model of ``trial`` changes its score by, as far as the
    evaluations show (``None`` where they show nothing). Halving: its vote over half the samples
    (``Environment.prefix_scores``). Doubling: the plan with twice the samples where a trial or an evaluation's samples
    showed it (the parent of a ``peak``), else half of what the last doubling gained (returns diminish, insight 2).
    A trade between that stage and another is judged by them: it loses or gains this before the other stage's
    change, which only its kind's evidence predicts."""
    if trial.score is None or len(base[-1].samples) != 1:
        return None, None
    ((model, n),) = base[-1].samples

    def at(count: int | None) -> float | None:
        if count is None:
            return None
        return known.get(_last_stage_at(space, base, model, count).plan_id)

    half = at(_next(space.n_choices[model], n, -1))
    halving = None if half is None else half - trial.score
    double = at(_next(space.n_choices[model], n, +1))
    if double is not None:
        return halving, double - trial.score
    return halving, None if halving is None else -halving / 2


def _spend_share(context: StudyContext, move: _Move, plan: Plan, parent_share: float) -> float:
    """The share of the budget a move's spend bonus is computed on: its plan's, or for a move that frees budget
    on purpose (``_Move.frees``), at least its parent's (``parent_share``, computed once per parent)."""
    spend = context.spent(plan) / context.budget.limit
    return max(spend, parent_share) if move.frees else spend


def _reinvested(
    space: SearchSpace, choices: tuple[StageChoice, ...], index: int, context: StudyContext
) -> Iterator[tuple[tuple[StageChoice, ...], str]]:
    """``choices`` with one node of a stage other than ``index`` doubled, for each such node that then fits."""
    for other_index, choice in enumerate(choices):
        if other_index == index:
            continue
        counts = dict(choice.samples)
        for model, n in counts.items():
            bigger = _next(space.n_choices[model], n, +1)
            if bigger is None:
                continue
            grown = tuple(_with_samples(c, {**counts, model: bigger}) if i == other_index else c for i, c in enumerate(choices))
            if context.fits(space.plan(grown)):
                yield grown, f"{model} x{bigger} on stage {space.stages[other_index]}"


def _jumped(space: SearchSpace, trial: FrozenTrial, by_number: Mapping[int, FrozenTrial]) -> frozenset[int]:
    """The stages whose sample counts ``trial`` set by a jump (assembled, or changed by a move other than a
    doubling or halving): no trial has shown that half as many samples there do worse."""
    info = trial.strategy_info
    if info.get("phase") == "assemble":
        return frozenset(range(len(space.stages)))
    parent = by_number.get(info.get("parent", -1))
    if parent is None or info.get("move") in ("grow", "shrink", "check"):
        return frozenset()
    old, new = space.choices_of(parent.plan), space.choices_of(trial.plan)
    return frozenset(i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a.samples != b.samples)


def probes_every_model(space: SearchSpace) -> bool:
    """Whether every model is probed once (a single-stage task) or only each stage's cheapest and costliest (a
    multi-stage task whose budget is too tight for ``in_context_probes``). There a probe costs a trial per stage and
    model and says little: it is measured through the other stages at their weakest, which damps it, and at one
    sample, which hides what a model gains from many. The others get scores between the two ends (``_impute``), and
    the assembly and the search try them in context, at scale."""
    return len(space.stages) == 1


def assembly_floors(space: SearchSpace) -> tuple[int, ...]:
    """The floors of the assemblies tried after the probes. On a single-stage task each probe measures its model
    directly, so the best-probed model at a few samples and at more (1+, 4+) bracket the optimum. On a multi-stage
    task a one-sample probe is damped by the other stages and hides what a model gains from samples: there the best
    models at a few samples (4+) and the cheaper ones at many (16+: insight 1 at equal cost, insight 2) bracket it.
    On 150 simulated settings (2-4 stages, 2-50% budgets, 20 study seeds) that took the regret after 20 trials from
    2.06 to 1.82 points, lower on each of four seed sets; the 1+ assembly it replaced had been within 0.5 point of
    the optimum on none of 99 (docs/insight-heuristic-history.md, stop 20)."""
    return SINGLE_STAGE_FLOORS if len(space.stages) == 1 else MULTI_STAGE_FLOORS


@dataclass(frozen=True)
class _Ranking:
    """What the assembly builds from: per stage, the models with a probe score (measured or imputed), best first
    (ties: the cheaper; on a multi-stage task, every model of a stage whose probes differ by less than the noise:
    the costlier first, see ``TIE_Z``), and their scores and probe costs. Computed once per propose, used for every floor."""

    ranked: tuple[tuple[str, ...], ...]
    probe: Mapping[tuple[str, str], float]
    probe_cost: Mapping[tuple[str, str], float]


def in_context_probes(space: SearchSpace, context: StudyContext) -> Iterator[tuple[Plan, list[tuple[str, str]]]] | None:
    """Insight 1 on a multi-stage task, in context and at scale: the probe plans and the (stage, model) pairs each
    measures; ``None`` on a single-stage task or where the budget does not give every stage's costliest model
    ``IN_CONTEXT_MIN_SAMPLES`` samples at once (then the one-sample probes serve).

    The first plan runs every stage's costliest model, the samples grown in turn while the plan fits. Then each
    stage tries, at the same spend (the most samples that cost no more than the first plan), the model halfway in
    log size between its cheapest and the current one; where that does at least as well it goes on down (halfway
    again, then the cheapest), else the stage is done, but for the last stage where evaluations show its votes over
    fewer samples (``prefix_scores``): there one trial shows a model at every count up to the spend's, and the
    cheapest, which gains most from samples, is tried once after the loss (a model size that lost does not show that
    a smaller one loses too). At equal spend a small model's many votes and a large model's few trade off, and the
    best size often lies between the ends, which a guess between two end probes never ranks first. A step waits for
    the step before it to be scored. ``None`` too where the study has probed the one-sample way already (an agent's
    probes, which this heuristic then searches from)."""
    if len(space.stages) < 2 or any(_probed(t) and not t.strategy_info.get("in_context") for t in context.trials):
        return None
    counts = _in_context_base(space, context)
    if counts is None:
        return None
    cap = _widest_cap(space)

    def plan_of(allocation: Sequence[Mapping[str, int]]) -> Plan:
        return space.plan([StageChoice(tuple(a.items()), cap) for a in allocation])

    base = plan_of(counts)
    here = _spent(context, base)

    def at_spend(index: int, model: str) -> Plan | None:
        for count in sorted(space.n_choices[model], reverse=True):
            allocation = [dict(a) for a in counts]
            allocation[index] = {model: count}
            plan = plan_of(allocation)
            if _spent(context, plan) <= here * (1 + 1e-9) and context.fits(plan):
                return plan
        return None

    def halfway(stage: str, low: str, high: str) -> str:
        bottom, top = _log_size(context, low), _log_size(context, high)
        inside = [m for m in space.stage_models[stage] if bottom < _log_size(context, m) < top]
        middle = (bottom + top) / 2
        return min(inside, key=lambda m: (abs(_log_size(context, m) - middle), m)) if inside else low

    finished = {t.plan_id: t for t in context.trials if t.state is TrialState.COMPLETE and t.score is not None}

    def score_of(plan: Plan, at_peak: bool) -> float | None:
        """The plan's trial score (``None`` while pending); on the last stage each model at its peak."""
        trial = finished.get(plan.plan_id)
        if trial is None:
            return None
        return _peak_score(context, trial) if at_peak else trial.score

    def steps() -> Iterator[tuple[Plan, list[tuple[str, str]]]]:
        yield base, [(stage, next(iter(counts[i]))) for i, stage in enumerate(space.stages)]
        for index, stage in enumerate(space.stages):
            low = min(space.stage_models[stage], key=lambda m: (_log_size(context, m), m))
            high, high_plan = next(iter(counts[index])), base
            at_peak = index == len(space.stages) - 1 and context.prefix_scores is not None
            while (model := halfway(stage, low, high)) != high:
                plan = at_spend(index, model)
                if plan is None:
                    break
                yield plan, [(stage, model)]
                mine, theirs = score_of(plan, at_peak), score_of(high_plan, at_peak)
                if model == low or mine is None or theirs is None:
                    break  # the cheapest is reached or a score is pending
                if mine < theirs:
                    if not at_peak:
                        break  # the larger model did better
                    # On the last stage one trial shows a model's vote at every count up to the spend's (its peaks):
                    # the cheapest gains most from samples, and losing in the middle does not show it loses too.
                    cheapest = at_spend(index, low)
                    if cheapest is not None:
                        yield cheapest, [(stage, low)]
                    break
                high, high_plan = model, plan

    return steps()


def _in_context_base(space: SearchSpace, context: StudyContext) -> list[dict[str, int]] | None:
    """Every stage's costliest model (by its price on the stage at one sample), the stages' samples doubled in turn
    while the plan fits; ``None`` unless every stage gets ``IN_CONTEXT_MIN_SAMPLES``."""
    anchor = [_cheapest_fitting(space, s, context) for s in space.stages]
    cap = _widest_cap(space)
    counts: list[dict[str, int]] = []
    for index, stage in enumerate(space.stages):
        top = max(space.stage_models[stage], key=lambda m, i=index: (_spent_smallest(space, anchor, i, m, context), m))
        counts.append({top: min(space.n_choices[top])})

    def fits(allocation: Sequence[Mapping[str, int]]) -> bool:
        return context.fits(space.plan([StageChoice(tuple(a.items()), cap) for a in allocation]))

    if not fits(counts):
        return None
    growing = True
    while growing:
        growing = False
        for index, allocation in enumerate(counts):
            ((model, n),) = allocation.items()
            bigger = _next(space.n_choices[model], n, +1)
            grown = [{model: bigger} if i == index else a for i, a in enumerate(counts)]
            if bigger is not None and fits(grown):
                counts, growing = grown, True
    if any(n < IN_CONTEXT_MIN_SAMPLES for allocation in counts for n in allocation.values()):
        return None
    return counts


def _assembly_ranking(space: SearchSpace, context: StudyContext) -> _Ranking | None:
    """The probes' ranking of each stage's models; ``None`` while a stage has no probe."""
    probe = _probe_scores(context, space)
    measured_keys = set(probe)
    probe_cost = _probe_costs(context)
    anchor = tuple(_cheapest_fitting(space, s, context) for s in space.stages)
    for index, stage in enumerate(space.stages):
        _impute(space, anchor, index, probe, context)
        for model in space.stage_models[stage]:
            if (stage, model) in probe and (stage, model) not in probe_cost:  # imputed: costed as its probe would be
                probe_cost[(stage, model)] = _spent_smallest(space, anchor, index, model, context)
    # On a multi-stage task, a stage whose probes all lie within the noise of each other is unresolved: see ``TIE_Z``.
    band = TIE_Z * _probe_noise(context) if len(space.stages) > 1 else 0.0
    ranked: list[list[str]] = []
    for stage in space.stages:
        known = [m for m in space.stage_models[stage] if (stage, m) in probe]
        if not known:
            return None
        measured = [probe[(stage, m)] for m in known if (stage, m) in measured_keys]
        if len(measured) > 1 and max(measured) - min(measured) < band:  # unresolved: the costlier first
            ranked.append(sorted(known, key=lambda m, s=stage: -probe_cost.get((s, m), 0.0)))
        else:
            ranked.append(sorted(known, key=lambda m, s=stage: (-probe[(s, m)], probe_cost.get((s, m), 0.0))))
    return _Ranking(tuple(tuple(r) for r in ranked), probe, probe_cost)


def _probe_noise(context: StudyContext) -> float:
    """The standard error of the difference between two probes' scores: from the median standard error of the
    probes' own scores (their spread over repeats or sample orderings); 0 where evaluations report no spread."""
    errors = sorted(
        t.spread / math.sqrt(len(t.scores) - 1) for t in _scored_probes(context) if t.spread is not None and len(t.scores) > 1
    )
    return math.sqrt(2.0) * errors[len(errors) // 2] if errors else 0.0


def _assemble(
    space: SearchSpace,
    context: StudyContext,
    min_samples: int | Sequence[int] = 1,
    ranking: _Ranking | None = None,
    keep: int | None = None,
) -> Plan | None:
    """Insights 1-3 in one plan: each stage's best-probed model, downgraded (the stage whose model costs
    most moves to its next best cheaper model; stage ``keep`` only once no other can) until every stage affords
    ``min_samples`` (one floor for all, or one per stage) within the budget, then the samples of stage ``keep``
    and then of the weakest stage that can still grow are doubled while the plan fits."""
    ranking = ranking or _assembly_ranking(space, context)
    if ranking is None:
        return None
    ranked, probe, probe_cost = ranking.ranked, ranking.probe, ranking.probe_cost
    cap = _widest_cap(space)
    picks = [0] * len(space.stages)

    def plan_of(allocation: list[dict[str, int]]) -> Plan:
        return space.plan([StageChoice(tuple(a.items()), cap) for a in allocation])

    floors = [min_samples] * len(space.stages) if isinstance(min_samples, int) else list(min_samples)

    def start() -> list[dict[str, int]]:
        return [
            {ranked[i][picks[i]]: _closest(space.n_choices[ranked[i][picks[i]]], floors[i])} for i in range(len(space.stages))
        ]

    def cost_of(i: int, k: int) -> float:
        return probe_cost.get((space.stages[i], ranked[i][k]), 0.0)

    while not context.fits(plan_of(start())):
        options = [
            (
                cost_of(i, picks[i]),
                i,
                next(k for k in range(picks[i] + 1, len(ranked[i])) if cost_of(i, k) < cost_of(i, picks[i])),
            )
            for i in range(len(picks))
            if any(cost_of(i, k) < cost_of(i, picks[i]) for k in range(picks[i] + 1, len(ranked[i])))
        ]
        options = [o for o in options if o[1] != keep] or options
        if not options:
            return None
        _, stage_index, cheaper = max(options)
        picks[stage_index] = cheaper
    counts = start()
    growing = set(range(len(space.stages)))
    while growing:
        index = keep if keep in growing else min(growing, key=lambda i: (max(probe[(space.stages[i], m)] for m in counts[i]), i))
        ((model, n),) = counts[index].items()
        bigger = _next(space.n_choices[model], n, +1)
        trial = [dict(c) for c in counts]
        if bigger is not None:
            trial[index] = {model: bigger}
        if bigger is None or not context.fits(plan_of(trial)):
            growing.discard(index)
            continue
        counts = trial
    return plan_of(counts)


def _focused_assembly(space: SearchSpace, context: StudyContext, ranking: _Ranking, usual: Plan | None) -> Plan | None:
    """On a multi-stage task where the 4+ assembly (``usual``, as ``propose`` built it) cannot keep the best model
    of the stage whose probes lie furthest apart (where the model matters most), a plan that keeps it: the other
    stages run their cheapest models at 16+ samples, that stage its best model at as many samples as then fit, and
    what is left grows the others, weakest first. The optimum of a tight budget is often such a plan, one large
    model at a few samples and small ones at many, which no assembly of one floor for every stage builds and no
    single move reaches from one (the other stages would change model at once); on 150 simulated settings it took
    the regret after 20 trials from 1.58 to 1.32 points (docs/insight-heuristic-history.md, stop 24). Where 16 samples
    of the others leave no room for that model, they get 4+, then 1+ (at 2% the optimum is often the one large model
    once, the others at 4-8 samples). ``None`` where there is no such stage."""
    if len(space.stages) < 2:
        return None
    spreads = _stage_spreads(space, ranking.probe)
    if not spreads:
        return None
    _, focus = max((spread, space.stages.index(stage)) for stage, spread in spreads.items())
    best = ranking.ranked[focus][0]
    if usual is None or any(node.model == best for node in usual.stages[focus].nodes):
        return None
    cheapest = tuple(
        ranked if i == focus else tuple(sorted(ranked, key=lambda m, s=space.stages[i]: ranking.probe_cost.get((s, m), 0.0)))
        for i, ranked in enumerate(ranking.ranked)
    )
    for floor in (MULTI_STAGE_FLOORS[-1], MULTI_STAGE_FLOORS[0], 1):
        floors = [floor] * len(space.stages)
        floors[focus] = 1
        focused = _assemble(space, context, floors, _Ranking(cheapest, ranking.probe, ranking.probe_cost), keep=focus)
        if focused is not None and any(node.model == best for node in focused.stages[focus].nodes):
            return focused
    return None


def _stage_spreads(space: SearchSpace, probe: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """How far apart each stage's models probed (best minus worst), for the stages with two scores or more."""
    return {
        stage: max(scores) - min(scores)
        for stage in space.stages
        if len(scores := [v for (s, _), v in probe.items() if s == stage]) > 1
    }


def _impute(
    space: SearchSpace, base: tuple[StageChoice, ...], index: int, probe: dict[tuple[str, str], float], context: StudyContext
) -> None:
    """Give the models left unprobed on stage ``index`` a probe score interpolated between the probed models
    next cheaper and next costlier, on the log of their sizes (a bigger model does better, by about as much as the
    log of its size suggests, as scaling laws go); beyond the probed ones, the nearest one's. Nothing where the
    stage has no probe yet."""
    stage = space.stages[index]
    if not any((stage, m) in probe for m in space.stage_models[stage]):
        return

    ranked = sorted(space.stage_models[stage], key=lambda model: _spent_smallest(space, base, index, model, context))
    known = [i for i, m in enumerate(ranked) if (stage, m) in probe]
    for i, model in enumerate(ranked):
        if (stage, model) in probe:
            continue
        below = [k for k in known if k < i]
        above = [k for k in known if k > i]
        if below and above:
            lo, hi = below[-1], above[0]
            a, b = probe[(stage, ranked[lo])], probe[(stage, ranked[hi])]
            low, mid, high = (_log_size(context, m) for m in (ranked[lo], model, ranked[hi]))
            share = (mid - low) / (high - low) if high > low else (i - lo) / (hi - lo)
            probe[(stage, model)] = a + (b - a) * min(1.0, max(0.0, share))
        else:
            probe[(stage, model)] = probe[(stage, ranked[(below or above)[-1 if below else 0]])]


def _spent_smallest(space: SearchSpace, base: Sequence[StageChoice], index: int, model: str, context: StudyContext) -> float:
    """What ``base`` costs (budget units) with stage ``index`` running ``model`` at its smallest count, at that
    stage's cap: how a model is priced on a stage where it has not been probed."""
    choice = StageChoice(((model, min(space.n_choices[model])),), base[index].cap)
    return _spent(context, space.plan(tuple(choice if i == index else c for i, c in enumerate(base))))


def _log_size(context: StudyContext, model: str) -> float:
    """The log of a model's active parameters: what it costs per token, and the scale its quality goes with."""
    spec = context.info.models.get(model)
    return math.log(spec.active_params) if spec is not None else 0.0


def _paid(
    space: SearchSpace, choices: tuple[StageChoice, ...], keep: tuple[int, str], context: StudyContext
) -> tuple[StageChoice, ...] | None:
    """``choices`` made to fit by halving its largest nodes (most samples first), all but ``keep`` (a stage
    index and model); ``None`` if that cannot make it fit."""
    counts = [dict(c.samples) for c in choices]

    def build() -> tuple[StageChoice, ...]:
        return tuple(_with_samples(choice, samples) for choice, samples in zip(choices, counts, strict=True))

    while not context.fits(space.plan(build())):
        payers = [
            (n, i, m)
            for i, samples in enumerate(counts)
            for m, n in samples.items()
            if (i, m) != keep and _next(space.n_choices[m], n, -1) is not None
        ]
        if not payers:
            return None
        _, i, m = max(payers)
        counts[i][m] = _next(space.n_choices[m], counts[i][m], -1)  # type: ignore[assignment]
    return build()


def _with_samples(choice: StageChoice, samples: dict[str, int]) -> StageChoice:
    """``choice`` with other sample counts; its early-stop rule is dropped where the stage no longer draws more
    samples than the rule waits for (the space allows such a rule only above it)."""
    stop = choice.early_stop if choice.early_stop is None or sum(samples.values()) > choice.early_stop else None
    return replace(choice, samples=tuple(samples.items()), early_stop=stop)


def _spent(context: StudyContext, plan: Plan) -> float:
    """``plan``'s cost in budget units; infinite where it cannot be costed (e.g. a prompt over a model's
    context window), so a hypothetical plan the environment refuses is never preferred."""
    try:
        return context.spent(plan)
    except AllotError:
        return float("inf")


def _probe_costs(context: StudyContext) -> dict[tuple[str, str], float]:
    """(stage, model) -> cost of its probe plan in budget units (others at the anchor, so comparable)."""
    costs: dict[tuple[str, str], float] = {}
    for trial in context.trials:
        if trial.strategy_info.get("in_context"):
            continue  # a plan at full spend, not a price: such models are priced as unprobed ones are
        for key in _probed(trial):
            costs[key] = context.budget.spent(trial.estimated_cost)
    return costs


def _fill(space, base, index, counts, context, rebuilt):  # type: ignore[no-untyped-def]
    """``base`` with stage ``index``'s counts multiplied by the largest power of two (>= 4) that fits."""
    best = None
    factor = 4
    while True:
        scaled = {m: n * factor for m, n in counts.items()}
        if any(n not in space.n_choices[m] for m, n in scaled.items()):
            return best
        choices = tuple(rebuilt(scaled) if i == index else c for i, c in enumerate(base))
        if not context.fits(space.plan(choices)):
            return best
        best = (choices, factor)
        factor *= 2


def _observed_gains(trials: Sequence[FrozenTrial], space: SearchSpace) -> dict[str, float]:
    """Predicted score change of each kind of move, and of each kind acting on one thing (``kind:detail``,
    e.g. growing one model, one early-stop rule), from the stored trials' changes over their parents.

    Each change counts a loss as at most ``LOSS_CAP``. Each estimate is a mean shrunk toward the one above it
    (a detail toward its kind, a kind toward its prior), with the weight of ``PRIOR_WEIGHT`` observations, so
    one lucky or unlucky trial does not decide, yet a kind of move that keeps losing stops being tried."""
    by_number = {t.number: t for t in trials}
    deltas: dict[str, list[float]] = {}
    for trial in trials:
        info = trial.strategy_info
        kind = info.get("move")
        parent = by_number.get(info.get("parent", -1))
        if not kind or kind not in PRIOR_GAIN or parent is None or trial.score is None or parent.score is None:
            continue
        delta = max(trial.score - parent.score, -LOSS_CAP)
        deltas.setdefault(kind, []).append(delta)
        key = info.get("key")
        if key and key != kind:
            deltas.setdefault(str(key), []).append(delta)
    gains: dict[str, float] = {}
    for kind, prior in PRIOR_GAIN.items():
        observed = deltas.get(kind, [])
        gains[kind] = (PRIOR_WEIGHT * prior + sum(observed)) / (PRIOR_WEIGHT + len(observed))
    for key, observed in deltas.items():
        kind = key.split(":", 1)[0]
        if key != kind and kind in gains:
            gains[key] = (PRIOR_WEIGHT * gains[kind] + sum(observed)) / (PRIOR_WEIGHT + len(observed))
    return gains


def _resample_held_back(gains: dict[str, float], trials: Sequence[FrozenTrial]) -> dict[str, float]:
    """``gains`` with an untried resample ranked below a downsize until ``RESAMPLE_AFTER`` search trials are done."""
    moved = [t.strategy_info.get("move") for t in trials if t.strategy_info.get("phase") == "search"]
    if len(moved) < RESAMPLE_AFTER and "resample" not in moved:
        return {**gains, "resample": min(gains["resample"], gains["downsize"] - 0.001)}
    return gains


def _predicted_gain(gains: dict[str, float], move: _Move) -> float:
    return gains.get(move.key, gains.get(move.kind, PRIOR_GAIN[move.kind]))


def _probed(trial: FrozenTrial) -> list[tuple[str, str]]:
    """The (stage, model) pairs a trial probed: this heuristic's probes, or an agent's (``info["probe"]``)."""
    info = trial.strategy_info
    if info.get("probe"):
        return [(str(stage), str(model)) for stage, model in info["probe"]]
    if info.get("phase") == "probe":
        return [(str(info.get("stage")), str(info.get("model")))]
    return []


def _probe_scores(context: StudyContext, space: SearchSpace) -> dict[tuple[str, str], float]:
    """(stage, model) -> score of the probe of that model on that stage, all else held at the anchor."""
    scores: dict[tuple[str, str], float] = {}
    last = space.stages[-1]
    for trial in _scored_probes(context):
        for key in _probed(trial):
            scores[key] = _peak_score(context, trial) if key[0] == last else trial.score  # type: ignore[assignment]
    return scores


def _peak_score(context: StudyContext, trial: FrozenTrial) -> float:
    """A trial's score, or its last stage's vote over fewer of its samples where that did better
    (``Environment.prefix_scores``): a model compared at the same spend as a larger one gets many more samples,
    often past where its vote peaks, and its probe would rank it by a count nobody would choose."""
    score = trial.score or 0.0
    if context.prefix_scores is None:
        return score
    return max([score, *context.prefix_scores(trial.plan).values()])


def _prefix_plans(space: SearchSpace, context: StudyContext) -> Iterator[tuple[float, Plan, FrozenTrial, int]]:
    """(score, plan, trial, count) for every plan of the space whose score an evaluated trial showed on the way: the
    trial with its last stage's single model cut to ``count`` samples (``Environment.prefix_scores``)."""
    if context.prefix_scores is None:
        return
    for trial in context.trials:
        if trial.state is not TrialState.COMPLETE or trial.score is None:
            continue
        scores = context.prefix_scores(trial.plan)
        if not scores:
            continue
        try:
            choices = space.choices_of(trial.plan)
        except (KeyError, ValueError, AllotError):
            continue  # not a plan of this space (an agent's graph)
        last = choices[-1]
        if len(last.samples) != 1:
            continue
        ((model, _),) = last.samples
        for k, score in scores.items():
            if k in space.n_choices[model]:
                yield score, _last_stage_at(space, choices, model, k), trial, k


def _last_stage_at(space: SearchSpace, choices: Sequence[StageChoice], model: str, count: int) -> Plan:
    """``choices`` with the last stage's single ``model`` at ``count`` samples: the one way the plans an evaluation
    showed are built, so that their ids match wherever they are looked up."""
    return space.plan([*choices[:-1], replace(choices[-1], samples=((model, count),))])


def _scored_probes(context: StudyContext) -> Iterator[FrozenTrial]:
    """The completed trials that probed a (stage, model) pair: what probe scores and their noise come from."""
    for trial in context.trials:
        if trial.state is TrialState.COMPLETE and trial.score is not None and _probed(trial):
            yield trial


def _cheapest_fitting(space: SearchSpace, stage: str, context: StudyContext) -> StageChoice:
    """The anchor of a stage while others are probed: its cheapest model at the smallest count."""
    index = space.stages.index(stage)
    cap = _widest_cap(space)

    def spent(model: str) -> float:
        choices = [
            StageChoice(((space.stage_models[s][0], min(space.n_choices[space.stage_models[s][0]])),), cap) for s in space.stages
        ]
        choices[index] = StageChoice(((model, min(space.n_choices[model])),), cap)
        return _spent(context, space.plan(choices))

    model = min(space.stage_models[stage], key=spent)
    return StageChoice(((model, min(space.n_choices[model])),), cap)


def _cap_order(cap: int | None) -> float:
    """Caps from the tightest to none at all."""
    return float("inf") if cap is None else float(cap)


def _widest_cap(space: SearchSpace) -> int | None:
    return None if None in space.caps else max(c for c in space.caps if c is not None)


def _smallest(
    space: SearchSpace, model: str, context: StudyContext, anchor: Sequence[StageChoice], index: int
) -> StageChoice | None:
    """The model at its smallest count, uncapped if that fits the budget, else at the widest cap that does."""
    caps = sorted(space.caps, key=lambda c: float("inf") if c is None else c, reverse=True)
    for cap in caps:
        choice = StageChoice(((model, min(space.n_choices[model])),), cap)
        trial = list(anchor)
        trial[index] = choice
        if context.fits(space.plan(trial)):
            return choice
    return None


def _next(values: Sequence[int], current: int, step: int) -> int | None:
    ordered = sorted(values)
    if current not in ordered:
        return None
    position = ordered.index(current) + step
    return ordered[position] if 0 <= position < len(ordered) else None


def _closest(values: Sequence[int], target: int) -> int:
    return min(values, key=lambda v: (abs(v - target), v))
