"""The recorder: export what live runs generated in the replay format, so a live search replays offline.

``Recorder(task, catalog)`` collects runs (``add(plan, result)``, ``add_environment(live_env)`` for every
evaluation a ``LiveEnvironment`` made, ``add_runs`` for a job's runs) and ``export(directory)`` writes a
replay directory (see ``executors/datasets/replay-qwen3-math/README.md`` for the base format and
``executors/datasets/README-multistage.md`` for the extension):

- ``models.json``: the sizes (and prices) of every recorded model, from the catalog.
- **Single-stage task**: ``<task>__<model>.jsonl.gz``, one line per example: ``id``, ``benchmark``,
  ``model``, ``question`` (the rendered prompt), ``gold`` (the first reference), ``probe_every`` 0 and
  ``samples`` (``answer`` as the stage's parser read it, ``""`` where it could not; ``tokens`` generated;
  ``probes`` empty). ``ReplayEnvironment(directory)`` loads it as it is.
- **Multi-stage task** (the extension): one such benchmark per stage, named ``<task>.<stage>``, in files
  ``<task>.<stage>__<model>.jsonl.gz``. A stage's prompt depends on its upstream stages' answers, so a
  line is one *context*: the example plus the decided answers of the upstream stages. Its ``id`` is the
  example id for a stage without upstream stages, else ``<example>@<8 hex digits of the context hash>``;
  extra fields ``example``, ``stage`` and ``upstream`` (stage -> answer) say which context it is; ``gold``
  is the example's reference for the answer stage, the stage's own reference where the task gives one,
  else ``""``. Each stage loads on its own with ``ReplayEnvironment(directory, "<task>.<stage>")``. A
  manifest ``<task>.task.json`` holds the stage DAG, the references, and every recorded run (plan, the
  context each stage saw, answers, score, cost), so recorded plans can be re-scored without a model.

Only independent samples are exported as replay samples: those of solver nodes without predecessors,
which is what replay draws from. Samples of reviewers, revisers, aggregators and verifiers depend on
other samples; they appear in the manifest's runs (their count and cost) but not in the sample files.
Every sample also keeps its ``text``, ``temperature`` and ``max_tokens`` (extra fields the loader
ignores). A sample served again by a sample store is exported once: samples are deduplicated on
(stage, context, model, temperature, max_tokens, sample index, text).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executors.aggregators import Sample
from executors.plan_runner import RunResult
from executors.tasks import Task
from graphs.cost import ModelSpec
from graphs.errors import DataError
from graphs.plan import Plan, Role

__all__ = ["MANIFEST_FORMAT", "Recorder", "record_environment"]

MANIFEST_FORMAT = "allot-replay-multistage/1"
_SIZE_FIELDS = ("params_b", "active_params_b", "layers", "hidden", "input_usd_per_mtok", "output_usd_per_mtok", "context")


@dataclass
class _Context:
    """One problem of a stage benchmark: an example with given upstream answers."""

    id: str
    example: str
    stage: str
    question: str
    gold: str
    upstream: dict[str, str]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # model -> samples
    seen: set[tuple[Any, ...]] = field(default_factory=set)


class Recorder:
    """Collects live runs of ``task`` and exports them as a replay directory (see the module docstring).

    Args:
        task: the task the runs belong to.
        catalog: model sizes for ``models.json`` (a model missing from it is exported without sizes,
            and the replay loader then reads its size from its name, or asks for it).
    """

    def __init__(self, task: Task, catalog: Mapping[str, ModelSpec] | None = None) -> None:
        self.task = task
        self.catalog = dict(catalog or {})
        self._contexts: dict[tuple[str, str], _Context] = {}  # (stage, context id) -> context
        self._runs: list[dict[str, Any]] = []

    @property
    def multistage(self) -> bool:
        return len(self.task.stages) > 1

    def benchmark(self, stage: str) -> str:
        """The replay benchmark name of ``stage``: the task's name, ``<task>.<stage>`` if multi-stage."""
        return f"{self.task.name}.{stage}" if self.multistage else self.task.name

    def add(self, plan: Plan, result: RunResult) -> None:
        """Record one run of ``plan`` (on the example ``result.example_id`` of the task)."""
        example = self.task.example(result.example_id)
        run_stages: dict[str, Any] = {}
        for name in self.task.order:
            stage = result.stages[name]
            if stage.skipped is not None:
                run_stages[name] = {"skipped": stage.skipped}
                continue
            upstream = {dep: result.stages[dep].answer or "" for dep in self.task.stage(name).depends_on}
            context = self._context(name, example.id, stage.prompt, upstream)
            graph = plan.stage(name)
            targets = {dst for _, dst in graph.edges}
            independent = {n.id: n for n in graph.nodes if n.role is Role.SOLVER and n.id not in targets}
            for sample in stage.samples:
                node = independent.get(sample.node)
                if node is not None and not _never_generated(sample):
                    self._add_sample(context, sample, node.temperature, node.max_tokens or self.task.stage_max_tokens(name))
            run_stages[name] = {
                "context": context.id,
                "answer": stage.answer,
                "samples": len(stage.samples),
                "failed": len(stage.failed),
                "stopped_early": stage.stopped_early,
                "cost": stage.cost.as_dict(),
            }
        self._runs.append(
            {
                "plan_id": plan.plan_id,
                "plan": json.loads(plan.canonical_json()),
                "example": example.id,
                "answer": result.answer,
                "score": result.score,
                "stopped_at_budget": result.stopped_at_budget,
                "cost": result.cost.as_dict(),
                "stages": run_stages,
            }
        )

    def add_runs(self, plan: Plan, results: Iterable[RunResult]) -> None:
        for result in results:
            self.add(plan, result)

    def add_environment(self, environment: Any) -> None:
        """Record every evaluation a ``LiveEnvironment`` has made (its ``history``)."""
        for run in environment.history:
            self.add_runs(run.plan, run.results)

    def export(self, directory: str | Path) -> list[Path]:
        """Write the replay directory; returns the files written. Existing files of the same names are
        replaced; other files are left alone."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        by_file: dict[tuple[str, str], list[_Context]] = {}
        for context in self._contexts.values():
            for model in context.samples:
                by_file.setdefault((context.stage, model), []).append(context)
        models = sorted({model for _, model in by_file})
        for model in models:
            if "__" in model or "/" in model or not model:
                raise DataError(f"model name {model!r} cannot name a replay file: rename it in the catalog (no '/' or '__')")
        for (stage, model), contexts in sorted(by_file.items()):
            file = out / f"{self.benchmark(stage)}__{model}.jsonl.gz"
            with gzip.open(file, "wt", encoding="utf-8") as handle:
                for context in contexts:
                    handle.write(json.dumps(self._line(context, model), ensure_ascii=False) + "\n")
            written.append(file)
        sizes = {m: _sizes(self.catalog[m]) for m in models if m in self.catalog}
        if sizes:
            file = out / "models.json"
            existing = json.loads(file.read_text()) if file.exists() else {}
            file.write_text(json.dumps({**existing, **sizes}, indent=2, sort_keys=True) + "\n")
            written.append(file)
        if self.multistage:
            file = out / f"{self.task.name}.task.json"
            file.write_text(json.dumps(self.manifest(), indent=1, ensure_ascii=False) + "\n")
            written.append(file)
        return written

    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "task": self.task.name,
            "answer_stage": self.task.final_stage,
            "stages": [
                {"name": name, "depends_on": list(self.task.stage(name).depends_on), "benchmark": self.benchmark(name)}
                for name in self.task.order
            ],
            "examples": {e.id: {"references": list(e.references)} for e in self.task.examples},
            "runs": self._runs,
        }

    # -- internals ---------------------------------------------------------------------------------------

    def _context(self, stage: str, example_id: str, prompt: str, upstream: dict[str, str]) -> _Context:
        if upstream:
            digest = hashlib.sha256(json.dumps(upstream, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:8]
            context_id = f"{example_id}@{digest}"
        else:
            context_id = example_id
        key = (stage, context_id)
        if key not in self._contexts:
            self._contexts[key] = _Context(context_id, example_id, stage, prompt, self._gold(stage, example_id), upstream)
        return self._contexts[key]

    def _gold(self, stage: str, example_id: str) -> str:
        example = self.task.example(example_id)
        spec = self.task.stage(stage)
        if spec.reference is not None:
            value = example.inputs.get(spec.reference)
            value = value[0] if isinstance(value, list | tuple) and value else value
            return "" if value is None else str(value)
        if stage == self.task.final_stage or spec.scorer is not None:
            return example.references[0] if example.references else ""
        return ""

    @staticmethod
    def _add_sample(context: _Context, sample: Sample, temperature: float, max_tokens: int | None) -> None:
        key = (sample.model, temperature, max_tokens, sample.index, sample.text)
        if key in context.seen:
            return
        context.seen.add(key)
        context.samples.setdefault(sample.model, []).append(
            {
                "answer": sample.answer if sample.answer is not None else "",
                "tokens": int(sample.output_tokens),
                "probes": [],
                "text": sample.text,
                "index": sample.index,
                "temperature": temperature,
                "max_tokens": max_tokens,
                **({"error": sample.error} if sample.error else {}),
            }
        )

    def _line(self, context: _Context, model: str) -> dict[str, Any]:
        line: dict[str, Any] = {
            "id": context.id,
            "benchmark": self.benchmark(context.stage),
            "model": model,
            "question": context.question,
            "gold": context.gold,
            "probe_every": 0,
            "samples": context.samples[model],
        }
        if self.multistage:
            line.update({"example": context.example, "stage": context.stage, "upstream": context.upstream})
        return line


def record_environment(environment: Any, directory: str | Path) -> list[Path]:
    """Export everything a ``LiveEnvironment`` evaluated so far into a replay directory."""
    recorder = Recorder(environment.task, environment.catalog)
    recorder.add_environment(environment)
    return recorder.export(directory)


def _never_generated(sample: Sample) -> bool:
    """A failed call's stand-in (e.g. a prompt too long for the model): no text was generated."""
    return sample.failed and sample.text == "" and sample.output_tokens == 0


def _sizes(spec: ModelSpec) -> dict[str, Any]:
    return spec.model_dump(include=set(_SIZE_FIELDS), exclude_none=True)
