"""The recorder: live runs exported in the replay format; a single-stage export replays to the same scores."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from executors.backends import CompletionRequest, MockBackend
from executors.live import LiveEnvironment
from executors.recorder import MANIFEST_FORMAT, Recorder, record_environment
from executors.replay import ReplayEnvironment
from executors.replay_data import list_benchmarks
from executors.tasks import Example, Task
from graphs.cost import ModelSpec
from graphs.errors import DataError
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph

CATALOG = {
    "tiny": ModelSpec(name="tiny", params_b=0.5, layers=12, hidden=1024, context=4096),
    "large": ModelSpec(
        name="large", params_b=7.0, layers=28, hidden=3584, context=4096, input_usd_per_mtok=0.1, output_usd_per_mtok=0.4
    ),
}
GOLDS = {"p0": "3", "p1": "10", "p2": "7", "p3": "42", "p4": "5", "p5": "8"}
# per model and problem: four sampled replies (no vote ties, single or pooled); "???" cannot be parsed
REPLIES = {
    "tiny": {
        "p0": ["3", "3", "4", "???"],
        "p1": ["11", "11", "10", "12"],
        "p2": ["7", "???", "???", "???"],
        "p3": ["42", "42", "42", "41"],
        "p4": ["6", "6", "6", "5"],
        "p5": ["8", "9", "8", "1"],
    },
    "large": {
        "p0": ["3", "3", "3", "3"],
        "p1": ["10", "11", "11", "11"],
        "p2": ["2", "7", "7", "7"],
        "p3": ["42", "41", "42", "40"],
        "p4": ["5", "5", "???", "5"],
        "p5": ["8", "8", "8", "1"],
    },
}


def single_stage_task() -> Task:
    examples = [Example(id=pid, inputs={"problem": f"Problem {pid}: compute it."}, reference=gold) for pid, gold in GOLDS.items()]
    stage = {
        "name": "answer",
        "prompt": "{input[problem]} Finish with 'ANSWER: <n>'.",
        "parser": {"kind": "regex", "pattern": r"ANSWER: (\d+)"},
    }
    return Task.model_validate(
        {"name": "arith", "stages": [stage], "scorer": {"kind": "exact"}, "examples": examples, "max_tokens": 64}
    )


def handler(request: CompletionRequest) -> list[str]:
    problem = request.messages[-1]["content"].split(":")[0].removeprefix("Problem ")
    replies = REPLIES[request.model][problem][: request.n]
    return [f"Working... ANSWER: {r}" if r != "???" else "I am not sure." for r in replies]


def solver(model: str, n: int, node_id: str = "n0") -> Node:
    return Node(id=node_id, model=model, n=n)


PLANS = [
    Plan(stages=(StageGraph(stage="answer", nodes=(solver("tiny", 4),)),)),
    Plan(stages=(StageGraph(stage="answer", nodes=(solver("large", 4),)),)),
    Plan(stages=(StageGraph(stage="answer", nodes=(solver("tiny", 4), solver("large", 4, "n1"))),)),
]


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[LiveEnvironment, Path, list[Path]]:
    env = LiveEnvironment(single_stage_task(), CATALOG, MockBackend(handler))
    for plan in PLANS:
        env.evaluate(plan)
    env.evaluate(PLANS[0])  # the same samples again (as a sample store serves them): exported once
    written = record_environment(env, tmp_path / "replay")
    return env, tmp_path / "replay", written


def test_single_stage_export_is_plain_replay_format(recorded) -> None:
    _, directory, written = recorded
    assert sorted(p.name for p in written) == ["arith__large.jsonl.gz", "arith__tiny.jsonl.gz", "models.json"]
    assert list(list_benchmarks(directory)) == ["arith"]
    with gzip.open(directory / "arith__tiny.jsonl.gz", "rt") as handle:
        lines = [json.loads(line) for line in handle]
    assert [line["id"] for line in lines] == list(GOLDS)
    first = lines[0]
    assert first["gold"] == "3" and first["benchmark"] == "arith" and first["model"] == "tiny" and first["probe_every"] == 0
    assert first["question"] == "Problem p0: compute it. Finish with 'ANSWER: <n>'."
    assert [s["answer"] for s in first["samples"]] == ["3", "3", "4", ""]
    assert first["samples"][3]["error"].startswith("output unreadable")
    assert all(s["tokens"] > 0 and s["probes"] == [] and s["text"] for s in first["samples"])
    sizes = json.loads((directory / "models.json").read_text())
    assert sizes["large"] == {
        "params_b": 7.0,
        "layers": 28,
        "hidden": 3584,
        "context": 4096,
        "input_usd_per_mtok": 0.1,
        "output_usd_per_mtok": 0.4,
    }


@pytest.mark.parametrize("plan", PLANS, ids=["tiny", "large", "mixture"])
def test_replayed_scores_match_live_scores(recorded, plan: Plan) -> None:
    env, directory, _ = recorded
    live = env.evaluate(plan)
    replay = ReplayEnvironment(directory, orderings=5, seed=3)
    replayed = replay.evaluate(plan)
    assert replayed.score == pytest.approx(live.score)
    assert replayed.per_example == pytest.approx(live.per_example)
    assert replayed.spread == pytest.approx(0.0)  # every recorded sample is drawn: orderings do not matter
    assert replayed.cost.output_tokens == pytest.approx(live.cost.output_tokens)
    assert replay.info.max_samples == {"tiny": 4, "large": 4}


def test_expected_live_scores() -> None:
    env = LiveEnvironment(single_stage_task(), CATALOG, MockBackend(handler))
    assert [env.evaluate(plan).score for plan in PLANS] == pytest.approx([4 / 6, 5 / 6, 5 / 6])


def qa_replies(request: CompletionRequest) -> list[str]:
    text = request.messages[-1]["content"]
    if "Final answer" in text:
        return [f"Final answer: {'Paris' if 'Eiffel' in text else 'no idea'}"] * request.n
    if "Answer: <short answer>" in text:
        return [f"Answer: {'Paris' if i % 2 == 0 else 'Lyon'}" for i in range(request.n)]
    if "Proposed answer" in text:
        return ["Score: 7"] * request.n
    return [f"sub-question {request.model}"] * request.n


def test_multistage_export(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "examples" / "tasks" / "qa_chain"
    catalog = {"gemma": ModelSpec(name="gemma", params_b=0.268, layers=18, hidden=640), "large": CATALOG["large"]}
    env = LiveEnvironment(root / "task.yaml", catalog, MockBackend(qa_replies), limit=3)
    allocation = Plan.allocation({"decompose": ("gemma", 1), "answer": ("gemma", 3), "verify": ("large", 1)})
    verified = Plan(
        stages=(
            allocation.stage("decompose"),
            StageGraph(
                stage="answer",
                nodes=(solver("large", 2), Node(id="v", role=Role.VERIFIER, model="gemma")),
                decision=DecisionRule.BEST_OF_N,
            ),
            allocation.stage("verify"),
        )
    )
    env.evaluate(allocation)
    env.evaluate(allocation)
    env.evaluate(verified)
    directory = tmp_path / "multi"
    written = {p.name for p in record_environment(env, directory)}
    assert {
        "qa_chain.decompose__gemma.jsonl.gz",
        "qa_chain.answer__gemma.jsonl.gz",
        "qa_chain.answer__large.jsonl.gz",
        "qa_chain.verify__large.jsonl.gz",
        "models.json",
        "qa_chain.task.json",
    } == written
    assert set(list_benchmarks(directory)) == {"qa_chain.decompose", "qa_chain.answer", "qa_chain.verify"}
    with gzip.open(directory / "qa_chain.answer__gemma.jsonl.gz", "rt") as handle:
        lines = [json.loads(line) for line in handle]
    assert len(lines) == 3  # one context per example (the decompose stage answered the same each time)
    first = lines[0]
    assert first["example"] == "eiffel-capital" and first["stage"] == "answer"
    assert first["upstream"] == {"decompose": "sub-question gemma"}
    assert first["id"].startswith("eiffel-capital@") and len(first["id"]) == len("eiffel-capital@") + 8
    assert first["gold"] == "Paris"
    assert [s["answer"] for s in first["samples"]] == ["Paris", "Lyon", "Paris"]  # twice evaluated, stored once
    with gzip.open(directory / "qa_chain.decompose__gemma.jsonl.gz", "rt") as handle:
        decompose = [json.loads(line) for line in handle]
    assert decompose[0]["id"] == "eiffel-capital" and decompose[0]["gold"] == "" and decompose[0]["upstream"] == {}
    manifest = json.loads((directory / "qa_chain.task.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["answer_stage"] == "verify"
    assert [s["name"] for s in manifest["stages"]] == ["decompose", "answer", "verify"]
    assert manifest["stages"][1] == {"name": "answer", "depends_on": ["decompose"], "benchmark": "qa_chain.answer"}
    assert len(manifest["runs"]) == 9
    run = next(r for r in manifest["runs"] if r["plan_id"] == verified.plan_id and r["example"] == "eiffel-capital")
    assert run["stages"]["answer"]["samples"] == 4  # 2 solver samples, 2 verifier scores (one per distinct answer)
    assert run["stages"]["verify"]["context"] == f"eiffel-capital@{run['stages']['verify']['context'].split('@')[1]}"
    first_run = manifest["runs"][0]
    assert first_run["stages"]["answer"]["context"] == lines[0]["id"] and first_run["answer"] == "Paris"
    # each stage replays on its own
    answer_stage = ReplayEnvironment(directory, "qa_chain.answer")
    assert answer_stage.info.models.keys() == {"gemma", "large"}
    verify_only = Plan.allocation({"answer": ("gemma", 3)})
    assert 0.0 <= answer_stage.evaluate(verify_only).score <= 1.0


def test_model_names_must_be_file_safe(tmp_path: Path) -> None:
    catalog = {"org/tiny": CATALOG["tiny"].model_copy(update={"name": "org/tiny"})}
    task = single_stage_task()
    env = LiveEnvironment(task, catalog, MockBackend(lambda r: ["ANSWER: 3"] * r.n), limit=1)
    env.evaluate(Plan(stages=(StageGraph(stage="answer", nodes=(solver("org/tiny", 1),)),)))
    recorder = Recorder(task, catalog)
    recorder.add_environment(env)
    with pytest.raises(DataError, match="rename it in the catalog"):
        recorder.export(tmp_path)
