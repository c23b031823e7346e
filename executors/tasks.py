"""Task files: the stages of a multi-stage LLM task, their prompts, parsers and scorers, and a dataset.

A task file is YAML (or JSON). Paths inside it are relative to the file::

    name: qa_chain
    max_tokens: 256                 # default cap on every generated answer (a node's max_tokens wins)
    dataset:
      path: dev.jsonl               # JSON Lines or CSV, one example per row
      reference: answer             # the field holding the reference (a string, or a list of accepted ones)
      id: id                        # optional: the field holding the example's id (default: row number)
    stages:                         # a DAG, usually a chain; dependencies come from the templates
      - name: decompose
        prompt: "Split into sub-questions: {input[question]}"
        parser: {kind: text}
      - name: answer
        system: "You answer briefly."
        prompt: "{input[question]}\\nSub-questions:\\n{stages[decompose]}\\nEnd with 'Answer: <answer>'."
        parser: {kind: regex, pattern: "Answer:\\\\s*(.+)", on_miss: last_line}
        fallback: true              # stands in for the final answer if the job stops before the end
        scorer: {kind: exact}       # optional per-stage score against the reference
    scorer: {kind: f1}              # the task's score, of the answer stage (default: the only sink stage)

**Templates** are ``str.format``-style: ``{input[question]}`` (or ``{input.question}``) is a field of the
example, ``{stages[decompose]}`` (or ``{stages.decompose}``) the decided answer of an upstream stage;
``{{`` and ``}}`` are literal braces. A template naming a field the dataset lacks, a stage the task lacks
or a stage downstream of itself is refused when the file is loaded.

**Parsers** turn a generation into the stage's answer (``None``: the sample failed and is recorded as
such): ``text`` (the whole text, stripped), ``regex`` (``pattern`` and ``group``, default 1; last match
wins), ``json`` (``field``, a dotted path into the first JSON object in the text), ``last_number``,
``code_block`` (the last fenced block, optionally of ``language``, else the whole text if
``on_miss: text``). ``on_miss: text | last_line`` makes a parser lenient.

**Scorers** compare the answer with the reference and give a number in [0, 1]: ``exact`` (after
``executors.answers.normalize_answer``), ``numeric`` (``tolerance`` absolute, ``relative``), ``f1``
(SQuAD token F1), ``contains`` (the normalised reference occurs in the answer), ``unit_tests`` (the
reference is Python test code, run against the answer's code in a subprocess in a temporary directory
with ``timeout_s``; 1 if it exits 0), ``llm_judge`` (``model`` from the catalog scores with ``prompt``,
a template over ``{answer}``, ``{reference}`` and ``{input[...]}``; the last number in its reply divided
by ``scale``). A list of references scores the best match.

Malformed files raise ``DataError`` naming the file, the field and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import os
import re
import string
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from executors.answers import normalize_answer
from graphs.errors import DataError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Example",
    "OutputParser",
    "ParserKind",
    "PromptTemplate",
    "Scorer",
    "ScorerKind",
    "Stage",
    "Task",
    "load_task",
    "run_unit_tests",
    "token_f1",
]

DEFAULT_MAX_TOKENS = 512
_NAME = r"^[A-Za-z0-9_.-]+$"


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- templates -------------------------------------------------------------------------------------------

_FIELD = re.compile(r"^(?P<root>input|stages)(?:\[(?P<key>[^\[\]]+)\]|\.(?P<attr>[A-Za-z_][\w-]*))$")


class PromptTemplate:
    """A parsed ``str.format``-style template over ``input`` fields and upstream ``stages``.

    ``inputs`` and ``stages`` list the names it reads; ``render`` fills them in; ``literal_chars`` is the
    length of the text around the fields (what a cost estimate adds field lengths to).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pieces: list[tuple[str, tuple[str, str] | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"template is malformed ({exc}): write literal braces as {{{{ and }}}}") from exc
        for literal, field, spec, conversion in parsed:
            ref = None
            if field is not None:
                match = _FIELD.match(field.strip())
                if match is None or spec or conversion:
                    raise ValueError(
                        f"template field {{{field}}} is not understood: use {{input[<field>]}} for a field of the "
                        "example or {stages[<stage>]} for an upstream stage's answer (literal braces: {{ and }})"
                    )
                ref = (match["root"], match["key"] or match["attr"])
            self.pieces.append((literal, ref))

    @property
    def inputs(self) -> tuple[str, ...]:
        return self._names("input")

    @property
    def stages(self) -> tuple[str, ...]:
        return self._names("stages")

    def _names(self, root: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ref[1] for _, ref in self.pieces if ref is not None and ref[0] == root))

    @property
    def literal_chars(self) -> int:
        return sum(len(literal) for literal, _ in self.pieces)

    def render(self, inputs: Mapping[str, Any], stages: Mapping[str, Any] | None = None) -> str:
        out = []
        for literal, ref in self.pieces:
            out.append(literal)
            if ref is not None:
                root, key = ref
                source = inputs if root == "input" else (stages or {})
                if key not in source:
                    raise KeyError(f"template needs {root}[{key}], which was not given")
                out.append(_as_text(source[key]))
        return "".join(out)

    def field_chars(self, inputs: Mapping[str, Any]) -> int:
        """Characters the ``input`` fields add for this example (stages are bounded elsewhere)."""
        return sum(len(_as_text(inputs.get(ref[1], ""))) for _, ref in self.pieces if ref and ref[0] == "input")

    def stage_uses(self) -> Counter[str]:
        """How many times each upstream stage is pasted in."""
        return Counter(ref[1] for _, ref in self.pieces if ref and ref[0] == "stages")


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


