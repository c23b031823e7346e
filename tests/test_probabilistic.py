"""Probabilistic collaboration graphs: every sample is a valid DAG, updates obey the rules, values round-trip."""

from __future__ import annotations

import json
import math
import random
from statistics import fmean

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from graphs.errors import InvalidPlan
from graphs.plan import MAX_IN_DEGREE, DecisionRule, Node, Role, StageGraph
from graphs.probabilistic import (
    LOGIT_LIMIT,
    NEW_MAX_PROBABILITY,
    Edge,
    ProbabilisticGraph,
    Slot,
    reinforce_step,
    slot_id,
)

MODELS = ("m-1B", "m-8B", "m-70B")
ANSWER_ROLES = (Role.SOLVER, Role.REVISER, Role.AGGREGATOR)
FLOOR = 1 / (1 + math.exp(LOGIT_LIMIT))


def template(**overrides: object) -> ProbabilisticGraph:
    args: dict[str, object] = {
        "solvers": {m: (1, 2, 4, 8) for m in MODELS},
        "reviewers": MODELS[1:],
        "revisers": MODELS[1:],
        "aggregators": MODELS,
        "rounds": 2,
        "max_solvers": 2,
    }
    args.update(overrides)
    return ProbabilisticGraph.template("stage1", **args)  # type: ignore[arg-type]


def assert_valid_sample(pg: ProbabilisticGraph, graph: StageGraph) -> None:
    """Everything ``sample`` promises, checked independently of its code."""
    assert isinstance(graph, StageGraph) and graph.stage == pg.stage
    slots = {s.id: s for s in pg.slots}
    nodes = {n.id: n for n in graph.nodes}
    for node in graph.nodes:
        slot = slots[node.id]
        assert (node.role, node.model) == (slot.role, slot.model)
        assert node.n in slot.counts
    g = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    assert max((d for _, d in g.in_degree()), default=0) <= pg.max_in_degree
    position = {s.id: i for i, s in enumerate(pg.slots)}
    candidates = {e.key for e in pg.edges}
    solvers = [n for n in graph.nodes if n.role is Role.SOLVER]
    assert solvers
    if pg.max_solvers is not None:
        assert len(solvers) <= pg.max_solvers
    for src, dst in graph.edges:
        assert position[src] < position[dst]  # forward in the fixed order
        forced = graph.decision is DecisionRule.FUSION and nodes[dst].role is Role.AGGREGATOR
        assert (src, dst) in candidates or forced
    for node in graph.nodes:
        inputs = [nodes[u] for u, v in graph.edges if v == node.id]
        if node.role is Role.SOLVER:
            assert not inputs
        else:
            assert any(u.role in ANSWER_ROLES for u in inputs), node.id
        if node.role is Role.REVIEWER:
            assert any(u == node.id for u, _ in graph.edges), "a review nobody reads"
    aggregators = [n for n in graph.nodes if n.role is Role.AGGREGATOR]
    assert len(aggregators) <= 1
    if graph.decision is DecisionRule.FUSION:
        assert [n.id for n in graph.answer_nodes] == [aggregators[0].id]
    else:
        assert graph.decision is DecisionRule.MAJORITY_VOTE and not aggregators
        assert all(n.role in ANSWER_ROLES for n in graph.answer_nodes)


# -- hypothesis: arbitrary graphs -------------------------------------------------------------------------

logits = st.floats(min_value=-LOGIT_LIMIT, max_value=LOGIT_LIMIT, allow_nan=False)


