"""Task files: loading, bad files, templates, parsers and scorers (unit tests in a subprocess, LLM judge)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import yaml

from executors.tasks import (
    Example,
    OutputParser,
    PromptTemplate,
    Scorer,
    load_task,
    run_unit_tests,
    token_f1,
)
from graphs.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"


def write_task(tmp_path: Path, task: dict, rows: list[dict] | None = None, *, dataset_name: str = "dev.jsonl") -> Path:
    if rows is not None:
        (tmp_path / dataset_name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    file = tmp_path / "task.yaml"
    file.write_text(yaml.safe_dump(task, sort_keys=False))
    return file


def chain(**extra) -> dict:
    task = {
        "name": "t",
        "dataset": {"path": "dev.jsonl", "reference": "answer"},
        "stages": [
            {"name": "first", "prompt": "Q: {input[question]}"},
            {"name": "second", "prompt": "Q: {input.question}\nNotes: {stages[first]}", "parser": {"kind": "last_number"}},
        ],
        "scorer": {"kind": "exact"},
    }
    task.update(extra)
    return task


ROWS = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": ["4", "four"]}]


def assert_data_error(file: Path, *needles: str, named: Path | None = None) -> str:
    """Loading ``file`` fails with a DataError that names the file at fault (default: the task file)."""
    with pytest.raises(DataError) as info:
        load_task(file)
    message = str(info.value)
    assert str(named or file) in message
    for needle in needles:
        assert needle in message, message
    return message


# -- loading ---------------------------------------------------------------------------------------------


def test_load_chain(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, chain(), ROWS))
    assert task.order == ("first", "second")
    assert task.final_stage == "second"
    assert task.stage("second").depends_on == ("first",)
    assert [e.id for e in task.examples] == ["1", "2"]
    assert task.examples[1].references == ("4", "four")
    assert task.examples[0].inputs == {"question": "1+1?"}
    assert task.render("second", task.examples[0], {"first": "think"}) == "Q: 1+1?\nNotes: think"
    assert task.source == str((tmp_path / "task.yaml").resolve())


def test_task_is_frozen(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, chain(), ROWS))
    with pytest.raises(ValueError):
        task.name = "other"  # type: ignore[misc]


def test_csv_dataset_and_limit(tmp_path: Path) -> None:
    (tmp_path / "dev.csv").write_text("id,question,answer\na,1+1?,2\nb,2+2?,4\nc,3+3?,6\n")
    task = load_task(write_task(tmp_path, chain(dataset={"path": "dev.csv", "id": "id", "limit": 2})))
    assert [e.id for e in task.examples] == ["a", "b"]
    assert task.examples[1].reference == "4"


def test_independent_stages_and_answer_stage(tmp_path: Path) -> None:
    task = chain(
        stages=[
            {"name": "a", "prompt": "{input[question]}"},
            {"name": "b", "prompt": "{input[question]}"},
            {"name": "join", "prompt": "{stages[a]} {stages[b]}"},
        ]
    )
    loaded = load_task(write_task(tmp_path, task, ROWS))
    assert loaded.order == ("a", "b", "join")
    assert set(loaded.graph.predecessors("join")) == {"a", "b"}


@pytest.mark.parametrize("name", ["qa_chain", "code"])
def test_example_tasks_load(name: str) -> None:
    task = load_task(EXAMPLES / name / "task.yaml")
    assert task.name == name
    assert len(task.order) == 3
    assert len(task.examples) >= 6
    assert all(example.reference for example in task.examples)


def test_example_code_task_references_pass_with_correct_solutions() -> None:
    task = load_task(EXAMPLES / "code" / "task.yaml")
    solutions = {
        "is-palindrome": "def is_palindrome(t):\n    c = [x.lower() for x in t if x.isalnum()]\n    return c == c[::-1]\n",
        "second-largest": "def second_largest(v):\n    d = sorted(set(v))\n    return d[-2] if len(d) > 1 else None\n",
    }

    async def check() -> list[float | None]:
        return [await task.scorer.score(solutions[e.id], e) for e in task.examples if e.id in solutions]

    assert asyncio.run(check()) == [1.0, 1.0]


# -- bad files -------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be read"):
        load_task(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    file = tmp_path / "task.yaml"
    file.write_text("stages: [unclosed\n")
    assert_data_error(file, "not valid YAML")


def test_unknown_stage_in_template(tmp_path: Path) -> None:
    task = chain()
    task["stages"][1]["prompt"] = "{stages[frist]}"
    assert_data_error(write_task(tmp_path, task, ROWS), "frist", "not a stage", "first, second")


def test_unknown_input_field(tmp_path: Path) -> None:
    task = chain()
    task["stages"][0]["prompt"] = "{input[questoin]}"
    assert_data_error(write_task(tmp_path, task, ROWS), "input[questoin]", "first", "question")


def test_unknown_template_variable(tmp_path: Path) -> None:
    task = chain()
    task["stages"][0]["prompt"] = "{question}"
    assert_data_error(write_task(tmp_path, task, ROWS), "stages[0] (first).prompt", "{input[<field>]}")


def test_stage_cycle(tmp_path: Path) -> None:
    task = chain()
    task["stages"][0]["prompt"] = "{stages[second]}"
    assert_data_error(write_task(tmp_path, task, ROWS), "cycle")


def test_stage_reads_itself(tmp_path: Path) -> None:
    task = chain()
    task["stages"][0]["prompt"] = "{stages[first]}"
    assert_data_error(write_task(tmp_path, task, ROWS), "its own answer")


def test_two_sinks_need_answer_stage(tmp_path: Path) -> None:
    task = chain(stages=[{"name": "a", "prompt": "x"}, {"name": "b", "prompt": "y"}])
    assert_data_error(write_task(tmp_path, task, ROWS), "answer_stage")
    task["answer_stage"] = "b"
    assert load_task(write_task(tmp_path, task, ROWS)).final_stage == "b"


def test_unknown_field_names_place(tmp_path: Path) -> None:
    task = chain()
    task["stages"][1]["parsr"] = {"kind": "text"}
    assert_data_error(write_task(tmp_path, task, ROWS), "stages[1] (second).parsr", "not a known field")


def test_bad_regex(tmp_path: Path) -> None:
    task = chain()
    task["stages"][1]["parser"] = {"kind": "regex", "pattern": "(unclosed"}
    assert_data_error(write_task(tmp_path, task, ROWS), "stages[1] (second).parser", "not a valid regular expression")


def test_regex_without_group(tmp_path: Path) -> None:
    task = chain()
    task["stages"][1]["parser"] = {"kind": "regex", "pattern": "Answer: .+"}
    assert_data_error(write_task(tmp_path, task, ROWS), "group 1 does not exist")


def test_unknown_scorer_kind(tmp_path: Path) -> None:
    assert_data_error(write_task(tmp_path, chain(scorer={"kind": "bleu"}), ROWS), "scorer.kind")


def test_judge_needs_model(tmp_path: Path) -> None:
    assert_data_error(write_task(tmp_path, chain(scorer={"kind": "llm_judge"}), ROWS), "needs 'model'")


def test_missing_dataset_file(tmp_path: Path) -> None:
    assert_data_error(write_task(tmp_path, chain()), "dev.jsonl", "relative to the task file")


def test_bad_dataset_line(tmp_path: Path) -> None:
    (tmp_path / "dev.jsonl").write_text('{"question": "a", "answer": "1"}\n{not json\n')
    assert_data_error(write_task(tmp_path, chain()), ":2", "not valid JSON", named=tmp_path / "dev.jsonl")


def test_dataset_format(tmp_path: Path) -> None:
    (tmp_path / "dev.txt").write_text("x")
    assert_data_error(write_task(tmp_path, chain(dataset="dev.txt")), ".jsonl", ".csv")


def test_empty_dataset(tmp_path: Path) -> None:
    assert_data_error(write_task(tmp_path, chain(), []), "holds no examples")


def test_duplicate_ids(tmp_path: Path) -> None:
    rows = [{"id": "x", **ROWS[0]}, {"id": "x", **ROWS[1]}]
    task = write_task(tmp_path, chain(dataset={"path": "dev.jsonl", "id": "id"}), rows)
    assert_data_error(task, "row 2", "used twice", named=tmp_path / "dev.jsonl")


def test_dataset_spec_errors(tmp_path: Path) -> None:
    assert_data_error(write_task(tmp_path, chain(dataset={"file": "dev.jsonl"}), ROWS), "dataset", "path")


def test_stage_reference_field_checked(tmp_path: Path) -> None:
    task = chain()
    task["stages"][0]["scorer"] = {"kind": "exact"}
    task["stages"][0]["reference"] = "subanswer"
    assert_data_error(write_task(tmp_path, task, ROWS), "subanswer")


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    file = tmp_path / "task.yaml"
    file.write_text("- a\n- b\n")
    assert_data_error(file, "must be a mapping")


# -- templates and parsers -------------------------------------------------------------------------------


def test_template_fields_and_literal_braces() -> None:
    template = PromptTemplate("{{literal}} {input[q]} {stages.plan} {input.q}")
    assert template.inputs == ("q",)
    assert template.stages == ("plan",)
    assert template.render({"q": "Q"}, {"plan": "P"}) == "{literal} Q P Q"
    assert template.render({"q": ["a", 1]}, {"plan": None}) == '{literal} ["a", 1]  ["a", 1]'


@pytest.mark.parametrize("text", ["{x}", "{input}", "{input[q]!r}", "{input[q]:>10}", "unclosed {", "}"])
def test_template_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        PromptTemplate(text)


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        ({"kind": "text"}, "  hello \n", "hello"),
        ({"kind": "text"}, "   ", None),
        ({"kind": "regex", "pattern": r"Answer:\s*(\S+)"}, "Answer: 1\nAnswer: 42", "42"),
        ({"kind": "regex", "pattern": r"Answer:\s*(?P<a>\S+)", "group": "a"}, "Answer: x", "x"),
        ({"kind": "regex", "pattern": r"Answer:\s*(\S+)"}, "no answer here", None),
        ({"kind": "regex", "pattern": r"Answer:\s*(\S+)", "on_miss": "last_line"}, "a\nthe end\n\n", "the end"),
        ({"kind": "regex", "pattern": r"Answer:\s*(\S+)", "on_miss": "text"}, " all of it ", "all of it"),
        ({"kind": "last_number"}, "we get 1,234.5 then -7 apples", "-7"),
        ({"kind": "last_number"}, "the total is 1,234", "1234"),
        ({"kind": "last_number"}, "none", None),
        ({"kind": "json", "field": "answer"}, 'Sure! {"answer": 42, "why": "x"}', "42"),
        ({"kind": "json", "field": "result.items.1"}, '{"result": {"items": ["a", "b"]}}', "b"),
        ({"kind": "json", "field": "answer"}, '{"other": 1} then {"answer": "yes"}', "yes"),
        ({"kind": "json", "field": "answer"}, "{broken json", None),
        ({"kind": "code_block"}, "x\n```python\ndef f():\n    return 1\n```\nmore\n```\ndef g(): pass\n```", "def g(): pass"),
        ({"kind": "code_block", "language": "python"}, "```python\na = 1\n```\n```text\nnot\n```", "a = 1"),
        ({"kind": "code_block"}, "```python\nunterminated = 1\n", "unterminated = 1"),
        ({"kind": "code_block"}, "no fence", None),
        ({"kind": "code_block", "on_miss": "text"}, "def f(): pass", "def f(): pass"),
    ],
)
def test_parsers(parser: dict, text: str, expected: str | None) -> None:
    assert OutputParser(**parser).parse(text) == expected


# -- scorers ---------------------------------------------------------------------------------------------


def score(scorer: Scorer, answer: str | None, reference, **inputs) -> float | None:
    example = Example(id="e", inputs=inputs, reference=reference)
    return asyncio.run(scorer.score(answer, example))


def test_exact_scorer_normalises() -> None:
    exact = Scorer(kind="exact")
    assert score(exact, "\\boxed{204.0}", "204") == 1.0
    assert score(exact, "Paris.", "paris") == 1.0
    assert score(exact, "Lyon", "Paris") == 0.0
    assert score(exact, "four", ("4", "four")) == 1.0
    assert score(exact, None, "4") == 0.0
    assert score(exact, "x", None) is None


def test_numeric_scorer_tolerance() -> None:
    assert score(Scorer(kind="numeric", tolerance=0.01), "x = 3.141", "3.14159") == 1.0
    assert score(Scorer(kind="numeric", tolerance=0.0001), "3.141", "3.14159") == 0.0
    assert score(Scorer(kind="numeric", relative=0.01), "1005", "1000") == 1.0
    assert score(Scorer(kind="numeric"), "no number", "1") == 0.0


def test_f1_and_contains() -> None:
    assert token_f1("The Eiffel Tower", "eiffel tower") == 1.0
    assert token_f1("Richard Nixon was president", "Richard Nixon") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", "") == 1.0
    assert token_f1("x", "y") == 0.0
    assert score(Scorer(kind="f1"), "Nixon", ("Richard Nixon", "Nixon")) == 1.0
    assert score(Scorer(kind="contains"), "It was Richard Nixon, I think.", "richard nixon") == 1.0
    assert score(Scorer(kind="contains"), "Nixonian", "Nixon") == 0.0


def test_unit_tests_pass_and_fail() -> None:
    ok, _ = asyncio.run(run_unit_tests("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\n"))
    assert ok
    ok, output = asyncio.run(run_unit_tests("def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3, 'wrong sum'\n"))
    assert not ok and "wrong sum" in output
    ok, output = asyncio.run(run_unit_tests("def add(a, b) return", "assert True"))
    assert not ok and "SyntaxError" in output
    assert score(Scorer(kind="unit_tests"), "def f():\n    return 1\n", "assert f() == 1") == 1.0
    assert score(Scorer(kind="unit_tests"), "def f():\n    return 2\n", "assert f() == 1") == 0.0


def test_unit_tests_time_out_and_are_killed() -> None:
    start = time.perf_counter()
    ok, output = asyncio.run(run_unit_tests("while True:\n    pass\n", "assert True", timeout_s=1.0))
    assert not ok and "timed out" in output
    assert time.perf_counter() - start < 8


def test_unit_tests_run_isolated_in_a_temp_dir(tmp_path: Path) -> None:
    code = "import os\nprint(os.getcwd())\nassert 'ALLOT_SECRET' not in os.environ\nopen('scratch.txt', 'w').write('x')\n"
    import os

    os.environ["ALLOT_SECRET"] = "1"
    try:
        ok, output = asyncio.run(run_unit_tests(code, "assert True"))
    finally:
        del os.environ["ALLOT_SECRET"]
    assert ok, output
    assert "allot-tests-" in output
    assert not Path(output.strip().splitlines()[0]).exists()


def test_llm_judge_scores_through_the_judge() -> None:
    scorer = Scorer(kind="llm_judge", model="judge", prompt="Q {input[question]} A {answer} R {reference}", scale=10)
    prompts: list[tuple[str, str]] = []

    async def judge(model: str, prompt: str) -> str:
        prompts.append((model, prompt))
        return "I'd say 7" if "R first" in prompt else "2"

    example = Example(id="e", inputs={"question": "q?"}, reference=("first", "second"))
    assert asyncio.run(scorer.score("ans", example, judge=judge)) == pytest.approx(0.7)
    assert prompts[0] == ("judge", "Q q? A ans R first")
    with pytest.raises(DataError, match="backend"):
        asyncio.run(scorer.score("ans", example))


def test_judge_prompt_fields_checked_at_load(tmp_path: Path) -> None:
    task = chain(scorer={"kind": "llm_judge", "model": "m", "prompt": "{input[missing]} {answer}"})
    assert_data_error(write_task(tmp_path, task, ROWS), "judge prompt", "missing")