# -- parsers ---------------------------------------------------------------------------------------------


class ParserKind(StrEnum):
    TEXT = "text"
    REGEX = "regex"
    JSON = "json"
    LAST_NUMBER = "last_number"
    CODE_BLOCK = "code_block"


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


class OutputParser(_Value):
    """Reads a stage's answer out of a generation; ``parse`` returns ``None`` when it cannot."""

    kind: ParserKind = ParserKind.TEXT
    pattern: str | None = None
    group: int | str = 1
    field: str | None = None
    language: str | None = None
    on_miss: Literal["fail", "text", "last_line"] = "fail"

    @model_validator(mode="after")
    def _check(self) -> OutputParser:
        if self.kind is ParserKind.REGEX:
            if not self.pattern:
                raise ValueError("a regex parser needs 'pattern' with a group, e.g. pattern: 'Answer:\\s*(.+)'")
            try:
                compiled = re.compile(self.pattern, re.S)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression ({exc})") from exc
            if isinstance(self.group, int) and self.group > compiled.groups:
                raise ValueError(f"pattern {self.pattern!r} has {compiled.groups} groups; group {self.group} does not exist")
            if isinstance(self.group, str) and self.group not in compiled.groupindex:
                raise ValueError(f"pattern {self.pattern!r} has no group named {self.group!r}")
        if self.kind is ParserKind.JSON and not self.field:
            raise ValueError("a json parser needs 'field', a dotted path such as answer or result.value")
        return self

    def parse(self, text: str) -> str | None:
        value = self._parse(text)
        if value is not None and value.strip():
            return value.strip()
        if self.on_miss == "text":
            return text.strip() or None
        if self.on_miss == "last_line":
            lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
            return lines[-1] if lines else None
        return None

    def _parse(self, text: str) -> str | None:
        if self.kind is ParserKind.TEXT:
            return text
        if self.kind is ParserKind.REGEX:
            matches = list(re.finditer(self.pattern or "", text, re.S))
            return matches[-1].group(self.group) if matches else None
        if self.kind is ParserKind.LAST_NUMBER:
            numbers = _NUMBER.findall(text)
            return numbers[-1].replace(",", "") if numbers else None
        if self.kind is ParserKind.CODE_BLOCK:
            blocks = [body for lang, body in _FENCE.findall(text) if not self.language or lang.lower() == self.language.lower()]
            return blocks[-1] if blocks else None
        return _json_field(text, self.field or "")