@st.composite
def graphs(draw: st.DrawFn) -> ProbabilisticGraph:
    """Any valid probabilistic graph: 1-4 solvers, up to 9 helpers, random candidate edges and logits."""
    slots: list[Slot] = []
    n_solvers = draw(st.integers(1, 4))
    for i in range(n_solvers):
        counts = tuple(sorted(draw(st.sets(st.sampled_from((1, 2, 4, 8, 16, 64)), min_size=1, max_size=4))))
        slots.append(
            Slot(
                id=f"solver{i}",
                model=draw(st.sampled_from(MODELS)),
                include_logit=draw(logits),
                required=draw(st.booleans()) and i == 0,
                counts=counts,
                count_logits=tuple(draw(logits) for _ in counts),
            )
        )
    middle = draw(st.lists(st.sampled_from((Role.REVIEWER, Role.REVISER)), max_size=7))
    for i, role in enumerate(middle):
        slots.append(Slot(id=f"{role.value}{i}", role=role, model=draw(st.sampled_from(MODELS)), include_logit=draw(logits)))
    for i in range(draw(st.integers(0, 3))):
        slots.append(Slot(id=f"agg{i}", role=Role.AGGREGATOR, model=draw(st.sampled_from(MODELS)), include_logit=draw(logits)))
    pairs = [
        (a.id, b.id)
        for i, a in enumerate(slots)
        for b in slots[i + 1 :]
        if b.role is not Role.SOLVER and a.role is not Role.AGGREGATOR
    ]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=40)) if pairs else []
    edges = tuple(Edge(source=a, target=b, logit=draw(logits)) for a, b in chosen)
    return ProbabilisticGraph(
        stage="stage1",
        slots=tuple(slots),
        edges=edges,
        max_in_degree=draw(st.integers(1, MAX_IN_DEGREE)),
        max_solvers=draw(st.none() | st.integers(1, 3)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pg=graphs(), seed=st.integers(0, 2**32 - 1))
def test_every_sample_is_a_valid_dag(pg: ProbabilisticGraph, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(5):
        assert_valid_sample(pg, pg.sample(rng))
    assert_valid_sample(pg, pg.most_likely())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), edge_p=st.floats(0.0, 1.0), helper_p=st.floats(0.0, 1.0))
def test_template_samples_are_valid_at_any_probability(seed: int, edge_p: float, helper_p: float) -> None:
    pg = template(edge_probability=edge_p, helper_probability=helper_p, rounds=3)
    rng = random.Random(seed)
    for _ in range(10):
        assert_valid_sample(pg, pg.sample(rng))


def test_wide_graphs_respect_the_in_degree_bound() -> None:
    """An aggregator with far more candidate inputs than the bound: samples trim, or fall back to a vote."""
    solvers = {f"m{i}": (1,) for i in range(12)}
    pg = ProbabilisticGraph.template(
        "s", solvers, aggregators=("m0",), solver_probability=0.99, helper_probability=0.99, edge_probability=0.99
    )
    rng = random.Random(0)
    decisions = set()
    for _ in range(50):
        graph = pg.sample(rng)
        assert_valid_sample(pg, graph)
        decisions.add(graph.decision)
    assert DecisionRule.MAJORITY_VOTE in decisions  # 12 sinks cannot all feed one aggregator (bound 8)
    small = ProbabilisticGraph.template("s", {f"m{i}": (1,) for i in range(5)}, aggregators=("m0",), helper_probability=0.99)
    assert any(small.sample(rng).decision is DecisionRule.FUSION for _ in range(20))


def test_sampling_is_seeded_and_follows_the_probabilities() -> None:
    pg = template()
    first = [pg.sample(random.Random(7)) for _ in range(3)]
    assert first == [pg.sample(random.Random(7)) for _ in range(3)]
    rng = random.Random(1)
    draws = [pg.sample(rng) for _ in range(2000)]
    # with max_solvers=2 of 3 solvers at p=0.5 each, 70B is drawn a bit under half the time
    share = fmean(any(n.model == "m-70B" and n.role is Role.SOLVER for n in g.nodes) for g in draws)
    assert 0.3 < share < 0.55
    sure = ProbabilisticGraph.template("s", {"a": (1, 4)}, count_weights={"a": {4: 1.0}})
    assert fmean(sure.sample(rng).nodes[0].n == 4 for _ in range(500)) > 0.99
    assert sure.slot("solver-a").required  # a lone solver is always there


def test_inclusion_and_edge_probabilities() -> None:
    pg = template(helper_probability=0.2, edge_probability=0.3)
    assert pg.inclusion_probability("solver-m-1B") == pytest.approx(0.5)
    assert pg.inclusion_probability("reviewer1-m-8B") == pytest.approx(0.2)
    aggs = [s.id for s in pg.slots if s.role is Role.AGGREGATOR]
    # aggregators are exclusive: "none" plus one each, softmax over (0, l, l, l)
    odds = 0.2 / 0.8
    assert pg.inclusion_probability(aggs[0]) == pytest.approx(odds / (1 + 3 * odds))
    assert pg.edge_probability("solver-m-1B", "reviser1-m-8B") == pytest.approx(0.3)
    assert pg.edge_probability("reviser1-m-8B", "solver-m-1B") == 0.0  # not a candidate
    with pytest.raises(KeyError):
        pg.edge_probability("nope", "solver-m-1B")
    assert slot_id(Role.REVISER, "openai/gpt-4o", 2) == "reviser2-openai_gpt-4o"


