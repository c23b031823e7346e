"""Graph search: GPTSwarm REINFORCE and the Agent-REINFORCE agent, and the simulated graph model they search.

The strategies are not registered yet, so studies are built from strategy instances. Scripted planners
(``planner.llm.scripted_model``) stand in for the planner LLM: a good one, one that answers garbage, one
that proposes over budget.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Callable
from statistics import fmean

import pytest

from executors.replay import ReplayEnvironment
from executors.simulated import DEFAULT_MODELS, GRAPH_ROLES, SimulatedEnvironment
from graphs.cost import Budget, ModelSpec
from graphs.errors import InvalidPlan
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph
from graphs.probabilistic import LOGIT_LIMIT, ProbabilisticGraph
from planner.agents.agent_reinforce import AgentReinforceStrategy
from planner.llm import scripted_model
from planner.space import SearchSpace
from planner.storage import InMemoryStorage
from planner.strategies._base import Strategy
from planner.strategies._reinforce import GraphState, ReinforceStrategy, trial_score
from planner.study import Study, create_study
from planner.trial import FrozenTrial, TrialState

FLOOR = 1 / (1 + math.exp(LOGIT_LIMIT))
EVALUATED = (TrialState.COMPLETE, TrialState.FAIL)
SIM_BUDGET = Budget(limit=150)  # agenttts units
REPLAY_BUDGET = Budget(limit=500)


@pytest.fixture(scope="module")
def replay() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime24", orderings=2, seed=0)


@pytest.fixture(scope="module")
def sim_graphs() -> SimulatedEnvironment:
    return SimulatedEnvironment(stages=2, graphs=True, seed=0)


@pytest.fixture(scope="module")
def sim_plain() -> SimulatedEnvironment:
    return SimulatedEnvironment(stages=3, seed=0)


ENVS = ["sim_graphs", "sim_plain", "replay"]


def setup(request: pytest.FixtureRequest, which: str) -> tuple[object, Budget]:
    env = request.getfixturevalue(which)
    return env, (REPLAY_BUDGET if which == "replay" else SIM_BUDGET)


def run(env, budget: Budget, strategy: Strategy, n: int, *, batch_size: int = 3, storage=None, name: str = "s") -> Study:
    study = create_study(storage=storage or InMemoryStorage(), environment=env, budget=budget, strategy=strategy, name=name)
    study.optimize(n, batch_size=batch_size)
    return study


def states(trials: list[FrozenTrial], name: str) -> dict[int, GraphState]:
    """Every graph version a strategy published, by iteration."""
    out = {}
    for trial in trials:
        version = trial.strategy_info.get("graph_version")
        if version:
            assert set(version) == {"definition", "cause"} and version["cause"]
            json.dumps(version)  # JSON, ready for storage.add_graph_version
            state = GraphState.from_definition(version["definition"])
            assert state.strategy == name
            out[state.iteration] = state
    return out


def members(trials: list[FrozenTrial], name: str, iteration: int) -> list[FrozenTrial]:
    return [
        t
        for t in trials
        if (tag := t.strategy_info.get(name)) and tag.get("iteration") == iteration and tag.get("role") == "sample"
    ]


def check_search(study: Study, name: str) -> dict[int, GraphState]:
    """Never over budget, every sample a valid graph of its version, every update within the rules."""
    env, budget, trials = study.environment, study.budget, study.trials
    assert [t.number for t in trials] == list(range(len(trials)))
    assert not [t for t in trials if t.state is TrialState.REJECTED], "over-budget plans must be resampled, not proposed"
    for trial in trials:
        assert trial.state in EVALUATED
        assert budget.allows(env.estimate_cost(trial.plan)), trial.plan.summary()
    found = states(trials, name)
    assert sorted(found) == list(range(1, max(found) + 1))
    for trial in trials:
        tag = trial.strategy_info.get(name)
        if not tag or tag.get("role") != "sample":
            continue
        state = found[tag["iteration"]]
        env.check(trial.plan)
        for stage in trial.plan.stages:
            graph = state.graph(stage.stage)
            for node in stage.nodes:
                slot = graph.slot(node.id)
                assert (slot.role, slot.model) == (node.role, node.model) and node.n in slot.counts
    for k in sorted(found)[:-1]:
        before, after = found[k], found[k + 1]
        scored = [(t.plan, s) for t in members(trials, name, k) if (s := trial_score(t)) is not None]
        mean = fmean(s for _, s in scored) if scored else math.inf

        def proven(used: Callable[[StageGraph], bool], stage: str, scored=scored, mean=mean) -> bool:
            scores = [s for plan, s in scored if used(plan.stage(stage))]
            return bool(scores) and fmean(scores) > mean + 1e-9

        for old in before.graphs:
            new = after.graph(old.stage)
            for edge in old.edges:
                if new.edge_probability(edge.source, edge.target) > edge.probability + 1e-9:
                    assert proven(lambda g, key=edge.key: key in g.edges, old.stage), (k, edge.key)
            for slot in old.slots:
                if slot.id not in {s.id for s in new.slots}:
                    continue
                p_old, p_new = old.inclusion_probability(slot.id), new.inclusion_probability(slot.id)
                if p_new > p_old + 1e-9 and p_new > FLOOR:
                    assert proven(lambda g, sid=slot.id: any(n.id == sid for n in g.nodes), old.stage), (k, slot.id)
    return found


# -- GPTSwarm ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ENVS)
def test_gptswarm_searches_within_the_rules(request: pytest.FixtureRequest, which: str) -> None:
    env, budget = setup(request, which)
    study = run(env, budget, ReinforceStrategy(seed=3, batch=4), 20, batch_size=4)
    assert len(study.evaluated_trials) == 20
    found = check_search(study, "gptswarm")
    assert len(found) == 5  # one version per batch of 4
    assert all(t.rationale.startswith("GPTSwarm REINFORCE") for t in study.trials)
    last = found[max(found)]
    assert last.baseline is not None
    if which == "sim_graphs":  # the graph-capable environment gets graphs, not just allocations
        plans = [t.plan for t in study.trials]
        assert any(stage.edges for plan in plans for stage in plan.stages)
        roles = {node.role for plan in plans for stage in plan.stages for node in stage.nodes}
        assert roles & {Role.REVIEWER, Role.REVISER, Role.AGGREGATOR}
        assert {s.role for g in last.graphs for s in g.slots} == set(GRAPH_ROLES)
    else:
        assert all(s.role is Role.SOLVER for g in last.graphs for s in g.slots)


def test_gptswarm_learns_on_the_simulated_task(sim_plain: SimulatedEnvironment) -> None:
    study = run(sim_plain, SIM_BUDGET, ReinforceStrategy(seed=0, batch=4, learning_rate=1.0), 80, batch_size=4)
    scores = [t.score for t in study.trials]
    assert fmean(scores[-20:]) > fmean(scores[:20])
    _, optimum = sim_plain.optimum(SIM_BUDGET)
    assert study.best_trial.score > 0.8 * optimum


def ids(study: Study) -> list[str]:
    return [t.plan_id for t in study.trials]


@pytest.mark.parametrize("which", ["sim_graphs", "replay"])
def test_gptswarm_is_reproducible_and_resumes(request: pytest.FixtureRequest, which: str) -> None:
    env, budget = setup(request, which)
    straight = run(env, budget, ReinforceStrategy(seed=11), 16, batch_size=4)
    assert ids(run(env, budget, ReinforceStrategy(seed=11), 16, batch_size=4)) == ids(straight)
    assert ids(run(env, budget, ReinforceStrategy(seed=12), 16, batch_size=4)) != ids(straight)
    # interrupted after 6 (mid-iteration), resumed by a fresh instance from the stored trials
    storage = InMemoryStorage()
    first = run(env, budget, ReinforceStrategy(seed=11), 6, batch_size=4, storage=storage, name="halves")
    assert len(first.evaluated_trials) == 6
    resumed = Study(storage.get_study_by_name("halves"), storage, env, ReinforceStrategy(seed=11), first.space)
    resumed.optimize(10, batch_size=4)
    assert ids(resumed) == ids(straight)
    assert [t.strategy_info for t in resumed.trials] == [t.strategy_info for t in straight.trials]


def test_graph_versions_go_into_storage(sim_graphs: SimulatedEnvironment) -> None:
    """The study stores each ``info["graph_version"]`` as the next version of the study's graph, chained."""
    storage = InMemoryStorage()
    study = run(sim_graphs, SIM_BUDGET, ReinforceStrategy(seed=2), 12, batch_size=4, storage=storage, name="stored")
    updates = [t.strategy_info["graph_version"] for t in study.trials if t.strategy_info.get("graph_version")]
    stored = storage.get_graph_versions("stored")
    assert [v.version for v in stored] == [1, 2, 3] == list(range(1, len(updates) + 1))
    assert [v.definition for v in stored] == [u["definition"] for u in updates]
    assert [v.parent_id for v in stored] == [None, stored[0].version_id, stored[1].version_id]
    one, two = (GraphState.from_definition(v.definition) for v in stored[:2])
    diff = one.graphs[0].diff(two.graphs[0])
    assert not diff.empty and diff.slot_changes


