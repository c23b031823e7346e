"""Reading replay directories: recorded samples per benchmark and model.

Format (see ``executors/datasets/replay-qwen3-math/README.md``): ``<benchmark>__<model>.jsonl[.gz]``,
one problem per line with ``id``, ``question``, ``gold``, ``probe_every`` and ``samples`` (each with
``answer``, ``tokens``, ``probes``); an optional ``models.json`` gives model sizes. Any directory in this
format loads, whatever benchmarks and models it holds.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from graphs.cost import ModelSpec
from graphs.errors import DataError

__all__ = [
    "BUNDLED_DATA",
    "BenchmarkData",
    "ModelRecords",
    "Problem",
    "bundled_data_dir",
    "list_benchmarks",
    "load_benchmark",
    "model_spec_from_name",
]

BUNDLED_DATA = "replay-qwen3-math"
_FILE = re.compile(r"^(?P<benchmark>.+?)__(?P<model>.+?)\.jsonl(?:\.gz)?$")
_MOE = re.compile(r"(?<![\d.])(\d+)x(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")
_ACTIVE = re.compile(r"[-_]A(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")
_SIZE = re.compile(r"(?<![\d.A-Za-z])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")


def bundled_data_dir() -> Path:
    """The AIME 2024/2025 replay data shipped inside the package."""
    return Path(__file__).resolve().parent / "datasets" / BUNDLED_DATA


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str


@dataclass(frozen=True)
class ModelRecords:
    """One model's recorded samples on one benchmark, problems in the benchmark's order."""

    model: str
    answers: tuple[tuple[str, ...], ...]  # [problem][sample]
    tokens: tuple[tuple[int, ...], ...]
    probes: tuple[tuple[tuple[str, ...], ...], ...]  # [problem][sample][k]
    probe_every: int

    @property
    def min_samples(self) -> int:
        return min(len(row) for row in self.answers)

    @cached_property
    def max_tokens(self) -> int:
        """The longest recorded trace (every budget check of a replayed request asks; computed once)."""
        return max(max(row) for row in self.tokens)


@dataclass(frozen=True)
class BenchmarkData:
    name: str
    directory: Path
    problems: tuple[Problem, ...]
    records: dict[str, ModelRecords]
    specs: dict[str, ModelSpec]

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted(self.records, key=lambda m: (self.specs[m].active_params, m)))

    @property
    def probe_every(self) -> int:
        """Tokens between probes, 0 when any model of the benchmark has none."""
        values = {rec.probe_every for rec in self.records.values()}
        return 0 if 0 in values or len(values) != 1 else values.pop()


def list_benchmarks(directory: str | Path) -> dict[str, list[Path]]:
    """Benchmarks in a replay directory, each with its files; a clear error when there are none."""
    path = Path(directory)
    if not path.is_dir():
        raise DataError(f"replay directory {path} does not exist: pass --data DIR with <benchmark>__<model>.jsonl.gz files")
    found: dict[str, list[Path]] = {}
    for file in sorted(path.iterdir()):
        match = _FILE.match(file.name)
        if match and file.is_file():
            found.setdefault(match["benchmark"], []).append(file)
    if not found:
        raise DataError(
            f"no replay files in {path}: expected <benchmark>__<model>.jsonl.gz files (see the replay format in the README)"
        )
    return found


def model_spec_from_name(name: str) -> ModelSpec | None:
    """Guess a model's size from its name (``Qwen3-8B``, ``gpt-oss-20b``, ``Qwen3-30B-A3B``, ``8x7B``)."""
    moe = _MOE.search(name)
    active = _ACTIVE.search(name)
    if moe:  # N experts of M billion; top-2 routing is the common convention for the active share
        experts, size = float(moe.group(1)), float(moe.group(2))
        routed = float(active.group(1)) if active else min(2.0, experts) * size
        return ModelSpec(name=name, params_b=experts * size, active_params_b=routed)
    sizes = [float(m.group(1)) for m in _SIZE.finditer(name)]
    if not sizes:
        return None
    total = max(sizes)
    act = float(active.group(1)) if active else None
    if act is not None and act > total:
        act = None
    return ModelSpec(name=name, params_b=total, active_params_b=act)


