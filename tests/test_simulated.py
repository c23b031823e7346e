"""The simulated environment: deterministic, round-trippable, strict, and shaped like AgentTTS's findings."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from executors.environment import EnvironmentInfo, Evaluation
from executors.simulated import DEFAULT_MODELS, SimulatedEnvironment
from graphs.cost import Budget, ModelSpec
from graphs.errors import BudgetError, InvalidPlan, UnknownModel
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph

N_CHOICES = (1, 2, 4, 8, 16, 32, 64)
UNIT = Budget(limit=1.0)  # agenttts units, for reading costs


@pytest.fixture(scope="module")
def env() -> SimulatedEnvironment:
    return SimulatedEnvironment()


def alloc(env: SimulatedEnvironment, *choices: tuple[str, int]) -> Plan:
    return Plan.allocation(dict(zip(env.info.stages, choices, strict=True)))


def options(env: SimulatedEnvironment) -> list[tuple[str, int]]:
    return [(m, n) for m in env.info.stage_models["stage1"] for n in N_CHOICES]


def stage_units(env: SimulatedEnvironment, stage: str, model: str, n: int) -> float:
    """Cost of ``n`` samples of ``model`` at ``stage`` alone, in agenttts units."""
    return UNIT.spent(env.stage_cost(stage, model, n))


# -- basics ------------------------------------------------------------------------------------------


def test_info_describes_the_space(env: SimulatedEnvironment) -> None:
    info = env.info
    assert isinstance(info, EnvironmentInfo)
    assert info.stages == ("stage1", "stage2", "stage3")
    assert set(info.models) == {"sim-1B", "sim-3B", "sim-8B", "sim-70B"}
    assert all(set(models) == set(info.models) for models in info.stage_models.values())
    assert set(info.max_samples.values()) == {64}
    assert info.decisions == (DecisionRule.MAJORITY_VOTE,)
    assert info.roles == (Role.SOLVER,)
    assert info.caps == (None,)
    assert info.early_stop is False
    assert info.n_examples > 0


def test_evaluation_is_deterministic_and_seed_dependent(env: SimulatedEnvironment) -> None:
    plan = alloc(env, ("sim-8B", 4), ("sim-1B", 16), ("sim-70B", 1))
    first = env.evaluate(plan)
    again = SimulatedEnvironment().evaluate(plan)
    assert isinstance(first, Evaluation)
    assert first == again
    assert len(first.scores) == 4
    assert first.score == pytest.approx(sum(first.scores) / 4)
    assert first.spread > 0
    assert first.llm_calls == 0
    assert abs(first.score - env.true_score(plan)) < 0.05
    other = SimulatedEnvironment(seed=1)
    assert other.true_score(plan) != env.true_score(plan)
    assert other.evaluate(plan).scores != first.scores
    # a different plan gets different noise, not a shifted copy of the same draws
    plan2 = alloc(env, ("sim-8B", 4), ("sim-1B", 16), ("sim-70B", 2))
    deltas = {round(a - env.true_score(plan2), 12) for a in env.evaluate(plan2).scores}
    assert deltas != {round(a - env.true_score(plan), 12) for a in first.scores}


def test_noise_zero_gives_true_score(env: SimulatedEnvironment) -> None:
    quiet = SimulatedEnvironment(noise=0.0, repeats=3)
    plan = alloc(env, ("sim-3B", 8), ("sim-3B", 8), ("sim-3B", 8))
    result = quiet.evaluate(plan)
    assert result.score == pytest.approx(quiet.true_score(plan))
    assert result.spread == 0.0
    assert 0.0 <= result.score <= 1.0


def test_spec_round_trip() -> None:
    env = SimulatedEnvironment(stages=4, seed=7, noise=0.05, repeats=2, coupling=0.8, max_samples=32)
    spec = env.spec()
    assert spec["kind"] == "simulated"
    rebuilt = SimulatedEnvironment.from_spec(json.loads(json.dumps(spec)))
    assert rebuilt == env
    assert rebuilt.spec() == spec
    plan = Plan.allocation({s: ("sim-8B", 4) for s in env.info.stages})
    assert rebuilt.evaluate(plan) == env.evaluate(plan)
    assert SimulatedEnvironment(seed=8) != SimulatedEnvironment(seed=7)


def test_another_evaluation_seed_is_the_same_task_with_other_evaluation_luck() -> None:
    env = SimulatedEnvironment(stages=3, seed=5)
    other = env.with_evaluation_seed(1)
    assert other.noise_seed == 1 and env.noise_seed is None and other != env
    plans = [Plan.allocation({s: (model, n) for s in env.info.stages}) for model in ("sim-1B", "sim-8B") for n in (1, 4)]
    budget = Budget(limit=env.estimate_cost(plans[-1]).flops, unit="flops")
    assert other.optimum(budget) == env.optimum(budget)
    for plan in plans:
        assert other.true_score(plan) == env.true_score(plan)
        assert other.estimate_cost(plan) == env.estimate_cost(plan)
        assert other.evaluate(plan).scores != env.evaluate(plan).scores  # other draws
        assert other.evaluate(plan) == other.evaluate(plan)  # still one evaluation per plan
    rebuilt = SimulatedEnvironment.from_spec(json.loads(json.dumps(other.spec())))
    assert rebuilt == other and rebuilt.evaluate(plans[0]) == other.evaluate(plans[0])
    # a spec stored before noise seeds existed rebuilds the environment it described, draws included
    old = {k: v for k, v in env.spec().items() if k != "noise_seed"}
    assert SimulatedEnvironment.from_spec(old).evaluate(plans[0]) == env.evaluate(plans[0])


def test_custom_models_round_trip() -> None:
    models = {
        "tiny": ModelSpec(name="tiny", params_b=0.5),
        "huge": ModelSpec(name="huge", params_b=100.0, layers=96, hidden=10240),
    }
    env = SimulatedEnvironment(stages=2, models=models, seed=3)
    assert SimulatedEnvironment.from_spec(env.spec()) == env
    plan = Plan.allocation({"stage1": ("tiny", 8), "stage2": ("huge", 1)})
    assert env.estimate_cost(plan).usd is None  # no prices in the catalog
    assert 0.0 < env.true_score(plan) < 1.0


# -- check() -----------------------------------------------------------------------------------------


def test_check_unknown_model(env: SimulatedEnvironment) -> None:
    plan = alloc(env, ("sim-8B", 1), ("gpt-9", 1), ("sim-8B", 1))
    with pytest.raises(UnknownModel) as err:
        env.check(plan)
    message = str(err.value)
    assert "gpt-9" in message and "sim-70B" in message and "\n" not in message
    with pytest.raises(UnknownModel):
        env.evaluate(plan)


def test_check_bad_stage(env: SimulatedEnvironment) -> None:
    wrong = Plan.allocation({"stage1": ("sim-1B", 1), "stage2": ("sim-1B", 1), "answer": ("sim-1B", 1)})
    with pytest.raises(InvalidPlan, match="answer"):
        env.check(wrong)
    missing = Plan.allocation({"stage1": ("sim-1B", 1), "stage2": ("sim-1B", 1)})
    with pytest.raises(InvalidPlan, match="stage3"):
        env.check(missing)


def test_check_too_many_samples(env: SimulatedEnvironment) -> None:
    plan = alloc(env, ("sim-1B", 65), ("sim-1B", 1), ("sim-1B", 1))
    with pytest.raises(InvalidPlan, match="65"):
        env.check(plan)
    env.check(alloc(env, ("sim-1B", 64), ("sim-1B", 1), ("sim-1B", 1)))


def test_check_unsupported_roles_and_decisions(env: SimulatedEnvironment) -> None:
    fused = StageGraph(
        stage="stage1",
        nodes=(Node(id="a", model="sim-1B", n=4), Node(id="f", role=Role.AGGREGATOR, model="sim-8B")),
        edges=(("a", "f"),),
        decision=DecisionRule.FUSION,
    )
    rest = alloc(env, ("sim-1B", 1), ("sim-1B", 1), ("sim-1B", 1)).stages[1:]
    with pytest.raises(InvalidPlan, match="majority_vote"):
        env.check(Plan(stages=(fused, *rest)))
    reviewer = StageGraph(stage="stage1", nodes=(Node(id="r", role=Role.REVIEWER, model="sim-1B"),))
    with pytest.raises(InvalidPlan, match="solver"):
        env.check(Plan(stages=(reviewer, *rest)))
    capped = alloc(env, ("sim-1B", 4, 256), ("sim-1B", 1), ("sim-1B", 1))
    with pytest.raises(InvalidPlan, match="cap"):
        env.check(capped)


# -- cost ----------------------------------------------------------------------------------------------


def test_cost_counts_prefill_once_and_tokens(env: SimulatedEnvironment) -> None:
    one = env.estimate_cost(alloc(env, ("sim-8B", 1), ("sim-8B", 1), ("sim-8B", 1)))
    eight = env.estimate_cost(alloc(env, ("sim-8B", 8), ("sim-8B", 1), ("sim-8B", 1)))
    assert one.flops < eight.flops < 8 * one.flops
    assert eight.prompt_tokens == one.prompt_tokens
    assert eight.output_tokens > one.output_tokens
    assert one.usd is not None and eight.usd is not None and eight.usd > one.usd
    big = env.estimate_cost(alloc(env, ("sim-70B", 1), ("sim-70B", 1), ("sim-70B", 1)))
    assert big.flops > 5 * one.flops
    assert env.estimate_cost(alloc(env, ("sim-8B", 8), ("sim-8B", 1), ("sim-8B", 1))) == eight


def test_mixture_pools_votes(env: SimulatedEnvironment) -> None:
    rest = alloc(env, ("sim-1B", 1), ("sim-8B", 4), ("sim-8B", 4)).stages[1:]

    def with_stage1(*nodes: Node) -> Plan:
        return Plan(stages=(StageGraph(stage="stage1", nodes=nodes), *rest))

    solo_big = with_stage1(Node(id="a", model="sim-70B", n=2))
    solo_small = with_stage1(Node(id="b", model="sim-1B", n=8))
    mix = with_stage1(Node(id="a", model="sim-70B", n=2), Node(id="b", model="sim-1B", n=8))
    assert env.true_score(mix) > max(env.true_score(solo_big), env.true_score(solo_small))
    stage1 = env.stage_cost("stage1", "sim-70B", 2) + env.stage_cost("stage1", "sim-1B", 8)
    later = [env.stage_cost(stage.stage, stage.nodes[0].model, stage.nodes[0].n) for stage in rest]
    assert env.estimate_cost(mix).flops == pytest.approx(sum((c.flops for c in later), stage1.flops))
    # two nodes of one model pool their samples
    split = with_stage1(Node(id="a", model="sim-8B", n=4), Node(id="b", model="sim-8B", n=4))
    pooled = with_stage1(Node(id="a", model="sim-8B", n=8))
    assert env.true_score(split) == pytest.approx(env.true_score(pooled))


# -- the AgentTTS insights hold for the default seed ---------------------------------------------------


def test_insight1_stages_prefer_different_models(env: SimulatedEnvironment) -> None:
    big_everywhere = alloc(env, *[("sim-70B", 1)] * 3)
    budget = Budget(limit=UNIT.spent(env.estimate_cost(big_everywhere)))
    plan, _ = env.optimum(budget)
    chosen = [stage.nodes[0].model for stage in plan.stages]
    assert len(set(chosen)) > 1, chosen
    assert chosen != ["sim-70B"] * 3
    # and per stage, the best model at a fixed per-stage budget is not the same everywhere
    favourites = set()
    for stage in env.info.stages:
        cap = stage_units(env, stage, "sim-70B", 1)
        best = max((env.stage_accuracy(stage, m, n), m) for m, n in options(env) if stage_units(env, stage, m, n) <= cap)
        favourites.add(best[1])
    assert len(favourites) > 1


def test_insight1_small_model_with_many_samples_beats_large_at_equal_cost(env: SimulatedEnvironment) -> None:
    wins = []
    for stage in env.info.stages:
        cap = stage_units(env, stage, "sim-70B", 1)
        big = env.stage_accuracy(stage, "sim-70B", 1)
        for n in N_CHOICES:
            if n > 1 and stage_units(env, stage, "sim-1B", n) <= cap and env.stage_accuracy(stage, "sim-1B", n) > big:
                wins.append((stage, n))
    assert wins


def test_insight2_more_samples_rise_then_decline(env: SimulatedEnvironment) -> None:
    peaked = []
    for stage in env.info.stages:
        for model in env.info.models:
            curve = [env.stage_accuracy(stage, model, n) for n in N_CHOICES]
            top = max(range(len(curve)), key=curve.__getitem__)
            if 0 < top < len(curve) - 1 and curve[-1] < curve[top] and curve[top] > curve[0]:
                peaked.append((stage, model, N_CHOICES[top]))
                assert curve[top] - curve[-1] < 0.2  # declines slightly, not a collapse
    assert peaked
    # per-stage optima differ: not every stage peaks at the same sample count
    assert len({n for _, _, n in peaked}) > 1


def test_insight3_upstream_changes_what_downstream_needs(env: SimulatedEnvironment) -> None:
    later = [("sim-3B", 8), ("sim-8B", 4)]
    weak = env.true_score(alloc(env, ("sim-1B", 1), *later))
    strong = env.true_score(alloc(env, ("sim-70B", 8), *later))
    assert strong > weak + 0.02
    uncoupled = SimulatedEnvironment(coupling=0.0)
    assert uncoupled.true_score(alloc(env, ("sim-1B", 1), *later)) == pytest.approx(
        uncoupled.true_score(alloc(env, ("sim-70B", 8), *later))
    )

    # the best stage-2 choice under a fixed stage-2 cost cap depends on stage 1's allocation
    def best_stage2(stage1: tuple[str, int], cap: float) -> tuple[str, int]:
        feasible = [o for o in options(env) if stage_units(env, "stage2", *o) <= cap]
        return max(feasible, key=lambda o: env.true_score(alloc(env, stage1, o, ("sim-70B", 2))))

    changed = [
        cap
        for cap in (10.0, 20.0, 30.0, 60.0, 100.0, 200.0)
        if best_stage2(("sim-1B", 1), cap) != best_stage2(("sim-70B", 8), cap)
    ]
    assert changed


# -- the known optimum -----------------------------------------------------------------------------------


def test_optimum_respects_budget(env: SimulatedEnvironment) -> None:
    budget = Budget(limit=150.0)
    plan, score = env.optimum(budget)
    assert budget.allows(env.estimate_cost(plan))
    assert score == pytest.approx(env.true_score(plan))
    assert all(len(stage.nodes) == 1 for stage in plan.stages)
    # a larger budget never does worse, and the unconstrained space holds plans over this budget
    assert env.optimum(Budget(limit=600.0))[1] >= score
    assert not budget.allows(env.estimate_cost(alloc(env, *[("sim-70B", 64)] * 3)))
    # restricting the sample counts can only lose
    assert env.optimum(budget, n_choices=(1, 4))[1] <= score
    with pytest.raises(InvalidPlan):
        env.optimum(budget, n_choices=(128,))


def test_optimum_is_not_trivial_at_moderate_budget(env: SimulatedEnvironment) -> None:
    plan, _ = env.optimum(Budget(limit=300.0))
    models = [stage.nodes[0].model for stage in plan.stages]
    assert models != ["sim-70B"] * 3
    assert len(set(models)) > 1


def test_budget_below_cheapest_plan_raises(env: SimulatedEnvironment) -> None:
    cheapest = UNIT.spent(env.estimate_cost(alloc(env, *[("sim-1B", 1)] * 3)))
    with pytest.raises(BudgetError, match="cheapest") as err:
        env.optimum(Budget(limit=cheapest * 0.5))
    assert f"{cheapest:.4g}" in str(err.value)
    plan, _ = env.optimum(Budget(limit=cheapest))
    assert [stage.nodes[0].n for stage in plan.stages] == [1, 1, 1]


def test_optimum_in_dollars_and_tokens(env: SimulatedEnvironment) -> None:
    for budget in (Budget(limit=0.002, unit="usd"), Budget(limit=20_000, unit="tokens")):
        plan, score = env.optimum(budget)
        assert budget.allows(env.estimate_cost(plan))
        assert 0.0 < score <= 1.0


def test_exhaustive_enumeration_of_all_plans(env: SimulatedEnvironment) -> None:
    """All 3 x 4 x 7 allocations evaluate (fast enough to enumerate), and none beats the optimum."""
    seen = []
    for combo in itertools.product(options(env), repeat=3):
        plan = alloc(env, *combo)
        result = env.evaluate(plan)
        assert 0.0 <= result.score <= 1.0
        seen.append((result.cost, env.true_score(plan)))
    assert len(seen) == 21952
    for limit in (20.0, 75.0, 150.0, 300.0, 1000.0):
        budget = Budget(limit=limit)
        plan, best = env.optimum(budget)
        top = max(score for cost, score in seen if budget.allows(cost))
        assert best == pytest.approx(top, abs=1e-12), limit
        assert budget.allows(env.estimate_cost(plan))


def test_optimum_matches_brute_force_on_other_shapes() -> None:
    """The Pareto-front search equals plain enumeration, whatever the seed, depth and coupling."""
    cases = (
        (SimulatedEnvironment(stages=2, seed=5, coupling=1.0), (1, 4, 16, 64)),
        (SimulatedEnvironment(stages=4, seed=11, coupling=0.3), (2, 16)),
    )
    for env, counts in cases:
        opts = [(m, n) for m in env.info.models for n in counts]
        budget = Budget(limit=60.0 * env.stages)
        top = -math.inf
        for combo in itertools.product(opts, repeat=env.stages):
            plan = Plan.allocation(dict(zip(env.info.stages, combo, strict=True)))
            if budget.allows(env.estimate_cost(plan)):
                top = max(top, env.true_score(plan))
        assert env.optimum(budget, n_choices=counts)[1] == pytest.approx(top, abs=1e-12)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        SimulatedEnvironment(stages=0)
    with pytest.raises(ValueError):
        SimulatedEnvironment(coupling=1.5)
    with pytest.raises(ValueError):
        SimulatedEnvironment(models={"a": DEFAULT_MODELS["sim-1B"]})