def test_invalid_graphs_are_refused() -> None:
    good = template()
    data = good.to_dict()
    backwards = json.loads(json.dumps(data))
    backwards["edges"].append({"source": "aggregator-m-1B", "target": "solver-m-1B", "logit": 0.0})
    with pytest.raises(InvalidPlan, match=r"aggregator|backwards|solver"):
        ProbabilisticGraph.from_json(backwards)
    s = Slot(id="s", model="a")
    r = Slot(id="r", role=Role.REVISER, model="a")
    with pytest.raises(ValidationError, match="backwards"):
        ProbabilisticGraph(
            stage="x", slots=(s, r, Slot(id="r2", role=Role.REVISER, model="a")), edges=(Edge(source="r2", target="r"),)
        )
    with pytest.raises(ValidationError, match="ordered"):
        ProbabilisticGraph(stage="x", slots=(r, s))
    with pytest.raises(ValidationError, match="solver"):
        ProbabilisticGraph(stage="x", slots=(r,))
    with pytest.raises(ValidationError, match="unique"):
        ProbabilisticGraph(stage="x", slots=(s, s))
    with pytest.raises(ValidationError, match="twice"):
        ProbabilisticGraph(stage="x", slots=(s, r), edges=(Edge(source="s", target="r"), Edge(source="s", target="r")))
    with pytest.raises(ValidationError, match="cannot be sampled"):
        Slot(id="v", role=Role.VERIFIER, model="a")
    with pytest.raises(ValidationError, match="counts"):
        Slot(id="v", model="a", counts=(4, 2), count_logits=(0.0, 0.0))
    with pytest.raises(InvalidPlan, match="format"):
        ProbabilisticGraph.from_json({**data, "format": "other/9"})
    with pytest.raises(InvalidPlan, match="JSON"):
        ProbabilisticGraph.from_json("{not json")


# -- JSON and diff ----------------------------------------------------------------------------------------


def test_json_round_trip_and_canonical_order() -> None:
    pg = template()
    assert ProbabilisticGraph.from_json(pg.to_json()) == pg
    assert ProbabilisticGraph.from_json(pg.to_dict()) == pg
    shuffled = pg.to_dict()
    random.Random(3).shuffle(shuffled["edges"])
    rebuilt = ProbabilisticGraph.from_json(shuffled)
    assert rebuilt == pg and rebuilt.to_json() == pg.to_json()
    assert json.loads(pg.to_json())["format"] == "allot.probabilistic-graph/1"


def test_diff_reports_slots_and_edge_deltas() -> None:
    pg = template(aggregators=())
    data = pg.to_probabilities()
    data["slots"] = [s for s in data["slots"] if s["id"] != "reviser2-m-70B"]
    data["slots"].append({"id": "aggregator-m-70B", "role": "aggregator", "model": "m-70B", "include_probability": 0.3})
    data["edges"] = [e for e in data["edges"] if "reviser2-m-70B" not in (e["source"], e["target"])]
    data["edges"][0]["probability"] = 0.1
    data["edges"].append({"source": "solver-m-1B", "target": "aggregator-m-70B", "probability": 0.4})
    for s in data["slots"]:
        if s["id"] == "solver-m-8B":
            s["include_probability"] = 0.2
    other = pg.apply_update(data, []).graph
    diff = pg.diff(other)
    assert diff.added_slots == ("aggregator-m-70B",)
    assert diff.removed_slots == ("reviser2-m-70B",)
    assert [c.id for c in diff.slot_changes] == ["solver-m-8B"]
    assert diff.slot_changes[0].inclusion_after == pytest.approx(0.2, abs=1e-3)
    changes = {(e.source, e.target): e for e in diff.edge_changes}
    first = (pg.edges[0].source, pg.edges[0].target)
    assert changes[first].after == pytest.approx(0.1, abs=1e-3) and changes[first].delta < 0
    assert changes[("solver-m-1B", "aggregator-m-70B")].before == 0.0
    assert changes[("solver-m-1B", "aggregator-m-70B")].after == pytest.approx(0.4, abs=1e-3)
    assert all(e.after == 0.0 for k, e in changes.items() if "reviser2-m-70B" in k)
    assert pg.diff(pg).empty and not diff.empty
    assert any(line.startswith("+ slot aggregator-m-70B") for line in diff.summary())