def _read_specs(directory: Path) -> dict[str, ModelSpec]:
    file = directory / "models.json"
    if not file.exists():
        return {}
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict):
            raise ValueError("top level must be an object mapping model names to sizes")
        return {name: ModelSpec(name=name, **fields) for name, fields in raw.items()}
    except (ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0]
        raise DataError(
            f"{file} is malformed ({first}): it must map each model to params_b, active_params_b, layers, hidden"
        ) from exc


def _read_lines(file: Path) -> list[dict]:
    opener = gzip.open if file.suffix == ".gz" else open
    rows = []
    try:
        with opener(file, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}:{number} is not valid JSON ({exc.msg}): fix or remove the line") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{file}:{number} must be a JSON object with id, gold and samples")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{file} cannot be read ({exc}): is it a gzip'd JSON Lines file?") from exc
    return rows


def _parse_records(file: Path, model: str, rows: list[dict]) -> tuple[list[Problem], ModelRecords]:
    problems, answers, tokens, probes = [], [], [], []
    probe_every: set[int] = set()
    for number, row in enumerate(rows, 1):
        where = f"{file} problem {row.get('id', number)}"
        samples = row.get("samples")
        if "id" not in row or "gold" not in row or not isinstance(samples, list) or not samples:
            raise DataError(f"{where}: every line needs 'id', 'gold' and a non-empty 'samples' list")
        try:
            answers.append(tuple("" if s.get("answer") is None else str(s.get("answer")) for s in samples))
            tokens.append(tuple(int(s["tokens"]) for s in samples))
            probes.append(tuple(tuple(str(p) for p in (s.get("probes") or ())) for s in samples))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{where}: every sample needs 'answer' and an integer 'tokens' ({exc!r})") from exc
        if any(t < 0 for t in tokens[-1]):
            raise DataError(f"{where}: token counts must be >= 0")
        probe_every.add(int(row.get("probe_every") or 0))
        problems.append(Problem(id=str(row["id"]), question=str(row.get("question") or ""), gold=str(row["gold"])))
    every = 0 if 0 in probe_every or len(probe_every) != 1 else probe_every.pop()
    if every == 0:
        probes = [tuple(() for _ in row) for row in probes]
    return problems, ModelRecords(model, tuple(answers), tuple(tokens), tuple(probes), every)


def load_benchmark(directory: str | Path, benchmark: str | None = None) -> BenchmarkData:
    """Load one benchmark of a replay directory (the only one, or the one named)."""
    path = Path(directory)
    found = list_benchmarks(path)
    if benchmark is None:
        if len(found) > 1:
            raise DataError(f"{path} holds benchmarks {', '.join(found)}: choose one with --benchmark")
        benchmark = next(iter(found))
    if benchmark not in found:
        raise DataError(f"benchmark {benchmark!r} is not in {path}: it holds {', '.join(found)}")
    specs = _read_specs(path)
    problems_by_model: dict[str, list[Problem]] = {}
    records: dict[str, ModelRecords] = {}
    for file in found[benchmark]:
        model = _FILE.match(file.name)["model"]  # type: ignore[index]
        problems, rec = _parse_records(file, model, _read_lines(file))
        if not problems:
            raise DataError(f"{file} holds no problems")
        problems_by_model[model] = problems
        records[model] = rec
    for model in records:
        if model not in specs:
            guess = model_spec_from_name(model)
            if guess is None:
                raise DataError(
                    f"the size of model {model!r} is unknown: add it to {path / 'models.json'} "
                    '(e.g. {"' + model + '": {"params_b": 7, "layers": 28, "hidden": 3584}})'
                )
            specs[model] = guess
    # Align every model on the problems all of them recorded, in the first model's order.
    first = problems_by_model[min(problems_by_model)]
    common = set.intersection(*({p.id for p in ps} for ps in problems_by_model.values()))
    if not common:
        raise DataError(f"the models of benchmark {benchmark!r} in {path} share no problem ids")
    order = [p for p in first if p.id in common]
    aligned: dict[str, ModelRecords] = {}
    for model, rec in records.items():
        index = {p.id: i for i, p in enumerate(problems_by_model[model])}
        picks = [index[p.id] for p in order]
        aligned[model] = ModelRecords(
            model,
            tuple(rec.answers[i] for i in picks),
            tuple(rec.tokens[i] for i in picks),
            tuple(rec.probes[i] for i in picks),
            rec.probe_every,
        )
    return BenchmarkData(benchmark, path, tuple(order), aligned, {m: specs[m] for m in aligned})
