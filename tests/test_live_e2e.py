"""The bundled qa_chain task's multi-stage plan through a real llama.cpp server (Gemma 3 270M on the CPU).

Plumbing, not quality (a 270M base model): every stage runs through ``LiteLLMBackend`` behind a sample
store, tokens and FLOPs are counted, samples are stored and served again, the worst-case estimate bounds
what was spent, a budget stops a job before it passes its limit, and the recorder exports the runs.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from executors.budget import BudgetMeter
from executors.litellm_backend import LiteLLMBackend
from executors.live import LiveEnvironment
from executors.plan_runner import RunResult
from executors.recorder import record_environment
from executors.sample_store import CachedBackend, SampleStore
from executors.tasks import load_task
from graphs.cost import Budget
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph
from planner.catalog import load_catalog

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QA_CHAIN = Path(__file__).resolve().parents[1] / "examples" / "tasks" / "qa_chain"

# decompose: one sample; answer: two solvers, a reviewer and an aggregator fusing them; verify: early stop
PLAN = Plan(
    stages=(
        StageGraph(stage="decompose", nodes=(Node(id="s", model="gemma", max_tokens=16),)),
        StageGraph(
            stage="answer",
            nodes=(
                Node(id="x", model="gemma", n=2, max_tokens=16),
                Node(id="r", role=Role.REVIEWER, model="gemma", max_tokens=16),
                Node(id="f", role=Role.AGGREGATOR, model="gemma", max_tokens=16),
            ),
            edges=(("x", "r"), ("x", "f"), ("r", "f")),
            decision=DecisionRule.FUSION,
        ),
        StageGraph(stage="verify", nodes=(Node(id="v", model="gemma", n=3, max_tokens=16),), early_stop=2),
    )
)


def environment(llama: Any, store: Path, **kwargs: Any) -> LiveEnvironment:
    """The example task and catalog, the catalog pointed at the test's server."""
    served = llama.model_spec()
    catalog = {
        name: spec.model_copy(update={"api_base": served.api_base, "context": served.context})
        for name, spec in load_catalog(QA_CHAIN / "catalog.yaml").items()
    }
    inner = LiteLLMBackend(catalog, timeout_s=180, max_attempts=3, backoff_s=0.05, seed=0)
    backend = CachedBackend(inner, SampleStore(store))
    return LiveEnvironment(load_task(QA_CHAIN / "task.yaml"), catalog, backend, **kwargs)


def check_stages_ran(result: RunResult) -> bool:
    """Every stage either ran (real samples with real token counts) or was skipped because an upstream
    stage had no readable answer; returns whether all three ran."""
    for name, stage in result.stages.items():
        if stage.skipped is not None:
            upstream = stage.skipped.split("'")[1]
            assert result.stages[upstream].answer is None, stage.skipped
            continue
        assert stage.samples, name
        for sample in stage.samples:
            assert sample.prompt_tokens > 0
            assert sample.output_tokens > 0 or sample.text == ""
        node_tokens = {key: cost.output_tokens for key, cost in result.node_costs.items() if key.startswith(f"{name}/")}
        assert sum(node_tokens.values()) == sum(s.output_tokens for s in stage.samples)
    return all(stage.skipped is None for stage in result.stages.values())


def test_qa_chain_multi_stage_plan_on_a_real_server(llama: Any, tmp_path: Path) -> None:
    env = environment(llama, tmp_path / "samples.db", limit=2, concurrency=2)
    backend: CachedBackend = env.backend  # type: ignore[assignment]
    estimate = env.estimate_cost(PLAN)

    evaluation = env.evaluate(PLAN)
    results = env.history[-1].results
    assert evaluation.n_examples == 2 and 0.0 <= evaluation.score <= 1.0
    assert evaluation.llm_calls >= 2 * 3
    ran_all = [check_stages_ran(result) for result in results]  # every result is checked
    assert any(ran_all)
    for result in results:
        assert result.cost.prompt_tokens > 0 and result.cost.output_tokens > 0 and result.cost.flops > 0
        assert result.cost.tokens <= estimate.tokens and result.cost.flops <= estimate.flops
        assert result.reused_samples == 0 and result.paid == result.cost
        decompose = result.stages["decompose"]
        assert decompose.prompt.startswith("Break the question below")
        if result.stages["answer"].skipped is None:
            answer_prompt = result.stages["answer"].prompt
            assert decompose.answer in answer_prompt  # the upstream answer was pasted in
            fused = [s for s in result.stages["answer"].samples if s.node == "f"]
            assert len(fused) == 1 or not [s for s in result.stages["answer"].samples if s.node == "x" and not s.failed]
    generated = backend.stats.generated_samples
    assert generated == sum(len(stage.samples) for r in results for stage in r.stages.values())

    # the same plan again: every sample comes from the store, nothing is generated, the results agree
    again = env.evaluate(PLAN)
    assert backend.stats.generated_samples == generated
    assert again.score == evaluation.score and again.cost.tokens == pytest.approx(evaluation.cost.tokens)
    for first, second in zip(results, env.history[-1].results, strict=True):
        assert second.answer == first.answer and second.paid.tokens == 0
        assert second.reused_samples == sum(len(stage.samples) for stage in first.stages.values())
    with_reuse, without = env.search_cost([PLAN, PLAN])
    assert with_reuse.tokens == pytest.approx(evaluation.cost.tokens) and without.tokens == pytest.approx(2 * with_reuse.tokens)

    # what was generated exports in the replay format, one benchmark per stage
    written = {p.name for p in record_environment(env, tmp_path / "recorded")}
    assert {"qa_chain.decompose__gemma.jsonl.gz", "models.json", "qa_chain.task.json"} <= written
    with gzip.open(tmp_path / "recorded" / "qa_chain.decompose__gemma.jsonl.gz", "rt") as handle:
        lines = [json.loads(line) for line in handle]
    assert [line["example"] for line in lines] == [e.id for e in env.examples]
    assert all(len(line["samples"]) == 1 and line["samples"][0]["tokens"] > 0 for line in lines)
    env.close()


def test_a_job_stops_at_its_budget_on_a_real_server(llama: Any, tmp_path: Path) -> None:
    env = environment(llama, tmp_path / "samples.db", limit=1)
    example = env.examples[0]
    stages = {"decompose": ("gemma", 1, 16), "answer": ("gemma", 2, 16)}
    # the budget covers the first two stages at their worst case, not 8 verify samples of up to 100 tokens
    # (the slack between the estimate and what the first two stages really spent is far below 800 tokens)
    enough_for_two = env.runner.estimate_cost(Plan.allocation({**stages, "verify": ("gemma", 1, 1)}), example)
    meter = BudgetMeter(Budget(limit=enough_for_two.tokens, unit="tokens"))
    plan = Plan.allocation({**stages, "verify": ("gemma", 8, 100)})
    result = asyncio.run(env.runner.run(plan, example, meter=meter))
    assert result.stopped_at_budget and meter.refused >= 1
    assert meter.spent <= meter.limit
    assert result.cost.tokens == pytest.approx(meter.spent)
    assert result.stages["decompose"].samples and result.stages["verify"].samples == ()
    if result.stages["answer"].answer is not None:  # the best answer the job has: the fallback stage's
        assert result.answer == result.stages["answer"].answer and result.answered_by == "answer"
    env.close()
