"""The plan executor: runs one task input through a plan's stages, node by node, through a model backend.

``PlanRunner(task, backend, catalog, meter=None)``; ``await runner.run(plan, example) -> RunResult``.

- **Stages** run in dependency order; independent stages run concurrently. A stage's prompt is its
  template rendered over the example's fields and the decided answers of its upstream stages. A stage
  whose upstream stage has no answer is skipped (its ``skipped`` says why).
- **Nodes** of a stage run as their DAG allows, independent nodes concurrently. A solver draws its ``n``
  samples in one request; a node with predecessors gets their outputs appended to the stage prompt
  (``executors.aggregators``: answers to consider, candidates to review, reviews to revise by,
  candidates to fuse). A reviewer's output is a critique, not an answer.
- **Decisions**: majority vote (with ``early_stop = k``: the stage's source solvers draw in batches of
  ``k``, round-robin, until ``k`` answers agree), best-of-n (the verifier scores each distinct candidate),
  fusion (the aggregator sink's answer). When a decision has nothing to decide on (a verifier or
  aggregator refused by the budget, or every answer unreadable), the stage falls back to a majority vote
  over every answer its nodes did produce.
- **Every call** goes through the backend (a ``CachedBackend`` serves stored samples) and, with a
  ``BudgetMeter``, through ``MeteredBackend``: a call that could pass the budget is never made. The run
  then finishes with what it has: the answer stage's best answer (or that of the latest finished stage
  marked ``fallback`` in the task), and ``stopped_at_budget=True``.
- **Failures that are results**: output the parser cannot read and prompts too long for the model are
  recorded as failed samples (``RunResult.failed``). Other backend errors (server down, timeouts,
  missing keys) propagate: they are not properties of the plan.

``estimate_cost(plan, example)`` is the run's worst case before it starts: every node draws its full ``n``
at its ``max_tokens`` (the node's, else the stage's, else the task's), prompts as long as the templates
plus every generation pasted into them can make them (``CHARS_PER_OUTPUT_TOKEN`` characters per
generated token), counted the way ``BudgetMeter`` reserves them.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import networkx as nx

from executors.aggregators import (
    ANSWER_ROLES,
    Sample,
    agreement,
    best_of_n,
    context_messages,
    fusion_messages,
    parse_score,
    reviewer_messages,
    reviser_messages,
    sample_until_agreement,
    solver_messages,
    verifier_messages,
    vote,
)
from executors.backends import BudgetExhausted, CompletionRequest, CompletionResult, ContextTooLong, ModelBackend
from executors.budget import PROMPT_MARGIN, BudgetMeter, MeteredBackend, estimate_prompt_tokens, worst_case_cost
from executors.tasks import Example, Task
from graphs.cost import Cost, ModelSpec
from graphs.errors import InvalidPlan, UnknownModel
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph

__all__ = ["CHARS_PER_OUTPUT_TOKEN", "PlanRunner", "RunResult", "StageResult", "gather_or_cancel"]

T = TypeVar("T")

CHARS_PER_OUTPUT_TOKEN = 4
"""Characters per generated token assumed when a generation is pasted into a later prompt."""


@dataclass(frozen=True)
class StageResult:
    """What one stage did: its prompt, every sample of every node, the decided answer."""

    stage: str
    prompt: str
    answer: str | None
    samples: tuple[Sample, ...] = ()
    decision: DecisionRule = DecisionRule.MAJORITY_VOTE
    stopped_early: bool = False
    """Majority vote with early stop: the stage stopped before drawing every sample."""
    skipped: str | None = None
    """Why the stage did not run (an upstream stage had no answer)."""
    score: float | None = None
    """The stage's own scorer, where the task gives one and the example has a reference."""
    cost: Cost = field(default_factory=Cost)
    latency_s: float = 0.0

    @property
    def candidates(self) -> tuple[Sample, ...]:
        """Samples of answer-bearing roles (solvers, revisers, aggregators), failed ones included."""
        return tuple(s for s in self.samples if s.role in ANSWER_ROLES)

    @property
    def answers(self) -> tuple[str | None, ...]:
        """The parsed answer of every candidate (``None``: unreadable)."""
        return tuple(s.answer for s in self.candidates)

    @property
    def texts(self) -> tuple[str, ...]:
        """The raw text of every sample of the stage."""
        return tuple(s.text for s in self.samples)

    @property
    def failed(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if s.failed)


