"""Replay environment: score plans on recorded samples with zero LLM calls.

A plan's stage is a set of solver nodes (model, ``n`` samples, optional thinking cap ``max_tokens``) and a
majority vote, optionally stopping early once ``early_stop`` answers agree. For every problem, each model's
recorded traces are put in ``orderings`` seeded random orders (common to every plan, so plans are compared
on the same draws); a node takes the next ``n`` traces of its model. A trace cut by a cap at ``c`` tokens
answers what it said at its last probe before ``c`` (``probes[c // probe_every - 1]``) and costs ``c``
decode tokens. Votes ignore unusable answers; ties break by a seeded random priority per answer.

Scoring is vectorised over orderings and problems with numpy and cached per (model, cap, n), which is
what makes exhaustive enumeration of a plan space cheap. ``executors.replay_reference`` is the same
semantics as a plain loop, used to check this one.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np

from executors.answers import normalize_answer
from executors.environment import Environment, EnvironmentInfo, Evaluation
from executors.replay_data import BenchmarkData, bundled_data_dir, load_benchmark
from graphs.cost import Cost, ModelSpec, decode_flops, prefill_flops, sample_usd
from graphs.errors import InvalidPlan, UnknownModel
from graphs.plan import DecisionRule, Node, Plan, Role

__all__ = ["ReplayEnvironment", "tie_priority"]

STAGE = "answer"
DEFAULT_BENCHMARK = "aime24"  # of the bundled data
PROMPT_OVERHEAD_TOKENS = 32  # chat template and instruction around the question
CHARS_PER_TOKEN = 4.0


def tie_priority(seed: int, ordering: int, problem_id: str, answer: str) -> float:
    """A seeded priority in [0, 0.5) that breaks vote ties without favouring any answer."""
    key = f"{seed}:{ordering}:{problem_id}:{answer}".encode()
    return (zlib.crc32(key) / 2**32) * 0.5


def answer_at_cap(answer: str, tokens: int, probes: Sequence[str], cap: int | None, probe_every: int) -> tuple[str | None, int]:
    """What a trace answers, and the decode tokens it costs, when cut at ``cap`` tokens."""
    if cap is None or tokens <= cap:
        return normalize_answer(answer), tokens
    k = cap // probe_every if probe_every else 0
    probe = probes[k - 1] if 0 < k <= len(probes) else None
    return normalize_answer(probe), cap


@dataclass
class _CodeSpace:
    """Answers coded as small ints per problem, over the union of the caps a plan uses."""

    size: int
    codes: list[dict[str, int]]
    gold: np.ndarray  # [P] code of the gold answer, -1 when never produced
    priority: np.ndarray  # [R, P, K] tie-break priority


@dataclass
class _View:
    """One model's traces at one cap, in the environment's orderings: arrays [R, P, S]."""

    answers: list[list[str | None]]  # [P][S] in recorded order
    order: np.ndarray  # [R, P, S] recorded index of the j-th drawn trace
    cum_decode_flops: np.ndarray  # [R, P, S + 1]
    cum_output_tokens: np.ndarray  # [R, P, S + 1]
    mean_cum_flops: np.ndarray = field(init=False)  # [S + 1] mean over orderings and problems
    mean_cum_tokens: np.ndarray = field(init=False)
    codes: dict[frozenset, np.ndarray] = field(default_factory=dict)  # space -> [R, P, S]
    counts: dict[tuple[frozenset, int], np.ndarray] = field(default_factory=dict)  # -> [R, P, K]
    correct: dict[tuple[frozenset, int], np.ndarray] = field(default_factory=dict)  # -> [R, P] bool
    agree: dict[tuple[frozenset, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    sample_flops: float = field(init=False)
    """Mean decode FLOPs of one sample: what ``estimate_cost`` prices a node with, on every budget check."""
    sample_tokens: float = field(init=False)

    def __post_init__(self) -> None:
        self.mean_cum_flops = self.cum_decode_flops.mean(axis=(0, 1))
        self.mean_cum_tokens = self.cum_output_tokens.mean(axis=(0, 1))
        self.sample_flops = float(self.cum_decode_flops[:, :, -1].mean()) / self.order.shape[2]
        self.sample_tokens = float(self.cum_output_tokens[:, :, -1].mean()) / self.order.shape[2]


class ReplayEnvironment(Environment):
    """Scores single-stage plans on one benchmark of a replay directory."""

    kind = "replay"
    votes_over_prefixes = True

    def __init__(
        self,
        data: str | Path | None = None,
        benchmark: str | None = None,
        *,
        orderings: int = 8,
        seed: int = 0,
        caps: Sequence[int] | None = None,
        catalog: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        """``catalog`` overrides the data's model sizes and adds prices, routes and limits."""
        if orderings < 1:
            raise ValueError("orderings must be >= 1")
        self._directory = Path(data) if data is not None else bundled_data_dir()
        self._bundled = data is None
        if data is None and benchmark is None:
            benchmark = DEFAULT_BENCHMARK
        self.data: BenchmarkData = load_benchmark(self._directory, benchmark)
        self._catalog = {m: spec for m, spec in (catalog or {}).items() if m in self.data.records}
        self.data.specs.update(self._catalog)
        self.orderings = orderings
        self.seed = seed
        self._problem_ids = [p.id for p in self.data.problems]
        self._prompt_tokens = np.array(
            [math.ceil(len(p.question) / CHARS_PER_TOKEN) + PROMPT_OVERHEAD_TOKENS for p in self.data.problems],
            dtype=np.float64,
        )
        self._mean_prompt_tokens = float(self._prompt_tokens.mean())
        self._golds = [normalize_answer(p.gold) for p in self.data.problems]
        self._caps = tuple(caps) if caps is not None else self._default_caps()
        self._orders: dict[str, np.ndarray] = {}
        self._views: dict[tuple[str, int | None], _View] = {}
        self._spaces: dict[frozenset, _CodeSpace] = {}
        self._prefill: dict[str, float] = {}
        self._info = EnvironmentInfo(
            name=self.data.name,
            stages=(STAGE,),
            models=dict(self.data.specs),
            stage_models={STAGE: self.data.models},
            max_samples={m: rec.min_samples for m, rec in self.data.records.items()},
            caps=(None, *self._caps),
            decisions=(DecisionRule.MAJORITY_VOTE,),
            roles=(Role.SOLVER,),
            early_stop=True,
            n_examples=len(self.data.problems),
        )

    # -- Environment -------------------------------------------------------------------------------

    @property
    def info(self) -> EnvironmentInfo:
        return self._info

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "data": None if self._bundled else str(self._directory.resolve()),
            "benchmark": self.data.name,
            "orderings": self.orderings,
            "seed": self.seed,
            "caps": list(self._caps),
            "catalog": {m: spec.model_dump(mode="json") for m, spec in self._catalog.items()},
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ReplayEnvironment:
        return cls(
            spec.get("data"),
            spec.get("benchmark"),
            orderings=int(spec.get("orderings", 8)),
            seed=int(spec.get("seed", 0)),
            caps=spec.get("caps"),
            catalog={m: ModelSpec(**fields) for m, fields in (spec.get("catalog") or {}).items()},
        )

    def check(self, plan: Plan) -> None:
        if len(plan.stages) != 1 or plan.stages[0].stage != STAGE:
            names = [s.stage for s in plan.stages]
            raise InvalidPlan(f"replay benchmark {self.data.name} has one stage {STAGE!r}; the plan has {names}")
        stage = plan.stages[0]
        if stage.decision is not DecisionRule.MAJORITY_VOTE or stage.edges:
            raise InvalidPlan(
                f"replay data holds independent samples only: use solver nodes and majority_vote, not {stage.decision}"
                + (" with edges" if stage.edges else "")
            )
        drawn: dict[str, int] = {}
        for node in stage.nodes:
            if node.role is not Role.SOLVER:
                raise InvalidPlan(f"replay data has no recordings for role {node.role} (node {node.id})")
            if node.model not in self.data.records:
                known = ", ".join(self.data.models)
                raise UnknownModel(
                    f"unknown model {node.model!r} for replay benchmark {self.data.name}: known models are {known}"
                )
            if node.max_tokens is not None and self.data.probe_every == 0:
                raise InvalidPlan(f"benchmark {self.data.name} has no probes: thinking caps (max_tokens) are not available")
            if node.max_tokens is not None and node.max_tokens < self.data.probe_every:
                raise InvalidPlan(f"thinking cap {node.max_tokens} is below the probe interval {self.data.probe_every}")
            drawn[node.model] = drawn.get(node.model, 0) + node.n
        for model, n in drawn.items():
            have = self._info.max_samples[model]
            if n > have:
                raise InvalidPlan(f"plan draws {n} samples of {model} but {self.data.name} recorded {have} per problem")

    def estimate_cost(self, plan: Plan) -> Cost:
        self.check(plan)
        total = Cost()
        for node in plan.stages[0].nodes:
            view = self._view(node.model, node.max_tokens)
            total = total + self._node_cost(node, node.n * view.sample_flops, node.n * view.sample_tokens)
        return total

    def evaluate(self, plan: Plan) -> Evaluation:
        self.check(plan)
        stage = plan.stages[0]
        nodes = stage.nodes
        caps = frozenset(node.max_tokens for node in nodes)
        space = self._space(caps)
        offsets = self._offsets(nodes)
        drawn: list[np.ndarray] | None = None
        if len(nodes) == 1 and offsets[0] == 0:
            correct = self._single_correct(nodes[0], caps, space, nodes[0].n)
            if stage.early_stop is not None:
                correct, drawn = self._single_early_stop(nodes[0], caps, space, stage.early_stop, correct)
        elif stage.early_stop is None:
            counts = None
            for node, off in zip(nodes, offsets, strict=True):
                part = self._counts(node, caps, space, off + node.n)
                if off:
                    part = part - self._counts(node, caps, space, off)
                counts = part if counts is None else counts + part
            correct = self._vote(counts, space)
        else:
            correct, drawn = self._early_stop(nodes, offsets, caps, space, stage.early_stop)
        cost = Cost()
        for i, (node, off) in enumerate(zip(nodes, offsets, strict=True)):
            view = self._view(node.model, node.max_tokens)
            if drawn is None:
                flops = view.mean_cum_flops[off + node.n] - view.mean_cum_flops[off]
                tokens = view.mean_cum_tokens[off + node.n] - view.mean_cum_tokens[off]
            else:
                flops = _mean_at(view.cum_decode_flops, off + drawn[i]) - view.mean_cum_flops[off]
                tokens = _mean_at(view.cum_output_tokens, off + drawn[i]) - view.mean_cum_tokens[off]
            cost = cost + self._node_cost(node, float(flops), float(tokens))
        per_ordering = correct.mean(axis=1)
        return Evaluation(
            score=float(per_ordering.mean()),
            spread=float(per_ordering.std()),
            cost=cost,
            scores=tuple(per_ordering.tolist()),
            n_examples=len(self._problem_ids),
            llm_calls=0,
            per_example=tuple(correct.mean(axis=0).tolist()),
        )

    def search_cost(self, plans: Sequence[Plan]) -> tuple[Cost, Cost]:
        """Per example, with reuse: each model's j-th sample is generated once, as far as the largest cap
        any plan read it to (a cut trace is the prefix of a longer one), and each model's prompt is read
        once. Early stop is counted at its full sample count (an upper bound, as in ``estimate_cost``)."""
        without = Cost()
        reach: dict[str, dict[int, float]] = {}  # model -> sample index -> furthest cap (inf: uncapped)
        for plan in plans:
            without = without + self.estimate_cost(plan)
            for node, off in zip(plan.stages[0].nodes, self._offsets(plan.stages[0].nodes), strict=True):
                cap = math.inf if node.max_tokens is None else float(node.max_tokens)
                slots = reach.setdefault(node.model, {})
                for j in range(off, off + node.n):
                    slots[j] = max(slots.get(j, 0.0), cap)
        with_reuse = Cost()
        for model, slots in reach.items():
            flops = tokens = 0.0
            for cap in slots.values():
                view = self._view(model, None if cap == math.inf else int(cap))
                flops += view.mean_cum_flops[-1] / view.order.shape[2]
                tokens += view.mean_cum_tokens[-1] / view.order.shape[2]
            node = Node(id="reuse", model=model, n=len(slots))
            with_reuse = with_reuse + self._node_cost(node, flops, tokens)
        return with_reuse, without

    # -- internals ---------------------------------------------------------------------------------

    def _default_caps(self) -> tuple[int, ...]:
        every = self.data.probe_every
        if not every:
            return ()
        longest = max(rec.max_tokens for rec in self.data.records.values())
        caps, cap = [], every * 2
        while cap < longest:
            caps.append(cap)
            cap *= 2
        return tuple(caps)

    def _node_cost(self, node: Node, decode: float, output_tokens: float) -> Cost:
        spec: ModelSpec = self.data.specs[node.model]
        if node.model not in self._prefill:
            self._prefill[node.model] = float(np.mean([prefill_flops(spec, p) for p in self._prompt_tokens]))
        prompt = self._mean_prompt_tokens
        usd = sample_usd(spec, prompt, output_tokens / max(node.n, 1), node.n)
        return Cost(self._prefill[node.model] + decode, prompt, output_tokens, usd)

    @staticmethod
    def _offsets(nodes: Sequence[Node]) -> list[int]:
        """Nodes of the same model draw consecutive, disjoint traces."""
        used: dict[str, int] = {}
        offsets = []
        for node in nodes:
            offsets.append(used.get(node.model, 0))
            used[node.model] = offsets[-1] + node.n
        return offsets

    def ordering(self, model: str) -> np.ndarray:
        """[R, P, S] recorded trace index drawn j-th, per ordering and problem (same for every cap)."""
        if model not in self._orders:
            rec = self.data.records[model]
            keep = rec.min_samples
            rng = np.random.default_rng([self.seed, zlib.crc32(self.data.name.encode()), zlib.crc32(model.encode())])
            order = np.empty((self.orderings, len(rec.answers), keep), dtype=np.int64)
            for r in range(self.orderings):
                for p, row in enumerate(rec.answers):
                    order[r, p] = rng.permutation(len(row))[:keep]
            self._orders[model] = order
        return self._orders[model]

    def _view(self, model: str, cap: int | None) -> _View:
        key = (model, cap)
        if key not in self._views:
            rec = self.data.records[model]
            spec = self.data.specs[model]
            order = self.ordering(model)
            answers, tokens = [], []
            for p, row in enumerate(rec.answers):
                cut = [
                    answer_at_cap(a, t, pr, cap, rec.probe_every)
                    for a, t, pr in zip(row, rec.tokens[p], rec.probes[p], strict=True)
                ]
                answers.append([a for a, _ in cut])
                tokens.append(np.array([t for _, t in cut], dtype=np.float64))
            drawn_tokens = np.stack(
                [np.stack([tokens[p][order[r, p]] for p in range(len(tokens))]) for r in range(order.shape[0])]
            )
            prompt = self._prompt_tokens[None, :, None]
            flops = decode_flops(spec, prompt, drawn_tokens)
            zeros = np.zeros((*drawn_tokens.shape[:2], 1))
            self._views[key] = _View(
                answers=answers,
                order=order,
                cum_decode_flops=np.concatenate([zeros, np.cumsum(flops, axis=2)], axis=2),
                cum_output_tokens=np.concatenate([zeros, np.cumsum(drawn_tokens, axis=2)], axis=2),
            )
        return self._views[key]

    def _space(self, caps: frozenset) -> _CodeSpace:
        if caps not in self._spaces:
            codes: list[dict[str, int]] = [{} for _ in self._problem_ids]
            for model in self.data.records:
                for cap in sorted(caps, key=lambda c: -1 if c is None else c):
                    for p, row in enumerate(self._view(model, cap).answers):
                        table = codes[p]
                        for answer in row:
                            if answer is not None and answer not in table:
                                table[answer] = len(table)
            size = max(1, max(len(t) for t in codes))
            priority = np.zeros((self.orderings, len(codes), size), dtype=np.float64)
            for p, table in enumerate(codes):
                for answer, code in table.items():
                    for r in range(self.orderings):
                        priority[r, p, code] = tie_priority(self.seed, r, self._problem_ids[p], answer)
            gold = np.array([t.get(g, -1) if g is not None else -1 for t, g in zip(codes, self._golds, strict=True)])
            self._spaces[caps] = _CodeSpace(size, codes, gold, priority)
        return self._spaces[caps]

    def _codes(self, node: Node, space: _CodeSpace, caps: frozenset) -> np.ndarray:
        view = self._view(node.model, node.max_tokens)
        if caps not in view.codes:
            table = np.full((len(view.answers), max(len(r) for r in view.answers)), -1, dtype=np.int64)
            for p, row in enumerate(view.answers):
                for s, answer in enumerate(row):
                    if answer is not None:
                        table[p, s] = space.codes[p][answer]
            p_index = np.arange(table.shape[0])[None, :, None]
            view.codes[caps] = table[p_index, view.order]
        return view.codes[caps]

    def _counts(self, node: Node, caps: frozenset, space: _CodeSpace, n: int) -> np.ndarray:
        """[R, P, K] votes per answer among the first ``n`` traces of the node's view."""
        view = self._view(node.model, node.max_tokens)
        key = (caps, n)
        if key not in view.counts:
            codes = self._codes(node, space, caps)[:, :, :n]
            rows, problems = codes.shape[0], codes.shape[1]
            index = (np.arange(rows * problems).reshape(rows, problems, 1) * space.size + codes)[codes >= 0]
            flat = np.bincount(index, minlength=rows * problems * space.size)
            view.counts[key] = flat.reshape(rows, problems, space.size).astype(np.int32)
        return view.counts[key]

    def _single_correct(self, node: Node, caps: frozenset, space: _CodeSpace, n: int) -> np.ndarray:
        view = self._view(node.model, node.max_tokens)
        key = (caps, n)
        if key not in view.correct:
            view.correct[key] = self._vote(self._counts(node, caps, space, n), space)
        return view.correct[key]

    def _single_early_stop(
        self, node: Node, caps: frozenset, space: _CodeSpace, agree: int, voted: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One node drawing in order: the first time ``agree`` answers agree is cached per view."""
        view = self._view(node.model, node.max_tokens)
        key = (caps, agree)
        if key not in view.agree:
            codes = self._codes(node, space, caps)
            rows, problems, steps = codes.shape
            stop, winner = first_agreement(codes.reshape(rows * problems, steps), space.size, agree)
            view.agree[key] = (stop.reshape(rows, problems), winner.reshape(rows, problems))
        stop, winner = view.agree[key]
        stopped = stop <= node.n
        correct = np.where(stopped, winner == space.gold[None, :], voted)
        return correct, [np.minimum(stop, node.n)]

    @staticmethod
    def _vote(counts: np.ndarray, space: _CodeSpace) -> np.ndarray:
        """[R, P] whether the vote (ties broken by priority) picks the gold answer."""
        winner = np.argmax(counts + space.priority, axis=2)
        votes = np.take_along_axis(counts, winner[:, :, None], axis=2)[:, :, 0]
        return (winner == space.gold[None, :]) & (votes > 0)

    def _early_stop(
        self, nodes: Sequence[Node], offsets: Sequence[int], caps: frozenset, space: _CodeSpace, agree: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Draw round-robin across nodes; stop once ``agree`` answers agree."""
        schedule, owner_counts = _schedule(tuple(node.n for node in nodes))
        streams = [self._codes(node, space, caps)[:, :, off : off + node.n] for node, off in zip(nodes, offsets, strict=True)]
        columns = np.concatenate(streams, axis=2)  # [R, P, sum(n)], node after node
        rows, problems, steps = columns.shape
        correct, taken = early_stop_vote(
            columns.reshape(rows * problems, steps),
            schedule,
            space.priority.reshape(rows * problems, space.size),
            np.repeat(space.gold[None, :], rows, axis=0).reshape(-1),
            agree,
        )
        return correct.reshape(rows, problems), [counts[taken].reshape(rows, problems) for counts in owner_counts]


@functools.lru_cache(maxsize=4096)
def _schedule(sizes: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Round-robin draw order over nodes of ``sizes``, as columns of the node-after-node array, and per
    node how many of its samples the first t draws took (t = 0 .. sum(sizes))."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = _round_robin(list(sizes))
    schedule = np.array([starts[i] + j for i, j in order], dtype=np.int64)
    owner = np.array([i for i, _ in order])
    counts = [np.concatenate([[0], np.cumsum(owner == i)]) for i in range(len(sizes))]
    return schedule, counts


@numba.njit(cache=True, nogil=True)
def early_stop_vote(
    codes: np.ndarray, schedule: np.ndarray, priority: np.ndarray, gold: np.ndarray, agree: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sequential majority vote with early stop, row by row (row = one ordering of one problem).

    Draws ``codes[row, schedule[t]]`` for t = 0, 1, ...; codes < 0 are unusable answers and never vote.
    Stops once an answer has ``agree`` votes: that answer is the decision. Otherwise, after every draw,
    the answer with most votes wins, ties broken by ``priority``. Returns whether the decision is
    ``gold`` per row, and how many draws each row took.
    """
    rows = codes.shape[0]
    steps = schedule.shape[0]
    correct = np.zeros(rows, dtype=np.bool_)
    taken = np.full(rows, steps, dtype=np.int64)
    counts = np.zeros(priority.shape[1], dtype=np.int64)
    for i in range(rows):
        decision = -1
        for t in range(steps):
            code = codes[i, schedule[t]]
            if code < 0:
                continue
            counts[code] += 1
            if counts[code] >= agree:
                decision = code
                taken[i] = t + 1
                break
        if decision < 0:
            best = -1.0
            for t in range(steps):
                code = codes[i, schedule[t]]
                if code >= 0 and counts[code] + priority[i, code] > best:
                    best = counts[code] + priority[i, code]
                    decision = code
        correct[i] = decision >= 0 and decision == gold[i]
        for t in range(taken[i]):
            code = codes[i, schedule[t]]
            if code >= 0:
                counts[code] = 0
    return correct, taken


@numba.njit(cache=True, nogil=True)
def first_agreement(codes: np.ndarray, size: int, agree: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of draws: how many draws until an answer has ``agree`` votes (columns + 1 if never), and
    that answer (-1 if never). Cached per single-node stream: any ``n`` then reads off its result."""
    rows, steps = codes.shape
    stop = np.full(rows, steps + 1, dtype=np.int64)
    winner = np.full(rows, -1, dtype=np.int64)
    counts = np.zeros(size, dtype=np.int64)
    for i in range(rows):
        last = steps
        for t in range(steps):
            code = codes[i, t]
            if code < 0:
                continue
            counts[code] += 1
            if counts[code] >= agree:
                stop[i] = t + 1
                winner[i] = code
                last = t + 1
                break
        for t in range(last):
            if codes[i, t] >= 0:
                counts[codes[i, t]] = 0
    return stop, winner


def _round_robin(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(node, j) draw order: one sample of each node in turn, skipping nodes that are done."""
    order, j = [], 0
    while len(order) < sum(sizes):
        order.extend((i, j) for i, size in enumerate(sizes) if j < size)
        j += 1
    return order


def _mean_at(cumulative: np.ndarray, index: np.ndarray) -> float:
    """Mean over (r, p) of ``cumulative[r, p, index[r, p]]``."""
    rows = cumulative.shape[0] * cumulative.shape[1]
    flat = cumulative.reshape(rows, cumulative.shape[2])
    return float(flat[np.arange(rows), index.reshape(rows)].mean())