# -- update rules -------------------------------------------------------------------------------------------


def graph_with(
    nodes: list[tuple[str, Role, str, int]], edges: list[tuple[str, str]], decision: DecisionRule = DecisionRule.MAJORITY_VOTE
) -> StageGraph:
    return StageGraph(
        stage="stage1",
        nodes=tuple(Node(id=i, role=r, model=m, n=n) for i, r, m, n in nodes),
        edges=tuple(edges),
        decision=decision,
    )


def small() -> ProbabilisticGraph:
    return ProbabilisticGraph.template(
        "stage1", {"m-1B": (1, 4), "m-8B": (1, 4)}, revisers=("m-8B",), aggregators=("m-70B",), max_solvers=2
    )


SOLVER_1B = ("solver-m-1B", Role.SOLVER, "m-1B", 1)
SOLVER_8B = ("solver-m-8B", Role.SOLVER, "m-8B", 4)
REVISER = ("reviser1-m-8B", Role.REVISER, "m-8B", 1)


def raised(pg: ProbabilisticGraph, p: float = 0.95) -> dict:
    data = pg.to_probabilities()
    for slot in data["slots"]:
        slot["include_probability"] = p
    for edge in data["edges"]:
        edge["probability"] = p
    return data


def test_an_edge_used_only_by_below_mean_graphs_never_rises() -> None:
    pg = small()
    edge = ("solver-m-1B", "reviser1-m-8B")
    bad = graph_with([SOLVER_1B, REVISER], [edge])
    good = graph_with([SOLVER_8B], [])
    evidence = [(bad, 0.2), (bad, 0.3), (good, 0.8)]
    update = pg.apply_update(raised(pg), evidence)
    after = update.graph
    assert after.edge_probability(*edge) <= pg.edge_probability(*edge) + 1e-12
    assert any(v.kind == "unproven_rise" and v.target == "->".join(edge) for v in update.violations)
    assert after.inclusion_probability("reviser1-m-8B") <= pg.inclusion_probability("reviser1-m-8B") + 1e-12
    # the 8B solver was used by the above-mean graph: it may rise
    assert after.inclusion_probability("solver-m-8B") == pytest.approx(0.95, abs=1e-6)
    # and the same edge used by an above-mean graph may rise too
    flipped = [(bad, 0.9), (good, 0.1)]
    assert pg.apply_update(raised(pg), flipped).graph.edge_probability(*edge) == pytest.approx(0.95, abs=1e-6)


def test_lowering_is_always_allowed() -> None:
    pg = small()
    update = pg.apply_update(raised(pg, 0.01), [])
    for edge in pg.edges:
        assert update.graph.edge_probability(edge.source, edge.target) == pytest.approx(0.01, abs=1e-6)
    assert not any(v.kind == "unproven_rise" for v in update.violations)


def test_no_evidence_means_no_rise_and_new_elements_enter_at_half() -> None:
    pg = small()
    data = raised(pg)
    data["slots"].append({"id": "reviewer1-m-70B", "role": "reviewer", "model": "m-70B", "include_probability": 0.9})
    data["edges"].append({"source": "solver-m-8B", "target": "reviewer1-m-70B", "probability": 0.99})
    data["edges"].append({"source": "reviewer1-m-70B", "target": "reviser1-m-8B", "probability": 0.99})
    update = pg.apply_update(data, [])
    graph = update.graph
    for edge in pg.edges:
        assert graph.edge_probability(edge.source, edge.target) <= edge.probability + 1e-12
    assert graph.inclusion_probability("reviewer1-m-70B") <= NEW_MAX_PROBABILITY + 1e-9
    assert graph.edge_probability("solver-m-8B", "reviewer1-m-70B") <= NEW_MAX_PROBABILITY + 1e-9
    # the new reviewer was placed after the old middle slots: its edge into the old reviser points backwards
    assert graph.edge_probability("reviewer1-m-70B", "reviser1-m-8B") == 0.0
    kinds = {v.kind for v in update.violations}
    assert {"unproven_rise", "new_probability", "cycle"} <= kinds