def _json_field(text: str, path: str) -> str | None:
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        for part in path.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                value = None
                break
        if value is not None:
            return _as_text(value)
    return None


# -- scorers ---------------------------------------------------------------------------------------------


class ScorerKind(StrEnum):
    EXACT = "exact"
    NUMERIC = "numeric"
    F1 = "f1"
    CONTAINS = "contains"
    UNIT_TESTS = "unit_tests"
    LLM_JUDGE = "llm_judge"


DEFAULT_JUDGE_PROMPT = (
    "Question: {input[question]}\nReference answer: {reference}\nProposed answer: {answer}\n"
    "Is the proposed answer correct? Reply with a single number: 1 if it is, 0 if it is not."
)

Judge = Callable[[str, str], Awaitable[str]]
"""``judge(model, prompt) -> reply``: how an LLM-judge scorer reaches its model (the plan runner's backend)."""


class Scorer(_Value):
    """Scores an answer against an example's reference; ``None`` when there is no reference."""

    kind: ScorerKind = ScorerKind.EXACT
    tolerance: float = Field(default=1e-6, ge=0)
    relative: float = Field(default=0.0, ge=0)
    timeout_s: float = Field(default=10.0, gt=0)
    model: str | None = None
    prompt: str | None = None
    scale: float = Field(default=1.0, gt=0)
    max_tokens: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Scorer:
        if self.kind is ScorerKind.LLM_JUDGE:
            if not self.model:
                raise ValueError("an llm_judge scorer needs 'model', a model name from the catalog")
            self.judge_template  # noqa: B018 - parse now, so a bad template fails at load
        return self

    @cached_property
    def judge_template(self) -> PromptTemplate:
        text = self.prompt or DEFAULT_JUDGE_PROMPT
        # {answer} and {reference} are the scorer's own fields: pass them through as input fields.
        return PromptTemplate(text.replace("{answer}", "{input[__answer__]}").replace("{reference}", "{input[__reference__]}"))

    async def score(self, answer: str | None, example: Example, *, judge: Judge | None = None) -> float | None:
        """The score in [0, 1] (0 for no answer), or ``None`` if the example has no reference."""
        if example.reference is None:
            return None
        if answer is None:
            return 0.0
        references = example.references
        if self.kind is ScorerKind.UNIT_TESTS:
            results = [await run_unit_tests(answer, ref, timeout_s=self.timeout_s) for ref in references]
            return max(1.0 if ok else 0.0 for ok, _ in results)
        if self.kind is ScorerKind.LLM_JUDGE:
            if judge is None:
                raise DataError("an llm_judge scorer needs a model backend: score through PlanRunner or LiveEnvironment")
            best = 0.0
            for ref in references:
                fields = {**example.inputs, "__answer__": answer, "__reference__": ref}
                reply = await judge(self.model or "", self.judge_template.render(fields))
                number = OutputParser(kind=ParserKind.LAST_NUMBER).parse(reply)
                value = float(number) / self.scale if number is not None else 0.0
                best = max(best, min(1.0, max(0.0, value)))
            return best
        return max(self.score_text(answer, ref) for ref in references)

    def score_text(self, answer: str, reference: str) -> float:
        """The text scorers (exact, numeric, f1, contains) on one reference."""
        if self.kind is ScorerKind.EXACT:
            norm = normalize_answer(answer)
            return float(norm is not None and norm == normalize_answer(reference))
        if self.kind is ScorerKind.NUMERIC:
            got, want = _to_float(answer), _to_float(reference)
            if got is None or want is None:
                return 0.0
            return float(abs(got - want) <= self.tolerance + self.relative * abs(want))
        if self.kind is ScorerKind.F1:
            return token_f1(answer, reference)
        if self.kind is ScorerKind.CONTAINS:
            words, ref = _squad_tokens(answer), _squad_tokens(reference)
            return float(bool(ref) and any(words[i : i + len(ref)] == ref for i in range(len(words) - len(ref) + 1)))
        raise ValueError(f"{self.kind} is not a text scorer")  # pragma: no cover - guarded by score()