@dataclass(frozen=True)
class RunResult:
    """One task input run through one plan."""

    example_id: str
    answer: str | None
    stages: Mapping[str, StageResult]
    node_costs: Mapping[str, Cost]
    """Per node, keyed ``"stage/node"``: what its calls cost (stored samples counted as if generated)."""
    cost: Cost
    """The run's cost, whether its samples were generated now or served by a sample store."""
    paid: Cost
    """What the run's calls generated now (less than ``cost`` where a sample store served samples)."""
    latency_s: float
    score: float | None = None
    """The task scorer's result, when the example has a reference."""
    stopped_at_budget: bool = False
    """A call was refused by the budget; ``answer`` is the best the run had by then."""
    answered_by: str | None = None
    """The stage whose answer is ``answer`` (the task's answer stage, or a fallback stage)."""
    llm_calls: int = 0
    reused_samples: int = 0

    @property
    def failed(self) -> tuple[Sample, ...]:
        """Every failed sample: unreadable output, prompts too long for the model."""
        return tuple(s for stage in self.stages.values() for s in stage.failed)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary (what a job stores as its result)."""
        return {
            "example_id": self.example_id,
            "answer": self.answer,
            "answered_by": self.answered_by,
            "score": self.score,
            "stopped_at_budget": self.stopped_at_budget,
            "cost": self.cost.as_dict(),
            "paid": self.paid.as_dict(),
            "latency_s": self.latency_s,
            "llm_calls": self.llm_calls,
            "reused_samples": self.reused_samples,
            "failed_samples": len(self.failed),
            "stages": {
                name: {
                    "answer": stage.answer,
                    "score": stage.score,
                    "skipped": stage.skipped,
                    "stopped_early": stage.stopped_early,
                    "samples": len(stage.samples),
                    "failed": len(stage.failed),
                }
                for name, stage in self.stages.items()
            },
        }


class _Accounts:
    """Mutable tallies of one run, shared by its concurrent stages and nodes (one event loop)."""

    def __init__(self) -> None:
        self.node_costs: dict[str, Cost] = {}
        self.cost = Cost()
        self.paid = Cost()
        self.calls = 0
        self.reused = 0
        self.refused = 0

    def add(self, key: str, result: CompletionResult) -> None:
        self.node_costs[key] = self.node_costs.get(key, Cost()) + result.cost
        self.cost = self.cost + result.cost
        self.paid = self.paid + result.paid
        self.calls += 1
        self.reused += result.reused


class PlanRunner:
    """Runs plans of ``task`` through ``backend``. See the module docstring.

    Args:
        task: the task (stages, prompts, parsers, scorers).
        backend: any ``ModelBackend``; a ``CachedBackend`` reuses stored samples.
        catalog: model name -> ``ModelSpec``: which models exist, and their sizes for ``estimate_cost``.
        meter: a ``BudgetMeter`` for every run of this runner (one job); ``run(meter=...)`` overrides it.
    """

    def __init__(
        self,
        task: Task,
        backend: ModelBackend,
        catalog: Mapping[str, ModelSpec],
        meter: BudgetMeter | None = None,
    ) -> None:
        self.task = task
        self.backend = backend
        self.catalog = dict(catalog)
        self.meter = meter

    # -- checks and estimates --------------------------------------------------------------------------

    def check(self, plan: Plan) -> None:
        """``InvalidPlan`` unless the plan has exactly the task's stages; ``UnknownModel`` for a model the
        catalog lacks."""
        want, have = set(self.task.order), {stage.stage for stage in plan.stages}
        if want != have:
            raise InvalidPlan(
                f"task {self.task.name} has stages {', '.join(self.task.order)}; the plan has {', '.join(sorted(have))}"
            )
        for model in plan.models:
            if model not in self.catalog:
                known = ", ".join(sorted(self.catalog)) or "none"
                raise UnknownModel(f"unknown model {model!r} for task {self.task.name}: the catalog has {known}")
        if self.task.scorer.model is not None and self.task.scorer.model not in self.catalog:
            raise UnknownModel(f"the judge model {self.task.scorer.model!r} of task {self.task.name} is not in the catalog")

    def max_tokens(self, stage: str, node: Node) -> int:
        """The cap every request of ``node`` is made with: the node's, else the stage's, else the task's."""
        return node.max_tokens or self.task.stage_max_tokens(stage)

    def estimate_cost(self, plan: Plan, example: Example) -> Cost:
        """The most a run of ``plan`` on ``example`` can cost (see the module docstring)."""
        self.check(plan)
        total = Cost()
        answer_tokens: dict[str, int] = {}
        for name in self.task.order:
            graph, spec = plan.stage(name), self.task.stage(name)
            pasted = sum(count * answer_tokens[up] * CHARS_PER_OUTPUT_TOKEN for up, count in spec.template.stage_uses().items())
            prompt = "x" * (spec.template.literal_chars + spec.template.field_chars(example.inputs) + pasted)
            dag = graph.to_networkx()
            early = self._early_nodes(graph)
            batch = graph.early_stop or 1
            for node in graph.nodes:
                if node.role is Role.VERIFIER:
                    continue
                inputs = [graph.node(u) for u in dag.predecessors(node.id)]
                answers = self._stand_ins(name, [u for u in inputs if u.role in ANSWER_ROLES])
                reviews = self._stand_ins(name, [u for u in inputs if u.role is Role.REVIEWER])
                messages = self._messages(node, prompt, spec.system, answers, reviews)
                calls = math.ceil(node.n / batch) if node.id in early else 1
                total = total + self._worst(node, name, messages, node.n, calls)
            verifier = next((node for node in graph.nodes if node.role is Role.VERIFIER), None)
            if verifier is not None:
                candidates = [node for node in graph.answer_nodes if node.role in ANSWER_ROLES]
                longest = max((self.max_tokens(name, node) for node in candidates), default=0)
                messages = verifier_messages(prompt, spec.system, "x" * (longest * CHARS_PER_OUTPUT_TOKEN))
                total = total + self._worst(verifier, name, messages, verifier.n, sum(node.n for node in candidates))
            answer_tokens[name] = max(
                (self.max_tokens(name, node) for node in graph.nodes if node.role in ANSWER_ROLES), default=0
            )
        return total

    def _stand_ins(self, stage: str, nodes: Sequence[Node]) -> list[str]:
        """Worst-case stand-ins for what ``nodes`` send along their edges: one text per sample, as long as
        the node's ``max_tokens`` can make it."""
        return ["x" * (self.max_tokens(stage, node) * CHARS_PER_OUTPUT_TOKEN) for node in nodes for _ in range(node.n)]

    def _worst(self, node: Node, stage: str, messages: Sequence[Mapping[str, str]], n: int, calls: int) -> Cost:
        """``calls`` requests of ``messages`` sharing ``n`` samples, each as ``BudgetMeter`` would hold it."""
        if calls <= 0 or n <= 0:
            return Cost()
        scale, extra = PROMPT_MARGIN
        request = CompletionRequest(model=node.model, messages=tuple(messages), n=1, max_tokens=self.max_tokens(stage, node))
        prompt = estimate_prompt_tokens(request) * scale + extra
        spec = self.catalog[node.model]
        per_call = math.ceil(n / calls)
        full, rest = divmod(n, per_call)
        total = worst_case_cost(spec, prompt, per_call, request.max_tokens).scaled(full)
        if rest:
            total = total + worst_case_cost(spec, prompt, rest, request.max_tokens)
        return total

    # -- running ---------------------------------------------------------------------------------------

    async def run(self, plan: Plan, example: Example, *, meter: BudgetMeter | None = None) -> RunResult:
        """Run ``plan`` on ``example``; see the module docstring for what happens and what is recorded."""
        self.check(plan)
        meter = meter if meter is not None else self.meter
        backend = MeteredBackend(self.backend, meter, catalog=self.catalog) if meter is not None else self.backend
        accounts = _Accounts()
        start = time.perf_counter()
        futures: dict[str, asyncio.Future[StageResult]] = {}

        async def stage_task(name: str) -> StageResult:
            upstream = {dep: await futures[dep] for dep in self.task.stage(name).depends_on}
            missing = [dep for dep, result in upstream.items() if result.answer is None]
            graph = plan.stage(name)
            if missing:
                reason = f"upstream stage {missing[0]!r} has no answer"
                return StageResult(name, "", None, decision=graph.decision, skipped=reason)
            prompt = self.task.render(name, example, {dep: result.answer for dep, result in upstream.items()})
            return await self._run_stage(graph, prompt, backend, accounts, example)

        for name in self.task.order:
            futures[name] = asyncio.ensure_future(stage_task(name))
        await gather_or_cancel(list(futures.values()))
        stages = {name: futures[name].result() for name in self.task.order}
        answer, answered_by = self.final_answer(stages)
        score = await self.task.scorer.score(answer, example, judge=self._judge)
        return RunResult(
            example_id=example.id,
            answer=answer,
            stages=stages,
            node_costs=dict(accounts.node_costs),
            cost=accounts.cost,
            paid=accounts.paid,
            latency_s=time.perf_counter() - start,
            score=score,
            stopped_at_budget=accounts.refused > 0,
            answered_by=answered_by,
            llm_calls=accounts.calls,
            reused_samples=accounts.reused,
        )

    def final_answer(self, stages: Mapping[str, StageResult]) -> tuple[str | None, str | None]:
        """The run's answer and the stage it came from: the task's answer stage, else the latest fallback stage upstream
        of it that has an answer (a run stopped at its budget before the last stage decided)."""
        final = self.task.final_stage
        if stages[final].answer is not None:
            return stages[final].answer, final
        for name in reversed(self.task.order):  # the latest finished fallback stage upstream of the answer
            usable = self.task.stage(name).fallback and stages[name].answer is not None
            if usable and nx.has_path(self.task.graph, name, final):
                return stages[name].answer, name
        return None, None

    async def _run_stage(
        self, graph: StageGraph, prompt: str, backend: ModelBackend, accounts: _Accounts, example: Example
    ) -> StageResult:
        start = time.perf_counter()
        name = graph.stage
        spec = self.task.stage(name)
        dag = graph.to_networkx()
        early = self._early_nodes(graph)
        outputs: dict[str, asyncio.Future[list[Sample]]] = {}

        async def node_task(node: Node) -> list[Sample]:
            inputs = [(graph.node(u), await outputs[u]) for u in dag.predecessors(node.id) if u in outputs]
            answers = [s.text for pred, samples in inputs if pred.role in ANSWER_ROLES for s in samples if not s.failed]
            reviews = [s.text for pred, samples in inputs if pred.role is Role.REVIEWER for s in samples if not s.failed]
            if inputs and not answers and not reviews and node.role in (Role.REVIEWER, Role.AGGREGATOR):
                return []  # nothing reached it (failed or refused upstream): nothing to review or fuse
            messages = self._messages(node, prompt, spec.system, answers, reviews)
            return await self._draw(name, node, messages, 0, node.n, backend, accounts)

        topological = (graph.node(node_id) for node_id in nx.lexicographical_topological_sort(dag))
        order = [node for node in topological if node.role is not Role.VERIFIER and node.id not in early]
        for node in order:
            outputs[node.id] = asyncio.ensure_future(node_task(node))
        await gather_or_cancel(list(outputs.values()))
        samples = [s for node in order for s in outputs[node.id].result()]
        answer_ids = {node.id for node in graph.answer_nodes}
        candidates = [s for s in samples if s.node in answer_ids and s.role in ANSWER_ROLES]
        stopped_early = False
        if early:
            streams = []
            for node in graph.nodes:
                if node.id in early:
                    messages = solver_messages(prompt, spec.system)
                    draw = functools.partial(self._draw, name, node, messages, backend=backend, accounts=accounts)
                    streams.append((node.n, draw))
            k = graph.early_stop or 1
            drawn, stopped_early = await sample_until_agreement(streams, k, batch=k, prior=candidates)
            samples.extend(drawn)
            candidates.extend(drawn)
        winner: Sample | None
        if graph.decision is DecisionRule.BEST_OF_N:
            verifier = next(node for node in graph.nodes if node.role is Role.VERIFIER)

            async def score(candidate: Sample) -> list[Sample]:
                messages = verifier_messages(prompt, spec.system, candidate.text)
                return await self._draw(name, verifier, messages, 0, verifier.n, backend, accounts)

            winner, verdicts = await best_of_n(candidates, score)
            samples.extend(verdicts)
        elif graph.early_stop is not None:
            winner = agreement(candidates, graph.early_stop) or vote(candidates)
        else:
            winner = vote(candidates)
        if winner is None:  # nothing to decide on: the best answer the stage has
            winner = vote([s for s in samples if s.role in ANSWER_ROLES])
        answer = winner.answer if winner is not None else None
        stage_score = None
        if spec.scorer is not None:
            reference = example.inputs.get(spec.reference) if spec.reference else example.reference
            if reference is not None:
                target = Example(id=example.id, inputs=example.inputs, reference=_reference(reference))
                stage_score = await spec.scorer.score(answer, target, judge=self._judge)
        cost = sum((c for key, c in accounts.node_costs.items() if key.startswith(f"{name}/")), Cost())
        return StageResult(
            stage=name,
            prompt=prompt,
            answer=answer,
            samples=tuple(samples),
            decision=graph.decision,
            stopped_early=stopped_early,
            score=stage_score,
            cost=cost,
            latency_s=time.perf_counter() - start,
        )

    @staticmethod
    def _early_nodes(graph: StageGraph) -> set[str]:
        """With early stop, the answer nodes that draw in batches: solvers without predecessors."""
        if graph.early_stop is None:
            return set()
        targets = {dst for _, dst in graph.edges}
        return {node.id for node in graph.answer_nodes if node.role is Role.SOLVER and node.id not in targets}

    @staticmethod
    def _messages(
        node: Node, prompt: str, system: str | None, answers: Sequence[str], reviews: Sequence[str]
    ) -> list[dict[str, str]]:
        if node.role is Role.REVIEWER and (answers or reviews):
            return reviewer_messages(prompt, system, [*answers, *reviews])
        if node.role is Role.REVISER:
            return reviser_messages(prompt, system, answers, reviews)
        if node.role is Role.AGGREGATOR and answers:
            return fusion_messages(prompt, system, answers, reviews)
        return context_messages(prompt, system, [*answers, *reviews])

    async def _draw(
        self,
        stage: str,
        node: Node,
        messages: Sequence[Mapping[str, str]],
        offset: int,
        count: int,
        backend: ModelBackend,
        accounts: _Accounts,
    ) -> list[Sample]:
        """Samples ``offset .. offset + count - 1`` of ``node`` on ``messages``, parsed for its role."""
        request = CompletionRequest(
            model=node.model,
            messages=tuple(messages),
            n=count,
            temperature=node.temperature,
            max_tokens=self.max_tokens(stage, node),
            stop=self.task.stage(stage).stop,
            offset=offset,
        )
        try:
            result = await backend.complete(request)
        except BudgetExhausted:
            accounts.refused += 1
            return []
        except ContextTooLong as exc:
            return [Sample(stage, node.id, node.role, node.model, offset + i, "", error=str(exc)) for i in range(count)]
        accounts.add(f"{stage}/{node.id}", result)
        parser = self.task.stage(stage).parser
        samples = []
        for i, generation in enumerate(result.generations):
            text = generation.text
            answer = score = error = None
            if node.role in ANSWER_ROLES:
                answer = parser.parse(text)
                if answer is None:
                    error = f"output unreadable by the {parser.kind} parser"
            elif node.role is Role.VERIFIER:
                score = parse_score(text)
                if score is None:
                    error = "verifier reply holds no score from 0 to 10"
            samples.append(
                Sample(
                    stage,
                    node.id,
                    node.role,
                    node.model,
                    offset + i,
                    text,
                    answer=answer,
                    prompt_tokens=generation.prompt_tokens,
                    output_tokens=generation.output_tokens,
                    error=error,
                    score=score,
                )
            )
        return samples

    async def _judge(self, model: str, prompt: str) -> str:
        """An LLM-judge scorer's call: greedy, not metered (scoring is not part of the plan's cost)."""
        scorer = self.task.scorer
        request = CompletionRequest(
            model=model, messages=({"role": "user", "content": prompt},), n=1, temperature=0.0, max_tokens=scorer.max_tokens
        )
        result = await self.backend.complete(request)
        return result.generations[0].text if result.generations else ""


async def gather_or_cancel(futures: Sequence[asyncio.Future[T]]) -> list[T]:
    """``asyncio.gather``, but when one fails the others are cancelled (and awaited) before it raises."""
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        for future in futures:
            future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
        raise


def _reference(value: Any) -> str | tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return str(value)