def test_structural_violations_are_clipped_and_reported() -> None:
    pg = small()
    data = pg.to_probabilities()
    data["edges"] += [
        {"source": "reviser1-m-8B", "target": "solver-m-1B", "probability": 0.5},  # into a solver
        {"source": "aggregator-m-70B", "target": "reviser1-m-8B", "probability": 0.5},  # backwards
        {"source": "ghost", "target": "reviser1-m-8B", "probability": 0.5},  # unknown slot
        "not an edge",
    ]
    data["slots"] += [
        {"id": "x-1", "role": "verifier", "model": "m-8B"},
        {"id": "x-2", "role": "reviser", "model": "gpt-9"},
        {"id": "solver-m-1B", "role": "reviser", "model": "m-1B"},  # a duplicate id
    ]
    data["slots"][0]["role"] = "aggregator"  # an existing slot cannot change role
    update = pg.apply_update(
        data, [], allowed_models=("m-1B", "m-8B", "m-70B"), allowed_roles=(Role.SOLVER, Role.REVISER, Role.AGGREGATOR)
    )
    kinds = [v.kind for v in update.violations]
    for kind in ("cycle", "unknown_slot", "invalid", "role", "model", "slot_changed"):
        assert kind in kinds, (kind, update.report())
    assert update.graph.slot("solver-m-1B").role is Role.SOLVER
    assert {s.id for s in update.graph.slots} == {s.id for s in pg.slots}
    assert {e.key for e in update.graph.edges} == {e.key for e in pg.edges}


def test_removing_every_solver_keeps_the_old_ones() -> None:
    pg = small()
    data = pg.to_probabilities()
    data["slots"] = [s for s in data["slots"] if s["role"] != "solver"]
    update = pg.apply_update(data, [])
    assert {s.id for s in update.graph.slots if s.role is Role.SOLVER} == {"solver-m-1B", "solver-m-8B"}
    assert any(v.kind == "no_solver" for v in update.violations)


def test_expected_in_degree_is_bounded() -> None:
    solvers = {f"m{i}": (1,) for i in range(12)}
    pg = ProbabilisticGraph.template("s", solvers, aggregators=("m0",), edge_probability=0.5)
    agg = "aggregator-m0"
    assert sum(e.probability for e in pg.edges if e.target == agg) <= MAX_IN_DEGREE
    data = raised(pg, 0.99)
    evidence = [(StageGraph(stage="s", nodes=(Node(id=f"solver-m{i}", model=f"m{i}"),)), 0.0) for i in range(2)]
    # every edge "proven" by above-mean fused graphs would still exceed the bound: it is scaled down
    fused = StageGraph(
        stage="s",
        nodes=(*(Node(id=f"solver-m{i}", model=f"m{i}") for i in range(8)), Node(id=agg, role=Role.AGGREGATOR, model="m0")),
        edges=tuple((f"solver-m{i}", agg) for i in range(8)),
        decision=DecisionRule.FUSION,
    )
    update = pg.apply_update(data, [*evidence, (fused, 1.0)])
    assert sum(e.probability for e in update.graph.edges if e.target == agg) <= MAX_IN_DEGREE + 1e-6
    assert any(v.kind == "in_degree" for v in update.violations)