def _to_float(text: str) -> float | None:
    number = OutputParser(kind=ParserKind.LAST_NUMBER).parse(text)
    try:
        value = float(number) if number is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def _squad_tokens(text: str) -> list[str]:
    return _ARTICLES.sub(" ", _PUNCT.sub(" ", str(text).lower())).split()


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1: lower-cased, punctuation and articles removed, bag-of-words overlap."""
    got, want = _squad_tokens(answer), _squad_tokens(reference)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


async def run_unit_tests(code: str, tests: str, *, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Run ``tests`` (Python, e.g. asserts) after ``code`` in a fresh interpreter in a temporary directory.

    Returns (passed, the last lines of output or the reason it failed). The child runs isolated
    (``python -I``, an empty environment but ``PATH``), with ``timeout_s`` of wall time and a CPU limit
    of the same; on timeout it is killed.
    """
    with tempfile.TemporaryDirectory(prefix="allot-tests-") as tmp:
        script = Path(tmp) / "solution_test.py"
        script.write_text(f"{code}\n\n# --- tests ---\n{tests}\n", encoding="utf-8")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            str(script),
            cwd=tmp,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "")},
            preexec_fn=_limit_cpu(timeout_s),
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return False, f"timed out after {timeout_s:g} s"
        tail = "\n".join(output.decode("utf-8", "replace").strip().splitlines()[-5:])
        return process.returncode == 0, tail


def _limit_cpu(seconds: float) -> Callable[[], None] | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None

    def limit() -> None:
        cpu = math.ceil(seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

    return limit


# -- the task --------------------------------------------------------------------------------------------


class Example(_Value):
    """One row of the dataset: its input fields and reference (``None``: unscored)."""

    id: str
    inputs: Mapping[str, Any]
    reference: str | tuple[str, ...] | None = None

    @property
    def references(self) -> tuple[str, ...]:
        if self.reference is None:
            return ()
        return (self.reference,) if isinstance(self.reference, str) else self.reference


class Stage(_Value):
    """One stage: a prompt over the input and upstream answers, a parser, optional own scorer."""

    name: str = Field(min_length=1, max_length=64, pattern=_NAME)
    prompt: str = Field(min_length=1)
    system: str | None = None
    parser: OutputParser = OutputParser()
    scorer: Scorer | None = None
    reference: str | None = None
    """The example field the stage scorer compares with (default: the dataset's reference)."""
    after: tuple[str, ...] = ()
    """Extra dependencies the prompt does not name."""
    max_tokens: int | None = Field(default=None, ge=1)
    stop: tuple[str, ...] = ()
    fallback: bool = False
    """If a job stops (budget) before the answer stage decides, this stage's answer stands in."""

    @field_validator("prompt")
    @classmethod
    def _parse_prompt(cls, prompt: str) -> str:
        PromptTemplate(prompt)
        return prompt

    @cached_property
    def template(self) -> PromptTemplate:
        return PromptTemplate(self.prompt)

    @property
    def depends_on(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.template.stages, *self.after)))


