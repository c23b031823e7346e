"""A model backend that answers from recorded samples: jobs and plan runs at zero LLM cost.

``ReplayBackend(data)`` is a ``ModelBackend`` (the transport-swap idea of httpx's mock transport): the
same ``PlanRunner`` that calls hosted APIs and vLLM servers runs a plan on a replay directory's recorded
generations instead. ``replay_task(data)`` is the one-stage task those recordings answer (the prompt is
the problem's text, the reference its gold answer), so a replay-backed job is an ordinary job.

- A request is matched to a problem by its prompt: the last user message must be one of the benchmark's
  problem texts (stage prompts of ``replay_task`` are exactly that); anything else is a ``BackendError``
  naming the problem, not a guess.
- Sample ``offset + i`` of a request is the recording at position ``offset + i`` of a permutation of the
  problem's recordings seeded by ``(request.seed, model, problem)``: requests with the same seed replay
  the same samples (what a sample store would serve), different seeds different ones, like sampling.
  More samples than were recorded wrap around the permutation.
- ``max_tokens`` below a trace's length cuts the trace: where the data has probes, the answer is the
  probe at the cut (``answer_at_cap``), otherwise none; the cost is the cut length.
- Costs are those of the recorded traces: prompt tokens estimated from the text (4 characters per token),
  FLOPs from the model's size, dollars from the catalog's prices where given.

Only non-solver requests (reviewers, verifiers, fusion prompts) cannot be replayed: they carry prompts
no recording answered, and fail as above. Replay tasks therefore run solver-only plans (mixtures, sample
counts, caps, majority vote, early stop), which is what the recordings can support.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Mapping
from pathlib import Path

from executors.answers import normalize_answer
from executors.backends import BackendError, CompletionRequest, CompletionResult, Generation, ModelBackend
from executors.budget import worst_case_cost
from executors.replay import CHARS_PER_TOKEN, answer_at_cap
from executors.replay_data import BenchmarkData, ModelRecords, bundled_data_dir, load_benchmark
from executors.tasks import Example, OutputParser, ParserKind, Scorer, ScorerKind, Stage, Task
from graphs.cost import Cost, ModelSpec, call_flops, sample_usd
from graphs.errors import UnknownModel

__all__ = ["REPLAY_STAGE", "ReplayBackend", "replay_task"]

REPLAY_STAGE = "answer"
"""The one stage of a replay task."""


def _prompt_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


class ReplayBackend(ModelBackend):
    """Answers completion requests with recorded samples of one benchmark (see the module docstring).

    Args:
        data: a loaded ``BenchmarkData``, or a replay directory (the bundled data by default).
        benchmark: which benchmark of the directory (needed when it holds several).
        latency_s: seconds each call waits before answering, to stand in for a slow model in tests of
            queues and crashes (0: answer at once).
    """

    def __init__(
        self,
        data: BenchmarkData | str | Path | None = None,
        benchmark: str | None = None,
        *,
        latency_s: float = 0.0,
        catalog: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        if not isinstance(data, BenchmarkData):
            data = load_benchmark(data or bundled_data_dir(), benchmark)
        self.data = data
        self.latency_s = float(latency_s)
        self.catalog: dict[str, ModelSpec] = dict(catalog) if catalog is not None else dict(data.specs)
        self._by_question = {problem.question.strip(): i for i, problem in enumerate(data.problems)}
        self.calls = 0
        """Requests answered (what a sample store in front saved shows up here as fewer calls)."""

    def __repr__(self) -> str:
        return f"ReplayBackend({self.data.directory}, benchmark={self.data.name!r})"

    def _problem(self, request: CompletionRequest) -> int:
        users = [m for m in request.messages if m.get("role") == "user"]
        text = str(users[-1].get("content", "")).strip() if users else ""
        index = self._by_question.get(text)
        if index is None:
            raise BackendError(
                f"replay data {self.data.name!r} has no recording for this prompt ({text[:60]!r}...): a replay backend "
                "answers only the benchmark's own problems, asked as-is (solver requests of its replay task)"
            )
        return index

    def _order(self, seed: int | None, model: str, index: int, size: int) -> list[int]:
        key = f"{seed}:{model}:{self.data.problems[index].id}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        order = list(range(size))
        rng.shuffle(order)
        return order

    def _records(self, model: str) -> ModelRecords:
        records = self.data.records.get(model)
        if records is None or model not in self.catalog:
            known = ", ".join(self.data.models)
            raise UnknownModel(f"unknown model {model!r}: replay data {self.data.name!r} recorded {known}")
        return records

    def estimate(self, request: CompletionRequest) -> Cost:
        """The worst case of ``request`` (for a ``BudgetMeter``): ``n`` traces as long as the longest this
        model recorded, or ``max_tokens`` if smaller. Prompt tokens are counted exactly as ``complete`` does."""
        records = self._records(request.model)
        prompt = _prompt_tokens(str(request.messages[-1].get("content", "")))
        longest = records.max_tokens if request.max_tokens is None else min(request.max_tokens, records.max_tokens)
        spec = self.catalog[request.model]
        return worst_case_cost(spec, prompt, request.n, longest, usd=sample_usd(spec, prompt, longest, request.n))

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        start = time.perf_counter()
        records = self._records(request.model)
        index = self._problem(request)
        if self.latency_s > 0:
            import asyncio

            await asyncio.sleep(self.latency_s)
        answers, tokens, probes = records.answers[index], records.tokens[index], records.probes[index]
        order = self._order(request.seed, request.model, index, len(answers))
        prompt = _prompt_tokens(str(request.messages[-1].get("content", "")))
        spec = self.catalog[request.model]
        generations = []
        flops, output = 0.0, 0
        for i in range(request.offset, request.offset + request.n):
            j = order[i % len(order)]
            answer, used = answer_at_cap(answers[j], tokens[j], probes[j], request.max_tokens, records.probe_every)
            text = "" if answer is None else answer
            usd = sample_usd(spec, prompt / request.n, used)
            generations.append(Generation(text, prompt, used, finish_reason="stop" if used == tokens[j] else "length", usd=usd))
            flops += call_flops(spec, prompt, used, 1) - call_flops(spec, prompt, 0, 1)
            output += used
        flops += call_flops(spec, prompt, 0, 1)  # the prompt is read once per call
        usd = sample_usd(spec, prompt, output / max(1, request.n), request.n)
        self.calls += 1
        latency = time.perf_counter() - start
        return CompletionResult(tuple(generations), Cost(float(flops), float(prompt), float(output), usd), latency)


def replay_task(data: BenchmarkData | str | Path | None = None, benchmark: str | None = None) -> Task:
    """The one-stage task a replay benchmark answers: prompt = the problem text, reference = its gold answer."""
    if not isinstance(data, BenchmarkData):
        data = load_benchmark(data or bundled_data_dir(), benchmark)
    longest = max(records.max_tokens for records in data.records.values())
    return Task(
        name=f"replay-{data.name}",
        description=f"recorded samples of {', '.join(data.models)} on {data.name} ({data.directory})",
        stages=(Stage(name=REPLAY_STAGE, prompt="{input[question]}", parser=OutputParser(kind=ParserKind.TEXT)),),
        scorer=Scorer(kind=ScorerKind.EXACT),
        max_tokens=max(1, longest),
        examples=tuple(
            Example(
                id=problem.id, inputs={"question": problem.question}, reference=normalize_answer(problem.gold) or problem.gold
            )
            for problem in data.problems
        ),
    )