def test_gptswarm_validates_its_arguments() -> None:
    with pytest.raises(ValueError):
        ReinforceStrategy(learning_rate=0)
    with pytest.raises(ValueError):
        ReinforceStrategy(batch=0)
    strategy = ReinforceStrategy(seed=4, learning_rate=0.3, batch=5)
    assert strategy.name == "gptswarm"
    assert ReinforceStrategy(seed=4, **strategy.params()).params() == strategy.params()
    json.dumps(strategy.params())


# -- scripted planners --------------------------------------------------------------------------------------


def _blocks(text: str) -> list:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", text, re.S)]


def _prompt(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def good_planner(messages: list[dict[str, str]]) -> str:
    prompt = _prompt(messages)
    if "TASK: select" in prompt:
        return json.dumps({"picks": [0, 2, 4], "reason": "the most budget-using combinations"})
    current, samples = _blocks(prompt)
    best = samples[0]
    used = {(s["stage"], n["id"]) for s in best["stages"] for n in s["nodes"]}
    for stage in current["stages"]:
        for slot in stage["slots"]:
            slot["include_probability"] = 0.9 if (stage["stage"], slot["id"]) in used else 0.2
        for edge in stage["edges"]:
            edge["probability"] = 0.9  # everything up: only what the best graphs used may keep it
    return (
        "Following the best graph:\n```json\n" + json.dumps({"stages": current["stages"], "reason": "follow the best"}) + "\n```"
    )


def garbage_planner(messages: list[dict[str, str]]) -> str:
    return "I would simply use more samples of the biggest model, it is always better."


def over_budget_planner(messages: list[dict[str, str]]) -> str:
    prompt = _prompt(messages)
    task = re.findall(r"- (\S+): models (.*)", prompt)
    if "TASK: select" in prompt:
        picks = []
        for n in (64, 128):
            pick = {}
            for stage, models in task:
                model = re.findall(r"(\S+) \(", models)[-1]
                pick[stage] = {model: n}
            picks.append(pick)
        return json.dumps({"picks": picks, "reason": "spend everything"})
    current, _ = _blocks(prompt)
    for stage in current["stages"]:
        for slot in stage["slots"]:
            slot["include_probability"] = 1.0
            slot["counts"] = {max(slot["counts"], key=int): 1.0}
        for edge in stage["edges"]:
            edge["probability"] = 1.0
    return json.dumps({"stages": current["stages"], "reason": "more is better"})


PLANNERS = {
    "good": scripted_model("reinforce-good", good_planner),
    "garbage": scripted_model("reinforce-garbage", garbage_planner),
    "over-budget": scripted_model("reinforce-over-budget", over_budget_planner),
    "none": None,
}


def agent(planner: str, seed: int = 0, **kwargs: object) -> AgentReinforceStrategy:
    return AgentReinforceStrategy(seed=seed, planner_model=PLANNERS[planner], **kwargs)  # type: ignore[arg-type]


def pretests(study: Study) -> list[FrozenTrial]:
    return [t for t in study.trials if t.strategy_info.get("agent-reinforce", {}).get("role") == "pretest"]


@pytest.mark.parametrize("planner", sorted(PLANNERS))
@pytest.mark.parametrize("which", ["sim_graphs", "replay"])
def test_agent_searches_within_the_rules(request: pytest.FixtureRequest, which: str, planner: str) -> None:
    env, budget = setup(request, which)
    study = run(env, budget, agent(planner, iterations=3), 15)
    assert len(study.evaluated_trials) == 15
    trials = study.trials
    found = check_search(study, "agent-reinforce")
    assert len(found) >= 3
    # (c) pre-tests first: solver-only allocations, the selection stored with the first
    tests = pretests(study)
    assert tests and tests == trials[: len(tests)]
    assert all(not stage.edges for t in tests for stage in t.plan.stages)
    selection = tests[0].strategy_info["agent-reinforce"]
    assert len(selection["chosen"]) == len(tests)
    updates = [
        t.strategy_info["graph_version"]["definition"]["update"]
        for t in trials
        if "graph_version" in t.strategy_info and t.strategy_info["graph_version"]["definition"]["iteration"] > 1
    ]
    assert updates
    cost = sum(t.planner_cost.tokens for t in trials)
    if planner == "good":
        assert selection["source"] == "planner" and "fallback" not in tests[0].strategy_info
        assert "chosen by the planner" in tests[0].rationale
        assert [u["method"] for u in updates[:2]] == ["planner", "planner"]
        assert cost > 0
        assert any(u["violation_count"] > 0 for u in updates)  # it raised unproven edges: clipped
    elif planner == "garbage":
        assert selection["source"] == "coverage"
        assert "unusable" in tests[0].strategy_info["fallback"] and "coverage rule" in tests[0].rationale
        assert all(u["method"] == "numeric" and "unusable" in u["fallback"] for u in updates)
        assert cost > 0  # garbage still costs tokens, and is counted
        assert tests[0].strategy_info["planner_attempts"] == 3
    elif planner == "over-budget":
        assert selection["source"] == "coverage"
        assert any("over budget" in note for note in selection["discarded"])
        assert updates[0]["method"] == "planner" and updates[0]["violation_count"] > 0
    else:
        assert selection["source"] == "coverage"
        assert tests[0].strategy_info["fallback"] == "no planner model configured"
        # the coverage rule: one model per stage in each pre-test, every model of every stage pre-tested
        assert all(len(stage.nodes) == 1 for t in tests for stage in t.plan.stages)
        space = study.space
        every = {(stage, model) for stage in space.stages for model in space.stage_models[stage]}
        assert {(st.stage, node.model) for t in tests for st in t.plan.stages for node in st.nodes} == every
        assert all(u["method"] == "numeric" for u in updates)
        assert cost == 0
    # after the planner's iterations, updates are numeric
    assert all(u["method"] == "numeric" for u in updates[3:])


def test_agent_on_a_plain_multi_stage_task(sim_plain: SimulatedEnvironment) -> None:
    study = run(sim_plain, SIM_BUDGET, agent("good"), 12)
    check_search(study, "agent-reinforce")
    assert all(s.role is Role.SOLVER for g in states(study.trials, "agent-reinforce")[1].graphs for s in g.slots)


@pytest.mark.parametrize("which", ["sim_graphs", "replay"])
def test_agent_is_reproducible_and_resumes(request: pytest.FixtureRequest, which: str) -> None:
    env, budget = setup(request, which)
    straight = run(env, budget, agent("good", seed=5), 12)
    assert ids(run(env, budget, agent("good", seed=5), 12)) == ids(straight)
    assert ids(run(env, budget, agent("good", seed=6), 12)) != ids(straight)
    storage = InMemoryStorage()
    # stop after 2 pre-tests (the selection is stored with the first), then after an update's first sample
    first = run(env, budget, agent("good", seed=5), 2, batch_size=1, storage=storage, name="resumable")
    Study(storage.get_study_by_name("resumable"), storage, env, agent("good", seed=5), first.space).optimize(5, batch_size=3)
    resumed = Study(storage.get_study_by_name("resumable"), storage, env, agent("good", seed=5), first.space)
    resumed.optimize(5, batch_size=3)
    assert len(resumed.evaluated_trials) == 12
    assert ids(resumed) == ids(straight)
    check_search(resumed, "agent-reinforce")


def test_agent_graph_and_params() -> None:
    strategy = agent("good", seed=2, batch=4, iterations=5)
    assert strategy.name == "agent-reinforce"
    assert strategy.params()["planner_model"] == PLANNERS["good"]
    assert AgentReinforceStrategy(seed=2, **strategy.params()).params() == strategy.params()
    nodes = set(strategy._graph.get_graph().nodes)  # a compiled langgraph StateGraph
    assert {"observe", "enumerate", "select", "pretest", "init_graph", "update", "sample"} <= nodes
    with pytest.raises(ValueError):
        AgentReinforceStrategy(batch=0)
    tuned = AgentReinforceStrategy(seed=2, planner_model=PLANNERS["good"], max_tokens=256, timeout_s=15)
    assert (tuned.params()["max_tokens"], tuned.params()["timeout_s"]) == (256, 15.0)
    assert (tuned._llm.max_tokens, tuned._llm.timeout_s) == (256, 15.0)  # what the planner LLM is given
    assert AgentReinforceStrategy(seed=2, **tuned.params()).params() == tuned.params()
    for bad in ({"max_tokens": 0}, {"timeout_s": 0}):
        with pytest.raises(ValueError):
            AgentReinforceStrategy(**bad)  # type: ignore[arg-type]


def broken_edges_planner(messages: list[dict[str, str]]) -> str:
    """The good planner's rewrite plus edges whose ends are not slot ids but lists and objects."""
    reply = good_planner(messages)
    if "TASK: select" in _prompt(messages):
        return reply
    (rewrite,) = _blocks(reply)
    for stage in rewrite["stages"]:
        stage["edges"] += [{"source": ["s0"], "target": {"id": "r1"}, "probability": 0.9}, {"source": None, "target": 3}]
    return json.dumps(rewrite)


def test_agent_survives_edges_that_name_no_slot(sim_graphs: SimulatedEnvironment) -> None:
    route = scripted_model("reinforce-broken-edges", broken_edges_planner)
    study = run(sim_graphs, SIM_BUDGET, AgentReinforceStrategy(seed=0, planner_model=route, iterations=3), 12)
    assert len(study.evaluated_trials) == 12
    check_search(study, "agent-reinforce")
    versions = [t.strategy_info["graph_version"] for t in study.trials if "graph_version" in t.strategy_info]
    updates = [v for v in versions if v["definition"]["iteration"] > 1]
    assert updates
    for version in updates:
        assert version["definition"]["update"]["method"] == "planner"  # the rest of the rewrite is applied
        assert "4 unknown_slot" in version["cause"]  # two broken edges per stage, dropped and reported


def test_agent_falls_back_when_a_rewrite_cannot_be_applied(
    sim_graphs: SimulatedEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    import planner.agents.agent_reinforce as agent_module

    real = agent_module.apply_step

    def picky(state, proposed, trials, context):  # type: ignore[no-untyped-def]
        if any(not isinstance(graph, ProbabilisticGraph) for graph in proposed.values()):
            raise TypeError("unhashable type: 'list'")  # as a rewrite the rules cannot read once did
        return real(state, proposed, trials, context)

    monkeypatch.setattr(agent_module, "apply_step", picky)
    study = run(sim_graphs, SIM_BUDGET, agent("good", iterations=3), 12)
    assert len(study.evaluated_trials) == 12
    check_search(study, "agent-reinforce")
    versions = [t.strategy_info["graph_version"] for t in study.trials if "graph_version" in t.strategy_info]
    updates = [v for v in versions if v["definition"]["iteration"] > 1]
    assert updates
    for version in updates:
        update = version["definition"]["update"]
        assert update["method"] == "numeric"
        assert update["fallback"] == "planner rewrite could not be applied (TypeError: unhashable type: 'list')"
        assert "numeric REINFORCE step (planner rewrite could not be applied" in version["cause"]


# -- the simulated collaboration-graph model -------------------------------------------------------------------


def solo(stage: str, model: str, n: int) -> StageGraph:
    return StageGraph(stage=stage, nodes=(Node(id="s", model=model, n=n),))


def chain(stage: str, depth: int, *, model: str = "sim-8B", n: int = 4, reviewer: str | None = None) -> StageGraph:
    """A solver, then ``depth`` revision rounds (each with a reviewer if given)."""
    nodes = [Node(id="s", model=model, n=n)]
    edges = []
    prev = "s"
    for r in range(depth):
        if reviewer:
            nodes.append(Node(id=f"c{r}", role=Role.REVIEWER, model=reviewer))
            edges += [(prev, f"c{r}"), (f"c{r}", f"v{r}")]
        nodes.append(Node(id=f"v{r}", role=Role.REVISER, model=model))
        edges.append((prev, f"v{r}"))
        prev = f"v{r}"
    return StageGraph(stage=stage, nodes=tuple(nodes), edges=tuple(edges))


def fused(stage: str, aggregator: str, solvers: tuple[tuple[str, int], ...]) -> StageGraph:
    nodes = [Node(id=f"s{i}", model=m, n=n) for i, (m, n) in enumerate(solvers)]
    nodes.append(Node(id="f", role=Role.AGGREGATOR, model=aggregator))
    edges = tuple((f"s{i}", "f") for i in range(len(solvers)))
    return StageGraph(stage=stage, nodes=tuple(nodes), edges=edges, decision=DecisionRule.FUSION)


def test_graph_env_info_and_default_unchanged() -> None:
    env = SimulatedEnvironment(graphs=True)
    assert env.info.roles == GRAPH_ROLES
    assert env.info.decisions == (DecisionRule.MAJORITY_VOTE, DecisionRule.FUSION)
    plain = SimulatedEnvironment()
    assert plain.info.roles == (Role.SOLVER,) and plain.info.decisions == (DecisionRule.MAJORITY_VOTE,)
    rebuilt = SimulatedEnvironment.from_spec(json.loads(json.dumps(env.spec())))
    assert rebuilt == env and rebuilt.graphs and rebuilt != plain
    assert SimulatedEnvironment.from_spec({k: v for k, v in plain.spec().items() if k != "graphs"}) == plain
    # allocations score and cost the same with graphs on: the allocation model is the graph model's base
    plan = Plan.allocation({"stage1": ("sim-8B", 4), "stage2": ("sim-1B", 16), "stage3": ("sim-70B", 1)})
    assert env.true_score(plan) == plain.true_score(plan)
    assert env.estimate_cost(plan) == plain.estimate_cost(plan)
    assert env.evaluate(plan) == plain.evaluate(plan)
    with pytest.raises(InvalidPlan, match="graphs=True"):
        plain.stage_graph_accuracy(chain("stage1", 1))


def test_depth_rises_to_a_task_dependent_optimum_then_declines() -> None:
    env = SimulatedEnvironment(stages=4, graphs=True, seed=3)
    optima = set()
    for stage in env.info.stages:
        best = env.graph_parameters(stage)["depth_opt"]
        optima.add(best)
        curve = [env.stage_graph_accuracy(chain(stage, d, reviewer="sim-70B")) for d in range(6)]
        peak = curve.index(max(curve))
        assert peak == best, (stage, curve)
        assert all(a < b for a, b in itertools.pairwise(curve[: peak + 1]))
        assert all(a > b for a, b in itertools.pairwise(curve[peak:]))
        # a stronger reviewer helps more
        assert env.stage_graph_accuracy(chain(stage, 1, reviewer="sim-70B")) > env.stage_graph_accuracy(
            chain(stage, 1, reviewer="sim-1B")
        )
    assert len(optima) > 1  # the optimum depends on the task


def test_width_saturates_and_interacts_with_depth() -> None:
    env = SimulatedEnvironment(stages=4, graphs=True, seed=3)

    def gain(stage: str, n: int) -> float:
        """Log-odds a revision round adds on top of ``n`` solver samples."""
        base = env.stage_graph_accuracy(solo(stage, "sim-8B", n))
        revised = env.stage_graph_accuracy(chain(stage, 1, n=n))
        return math.log(revised / (1 - revised)) - math.log(base / (1 - base))

    signs = set()
    for stage in env.info.stages:
        lam = env.graph_parameters(stage)["interaction"]
        narrow, wide = gain(stage, 1), gain(stage, 16)
        assert narrow > 0 and wide > 0
        # the ratio is the interaction term: 1 + lam * log2(w), floored at 0.5
        assert narrow / wide == pytest.approx(max(0.5, 1 + lam * 4) / max(0.5, 1 + lam * 0), rel=1e-6)
        signs.add(lam > 0)
        # width alone saturates: the gain of a doubling shrinks
        accs = [env.stage_accuracy(stage, "sim-8B", n) for n in (1, 2, 4, 8)]
        assert accs[1] - accs[0] > accs[3] - accs[2]
    assert signs == {True, False} or signs == {True}


def test_fusion_beats_majority_vote_for_strong_aggregators() -> None:
    env = SimulatedEnvironment(stages=3, graphs=True, seed=0)
    solvers = (("sim-1B", 8), ("sim-3B", 4))
    for stage in env.info.stages:
        vote = env.stage_graph_accuracy(
            StageGraph(stage=stage, nodes=tuple(Node(id=f"s{i}", model=m, n=n) for i, (m, n) in enumerate(solvers)))
        )
        strong = env.stage_graph_accuracy(fused(stage, "sim-70B", solvers))
        weak = env.stage_graph_accuracy(fused(stage, "sim-1B", solvers))
        assert weak < vote < strong
        assert strong - vote < 0.15  # a bit better, not a different league


def test_context_grows_along_edges() -> None:
    env = SimulatedEnvironment(stages=1, graphs=True, seed=0)
    prompt, answer = env.prompt_tokens[0], env.output_tokens[0]

    def reviewed(n: int) -> StageGraph:
        return StageGraph(
            stage="stage1",
            nodes=(
                Node(id="s", model="sim-1B", n=n),
                Node(id="c", role=Role.REVIEWER, model="sim-8B"),
                Node(id="v", role=Role.REVISER, model="sim-8B"),
            ),
            edges=(("s", "c"), ("s", "v"), ("c", "v")),
        )

    one, eight = env.stage_graph_cost(reviewed(1)), env.stage_graph_cost(reviewed(8))
    review = math.ceil(answer / 2)
    # prompts: solver p; reviewer p + n * answer; reviser p + n * answer + review
    assert one.prompt_tokens == 3 * prompt + 2 * answer + review
    assert eight.prompt_tokens - one.prompt_tokens == 2 * 7 * answer
    assert eight.flops > one.flops
    solver_only = env.stage_cost("stage1", "sim-1B", 8)
    assert eight.flops > solver_only.flops
    assert env.estimate_cost(Plan(stages=(reviewed(8),))) == eight


def test_graph_check_rules() -> None:
    env = SimulatedEnvironment(stages=1, graphs=True, seed=0)
    s = Node(id="s", model="sim-1B", n=2)
    cases = {
        "solver": StageGraph(stage="stage1", nodes=(s, Node(id="t", model="sim-1B")), edges=(("s", "t"),)),
        "feeds nothing": StageGraph(
            stage="stage1", nodes=(s, Node(id="c", role=Role.REVIEWER, model="sim-8B")), edges=(("s", "c"),)
        ),
        "no answer": StageGraph(stage="stage1", nodes=(s, Node(id="v", role=Role.REVISER, model="sim-8B"))),
        "supports": StageGraph(
            stage="stage1",
            nodes=(s, Node(id="j", role=Role.VERIFIER, model="sim-8B")),
            decision=DecisionRule.BEST_OF_N,
        ),
        "64": StageGraph(stage="stage1", nodes=(Node(id="s", model="sim-1B", n=65),)),
    }
    for message, graph in cases.items():
        with pytest.raises(InvalidPlan, match=message):
            env.check(Plan(stages=(graph,)))
    env.check(Plan(stages=(fused("stage1", "sim-8B", (("sim-1B", 64),)),)))
    small = {**DEFAULT_MODELS, "tiny": ModelSpec(name="tiny", params_b=1.0, context=4096)}
    narrow = SimulatedEnvironment(stages=1, graphs=True, models=small)
    with pytest.raises(InvalidPlan, match="context"):
        narrow.check(Plan(stages=(fused("stage1", "tiny", (("sim-1B", 64),)),)))


def test_graph_evaluation_is_bounded_and_seeded() -> None:
    env = SimulatedEnvironment(stages=3, graphs=True, seed=0)
    space = SearchSpace.from_info(env.info)
    models = space.stage_models["stage1"]
    graphs = [
        ProbabilisticGraph.template(
            stage, {m: space.n_choices[m] for m in models}, reviewers=models, revisers=models, aggregators=models, rounds=2
        )
        for stage in env.info.stages
    ]
    rng = random.Random(0)
    plans = [Plan(stages=tuple(g.sample(rng) for g in graphs)) for _ in range(150)]
    plans = [p for p in plans if _runs(env, p)]
    assert len(plans) > 100
    for plan in plans:  # its speed is measured by benchmarks/planner_step.py, not asserted here
        assert 0.0 <= env.evaluate(plan).score <= 1.0
    again = SimulatedEnvironment(stages=3, graphs=True, seed=0)
    assert [again.evaluate(p) for p in plans[:20]] == [env.evaluate(p) for p in plans[:20]]
    other = SimulatedEnvironment(stages=3, graphs=True, seed=1)
    assert [other.true_score(p) for p in plans[:20]] != [env.true_score(p) for p in plans[:20]]


def _runs(env: SimulatedEnvironment, plan: Plan) -> bool:
    try:
        env.check(plan)
    except InvalidPlan:
        return False
    return True