class Task(_Value):
    """A multi-stage task: stages as a DAG, a final scorer, and the examples of its dataset."""

    name: str = Field(min_length=1, max_length=128)
    description: str = ""
    stages: tuple[Stage, ...] = Field(min_length=1)
    scorer: Scorer = Scorer()
    answer_stage: str | None = None
    """The stage whose answer is the task's answer (default: the only stage nothing depends on)."""
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    examples: tuple[Example, ...] = ()
    source: str | None = None
    """The file the task was loaded from."""

    @model_validator(mode="after")
    def _check(self) -> Task:
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for stage in self.stages:
            for dep in stage.depends_on:
                if dep not in names:
                    raise ValueError(
                        f"stage {stage.name!r} reads stages[{dep}], which is not a stage of this task "
                        f"(stages: {', '.join(names)})"
                    )
                if dep == stage.name:
                    raise ValueError(f"stage {stage.name!r} reads its own answer: a stage can only read upstream stages")
        graph = self.graph
        if not nx.is_directed_acyclic_graph(graph):
            cycle = " -> ".join(src for src, _ in nx.find_cycle(graph))
            raise ValueError(f"stages read each other in a cycle ({cycle}): stages must form a DAG")
        sinks = [n for n in names if graph.out_degree(n) == 0]
        if self.answer_stage is None and len(sinks) != 1:
            raise ValueError(f"stages {', '.join(sinks)} all end the task: set answer_stage to the one that answers")
        if self.answer_stage is not None and self.answer_stage not in names:
            raise ValueError(f"answer_stage {self.answer_stage!r} is not a stage (stages: {', '.join(names)})")
        for example in self.examples:
            for stage in self.stages:
                if stage.reference is not None and stage.reference not in example.inputs:
                    raise ValueError(
                        f"stage {stage.name!r} scores against field {stage.reference!r}, which example {example.id!r} "
                        "lacks: add it to the dataset or drop the stage's reference"
                    )
                missing = [key for key in stage.template.inputs if key not in example.inputs]
                if missing:
                    raise ValueError(
                        f"stage {stage.name!r} reads input[{missing[0]}], which example {example.id!r} of the dataset "
                        f"lacks (its fields: {', '.join(example.inputs) or 'none'})"
                    )
            if self.scorer.kind is ScorerKind.LLM_JUDGE:
                missing = [k for k in self.scorer.judge_template.inputs if not k.startswith("__") and k not in example.inputs]
                if missing:
                    raise ValueError(f"the scorer's judge prompt reads input[{missing[0]}], which example {example.id!r} lacks")
        return self

    @cached_property
    def graph(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        graph.add_nodes_from(stage.name for stage in self.stages)
        graph.add_edges_from((dep, stage.name) for stage in self.stages for dep in stage.depends_on if dep != stage.name)
        return graph

    @cached_property
    def order(self) -> tuple[str, ...]:
        """Stage names in dependency order (file order among independent stages)."""
        position = {stage.name: i for i, stage in enumerate(self.stages)}
        return tuple(nx.lexicographical_topological_sort(self.graph, key=position.__getitem__))

    @property
    def final_stage(self) -> str:
        if self.answer_stage is not None:
            return self.answer_stage
        return next(name for name in self.order if self.graph.out_degree(name) == 0)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def stage_max_tokens(self, stage: str) -> int:
        return self.stage(stage).max_tokens or self.max_tokens

    def render(self, stage: str, example: Example, answers: Mapping[str, str | None]) -> str:
        """The stage's prompt for ``example`` given upstream stages' decided answers."""
        upstream = {name: answers.get(name) or "" for name in self.stage(stage).depends_on}
        return self.stage(stage).template.render(example.inputs, upstream)

    def example(self, example_id: str) -> Example:
        for example in self.examples:
            if example.id == example_id:
                return example
        raise KeyError(example_id)


# -- loading ---------------------------------------------------------------------------------------------


def load_task(path: str | Path) -> Task:
    """Read a task file (YAML or JSON) and its dataset; ``DataError`` names the file, field and fix."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"task file {file} cannot be read ({exc.strerror}): check the path") from exc
    try:
        raw = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0]
        raise DataError(f"task file {file} is not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {first}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"task file {file} must be a mapping with name, stages, scorer and dataset")
    fields = dict(raw)
    fields.setdefault("name", file.parent.name if file.stem == "task" else file.stem)
    dataset = fields.pop("dataset", None)
    if dataset is not None:
        fields["examples"] = _load_dataset(file, dataset)
    fields["source"] = str(file.resolve())
    try:
        return Task.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = _where(raw, error.get("loc", ()))
        message = str(error.get("msg", exc)).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "is not a known field: check its spelling against the task file format in executors/tasks.py"
        elif error.get("type") == "missing":
            message = "is required"
        raise DataError(f"task file {file}: {where}: {message}") from exc


def _where(raw: Mapping[str, Any], loc: Sequence[Any]) -> str:
    """A readable location: ``stages[1] (answer).parser.pattern``."""
    parts: list[str] = []
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            label = f"[{part}]" + (f" ({name})" if name else "")
            parts[-1:] = [(parts[-1] if parts else "") + label]
        else:
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts) or "top level"


class _DatasetSpec(_Value):
    path: str
    reference: str = "answer"
    id: str | None = None
    limit: int | None = Field(default=None, ge=1)


def _load_dataset(task_file: Path, spec: Any) -> list[Example]:
    if isinstance(spec, str):
        spec = {"path": spec}
    try:
        dataset = _DatasetSpec.model_validate(spec)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error.get("loc", ()))
        raise DataError(
            f"task file {task_file}: dataset{'.' + where if where else ''}: {error.get('msg')} "
            "(write dataset: {path: dev.jsonl, reference: answer})"
        ) from exc
    file = (task_file.parent / dataset.path).resolve()
    rows = _read_rows(file, task_file)
    if not rows:
        raise DataError(f"dataset {file} (dataset.path of task file {task_file}) holds no examples: add rows")
    examples: list[Example] = []
    seen: set[str] = set()
    for number, row in enumerate(rows[: dataset.limit] if dataset.limit else rows, 1):
        where = f"dataset {file} row {number}"
        if dataset.id is not None and dataset.id not in row:
            raise DataError(f"{where} has no id field {dataset.id!r}: add it or drop dataset.id from {task_file}")
        example_id = str(row[dataset.id]) if dataset.id is not None else str(number)
        if example_id in seen:
            raise DataError(f"{where}: id {example_id!r} is used twice: ids must be unique")
        seen.add(example_id)
        reference = row.get(dataset.reference)
        if isinstance(reference, list):
            if not reference or not all(isinstance(r, str | int | float) for r in reference):
                raise DataError(f"{where}: reference {dataset.reference!r} must be a string or a non-empty list of strings")
            reference = tuple(str(r) for r in reference)
        elif reference is not None and not isinstance(reference, str):
            if isinstance(reference, dict):
                raise DataError(f"{where}: reference {dataset.reference!r} must be a string or a list of strings, not an object")
            reference = str(reference)
        inputs = {k: v for k, v in row.items() if k not in (dataset.reference, dataset.id)}
        examples.append(Example(id=example_id, inputs=inputs, reference=reference))
    return examples


def _read_rows(file: Path, task_file: Path) -> list[dict[str, Any]]:
    if file.suffix.lower() not in (".jsonl", ".csv", ".json"):
        raise DataError(f"dataset {file} (dataset.path of task file {task_file}): use a .jsonl or .csv file")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(
            f"dataset {file} cannot be read ({exc.strerror}): dataset.path is relative to the task file {task_file}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"dataset {file} is not UTF-8 text ({exc.reason})") from exc
    if file.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise DataError(f"dataset {file} has no header row: the first line must name the columns")
        return [dict(row) for row in reader]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"dataset {file}:{number} is not valid JSON ({exc.msg}): one JSON object per line") from exc
        if not isinstance(row, dict):
            raise DataError(f"dataset {file}:{number} must be a JSON object mapping fields to values")
        rows.append(row)
    return rows
