"""The plan executor and the live environment, on MockBackend: stages, nodes, decisions, budgets, failures."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from executors import environment_from_spec
from executors.aggregators import Sample, agreement, best_of_n, parse_score, vote
from executors.backends import BackendUnavailable, CompletionRequest, ContextTooLong, MockBackend
from executors.budget import BudgetMeter
from executors.live import LiveEnvironment
from executors.plan_runner import PlanRunner, RunResult
from executors.tasks import Example, Task, load_task
from graphs.cost import Budget, ModelSpec
from graphs.errors import InvalidPlan, UnknownModel
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph
from planner.catalog import load_catalog
from planner.space import SearchSpace

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"
CATALOG = {
    "small": ModelSpec(name="small", params_b=1.0, layers=16, hidden=2048, context=8192),
    "big": ModelSpec(name="big", params_b=8.0, layers=32, hidden=4096, context=8192),
}


def make_task(stages: Sequence[dict], *, examples: Sequence[dict] = ({"q": "one"},), **extra) -> Task:
    rows = [Example(id=str(i), inputs={"q": row["q"]}, reference=row.get("ref")) for i, row in enumerate(examples)]
    return Task.model_validate({"name": "t", "stages": stages, "examples": rows, **extra})


CHAIN = [
    {"name": "a", "prompt": "STAGE-A {input[q]}"},
    {"name": "b", "prompt": "STAGE-B {input[q]} after <{stages[a]}>", "parser": {"kind": "regex", "pattern": r"ANS=(\w+)"}},
]


def last(request: CompletionRequest) -> str:
    return request.messages[-1]["content"]


def run(runner: PlanRunner, plan: Plan, example: Example | None = None, **kwargs) -> RunResult:
    return asyncio.run(runner.run(plan, example or runner.task.examples[0], **kwargs))


def single(**stages: tuple[str, int]) -> Plan:
    return Plan.allocation(stages)


def graph(stage: str, nodes: Sequence[Node], edges=(), **kwargs) -> StageGraph:
    return StageGraph(stage=stage, nodes=tuple(nodes), edges=tuple(edges), **kwargs)


# -- stages ----------------------------------------------------------------------------------------------


def test_stages_run_in_order_with_upstream_answers() -> None:
    seen: list[str] = []

    def handler(request: CompletionRequest) -> list[str]:
        seen.append(last(request))
        return ["notes-from-a"] * request.n if "STAGE-A" in last(request) else ["so ANS=yes"] * request.n

    backend = MockBackend(handler)
    result = run(PlanRunner(make_task(CHAIN), backend, CATALOG), single(a=("small", 1), b=("big", 3)))
    assert seen == ["STAGE-A one", "STAGE-B one after <notes-from-a>"]
    assert [r.n for r in backend.requests] == [1, 3]  # a node's samples come from one request
    assert result.answer == "yes" and result.answered_by == "b"
    assert result.stages["b"].answers == ("yes", "yes", "yes")
    assert result.stages["a"].prompt == "STAGE-A one"
    assert set(result.node_costs) == {"a/s0", "b/s0"}
    assert result.cost.output_tokens == sum(c.output_tokens for c in result.node_costs.values())
    assert result.cost.tokens == pytest.approx(sum(s.cost.tokens for s in result.stages.values()))
    assert result.llm_calls == 2 and result.score is None
    assert result.as_dict()["stages"]["b"]["samples"] == 3


class InFlight:
    """A handler that sleeps and records how many calls overlapped."""

    def __init__(self, reply: str = "ANS=x", delay: float = 0.05) -> None:
        self.reply, self.delay, self.now, self.peak = reply, delay, 0, 0

    async def __call__(self, request: CompletionRequest) -> list[str]:
        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(self.delay)
        self.now -= 1
        return [self.reply] * request.n


def test_independent_stages_run_concurrently() -> None:
    task = make_task(
        [
            {"name": "left", "prompt": "L {input[q]}"},
            {"name": "right", "prompt": "R {input[q]}"},
            {"name": "join", "prompt": "J {stages[left]} {stages[right]}"},
        ]
    )
    handler = InFlight()
    result = run(PlanRunner(task, MockBackend(handler), CATALOG), single(left=("small", 1), right=("small", 1), join=("big", 1)))
    assert handler.peak == 2
    assert result.stages["join"].prompt == "J ANS=x ANS=x"


def test_independent_nodes_run_concurrently() -> None:
    nodes = [Node(id="n1", model="small", n=2), Node(id="n2", model="big", n=2), Node(id="n3", model="big")]
    plan = Plan(stages=(graph("a", nodes), graph("b", [Node(id="s", model="small")])))
    handler = InFlight()
    result = run(PlanRunner(make_task(CHAIN), MockBackend(handler), CATALOG), plan)
    assert handler.peak == 3
    assert len(result.stages["a"].samples) == 5


def test_plan_must_match_task_and_catalog() -> None:
    runner = PlanRunner(make_task(CHAIN), MockBackend(lambda r: ["x"] * r.n), CATALOG)
    with pytest.raises(InvalidPlan, match="stages a, b"):
        run(runner, single(a=("small", 1)))
    with pytest.raises(UnknownModel, match=r"'huge'.*big, small"):
        run(runner, single(a=("small", 1), b=("huge", 1)))


# -- node roles and decisions ----------------------------------------------------------------------------


def test_reviewer_and_reviser_get_their_predecessors_outputs() -> None:
    prompts: dict[str, str] = {}

    def handler(request: CompletionRequest) -> list[str]:
        text = last(request)
        if "STAGE-A" in text:
            return ["a"] * request.n
        if "Review the candidate answers" in text:
            prompts["reviewer"] = text
            return ["REVIEW: the second is wrong"] * request.n
        if "Taking the above into account" in text:
            prompts["reviser"] = text
            return ["ANS=revised"] * request.n
        prompts.setdefault("solver", text)
        return [f"draft ANS=d{i}" for i in range(request.n)]

    nodes = [
        Node(id="solve", model="small", n=2),
        Node(id="review", role=Role.REVIEWER, model="big"),
        Node(id="revise", role=Role.REVISER, model="big"),
    ]
    edges = [("solve", "review"), ("solve", "revise"), ("review", "revise")]
    plan = Plan(stages=(graph("a", [Node(id="s", model="small")]), graph("b", nodes, edges)))
    result = run(PlanRunner(make_task(CHAIN), MockBackend(handler), CATALOG), plan)
    assert "draft ANS=d0" in prompts["reviewer"] and "draft ANS=d1" in prompts["reviewer"]
    assert prompts["reviewer"].startswith("STAGE-B one after <a>")
    assert "REVIEW: the second is wrong" in prompts["reviser"] and "draft ANS=d1" in prompts["reviser"]
    assert result.answer == "revised"
    review = [s for s in result.stages["b"].samples if s.role is Role.REVIEWER]
    assert len(review) == 1 and review[0].answer is None and not review[0].failed
    assert result.stages["b"].answers[-1] == "revised"


def test_fusion_by_aggregator() -> None:
    fusion_prompts: list[str] = []

    def handler(request: CompletionRequest) -> list[str]:
        text = last(request)
        if "Combine the candidates" in text:
            fusion_prompts.append(text)
            return ["fused ANS=fused"]
        return [f"ANS={request.model}{i}" for i in range(request.n)]

    nodes = [Node(id="x", model="small", n=2), Node(id="y", model="big"), Node(id="agg", role=Role.AGGREGATOR, model="big")]
    stage_b = graph("b", nodes, [("x", "agg"), ("y", "agg")], decision=DecisionRule.FUSION)
    plan = Plan(stages=(graph("a", [Node(id="s", model="small")]), stage_b))
    result = run(PlanRunner(make_task(CHAIN), MockBackend(handler), CATALOG), plan)
    assert result.answer == "fused"
    assert all(f"ANS={c}" in fusion_prompts[0] for c in ("small0", "small1", "big0"))
    assert result.node_costs["b/agg"].output_tokens > 0


def test_best_of_n_follows_the_verifier_not_the_majority() -> None:
    verified: list[str] = []

    def handler(request: CompletionRequest) -> list[str]:
        text = last(request)
        if "Proposed answer" in text:
            verified.append(text)
            return ["Score: 9" if "ANS=rare" in text else "Score: 3/10"] * request.n
        if "STAGE-A" in text:
            return ["a"] * request.n
        return ["ANS=common", "ANS=rare", "ANS=common", "junk"][: request.n]

    nodes = [Node(id="s", model="small", n=4), Node(id="v", role=Role.VERIFIER, model="big", n=2)]
    plan = Plan(stages=(graph("a", [Node(id="s", model="small")]), graph("b", nodes, decision=DecisionRule.BEST_OF_N)))
    result = run(PlanRunner(make_task(CHAIN), MockBackend(handler), CATALOG), plan)
    assert result.answer == "rare"
    assert len(verified) == 2  # each distinct readable candidate scored once
    scores = sorted(s.score for s in result.stages["b"].samples if s.role is Role.VERIFIER)
    assert scores == [0.3, 0.3, 0.9, 0.9]
    assert len(result.failed) == 1 and result.failed[0].text == "junk"


def test_best_of_n_without_readable_scores_falls_back_to_vote() -> None:
    def handler(request: CompletionRequest) -> list[str]:
        if "Proposed answer" in last(request):
            return ["I cannot tell"] * request.n
        return ["ANS=b", "ANS=a", "ANS=a"][: request.n] if "STAGE-B" in last(request) else ["a"] * request.n

    nodes = [Node(id="s", model="small", n=3), Node(id="v", role=Role.VERIFIER, model="big")]
    plan = Plan(stages=(graph("a", [Node(id="s", model="small")]), graph("b", nodes, decision=DecisionRule.BEST_OF_N)))
    result = run(PlanRunner(make_task(CHAIN), MockBackend(handler), CATALOG), plan)
    assert result.answer == "a"
    assert sum(s.failed for s in result.stages["b"].samples if s.role is Role.VERIFIER) == 2


def test_majority_vote_normalises_answers() -> None:
    replies = ["ANS=Paris", "ANS=paris", "ANS=Lyon"]
    task = make_task(CHAIN, examples=[{"q": "one", "ref": "PARIS"}], scorer={"kind": "exact"})
    backend = MockBackend(lambda r: replies[: r.n] if "STAGE-B" in last(r) else ["a"] * r.n)
    result = run(PlanRunner(task, backend, CATALOG), single(a=("small", 1), b=("small", 3)))
    assert result.answer == "Paris" and result.score == 1.0


def test_early_stop_stops_once_answers_agree() -> None:
    backend = MockBackend(lambda r: ["ANS=same"] * r.n)
    plan = Plan.allocation({"a": ("small", 1), "b": ("big", 8)}, early_stop=None)
    stage_b = graph("b", [Node(id="s0", model="big", n=8)], early_stop=3)
    plan = Plan(stages=(plan.stage("a"), stage_b))
    runner = PlanRunner(make_task(CHAIN), backend, CATALOG)
    result = run(runner, plan)
    assert [r.n for r in backend.requests if "STAGE-B" in last(r)] == [3]
    assert result.stages["b"].stopped_early and result.answer == "same"
    full = run(
        PlanRunner(make_task(CHAIN), MockBackend(lambda r: ["ANS=same"] * r.n), CATALOG), single(a=("small", 1), b=("big", 8))
    )
    assert result.cost.output_tokens < full.cost.output_tokens


def test_early_stop_draws_in_batches_until_agreement_across_nodes() -> None:
    streams = {"small": iter(["ANS=1", "ANS=2", "ANS=3", "ANS=2", "ANS=4", "ANS=4"]), "big": iter(["ANS=5", "ANS=2", "ANS=6"])}

    def handler(request: CompletionRequest) -> list[str]:
        if "STAGE-A" in last(request):
            return ["a"] * request.n
        return [next(streams[request.model]) for _ in range(request.n)]

    backend = MockBackend(handler)
    nodes = [Node(id="p", model="small", n=6), Node(id="q", model="big", n=3)]
    plan = Plan(stages=(graph("a", [Node(id="s", model="small")]), graph("b", nodes, early_stop=3)))
    result = run(PlanRunner(make_task(CHAIN), backend, CATALOG), plan)
    calls = [(r.model, r.n) for r in backend.requests if "STAGE-B" in last(r)]
    # round 1: 3 + 3 draws (answers 1 2 3 / 5 2 6: "2" twice); round 2: 3 more of small -> "2" a third time
    assert calls == [("small", 3), ("big", 3), ("small", 3)]
    assert result.answer == "2" and not result.stages["b"].stopped_early
    assert [s.index for s in result.stages["b"].samples if s.node == "p"] == [0, 1, 2, 3, 4, 5]


def test_early_stop_without_agreement_votes() -> None:
    replies = iter(["ANS=1", "ANS=2", "ANS=2", "ANS=3"])
    backend = MockBackend(lambda r: [next(replies) for _ in range(r.n)] if "STAGE-B" in last(r) else ["a"] * r.n)
    plan = Plan(stages=(graph("a", [Node(id="s", model="small")]), graph("b", [Node(id="s", model="small", n=4)], early_stop=3)))
    result = run(PlanRunner(make_task(CHAIN), backend, CATALOG), plan)
    assert result.answer == "2" and not result.stages["b"].stopped_early


# -- failures are results --------------------------------------------------------------------------------


def test_unreadable_output_is_a_failed_sample() -> None:
    replies = ["ANS=ok", "garbage", "<<<>>>"]
    backend = MockBackend(lambda r: replies[: r.n] if "STAGE-B" in last(r) else ["a"] * r.n)
    result = run(PlanRunner(make_task(CHAIN), backend, CATALOG), single(a=("small", 1), b=("small", 3)))
    assert result.answer == "ok"
    assert [s.text for s in result.failed] == ["garbage", "<<<>>>"]
    assert all("regex parser" in (s.error or "") for s in result.failed)


def test_all_output_unreadable_gives_no_answer_and_skips_downstream() -> None:
    task = make_task([*CHAIN, {"name": "c", "prompt": "STAGE-C {stages[b]}"}])
    backend = MockBackend(lambda r: ["no marker"] * r.n)
    result = run(PlanRunner(task, backend, CATALOG), single(a=("small", 1), b=("small", 2), c=("small", 1)))
    assert result.answer is None and result.answered_by is None
    assert result.stages["c"].skipped == "upstream stage 'b' has no answer"
    assert len(result.failed) == 2
    assert not any("STAGE-C" in last(r) for r in backend.requests)


def test_prompt_too_long_is_a_failed_sample_not_a_crash() -> None:
    def handler(request: CompletionRequest) -> list[str]:
        if request.model == "big":
            raise ContextTooLong("model 'big': the prompt does not fit its context: shorten it")
        return ["ANS=small"] * request.n

    nodes = [Node(id="x", model="small"), Node(id="y", model="big", n=2)]
    plan = Plan(stages=(graph("a", [Node(id="s", model="small")]), graph("b", nodes)))
    result = run(PlanRunner(make_task(CHAIN), MockBackend(handler), CATALOG), plan)
    assert result.answer == "small"
    assert [s.node for s in result.failed] == ["y", "y"]
    assert "shorten" in (result.failed[0].error or "")


def test_server_errors_propagate() -> None:
    def handler(request: CompletionRequest) -> list[str]:
        raise BackendUnavailable("model 'small' at http://127.0.0.1:9/v1 cannot be reached: start the server")

    with pytest.raises(BackendUnavailable, match="start the server"):
        run(PlanRunner(make_task(CHAIN), MockBackend(handler), CATALOG), single(a=("small", 1), b=("small", 1)))


# -- budgets ---------------------------------------------------------------------------------------------


QA_REPLIES = {"STAGE-A": "sub-questions", "STAGE-B": "ANS=draft", "STAGE-C": "ANS=final"}


def qa_handler(request: CompletionRequest) -> list[str]:
    marker = re.search(r"STAGE-\w", last(request))
    return [QA_REPLIES[marker.group(0)]] * request.n if marker else ["?"] * request.n


def qa_task() -> Task:
    stages = [
        CHAIN[0],
        {**CHAIN[1], "fallback": True},
        {"name": "c", "prompt": "STAGE-C {stages[b]}", "parser": {"kind": "regex", "pattern": r"ANS=(\w+)"}, "max_tokens": 1000},
    ]
    return make_task(stages, examples=[{"q": "one", "ref": "final"}], scorer={"kind": "exact"}, max_tokens=64)


def test_budget_stop_returns_the_best_answer_marked() -> None:
    task = qa_task()
    plan = single(a=("small", 1), b=("small", 2), c=("big", 2))
    runner = PlanRunner(task, MockBackend(qa_handler), CATALOG)
    # enough for stages a and b at their worst case, not for c (up to 2 x 1000 output tokens)
    meter = BudgetMeter(Budget(limit=_worst_tokens(runner, plan, upto="b") + 1, unit="tokens"))
    result = run(runner, plan, meter=meter)
    assert result.stopped_at_budget
    assert result.answer == "draft" and result.answered_by == "b"
    assert result.score == 0.0
    assert result.stages["c"].samples == () and result.stages["c"].answer is None
    assert meter.spent <= meter.limit and meter.refused >= 1
    assert result.cost.tokens == pytest.approx(meter.spent)


def test_budget_too_small_for_anything() -> None:
    runner = PlanRunner(qa_task(), MockBackend(qa_handler), CATALOG, meter=BudgetMeter(Budget(limit=5, unit="tokens")))
    result = run(runner, single(a=("small", 1), b=("small", 2), c=("big", 2)))
    assert result.stopped_at_budget and result.answer is None and result.llm_calls == 0
    assert result.cost.tokens == 0


def test_a_budget_at_the_estimate_never_stops() -> None:
    task = qa_task()
    plan = single(a=("small", 1), b=("small", 4), c=("big", 2))
    runner = PlanRunner(task, MockBackend(qa_handler), CATALOG)
    estimate = runner.estimate_cost(plan, task.examples[0])
    meter = BudgetMeter(Budget(limit=estimate.tokens, unit="tokens"))
    result = run(runner, plan, meter=meter)
    assert not result.stopped_at_budget and result.answer == "final" and result.score == 1.0


def _worst_tokens(runner: PlanRunner, plan: Plan, *, upto: str) -> float:
    """Worst-case tokens of the stages up to and including ``upto`` (of a chain)."""
    keep = runner.task.order[: runner.task.order.index(upto) + 1]
    sub = make_task([s.model_dump() for s in runner.task.stages if s.name in keep], max_tokens=runner.task.max_tokens)
    sub_plan = Plan(stages=tuple(plan.stage(s) for s in keep))
    return PlanRunner(sub, runner.backend, runner.catalog).estimate_cost(sub_plan, sub.examples[0]).tokens


# -- aggregator units ------------------------------------------------------------------------------------


def sample(answer: str | None, i: int = 0, error: str | None = None, score: float | None = None) -> Sample:
    return Sample("s", "n", Role.SOLVER, "m", i, answer or "", answer=answer, error=error, score=score)


def test_vote_and_agreement() -> None:
    samples = [sample("2"), sample("1"), sample("1.0"), sample("2"), sample(None), sample("3", error="x")]
    assert vote(samples).answer == "2"  # tie 2:2, "2" seen first
    assert agreement(samples, 2).answer == "1"  # "1" reaches two votes first
    assert agreement(samples, 3) is None
    assert vote([sample(None)]) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Score: 7", 0.7),
        ("score=10", 1.0),
        ("8/10", 0.8),
        ("I give it 4 out of 10... Score: 6.5", 0.65),
        ("3/5", 0.6),
        ("Score: 11", None),
        ("no idea", None),
        ("-1", None),
    ],
)
def test_parse_score(text: str, expected: float | None) -> None:
    assert parse_score(text) == (pytest.approx(expected) if expected is not None else None)


def test_best_of_n_ties_break_by_votes() -> None:
    candidates = [sample("a", 0), sample("b", 1), sample("b", 2)]

    async def score(candidate: Sample) -> list[Sample]:
        return [Sample("s", "v", Role.VERIFIER, "m", 0, "Score: 5", score=0.5)]

    winner, verdicts = asyncio.run(best_of_n(candidates, score))
    assert winner.answer == "b" and len(verdicts) == 2


# -- the live environment --------------------------------------------------------------------------------


def qa_chain_handler(request: CompletionRequest) -> list[str]:
    """A fake model for the bundled qa_chain task: right on every question but the Austen one."""
    text = last(request)
    question = re.search(r"Question: (.*)", text)
    right = {
        "Eiffel": "Paris",
        "Apollo": "Richard Nixon",
        "Pride": "1776",
        "Mercury": "Hg",
        "planet closest": "Hg",
        "ocean": "Atlantic Ocean",
        "Quixote": "Spanish",
        "Tokyo": "Japanese yen",
        "carbon": "Nitrogen",
        "Hamlet": "1616",
        "South America": "Brasília",
        "Egypt": "Nile",
    }
    answer = next((v for k, v in right.items() if question and k in question.group(1)), "unknown")
    if "Final answer" in text:
        return [f"Checked. Final answer: {answer}"] * request.n
    if "Answer: <short answer>" in text:
        return [f"Some reasoning.\nAnswer: {answer}"] * request.n
    if "Proposed answer" in text:
        return ["Score: 8"] * request.n
    if "Review the candidate" in text:
        return ["Looks fine."] * request.n
    if "Combine the candidates" in text:
        return [f"Final answer: {answer}"] * request.n
    return ["1. What is X?\n2. What is Y?"] * request.n


@pytest.fixture
def qa_env() -> LiveEnvironment:
    catalog = load_catalog(EXAMPLES / "qa_chain" / "catalog.yaml")
    catalog["big"] = CATALOG["big"]
    return LiveEnvironment(EXAMPLES / "qa_chain" / "task.yaml", catalog, MockBackend(qa_chain_handler), concurrency=3)


def test_live_environment_info_and_space(qa_env: LiveEnvironment) -> None:
    info = qa_env.info
    assert info.stages == ("decompose", "answer", "verify")
    assert set(info.models) == {"gemma", "big"}
    assert info.max_samples["gemma"] == 16 and info.n_examples == 11
    assert set(info.decisions) == set(DecisionRule) and set(info.roles) == set(Role)
    space = SearchSpace.from_info(info)
    plan = space.sample(__import__("random").Random(0))
    qa_env.check(plan)


def test_live_environment_evaluates_on_the_dev_set(qa_env: LiveEnvironment) -> None:
    plan = single(decompose=("gemma", 1), answer=("gemma", 3), verify=("big", 1))
    evaluation = qa_env.evaluate(plan)
    assert evaluation.n_examples == 11
    # right on 10 of 11 questions (token F1 of a wrong year is 0)
    assert evaluation.score == pytest.approx(10 / 11)
    assert evaluation.per_example[2] == 0.0 and evaluation.per_example[0] == 1.0
    assert evaluation.llm_calls == 33
    assert evaluation.cost.output_tokens > 0
    assert len(qa_env.history) == 1 and len(qa_env.history[0].results) == 11
    with_reuse, without = qa_env.search_cost([plan])
    assert with_reuse == without == evaluation.cost


def test_live_environment_bounds_concurrency(qa_env: LiveEnvironment) -> None:
    handler = InFlight(reply="Answer: x\nFinal answer: x", delay=0.02)
    env = LiveEnvironment(qa_env.task, qa_env.catalog, MockBackend(handler), concurrency=2)
    env.evaluate(single(decompose=("gemma", 1), answer=("gemma", 1), verify=("gemma", 1)))
    assert handler.peak == 2


PLANS = [
    single(decompose=("gemma", 1), answer=("gemma", 4), verify=("big", 2)),
    Plan.allocation({"decompose": ("gemma", 2), "answer": ("big", 8), "verify": ("gemma", 3)}, early_stop=3),
    Plan(
        stages=(
            graph("decompose", [Node(id="s", model="gemma", max_tokens=40)]),
            graph(
                "answer",
                [
                    Node(id="x", model="gemma", n=3),
                    Node(id="r", role=Role.REVIEWER, model="big"),
                    Node(id="f", role=Role.AGGREGATOR, model="big", n=2),
                ],
                [("x", "r"), ("x", "f"), ("r", "f")],
                decision=DecisionRule.FUSION,
            ),
            graph(
                "verify",
                [Node(id="s", model="gemma", n=3), Node(id="v", role=Role.VERIFIER, model="big")],
                decision=DecisionRule.BEST_OF_N,
            ),
        )
    ),
]


@pytest.mark.parametrize("plan", PLANS, ids=["allocation", "early-stop", "graph"])
def test_estimate_cost_bounds_realised_cost(qa_env: LiveEnvironment, plan: Plan) -> None:
    estimate = qa_env.estimate_cost(plan)
    evaluation = qa_env.evaluate(plan)
    for result in qa_env.history[-1].results:
        assert result.cost.prompt_tokens <= estimate.prompt_tokens
        assert result.cost.output_tokens <= estimate.output_tokens
    assert evaluation.cost.tokens < estimate.tokens
    assert estimate.flops > 0
    assert estimate == qa_env.estimate_cost(plan)


def test_estimate_grows_with_samples_and_model(qa_env: LiveEnvironment) -> None:
    small = qa_env.estimate_cost(single(decompose=("gemma", 1), answer=("gemma", 1), verify=("gemma", 1)))
    more = qa_env.estimate_cost(single(decompose=("gemma", 1), answer=("gemma", 4), verify=("gemma", 1)))
    bigger = qa_env.estimate_cost(single(decompose=("gemma", 1), answer=("big", 1), verify=("gemma", 1)))
    assert small.flops < more.flops and small.flops < bigger.flops
    assert small.output_tokens < more.output_tokens


def test_live_environment_spec_round_trip(qa_env: LiveEnvironment) -> None:
    spec = qa_env.spec()
    assert spec["kind"] == "live" and spec["task"].endswith("task.yaml")
    assert spec["catalog"]["big"]["params_b"] == 8.0
    rebuilt = environment_from_spec(spec)
    try:
        assert isinstance(rebuilt, LiveEnvironment)
        assert rebuilt.info.stages == qa_env.info.stages and set(rebuilt.info.models) == set(qa_env.info.models)
        assert type(rebuilt.backend).__name__ in ("LiteLLMBackend", "CachedBackend")
        plan = PLANS[0]
        assert rebuilt.estimate_cost(plan) == qa_env.estimate_cost(plan)
    finally:
        rebuilt.close()
    from_file = LiveEnvironment(
        EXAMPLES / "code" / "task.yaml", EXAMPLES / "code" / "catalog.yaml", MockBackend(qa_chain_handler)
    )
    assert from_file.spec()["catalog"] == str((EXAMPLES / "code" / "catalog.yaml").resolve())


def test_code_task_runs_unit_tests_on_the_final_stage() -> None:
    task = load_task(EXAMPLES / "code" / "task.yaml")
    good = (
        "```python\ndef fizzbuzz(n):\n"
        "    return ['FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0 else str(i)\n"
        "            for i in range(1, n + 1)]\n```"
    )

    def handler(request: CompletionRequest) -> list[str]:
        text = last(request)
        if "Candidate solution" in text:
            return [good] * request.n
        if "single ```python code block" in text:
            return ["```python\ndef fizzbuzz(n):\n    return []\n```"] * request.n
        return ["1. loop\n2. return"] * request.n

    env = LiveEnvironment(task, EXAMPLES / "code" / "catalog.yaml", MockBackend(handler), limit=2)
    plan = single(plan=("gemma", 1), code=("gemma", 2), test=("gemma", 1))
    env.evaluate(plan)
    fizz = next(r for r in env.history[-1].results if r.example_id == "fizzbuzz")
    assert fizz.score == 1.0 and fizz.stages["code"].score == 0.0
    assert "def fizzbuzz(n):\n    return []" in fizz.stages["test"].prompt


def test_llm_judge_goes_through_the_backend() -> None:
    task = make_task(
        CHAIN,
        examples=[{"q": "one", "ref": "yes"}],
        scorer={"kind": "llm_judge", "model": "big", "prompt": "JUDGE {answer} vs {reference}"},
    )

    def handler(request: CompletionRequest) -> list[str]:
        if last(request).startswith("JUDGE"):
            assert request.temperature == 0.0
            return ["1" if last(request) == "JUDGE yes vs yes" else "0"]
        return ["ANS=yes"] * request.n if "STAGE-B" in last(request) else ["a"] * request.n

    backend = MockBackend(handler)
    result = run(PlanRunner(task, backend, CATALOG), single(a=("small", 1), b=("small", 1)))
    assert result.score == 1.0
    assert result.llm_calls == 2  # the judge is not part of the plan's calls or cost


def test_a_study_searches_a_live_task(qa_env: LiveEnvironment) -> None:
    from planner.storage._memory import InMemoryStorage
    from planner.study import create_study

    env = LiveEnvironment(qa_env.task, qa_env.catalog, MockBackend(qa_chain_handler), max_samples=4, limit=3)
    study = create_study(
        storage=InMemoryStorage(), environment=env, budget=Budget(limit=3000, unit="tokens"), strategy="random", seed=0
    )
    study.optimize(4)
    assert study.best_trial.score == pytest.approx(2 / 3)  # the Austen question is answered wrong
    assert len(env.history) == 4
    assert all(env.estimate_cost(run.plan).tokens <= 3000 for run in env.history)


def test_early_stop_batches_and_sample_reuse_through_a_sample_store() -> None:
    from executors.sample_store import CachedBackend

    def handler(request: CompletionRequest) -> list[str]:
        if "STAGE-A" in last(request):
            return ["a"] * request.n
        # sample i of the stage answers i // 3: "0" "0" "0" "1" "1" "1" "2" ...
        return [f"ANS={(request.offset + i) // 3}" for i in range(request.n)]

    mock = MockBackend(handler)
    cached = CachedBackend(mock, None, catalog=CATALOG)
    runner = PlanRunner(make_task(CHAIN), cached, CATALOG)
    early = Plan(
        stages=(graph("a", [Node(id="s", model="small")]), graph("b", [Node(id="s0", model="small", n=8)], early_stop=3))
    )
    first = run(runner, early)
    stage_b = [r for r in mock.requests if "STAGE-B" in last(r)]
    assert [(r.offset, r.n) for r in stage_b] == [(0, 3)]  # 0 0 0: three agree at once
    assert first.answer == "0" and first.stages["b"].stopped_early

    mock.requests.clear()
    again = run(runner, early)
    assert mock.requests == [] and again.reused_samples == 4 and again.paid.tokens == 0
    assert again.cost.tokens == first.cost.tokens and again.answer == first.answer  # (mock calls have no FLOPs)

    full = run(runner, single(a=("small", 1), b=("small", 8)))
    generated = [(r.offset, r.n) for r in mock.requests if "STAGE-B" in last(r)]
    assert generated == [(3, 5)]  # the first 3 of 8 come from the store
    assert [s.answer for s in full.stages["b"].samples] == ["0", "0", "0", "1", "1", "1", "2", "2"]

    mock.requests.clear()
    four = Plan(stages=(early.stage("a"), graph("b", [Node(id="s0", model="small", n=8)], early_stop=4)))
    result = run(runner, four)  # batches of 4 at offsets 0 and 4, all stored by the plan above; no 4 agree
    assert mock.requests == [] and result.answer == "0" and not result.stages["b"].stopped_early
    assert [s.index for s in result.stages["b"].samples] == list(range(8))


def test_search_cost_is_what_the_sample_store_generated(qa_env: LiveEnvironment) -> None:
    from executors.sample_store import CachedBackend

    cached = CachedBackend(MockBackend(qa_chain_handler), None, catalog=qa_env.catalog)
    env = LiveEnvironment(qa_env.task, qa_env.catalog, cached, limit=2)
    small = single(decompose=("gemma", 1), answer=("gemma", 2), verify=("gemma", 1))
    bigger = single(decompose=("gemma", 1), answer=("gemma", 4), verify=("gemma", 1))
    for plan in (small, bigger, small):
        env.evaluate(plan)
    with_reuse, without = env.search_cost([small, bigger, small])
    assert with_reuse.tokens == pytest.approx(cached.stats.generated.tokens / 2)  # per example, of 2
    assert without.tokens == pytest.approx(sum(_mean_tokens(run) for run in env.history))
    assert with_reuse.tokens < without.tokens
    assert env.history[-1].results[0].paid.tokens == 0  # the repeated plan generated nothing


def _mean_tokens(run) -> float:
    return sum(result.cost.tokens for result in run.results) / len(run.results)


def test_live_environment_from_spec_builds_a_cached_litellm_backend(tmp_path: Path) -> None:
    from executors.litellm_backend import LiteLLMBackend
    from executors.sample_store import CachedBackend

    spec = {
        "kind": "live",
        "task": str(EXAMPLES / "qa_chain" / "task.yaml"),
        "catalog": str(EXAMPLES / "qa_chain" / "catalog.yaml"),
        "max_samples": 8,
        "store": str(tmp_path / "samples.db"),
        "limit": 2,
    }
    env = environment_from_spec(spec)
    try:
        assert isinstance(env, LiveEnvironment) and isinstance(env.backend, CachedBackend)
        assert isinstance(env.backend.inner, LiteLLMBackend)
        assert env.backend.inner.catalog["gemma"].api_base == "http://127.0.0.1:8077/v1"
        assert env.info.max_samples == {"gemma": 8} and env.info.n_examples == 2
        assert env.spec() == {**spec, "concurrency": 4, "caps": [None]}
    finally:
        env.close()
