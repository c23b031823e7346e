"""Replay environment: bundled data, scoring against the plain-Python reference, costs, errors, loading."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from executors import environment_from_spec
from executors.replay import ReplayEnvironment
from executors.replay_data import bundled_data_dir, list_benchmarks, load_benchmark, model_spec_from_name
from executors.replay_reference import reference_score
from graphs.cost import prefill_flops
from graphs.errors import DataError, InvalidPlan, UnknownModel
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph
from planner.space import SearchSpace

MODELS = ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")


@pytest.fixture(scope="module")
def env24() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime24", orderings=16, seed=0)


@pytest.fixture(scope="module")
def env25() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime25", orderings=16, seed=0)


def single(model: str, n: int, cap: int | None = None, early_stop: int | None = None) -> Plan:
    return Plan.allocation({"answer": (model, n, cap)}, early_stop=early_stop)


def mixture(*nodes: tuple[str, int, int | None], early_stop: int | None = None) -> Plan:
    graph = StageGraph(
        stage="answer",
        nodes=tuple(Node(id=f"n{i}", model=m, n=n, max_tokens=cap) for i, (m, n, cap) in enumerate(nodes)),
        early_stop=early_stop,
    )
    return Plan(stages=(graph,))


def without_early_stop(plan: Plan) -> Plan:
    graph = plan.stages[0]
    return Plan(stages=(StageGraph(stage=graph.stage, nodes=graph.nodes, early_stop=None),))


def prefill_term(env: ReplayEnvironment, plan: Plan) -> float:
    """Mean prefill FLOPs per problem, paid once per node."""
    return sum(
        float(np.mean([prefill_flops(env.data.specs[node.model], p) for p in env._prompt_tokens]))
        for node in plan.stages[0].nodes
    )


# -- bundled data ---------------------------------------------------------------------------------------


def test_bundled_directory_lists_both_benchmarks() -> None:
    found = list_benchmarks(bundled_data_dir())
    assert set(found) == {"aime24", "aime25"}
    for files in found.values():
        assert len(files) == 4


@pytest.mark.parametrize("benchmark", ["aime24", "aime25"])
def test_bundled_benchmark_loads(benchmark: str) -> None:
    data = load_benchmark(bundled_data_dir(), benchmark)
    assert data.name == benchmark
    assert data.models == MODELS  # ordered by size
    assert len(data.problems) == 30
    assert len({p.id for p in data.problems}) == 30
    assert all(p.id.startswith(benchmark) and p.question and p.gold for p in data.problems)
    assert data.probe_every == 500
    for model in MODELS:
        rec = data.records[model]
        assert rec.probe_every == 500
        assert len(rec.answers) == len(rec.tokens) == len(rec.probes) == 30
        assert rec.min_samples == 128
        assert all(len(row) == 128 for row in rec.tokens)
        assert 30_000 < rec.max_tokens < 50_000
        assert data.specs[model].layers is not None  # from models.json
    # 8B is bigger than 0.6B in the cost model too
    assert data.specs["Qwen3-8B"].active_params > data.specs["Qwen3-0.6B"].active_params


def test_bundled_directory_needs_a_benchmark_choice() -> None:
    with pytest.raises(DataError, match="aime24") as info:
        load_benchmark(bundled_data_dir())
    assert "aime25" in str(info.value)
    with pytest.raises(DataError, match="aime24"):
        ReplayEnvironment(benchmark="aime99")


def test_info_describes_the_replay_space(env24: ReplayEnvironment) -> None:
    info = env24.info
    assert info.name == "aime24"
    assert info.stages == ("answer",)
    assert info.stage_models == {"answer": MODELS}
    assert dict(info.max_samples) == dict.fromkeys(MODELS, 128)
    assert info.caps[0] is None
    assert list(info.caps[1:]) == sorted(info.caps[1:])
    assert all(c % 500 == 0 for c in info.caps[1:])
    assert info.decisions == (DecisionRule.MAJORITY_VOTE,)
    assert info.roles == (Role.SOLVER,)
    assert info.early_stop is True
    assert info.n_examples == 30


# -- the README's accuracy table ------------------------------------------------------------------------

README_TABLE = {
    ("aime24", "Qwen3-0.6B"): (0.10, 0.13, 0.19, 0.22),
    ("aime24", "Qwen3-1.7B"): (0.47, 0.54, 0.66, 0.73),
    ("aime24", "Qwen3-4B"): (0.73, 0.79, 0.80, 0.80),
    ("aime24", "Qwen3-8B"): (0.76, 0.80, 0.81, 0.81),
    ("aime25", "Qwen3-4B"): (0.66, 0.72, 0.76, 0.77),
    ("aime25", "Qwen3-8B"): (0.68, 0.72, 0.78, 0.78),
}


@pytest.mark.parametrize(("benchmark", "model"), list(README_TABLE))
def test_single_model_accuracy_matches_readme(benchmark, model, env24, env25) -> None:
    env = env24 if benchmark == "aime24" else env25
    for k, expected in zip((1, 4, 16, 64), README_TABLE[benchmark, model], strict=True):
        evaluation = env.evaluate(single(model, k))
        assert evaluation.score == pytest.approx(expected, abs=0.06), (model, k)
        assert len(evaluation.scores) == env.orderings
        assert evaluation.score == pytest.approx(np.mean(evaluation.scores))
        assert evaluation.spread == pytest.approx(np.std(evaluation.scores))
        assert evaluation.llm_calls == 0
        assert evaluation.n_examples == 30
        assert len(evaluation.per_example) == 30


def test_readme_mean_tokens_per_sample(env24: ReplayEnvironment) -> None:
    assert env24.estimate_cost(single("Qwen3-8B", 1)).output_tokens == pytest.approx(14_200, rel=0.05)
    assert env24.estimate_cost(single("Qwen3-0.6B", 1)).output_tokens == pytest.approx(15_800, rel=0.05)


# -- the vectorised scorer equals the reference loop ----------------------------------------------------


def assert_matches_reference(env: ReplayEnvironment, plan: Plan) -> None:
    evaluation = env.evaluate(plan)
    score, decode = reference_score(env, plan)
    runs = env.orderings * len(env.data.problems)
    # Same correct answers (integer counts); only the float summation order differs.
    assert round(evaluation.score * runs) == round(score * runs), plan.summary()
    assert evaluation.score == pytest.approx(score, rel=0, abs=1e-12), plan.summary()
    assert evaluation.cost.flops - prefill_term(env, plan) == pytest.approx(decode, rel=1e-9), plan.summary()


@pytest.fixture(scope="module")
def small_env() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime24", orderings=2, seed=11)


def test_evaluate_equals_reference_on_space_samples(small_env: ReplayEnvironment) -> None:
    space = SearchSpace.from_info(small_env.info)
    rng = random.Random(1234)
    plans = {p.plan_id: p for p in (space.sample(rng) for _ in range(220))}
    kinds = {"mixture": 0, "capped": 0, "early_stop": 0}
    for plan in plans.values():
        graph = plan.stages[0]
        kinds["mixture"] += len(graph.nodes) > 1
        kinds["capped"] += any(n.max_tokens is not None for n in graph.nodes)
        kinds["early_stop"] += graph.early_stop is not None
        assert_matches_reference(small_env, plan)
    assert min(kinds.values()) >= 30, kinds


def test_evaluate_equals_reference_on_hand_built_graphs() -> None:
    env = ReplayEnvironment(benchmark="aime25", orderings=2, seed=5)
    rng = random.Random(99)
    caps = env.info.caps
    plans = []
    for _ in range(80):
        left = dict.fromkeys(MODELS, 128)
        nodes = []
        for i in range(rng.randint(1, 4)):
            model = rng.choice(MODELS[:2]) if rng.random() < 0.5 else rng.choice(MODELS)  # repeats are likely
            n = rng.randint(1, min(40, left[model]))
            left[model] -= n
            nodes.append(Node(id=f"x{i}", model=model, n=n, max_tokens=rng.choice(caps)))
        stop = rng.choice([None, None, 2, 3, 5])
        plans.append(Plan(stages=(StageGraph(stage="answer", nodes=tuple(nodes), early_stop=stop),)))
    # explicit corner cases: the same model twice, with and without early stop, different caps per node
    plans += [
        mixture(("Qwen3-1.7B", 3, None), ("Qwen3-1.7B", 5, None)),
        mixture(("Qwen3-1.7B", 3, None), ("Qwen3-1.7B", 5, 4000), early_stop=3),
        mixture(("Qwen3-8B", 1, None), ("Qwen3-0.6B", 7, 1000), ("Qwen3-8B", 2, 8000), early_stop=2),
        mixture(("Qwen3-4B", 64, None), ("Qwen3-4B", 64, None)),
        single("Qwen3-0.6B", 128, early_stop=2),
        single("Qwen3-0.6B", 3, 1000, early_stop=2),
    ]
    assert sum(len({n.model for n in p.stages[0].nodes}) < len(p.stages[0].nodes) for p in plans) >= 10
    for plan in plans:
        assert_matches_reference(env, plan)


# -- determinism ----------------------------------------------------------------------------------------

PLANS_FOR_DETERMINISM = [
    single("Qwen3-1.7B", 1),
    single("Qwen3-1.7B", 8, 4000, early_stop=3),
    mixture(("Qwen3-0.6B", 4, None), ("Qwen3-4B", 2, None), early_stop=2),
]


def test_same_seed_same_result() -> None:
    first = ReplayEnvironment(benchmark="aime24", orderings=4, seed=3)
    second = ReplayEnvironment(benchmark="aime24", orderings=4, seed=3)
    rebuilt = environment_from_spec(json.loads(json.dumps(first.spec())))
    for plan in PLANS_FOR_DETERMINISM:
        result = first.evaluate(plan)
        assert first.evaluate(plan) == result  # cached paths give the same answer
        assert second.evaluate(plan) == result
        assert rebuilt.evaluate(plan) == result
        assert second.estimate_cost(plan) == first.estimate_cost(plan)
    for model in MODELS:
        np.testing.assert_array_equal(first.ordering(model), second.ordering(model))


def test_different_seed_different_orderings() -> None:
    a = ReplayEnvironment(benchmark="aime24", orderings=4, seed=3)
    b = ReplayEnvironment(benchmark="aime24", orderings=4, seed=4)
    for model in MODELS:
        assert not np.array_equal(a.ordering(model), b.ordering(model))
        # every ordering is a permutation of the recorded samples
        assert sorted(a.ordering(model)[0, 0]) == list(range(128))
    assert a.evaluate(single("Qwen3-1.7B", 1)).scores != b.evaluate(single("Qwen3-1.7B", 1)).scores
    # orderings within one environment differ from each other
    assert not np.array_equal(a.ordering("Qwen3-4B")[0], a.ordering("Qwen3-4B")[1])


# -- costs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_orderings() -> ReplayEnvironment:
    return ReplayEnvironment(benchmark="aime25", orderings=128, seed=3)


@pytest.mark.parametrize(
    "plan",
    [
        single("Qwen3-4B", 4),
        single("Qwen3-1.7B", 16, 4000),
        mixture(("Qwen3-8B", 2, None), ("Qwen3-0.6B", 8, None)),
        mixture(("Qwen3-8B", 2, None), ("Qwen3-8B", 3, 8000)),
    ],
    ids=lambda p: p.summary(),
)
def test_estimate_cost_is_the_expected_cost(many_orderings: ReplayEnvironment, plan: Plan) -> None:
    estimate = many_orderings.estimate_cost(plan)
    realised = many_orderings.evaluate(plan).cost
    assert realised.flops == pytest.approx(estimate.flops, rel=0.03)
    assert realised.output_tokens == pytest.approx(estimate.output_tokens, rel=0.03)
    assert realised.prompt_tokens == pytest.approx(estimate.prompt_tokens)
    # the estimate does not depend on the orderings drawn
    other = ReplayEnvironment(benchmark="aime25", orderings=2, seed=3).estimate_cost(plan)
    assert other.flops == pytest.approx(estimate.flops, rel=0.02)


def test_costs_grow_with_samples_and_model_size(env24: ReplayEnvironment) -> None:
    flops = [env24.estimate_cost(single("Qwen3-4B", n)).flops for n in (1, 2, 4, 8)]
    assert flops == sorted(flops)
    assert flops[3] == pytest.approx(8 * flops[0], rel=0.01)  # prefill is tiny beside 14k decode tokens
    by_model = [env24.estimate_cost(single(m, 4)).flops for m in MODELS]
    assert by_model == sorted(by_model)


def test_early_stop_never_costs_more(small_env: ReplayEnvironment) -> None:
    space = SearchSpace.from_info(small_env.info)
    rng = random.Random(7)
    strictly_cheaper = 0
    checked = 0
    while checked < 60:
        plan = space.sample(rng)
        if plan.stages[0].early_stop is None:
            continue
        checked += 1
        stopped = small_env.evaluate(plan).cost
        full = small_env.evaluate(without_early_stop(plan)).cost
        assert stopped.flops <= full.flops * (1 + 1e-12), plan.summary()
        assert stopped.output_tokens <= full.output_tokens * (1 + 1e-12), plan.summary()
        assert stopped.flops <= small_env.estimate_cost(plan).flops * 1.5
        strictly_cheaper += stopped.flops < full.flops * 0.999
    assert strictly_cheaper >= 20
    big = single("Qwen3-8B", 64, early_stop=2)
    assert small_env.evaluate(big).cost.flops < 0.2 * small_env.evaluate(without_early_stop(big)).cost.flops


def test_caps_reduce_tokens(env24: ReplayEnvironment) -> None:
    caps = [c for c in env24.info.caps if c is not None]
    for model in MODELS:
        n = 4
        uncapped = env24.evaluate(single(model, n)).cost.output_tokens
        previous = 0.0
        for cap in caps:
            estimate = env24.estimate_cost(single(model, n, cap)).output_tokens
            realised = env24.evaluate(single(model, n, cap)).cost.output_tokens
            assert realised <= n * cap
            assert estimate <= n * cap
            assert previous <= realised <= uncapped
            previous = realised
        small_cap = env24.evaluate(single(model, n, caps[0])).cost
        assert small_cap.output_tokens < 0.2 * uncapped
        assert small_cap.flops < env24.evaluate(single(model, n)).cost.flops


def test_caps_change_answers_through_probes(env24: ReplayEnvironment) -> None:
    full = env24.evaluate(single("Qwen3-8B", 8)).score
    tiny = env24.evaluate(single("Qwen3-8B", 8, 1000)).score
    assert tiny < full - 0.2  # cutting a 14k-token reasoning trace at 1k tokens hurts


# -- check() --------------------------------------------------------------------------------------------


def test_unknown_model_names_model_and_known_ones(env24: ReplayEnvironment) -> None:
    plan = single("Llama-9000B", 2)
    for call in (env24.check, env24.estimate_cost, env24.evaluate):
        with pytest.raises(UnknownModel) as info:
            call(plan)
        message = str(info.value)
        assert "Llama-9000B" in message
        assert all(m in message for m in MODELS)
        assert "\n" not in message


def test_too_many_samples(env24: ReplayEnvironment) -> None:
    env24.check(single("Qwen3-4B", 128))
    with pytest.raises(InvalidPlan, match="129"):
        env24.check(single("Qwen3-4B", 129))
    with pytest.raises(InvalidPlan, match="Qwen3-4B"):
        env24.check(mixture(("Qwen3-4B", 100, None), ("Qwen3-4B", 29, 4000)))
    env24.check(mixture(("Qwen3-4B", 100, None), ("Qwen3-4B", 28, 4000)))


def test_non_solver_roles_are_rejected(env24: ReplayEnvironment) -> None:
    plan = Plan(
        stages=(
            StageGraph(
                stage="answer",
                nodes=(Node(id="a", model="Qwen3-4B", n=2), Node(id="r", model="Qwen3-8B", role=Role.REVIEWER)),
            ),
        )
    )
    with pytest.raises(InvalidPlan, match="reviewer"):
        env24.check(plan)


@pytest.mark.parametrize(
    "graph",
    [
        StageGraph(
            stage="answer",
            nodes=(Node(id="a", model="Qwen3-4B", n=2), Node(id="b", model="Qwen3-8B")),
            edges=(("a", "b"),),
        ),
        StageGraph(
            stage="answer",
            nodes=(Node(id="a", model="Qwen3-4B", n=2), Node(id="f", model="Qwen3-8B", role=Role.AGGREGATOR)),
            edges=(("a", "f"),),
            decision=DecisionRule.FUSION,
        ),
        StageGraph(
            stage="answer",
            nodes=(Node(id="a", model="Qwen3-4B", n=2), Node(id="v", model="Qwen3-8B", role=Role.VERIFIER)),
            decision=DecisionRule.BEST_OF_N,
        ),
    ],
    ids=["edges", "fusion", "best_of_n"],
)
def test_edges_and_other_decisions_are_rejected(env24: ReplayEnvironment, graph: StageGraph) -> None:
    with pytest.raises(InvalidPlan, match="majority_vote"):
        env24.check(Plan(stages=(graph,)))


def test_wrong_stage_name_or_count(env24: ReplayEnvironment) -> None:
    with pytest.raises(InvalidPlan, match="'answer'") as info:
        env24.check(Plan.allocation({"solve": ("Qwen3-4B", 2)}))
    assert "solve" in str(info.value)
    with pytest.raises(InvalidPlan, match="'answer'"):
        env24.check(Plan.allocation({"answer": ("Qwen3-4B", 2), "verify": ("Qwen3-8B", 1)}))


def test_cap_below_probe_interval(env24: ReplayEnvironment) -> None:
    with pytest.raises(InvalidPlan, match="500"):
        env24.check(single("Qwen3-4B", 2, 100))
    env24.check(single("Qwen3-4B", 2, 500))


# -- loading errors -------------------------------------------------------------------------------------


def problem(pid: str, gold: str = "1", answers=("1", "2"), tokens=None, probe_every: int = 0, **extra) -> dict:
    tokens = tokens or [100 + 10 * i for i in range(len(answers))]
    samples = [{"answer": a, "tokens": t, "probes": []} for a, t in zip(answers, tokens, strict=True)]
    return {"id": pid, "benchmark": "b", "model": "m", "question": f"Q {pid}?", "gold": gold,
            "probe_every": probe_every, "samples": samples, **extra}  # fmt: skip


def write_jsonl(path: Path, rows, *, raw_lines=()) -> Path:
    lines = [json.dumps(row) for row in rows] + list(raw_lines)
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def assert_data_error(directory: Path, *needles: str) -> str:
    with pytest.raises(DataError) as info:
        ReplayEnvironment(directory)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert_data_error(missing, str(missing), "does not exist")


def test_directory_without_replay_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "nounderscores.jsonl").write_text("{}\n")
    assert_data_error(tmp_path, "no replay files", str(tmp_path))


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "b__M-1B.jsonl", [problem("p1")], raw_lines=["", "{broken"])
    assert_data_error(tmp_path, f"{file}:3")


def test_malformed_json_line_in_gzip(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "b__M-1B.jsonl.gz", [problem("p1"), problem("p2")], raw_lines=["[1, 2]"])
    assert_data_error(tmp_path, f"{file}:3")


def test_unreadable_gzip(tmp_path: Path) -> None:
    (tmp_path / "b__M-1B.jsonl.gz").write_text("not gzip at all")
    assert_data_error(tmp_path, "b__M-1B.jsonl.gz")


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({k: v for k, v in problem("p1").items() if k != "gold"}, "gold"),
        ({k: v for k, v in problem("p1").items() if k != "id"}, "id"),
        ({**problem("p1"), "samples": []}, "samples"),
        ({**problem("p1"), "samples": [{"answer": "1"}]}, "tokens"),
        ({**problem("p1"), "samples": [{"answer": "1", "tokens": "many"}]}, "tokens"),
        ({**problem("p1"), "samples": ["just a string"]}, "tokens"),
        ({**problem("p1"), "samples": [{"answer": "1", "tokens": -5}]}, ">= 0"),
    ],
    ids=["no-gold", "no-id", "no-samples", "no-tokens", "bad-tokens", "bad-sample", "negative-tokens"],
)
def test_missing_or_bad_fields(tmp_path: Path, row: dict, needle: str) -> None:
    write_jsonl(tmp_path / "b__M-1B.jsonl", [problem("p0"), row])
    assert_data_error(tmp_path, needle, "b__M-1B.jsonl")


def test_unknown_model_size_names_models_json(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b__Mystery.jsonl", [problem("p1")])
    assert_data_error(tmp_path, "Mystery", "models.json")


def test_models_json_gives_unknown_sizes(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b__Mystery.jsonl", [problem("p1")])
    (tmp_path / "models.json").write_text(json.dumps({"Mystery": {"params_b": 7, "layers": 28, "hidden": 3584}}))
    env = ReplayEnvironment(tmp_path)
    assert env.data.specs["Mystery"].params_b == 7
    assert env.info.models["Mystery"].attention_width == 28 * 3584


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2, 3]",
        json.dumps({"M-1B": 5}),
        json.dumps({"M-1B": {"params_b": -1}}),
        json.dumps({"M-1B": {"params_b": 1, "colour": "red"}}),
        json.dumps({"M-1B": {"params_b": 1, "active_params_b": 2}}),
    ],
    ids=["not-json", "list", "number", "negative", "unknown-field", "active-above-total"],
)
def test_malformed_models_json(tmp_path: Path, content: str) -> None:
    write_jsonl(tmp_path / "b__M-1B.jsonl", [problem("p1")])
    (tmp_path / "models.json").write_text(content)
    assert_data_error(tmp_path, "models.json", "malformed")


def test_models_without_common_problems(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b__M-1B.jsonl", [problem("p1")])
    write_jsonl(tmp_path / "b__M-2B.jsonl", [problem("p2")])
    assert_data_error(tmp_path, "share no problem")


# -- a generated directory: unseen benchmark and models -------------------------------------------------

GOLDS = {"q1": "B", "q2": "1,000", "q3": "C", "q4": "x+1"}


@pytest.fixture(scope="module")
def mybench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mybench")
    # Acme-3B: always wrong, unusable answers included; different sample counts per problem.
    small = [
        problem("q1", GOLDS["q1"], ["A", "a", "ERR", "", "D"]),
        problem("q2", GOLDS["q2"], ["999", "999.0", "7", "", "8", "9", "10"]),
        problem("q3", GOLDS["q3"], ["B", "A", "D", "E", "F", "none"]),
        problem("q4", GOLDS["q4"], ["x", "x-1", "y", "2x", "?", "x", "x", "1", "0"]),
    ]
    # Acme-70B: always right, in other spellings; also a problem Acme-3B does not have, and another order.
    big = [
        problem("q5", "7", ["7", "7", "7"]),
        problem("q4", GOLDS["q4"], ["x+1", "$x+1$", "\\boxed{x+1}", "X+1"]),
        problem("q3", GOLDS["q3"], ["c", "\\boxed{C}", "C."]),
        problem("q2", GOLDS["q2"], ["1000", "1000.0", "\\boxed{1,000}", "1000", "$1000$"]),
        problem("q1", GOLDS["q1"], ["b", "B", "\\text{B}", " B "]),
    ]
    write_jsonl(directory / "mybench__Acme-3B.jsonl.gz", small)
    write_jsonl(directory / "mybench__Acme-70B.jsonl", big)
    return directory


@pytest.fixture(scope="module")
def acme(mybench: Path) -> ReplayEnvironment:
    return ReplayEnvironment(mybench, orderings=6, seed=2)


def test_generated_directory_loads(acme: ReplayEnvironment) -> None:
    info = acme.info
    assert info.name == "mybench"
    assert info.stage_models == {"answer": ("Acme-3B", "Acme-70B")}
    assert [p.id for p in acme.data.problems] == ["q1", "q2", "q3", "q4"]  # common problems, first model's order
    assert info.n_examples == 4
    assert dict(info.max_samples) == {"Acme-3B": 5, "Acme-70B": 3}
    assert info.caps == (None,)
    assert acme.data.probe_every == 0
    assert acme.data.specs["Acme-70B"].params_b == 70
    assert acme.data.specs["Acme-3B"].params_b == 3
    space = SearchSpace.from_info(info)
    assert space.n_choices == {"Acme-3B": (1, 2, 4), "Acme-70B": (1, 2)}


def test_generated_directory_evaluates(acme: ReplayEnvironment) -> None:
    assert acme.evaluate(single("Acme-70B", 1)).score == 1.0
    assert acme.evaluate(single("Acme-70B", 3)).score == 1.0
    assert acme.evaluate(single("Acme-3B", 5)).score == 0.0
    assert acme.evaluate(mixture(("Acme-3B", 1, None), ("Acme-70B", 3, None))).score == 1.0
    assert acme.evaluate(single("Acme-70B", 3, early_stop=2)).score == 1.0
    assert acme.estimate_cost(single("Acme-70B", 1)).flops > acme.estimate_cost(single("Acme-3B", 1)).flops
    space = SearchSpace.from_info(acme.info)
    plans = list(space.enumerate())
    assert len(plans) == space.size() > 10
    for plan in plans:
        evaluation = acme.evaluate(plan)
        assert 0.0 <= evaluation.score <= 1.0
        assert_matches_reference(acme, plan)


def test_generated_directory_check_errors(acme: ReplayEnvironment) -> None:
    with pytest.raises(InvalidPlan, match="probes"):
        acme.check(single("Acme-70B", 2, 1000))
    with pytest.raises(InvalidPlan, match="Acme-70B"):
        acme.check(single("Acme-70B", 4))
    with pytest.raises(UnknownModel, match="Acme-3B, Acme-70B"):
        acme.check(single("Qwen3-8B", 1))


def test_generated_directory_round_trips_through_spec(acme: ReplayEnvironment) -> None:
    spec = json.loads(json.dumps(acme.spec()))
    assert spec["data"] is not None
    rebuilt = environment_from_spec(spec)
    plan = mixture(("Acme-3B", 2, None), ("Acme-70B", 1, None))
    assert rebuilt.evaluate(plan) == acme.evaluate(plan)


# -- model sizes from names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("Qwen3-8B", 8),
        ("Qwen3-0.6B", 0.6),
        ("gpt-oss-20b", 20),
        ("Llama-3.1-70B-Instruct", 70),
        ("Qwen2.5-0.5B-Instruct", 0.5),
        ("Acme-3B", 3),
    ],
)
def test_model_spec_from_name_dense(name: str, params: float) -> None:
    spec = model_spec_from_name(name)
    assert spec is not None
    assert spec.name == name
    assert spec.params_b == pytest.approx(params)
    assert spec.active_params == pytest.approx(params * 1e9)


def test_model_spec_from_name_moe_with_active_suffix() -> None:
    spec = model_spec_from_name("Qwen3-30B-A3B")
    assert spec is not None
    assert spec.params_b == 30
    assert spec.active_params_b == 3
    assert spec.active_params == pytest.approx(3e9)
    assert model_spec_from_name("Qwen3-235B-A22B").active_params_b == 22  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["8x7B", "Mixtral-8x7B-Instruct"])
def test_model_spec_from_name_moe_experts(name: str) -> None:
    spec = model_spec_from_name(name)
    assert spec is not None
    assert spec.params_b == pytest.approx(56)
    # A mixture of experts routes each token through a few experts: it must not cost like a dense 56B.
    assert spec.active_params < spec.params_b * 1e9


@pytest.mark.parametrize("name", ["gpt-4o", "claude-3-5-sonnet", "mystery-model", "o3", "B"])
def test_model_spec_from_name_unknown(name: str) -> None:
    assert model_spec_from_name(name) is None


def test_orderings_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplayEnvironment(benchmark="aime24", orderings=0)


def test_per_example_is_consistent(env24: ReplayEnvironment) -> None:
    evaluation = env24.evaluate(single("Qwen3-4B", 4))
    assert math.isclose(float(np.mean(evaluation.per_example)), evaluation.score, rel_tol=1e-9)
    assert all(0.0 <= x <= 1.0 for x in evaluation.per_example)