def test_count_options_rise_only_when_proven() -> None:
    pg = small()
    data = pg.to_probabilities()
    for slot in data["slots"]:
        if slot["id"] == "solver-m-8B":
            slot["counts"] = {"1": 0.05, "4": 0.95}
        if slot["id"] == "solver-m-1B":
            slot["counts"] = {"1": 0.05, "4": 0.9, "64": 0.05}
    good4 = graph_with([SOLVER_8B], [])  # 8B with 4 samples scored above the mean
    bad = graph_with([("solver-m-1B", Role.SOLVER, "m-1B", 4)], [])  # 1B with 4 did not
    update = pg.apply_update(data, [(good4, 0.9), (bad, 0.1)], allowed_counts={"m-1B": (1, 2, 4, 8), "m-8B": (1, 2, 4, 8)})
    eight = update.graph.slot("solver-m-8B").count_probabilities
    assert eight[4] == pytest.approx(0.95, abs=1e-6)
    one = update.graph.slot("solver-m-1B").count_probabilities
    before = pg.slot("solver-m-1B").count_probabilities
    assert set(one) == {1, 4}  # 64 is not an allowed count
    assert all(one[n] <= before[n] + 1e-9 for n in one)
    assert any(v.kind == "count" for v in update.violations)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), proposal_seed=st.integers(0, 2**32 - 1))
def test_rules_hold_for_any_proposal(seed: int, proposal_seed: int) -> None:
    """Whatever is proposed, nothing rises without above-mean use, and the result stays valid."""
    pg = template()
    rng = random.Random(seed)
    evidence = [(pg.sample(rng), rng.random()) for _ in range(rng.randint(1, 6))]
    mean = fmean(s for _, s in evidence)
    prng = random.Random(proposal_seed)
    data = pg.to_probabilities()
    for slot in data["slots"]:
        slot["include_probability"] = prng.random()
        slot["counts"] = {str(n): prng.random() for n in (1, 2, 4, 8)}
    for edge in data["edges"]:
        edge["probability"] = prng.random()
    after = pg.apply_update(data, evidence).graph

    def proven(used) -> bool:
        scores = [s for g, s in evidence if used(g)]
        return bool(scores) and fmean(scores) > mean + 1e-9

    for edge in pg.edges:
        if after.edge_probability(edge.source, edge.target) > edge.probability + 1e-9:
            assert proven(lambda g, k=edge.key: k in g.edges), edge.key
    for slot in pg.slots:

        def uses(g: StageGraph, sid: str = slot.id) -> bool:
            return any(n.id == sid for n in g.nodes)

        rise = after.inclusion_probability(slot.id) - pg.inclusion_probability(slot.id)
        if rise > 1e-9 and after.inclusion_probability(slot.id) > FLOOR:
            assert proven(uses), slot.id
        new_counts = after.slot(slot.id).count_probabilities
        for n, p in new_counts.items():
            if n not in slot.counts:  # a new option enters at most at NEW_MAX_PROBABILITY
                assert p <= NEW_MAX_PROBABILITY + 1e-6
            elif p > slot.count_probabilities[n] + 1e-9:
                assert proven(lambda g, sid=slot.id, n=n: any(x.id == sid and x.n == n for x in g.nodes)), (slot.id, n)
    sampler = random.Random(seed + 1)
    for _ in range(5):
        assert_valid_sample(after, after.sample(sampler))


# -- the numeric REINFORCE step --------------------------------------------------------------------------


def test_reinforce_step_follows_the_advantage() -> None:
    pg = small()
    edge = ("solver-m-8B", "reviser1-m-8B")
    with_edge = graph_with([SOLVER_8B, REVISER], [edge])
    without = graph_with([SOLVER_8B, ("reviser1-m-8B", Role.REVISER, "m-8B", 1), SOLVER_1B], [("solver-m-1B", "reviser1-m-8B")])
    evidence = [(with_edge, 0.9), (without, 0.2)]
    step = reinforce_step(pg, evidence, baseline=0.55, learning_rate=1.0)
    assert step.edge_probability(*edge) > pg.edge_probability(*edge)
    assert step.edge_probability("solver-m-1B", "reviser1-m-8B") < pg.edge_probability("solver-m-1B", "reviser1-m-8B")
    assert step.inclusion_probability("solver-m-1B") < pg.inclusion_probability("solver-m-1B")
    update = pg.apply_update(step, evidence)
    assert update.graph.edge_probability(*edge) == pytest.approx(step.edge_probability(*edge))
    assert reinforce_step(pg, [], baseline=0.5) == pg
    grads = pg.score_function(with_edge)
    assert grads["edge"][edge] == pytest.approx(1 - pg.edge_probability(*edge))
    assert grads["include"]["solver-m-1B"] == pytest.approx(-pg.inclusion_probability("solver-m-1B"))
