"""Plans: construction, canonical identity, JSON round trips, invariants, immutability."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from graphs.errors import InvalidPlan
from graphs.plan import MAX_IN_DEGREE, DecisionRule, Node, Plan, Role, StageGraph


def node(node_id: str, model: str = "m", **fields) -> dict:
    return {"id": node_id, "model": model, **fields}


def stage(name: str = "s", nodes=(), edges=(), **fields) -> dict:
    return {"stage": name, "nodes": list(nodes), "edges": [list(e) for e in edges], **fields}


def fusion_plan_fields(nodes_order=None, edges_order=None) -> dict:
    nodes = [node("a", "small", n=4), node("b", "big", n=2, max_tokens=512), node("agg", "big", role="aggregator")]
    edges = [("a", "agg"), ("b", "agg"), ("a", "b")]
    if nodes_order is not None:
        nodes = [nodes[i] for i in nodes_order]
    if edges_order is not None:
        edges = [edges[i] for i in edges_order]
    return {"stages": [stage("answer", nodes, edges, decision="fusion")]}


# -- construction ---------------------------------------------------------------------------------------


def test_allocation_one_liner() -> None:
    plan = Plan.allocation({"answer": ("Qwen3-4B", 8)})
    assert len(plan.stages) == 1
    graph = plan.stages[0]
    assert graph.stage == "answer"
    assert graph.decision is DecisionRule.MAJORITY_VOTE
    assert graph.edges == ()
    assert graph.early_stop is None
    (only,) = graph.nodes
    assert (only.model, only.n, only.role, only.max_tokens) == ("Qwen3-4B", 8, Role.SOLVER, None)
    assert plan.models == ("Qwen3-4B",)
    assert plan.stage("answer") is graph
    with pytest.raises(KeyError):
        plan.stage("missing")


def test_allocation_accepts_bare_model_and_cap_and_keeps_stage_order() -> None:
    plan = Plan.allocation({"retrieve": "m-1B", "answer": ("m-8B", 4, 2000)}, early_stop=3)
    assert [s.stage for s in plan.stages] == ["retrieve", "answer"]
    retrieve, answer = plan.stages
    assert (retrieve.nodes[0].model, retrieve.nodes[0].n, retrieve.nodes[0].max_tokens) == ("m-1B", 1, None)
    assert (answer.nodes[0].model, answer.nodes[0].n, answer.nodes[0].max_tokens) == ("m-8B", 4, 2000)
    assert retrieve.early_stop == answer.early_stop == 3
    assert plan.models == ("m-1B", "m-8B")


def test_allocation_rejects_bad_values_with_invalid_plan() -> None:
    # Plan.allocation is a public constructor: a bad sample count is a user error, so it must come
    # back as InvalidPlan (one line), like Plan.build and Plan.from_json.
    with pytest.raises(InvalidPlan):
        Plan.allocation({"answer": ("m", 0)})


def test_build_sorts_nodes_and_edges_and_dedups_edges() -> None:
    plan = Plan.build(**fusion_plan_fields(nodes_order=[2, 1, 0], edges_order=[2, 1, 0]))
    graph = plan.stages[0]
    assert [n.id for n in graph.nodes] == sorted(n.id for n in graph.nodes)
    assert list(graph.edges) == sorted(graph.edges)
    doubled = fusion_plan_fields()
    doubled["stages"][0]["edges"] *= 2
    assert Plan.build(**doubled).stages[0].edges == graph.edges


# -- identity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes_order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
@pytest.mark.parametrize("edges_order", [[0, 1, 2], [2, 0, 1]])
def test_canonical_json_and_id_ignore_node_and_edge_order(nodes_order, edges_order) -> None:
    reference = Plan.build(**fusion_plan_fields())
    plan = Plan.build(**fusion_plan_fields(nodes_order, edges_order))
    assert plan.canonical_json() == reference.canonical_json()
    assert plan.plan_id == reference.plan_id
    assert plan == reference
    assert hash(plan) == hash(reference)
    assert len({plan, reference}) == 1


def test_canonical_json_is_sorted_compact_and_hashed() -> None:
    plan = Plan.build(**fusion_plan_fields())
    text = plan.canonical_json()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert plan.plan_id == hashlib.sha256(text.encode()).hexdigest()
    assert len(plan.plan_id) == 64


def test_different_plans_have_different_ids() -> None:
    base = Plan.allocation({"answer": ("m", 4)})
    others = [
        Plan.allocation({"answer": ("m", 8)}),
        Plan.allocation({"answer": ("other", 4)}),
        Plan.allocation({"answer": ("m", 4, 1000)}),
        Plan.allocation({"answer": ("m", 4)}, early_stop=2),
        Plan.allocation({"question": ("m", 4)}),
    ]
    ids = {base.plan_id, *(p.plan_id for p in others)}
    assert len(ids) == len(others) + 1
    assert all(p != base for p in others)


# -- JSON round trips -----------------------------------------------------------------------------------


def test_from_json_round_trip_str_bytes_and_mapping() -> None:
    plan = Plan.build(**fusion_plan_fields())
    text = plan.canonical_json()
    for source in (text, text.encode(), json.loads(text), json.dumps(json.loads(text), indent=2)):
        again = Plan.from_json(source)
        assert again == plan
        assert again.plan_id == plan.plan_id
        assert again.canonical_json() == text


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"stages"', "{}"])
def test_from_json_rejects_garbage_with_invalid_plan(text: str) -> None:
    with pytest.raises(InvalidPlan) as info:
        Plan.from_json(text)
    assert "\n" not in str(info.value)


# -- invariants -----------------------------------------------------------------------------------------

INVALID = {
    "cycle": (
        stage(nodes=[node("a"), node("b"), node("c")], edges=[("a", "b"), ("b", "a"), ("a", "c")]),
        "cycle",
    ),
    "self-loop": (stage(nodes=[node("a"), node("b")], edges=[("a", "a")]), "self-loop"),
    "edge to unknown node": (stage(nodes=[node("a")], edges=[("a", "ghost")]), "ghost"),
    "duplicate node ids": (stage(nodes=[node("a"), node("a", "m2")]), "unique"),
    "fusion without aggregator sink": (
        stage(nodes=[node("a"), node("b")], edges=[("a", "b")], decision="fusion"),
        "aggregator",
    ),
    "fusion with two sinks": (
        stage(nodes=[node("a"), node("b", role="aggregator")], decision="fusion"),
        "aggregator",
    ),
    "best_of_n without verifier": (stage(nodes=[node("a", n=4)], decision="best_of_n"), "verifier"),
    "best_of_n with two verifiers": (
        stage(nodes=[node("a", n=4), node("v", role="verifier"), node("w", role="verifier")], decision="best_of_n"),
        "verifier",
    ),
    "early_stop with best_of_n": (
        stage(nodes=[node("a", n=4), node("v", role="verifier")], decision="best_of_n", early_stop=2),
        "early_stop",
    ),
    "early_stop with fusion": (
        stage(nodes=[node("a", n=4), node("agg", role="aggregator")], edges=[("a", "agg")], decision="fusion", early_stop=2),
        "early_stop",
    ),
    "in-degree above the limit": (
        stage(
            nodes=[*(node(f"x{i}") for i in range(MAX_IN_DEGREE + 1)), node("agg", role="aggregator")],
            edges=[(f"x{i}", "agg") for i in range(MAX_IN_DEGREE + 1)],
            decision="fusion",
        ),
        "in-degree",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_graphs_raise_one_line_invalid_plan(case: str) -> None:
    fields, needle = INVALID[case]
    for attempt in (lambda: Plan.build(stages=[fields]), lambda: Plan.from_json(json.dumps({"stages": [fields]}))):
        with pytest.raises(InvalidPlan) as info:
            attempt()
        message = str(info.value)
        assert needle in message, message
        assert "\n" not in message
        assert isinstance(info.value, ValueError)


def test_in_degree_at_the_limit_is_valid() -> None:
    fields = stage(
        nodes=[*(node(f"x{i}") for i in range(MAX_IN_DEGREE)), node("agg", role="aggregator")],
        edges=[(f"x{i}", "agg") for i in range(MAX_IN_DEGREE)],
        decision="fusion",
    )
    plan = Plan.build(stages=[fields])
    assert [n.id for n in plan.stages[0].answer_nodes] == ["agg"]


def test_valid_best_of_n_and_fusion_graphs_build() -> None:
    best = Plan.build(stages=[stage(nodes=[node("a", n=4), node("v", role="verifier")], decision="best_of_n")])
    assert [n.id for n in best.stages[0].answer_nodes] == ["a"]
    fused = Plan.build(**fusion_plan_fields())
    assert [n.id for n in fused.stages[0].answer_nodes] == ["agg"]


@pytest.mark.parametrize(
    "fields",
    [
        {"stages": []},
        {"stages": [stage("a", [node("x")]), stage("a", [node("y")])]},
        {"stages": [stage(nodes=[node("x", n=0)])]},
        {"stages": [stage(nodes=[node("bad id!")])]},
        {"stages": [stage(nodes=[node("x")], early_stop=1)]},
        {"stages": [stage(nodes=[])]},
        {"stages": [stage(nodes=[node("x")])], "extra": 1},
    ],
)
def test_field_errors_are_invalid_plan(fields) -> None:
    with pytest.raises(InvalidPlan) as info:
        Plan.build(**fields)
    assert str(info.value).startswith("invalid plan")
    assert "\n" not in str(info.value)


# -- immutability ---------------------------------------------------------------------------------------


def test_plans_are_frozen() -> None:
    plan = Plan.build(**fusion_plan_fields())
    before = plan.plan_id
    graph = plan.stages[0]
    with pytest.raises(ValidationError):
        plan.stages = ()  # type: ignore[misc]
    with pytest.raises(ValidationError):
        graph.early_stop = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        graph.nodes[0].n = 99  # type: ignore[misc]
    assert isinstance(plan.stages, tuple)
    assert isinstance(graph.nodes, tuple)
    assert isinstance(graph.edges, tuple)
    assert all(isinstance(edge, tuple) for edge in graph.edges)
    assert plan.plan_id == before == Plan.build(**fusion_plan_fields()).plan_id


def test_direct_construction_matches_build() -> None:
    graph = StageGraph(stage="answer", nodes=(Node(id="b", model="y", n=2), Node(id="a", model="x")))
    assert Plan(stages=(graph,)) == Plan.build(stages=[stage("answer", [node("a", "x"), node("b", "y", n=2)])])


# -- property: any allocation round-trips ---------------------------------------------------------------

stage_names = st.text(min_size=1, max_size=64)
models = st.text(min_size=1, max_size=40)
allocations = st.dictionaries(
    stage_names,
    st.one_of(
        models,
        st.tuples(models, st.integers(1, 4096)),
        st.tuples(models, st.integers(1, 4096), st.one_of(st.none(), st.integers(1, 200_000))),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(spec=allocations, early_stop=st.one_of(st.none(), st.integers(2, 64)))
def test_any_allocation_round_trips_with_the_same_id(spec, early_stop) -> None:
    plan = Plan.allocation(spec, early_stop=early_stop)
    text = plan.canonical_json()
    again = Plan.from_json(text)
    assert again.plan_id == plan.plan_id
    assert again == plan
    assert again.canonical_json() == text
    assert Plan.from_json(json.loads(text)).plan_id == plan.plan_id
    assert [s.stage for s in again.stages] == list(spec)
