"""Probabilistic collaboration graphs: a distribution over one stage's ``StageGraph``s.

A ``ProbabilisticGraph`` is what Agent-REINFORCE and GPTSwarm optimise. It has

- **slots**: ``(role, model)`` node sites, in a fixed order that is also a topological order (solvers
  first, reviewers and revisers in the middle, aggregators last). A slot is in a sampled graph with its
  *inclusion* probability (``sigmoid(include_logit)``; a ``required`` solver always), and draws its sample
  count ``n`` from a categorical over ``counts`` (``softmax(count_logits)``). Aggregators are exclusive:
  at most one is drawn, from ``softmax(0, l_1, ..., l_k)`` (the 0 being "no aggregator"), so with one
  aggregator slot its inclusion is again ``sigmoid(l_1)``.
- **edges**: candidate edges ``u -> v`` between slots, each present with ``sigmoid(logit)`` when both ends
  are. An edge always points forward in the slot order, never into a solver and never out of an
  aggregator, so every sample is acyclic by construction.

``sample(rng)`` returns a ``StageGraph`` valid under its validators, always:

1. slots and counts are drawn; if no solver was drawn, one is (weighted by inclusion); if more than
   ``max_solvers`` were, a weighted subset is kept;
2. edges between drawn slots are drawn; a node with more than ``max_in_degree`` drawn inputs keeps the
   most probable ones;
3. in slot order, a reviewer, reviser or aggregator without an answer-bearing input (a solver, reviser or
   aggregator) is dropped; in reverse order, a reviewer whose review nobody reads is dropped;
4. with an aggregator, every other sink is wired into it and the stage decides by ``fusion`` (its inputs
   trimmed to ``max_in_degree``, keeping every sink; if the sinks alone exceed it the aggregator is
   dropped); without one, the stage decides by ``majority_vote`` over its sinks.

Node ids of a sample are slot ids, so a sampled graph says which slots, counts and edges it used: that is
the evidence ``apply_update`` and the score-function gradient (``reinforce_step``) read.

``apply_update(proposed, evidence)`` is the only way a graph changes under an untrusted rewrite (an LLM
acting as the gradient, or the numeric step): the result is acyclic (edges that do not point forward in
the fixed order are dropped), the expected in-degree of every slot stays within ``max_in_degree``, and a
probability (edge, inclusion, or count option) may rise only if the sampled graphs that used it scored,
on average, above the mean of all sampled graphs. New slots, edges and count options enter at most at
``NEW_MAX_PROBABILITY``. Every violation is clipped, never trusted, and reported. (Logits stay within
``+-LOGIT_LIMIT``, so every element keeps a small chance; aggregators share one softmax, so lowering one
can lift another's tiny marginal up to that floor.)

Also: ``template`` (the layered start both REINFORCE strategies use), ``most_likely`` (the mode),
``score_function`` and ``reinforce_step`` (GPTSwarm's numeric update), ``to_json``/``from_json`` (canonical
JSON, what a graph version stores), ``to_probabilities`` (what a reviewer or a planner LLM reads and
rewrites) and ``diff`` (what changed between two versions, for review).

Pure values and functions; no I/O.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from statistics import fmean, pstdev
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graphs.errors import InvalidPlan
from graphs.plan import MAX_IN_DEGREE, DecisionRule, Node, Role, StageGraph

__all__ = [
    "FORMAT",
    "GRAPH_ROLES",
    "LOGIT_LIMIT",
    "NEW_MAX_PROBABILITY",
    "Edge",
    "EdgeChange",
    "Evidence",
    "GraphDiff",
    "GraphUpdate",
    "ProbabilisticGraph",
    "Slot",
    "SlotChange",
    "Violation",
    "reinforce_step",
    "slot_id",
]

FORMAT = "allot.probabilistic-graph/1"
LOGIT_LIMIT = 6.0
"""Logits stay within +-6 (probabilities 0.0025 .. 0.9975): every slot and edge keeps a chance."""
NEW_MAX_PROBABILITY = 0.5
"""Highest probability a slot, edge or count option may enter with: unproven is at most a coin flip."""
GRAPH_ROLES = (Role.SOLVER, Role.REVIEWER, Role.REVISER, Role.AGGREGATOR)
"""Roles a probabilistic graph can hold (verifiers and best-of-n are not sampled)."""
_RANK = {Role.SOLVER: 0, Role.REVIEWER: 1, Role.REVISER: 1, Role.AGGREGATOR: 2}
_ANSWERS = (Role.SOLVER, Role.REVISER, Role.AGGREGATOR)
_ID = re.compile(r"[^A-Za-z0-9_.:-]+")
_EPS = 1e-9

Evidence = Sequence[tuple[StageGraph, float]]
"""Sampled graphs of this stage with the score of the plan they were part of."""


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _logit(p: float) -> float:
    p = min(max(p, _sigmoid(-LOGIT_LIMIT)), _sigmoid(LOGIT_LIMIT))
    return _clip(math.log(p / (1.0 - p)))


def _clip(z: float) -> float:
    return min(max(float(z), -LOGIT_LIMIT), LOGIT_LIMIT)


def _softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(z - top) for z in logits]
    total = sum(weights)
    return [w / total for w in weights]


def _logits_of(probs: Sequence[float]) -> tuple[float, ...]:
    """Centred logits within +-LOGIT_LIMIT whose softmax is ``probs`` (odds beyond e**12 are cut)."""
    floor = math.exp(-2 * LOGIT_LIMIT)
    logs = [math.log(max(p, floor)) for p in probs]
    top = max(logs)
    rel = [max(z - top, -2 * LOGIT_LIMIT) for z in logs]
    shift = -(max(rel) + min(rel)) / 2
    return tuple(_clip(z + shift) for z in rel)


def _rebuild(graph: ProbabilisticGraph, **changes: Any) -> ProbabilisticGraph:
    """A validated copy with ``changes`` (``model_copy`` would keep stale cached lookups)."""
    fields = {name: getattr(graph, name) for name in ("stage", "slots", "edges", "max_in_degree", "max_solvers")}
    return ProbabilisticGraph(**{**fields, **changes})


def slot_id(role: Role | str, model: str, round_: int | None = None) -> str:
    """A node id for a slot: ``solver-Qwen3-8B``, ``reviser2-sim-70B`` (model names made id-safe)."""
    role = Role(role)
    stem = f"{role.value}{round_ if round_ is not None else ''}"
    return f"{stem}-{_ID.sub('_', model)}"[:64]


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Slot(_Value):
    """A node site: ``role`` played by ``model``, present with some probability, drawing ``n`` from ``counts``."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    role: Role = Role.SOLVER
    model: str = Field(min_length=1)
    include_logit: float = Field(default=0.0, ge=-LOGIT_LIMIT, le=LOGIT_LIMIT)
    required: bool = False
    """A required solver is in every sample (its ``include_logit`` is ignored)."""
    counts: tuple[int, ...] = Field(default=(1,), min_length=1)
    count_logits: tuple[float, ...] = (0.0,)
    max_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Slot:
        if self.role not in GRAPH_ROLES:
            raise ValueError(f"slot {self.id!r}: role {self.role} cannot be sampled (use {', '.join(GRAPH_ROLES)})")
        if self.required and self.role is not Role.SOLVER:
            raise ValueError(f"slot {self.id!r}: only solver slots can be required")
        if len(self.counts) != len(self.count_logits):
            raise ValueError(f"slot {self.id!r}: {len(self.counts)} counts but {len(self.count_logits)} count logits")
        if any(n < 1 for n in self.counts) or list(self.counts) != sorted(set(self.counts)):
            raise ValueError(f"slot {self.id!r}: counts must be distinct, ascending and >= 1, got {list(self.counts)}")
        if any(not math.isfinite(z) or abs(z) > LOGIT_LIMIT for z in self.count_logits):
            raise ValueError(f"slot {self.id!r}: count logits must be finite and within +-{LOGIT_LIMIT}")
        return self

    @property
    def count_probabilities(self) -> dict[int, float]:
        return dict(zip(self.counts, _softmax(self.count_logits), strict=True))


class Edge(_Value):
    """A candidate edge: present with ``sigmoid(logit)`` when both of its slots are."""

    source: str
    target: str
    logit: float = Field(default=0.0, ge=-LOGIT_LIMIT, le=LOGIT_LIMIT)

    @property
    def probability(self) -> float:
        return _sigmoid(self.logit)

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.target)


class Violation(_Value):
    """A part of a proposed update that broke a rule, and what was done instead."""

    kind: str
    """``cycle``, ``in_degree``, ``unproven_rise``, ``new_probability``, ``unknown_slot``, ``slot_changed``,
    ``model``, ``role``, ``count``, ``no_solver``, ``invalid``, ``limits``."""
    target: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.target}: {self.detail}"


class GraphUpdate(_Value):
    """The result of ``apply_update``: the graph that holds the rules, and what was clipped on the way."""

    graph: ProbabilisticGraph
    violations: tuple[Violation, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        if not self.violations:
            return "no violations"
        return "; ".join(str(v) for v in self.violations)


class SlotChange(_Value):
    id: str
    role: Role
    model: str
    inclusion_before: float
    inclusion_after: float
    counts_before: dict[int, float]
    counts_after: dict[int, float]


class EdgeChange(_Value):
    source: str
    target: str
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


class GraphDiff(_Value):
    """What changed from one graph to another (``a.diff(b)``: from ``a`` to ``b``)."""

    added_slots: tuple[str, ...] = ()
    removed_slots: tuple[str, ...] = ()
    slot_changes: tuple[SlotChange, ...] = ()
    edge_changes: tuple[EdgeChange, ...] = ()
    """Every edge whose probability moved, including edges of added and removed slots (0 when absent)."""

    @property
    def empty(self) -> bool:
        return not (self.added_slots or self.removed_slots or self.slot_changes or self.edge_changes)

    def summary(self) -> list[str]:
        lines = [f"+ slot {s}" for s in self.added_slots] + [f"- slot {s}" for s in self.removed_slots]
        for change in self.slot_changes:
            lines.append(f"~ slot {change.id}: inclusion {change.inclusion_before:.3f} -> {change.inclusion_after:.3f}")
        for edge in self.edge_changes:
            lines.append(f"~ edge {edge.source}->{edge.target}: {edge.before:.3f} -> {edge.after:.3f} ({edge.delta:+.3f})")
        return lines


class ProbabilisticGraph(_Value):
    """A distribution over one stage's collaboration graphs. See the module docstring."""

    stage: str = Field(min_length=1, max_length=64)
    slots: tuple[Slot, ...] = Field(min_length=1)
    """In the fixed topological order: solvers, then reviewers and revisers, then aggregators."""
    edges: tuple[Edge, ...] = ()
    max_in_degree: int = Field(default=MAX_IN_DEGREE, ge=1, le=MAX_IN_DEGREE)
    max_solvers: int | None = Field(default=None, ge=1)
    """At most this many solver slots in one sample (the search space's model-mixture limit)."""

    @model_validator(mode="before")
    @classmethod
    def _canonical_edges(cls, data: Any) -> Any:
        """Edges in slot order (by source, then target), so equal graphs serialise equally."""
        if not isinstance(data, Mapping) or "edges" not in data or "slots" not in data:
            return data
        try:
            ids = [s["id"] if isinstance(s, Mapping) else s.id for s in data["slots"]]
            position = {sid: i for i, sid in enumerate(ids)}

            def key(edge: Any) -> tuple[int, int]:
                src, dst = (edge["source"], edge["target"]) if isinstance(edge, Mapping) else (edge.source, edge.target)
                return (position.get(src, len(ids)), position.get(dst, len(ids)))

            return {**data, "edges": tuple(sorted(data["edges"], key=key))}
        except (KeyError, TypeError, AttributeError):
            return data  # the field validators say what is wrong

    @field_validator("slots")
    @classmethod
    def _check_slots(cls, slots: tuple[Slot, ...]) -> tuple[Slot, ...]:
        ids = [slot.id for slot in slots]
        if len(set(ids)) != len(ids):
            raise ValueError(f"slot ids must be unique, got {ids}")
        ranks = [_RANK[slot.role] for slot in slots]
        if ranks != sorted(ranks):
            raise ValueError("slots must be ordered solvers, then reviewers and revisers, then aggregators")
        if not any(slot.role is Role.SOLVER for slot in slots):
            raise ValueError("a probabilistic graph needs at least one solver slot")
        return slots

    @model_validator(mode="after")
    def _check_edges(self) -> ProbabilisticGraph:
        position = self._position
        seen: set[tuple[str, str]] = set()
        for edge in self.edges:
            if edge.source not in position or edge.target not in position:
                raise ValueError(f"edge {edge.source}->{edge.target} names a slot that is not in the graph")
            if position[edge.source] >= position[edge.target]:
                raise ValueError(f"edge {edge.source}->{edge.target} points backwards in the slot order (a cycle)")
            if self.slot(edge.target).role is Role.SOLVER:
                raise ValueError(f"edge {edge.source}->{edge.target}: solvers take no inputs")
            if self.slot(edge.source).role is Role.AGGREGATOR:
                raise ValueError(f"edge {edge.source}->{edge.target}: an aggregator is the stage's answer, not an input")
            if edge.key in seen:
                raise ValueError(f"edge {edge.source}->{edge.target} is listed twice")
            seen.add(edge.key)
        return self

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def template(
        cls,
        stage: str,
        solvers: Mapping[str, Sequence[int]],
        *,
        reviewers: Sequence[str] = (),
        revisers: Sequence[str] = (),
        aggregators: Sequence[str] = (),
        rounds: int = 1,
        solver_probability: float = 0.5,
        helper_probability: float = 0.2,
        edge_probability: float = 0.5,
        count_weights: Mapping[str, Mapping[int, float]] | None = None,
        max_solvers: int | None = None,
        max_tokens: int | None = None,
    ) -> ProbabilisticGraph:
        """The layered graph both REINFORCE strategies start from.

        Solvers ``{model: counts}`` answer; in each of ``rounds`` rounds reviewers criticise the answers so
        far and revisers rewrite them (``reviewer1-*``, ``reviser1-*``, ...); an aggregator may fuse
        everything. Candidate edges: solver -> round-1 reviewer/reviser and aggregator; round-r reviewer
        -> round-r reviser and aggregator; round-r reviser -> round-(r+1) reviewer/reviser and aggregator.
        ``count_weights`` sets a slot's initial count distribution (default uniform).
        """
        weights = count_weights or {}

        def counts_of(model: str, options: Sequence[int]) -> tuple[tuple[int, ...], tuple[float, ...]]:
            counts = tuple(sorted(set(options)))
            given = weights.get(model, {})
            probs = [float(given.get(n, 0.0)) for n in counts] if given else [1.0] * len(counts)
            total = sum(probs)
            probs = [p / total for p in probs] if total > 0 else [1.0 / len(counts)] * len(counts)
            return counts, _logits_of(probs)

        slots: list[Slot] = []
        for model, options in solvers.items():
            counts, logits = counts_of(model, options)
            slots.append(
                Slot(
                    id=slot_id(Role.SOLVER, model),
                    model=model,
                    include_logit=_logit(solver_probability),
                    required=len(solvers) == 1,
                    counts=counts,
                    count_logits=logits,
                    max_tokens=max_tokens,
                )
            )
        layers: list[tuple[list[str], list[str]]] = []
        for r in range(1, rounds + 1 if (reviewers or revisers) else 1):
            rev = [slot_id(Role.REVIEWER, m, r) for m in reviewers]
            fix = [slot_id(Role.REVISER, m, r) for m in revisers]
            slots += [
                Slot(id=i, role=Role.REVIEWER, model=m, include_logit=_logit(helper_probability))
                for i, m in zip(rev, reviewers, strict=True)
            ]
            slots += [
                Slot(id=i, role=Role.REVISER, model=m, include_logit=_logit(helper_probability))
                for i, m in zip(fix, revisers, strict=True)
            ]
            layers.append((rev, fix))
        aggs = [slot_id(Role.AGGREGATOR, m) for m in aggregators]
        slots += [
            Slot(id=i, role=Role.AGGREGATOR, model=m, include_logit=_logit(helper_probability))
            for i, m in zip(aggs, aggregators, strict=True)
        ]
        pairs: list[tuple[str, str]] = []
        answers = [s.id for s in slots if s.role is Role.SOLVER]
        for rev, fix in layers:
            pairs += [(a, b) for a in answers for b in (*rev, *fix)]
            pairs += [(a, b) for a in rev for b in fix]
            pairs += [(a, b) for a in rev for b in aggs]
            answers = fix
        pairs += [(a, b) for a in answers for b in aggs]
        if layers:  # solvers may also feed the aggregator directly
            pairs += [(s.id, b) for s in slots if s.role is Role.SOLVER for b in aggs]
        pairs = list(dict.fromkeys(pairs))
        fan_in: dict[str, int] = {}
        for _, b in pairs:
            fan_in[b] = fan_in.get(b, 0) + 1
        # keep every slot's expected in-degree (the sum of its input probabilities) within the bound
        edges = tuple(
            Edge(source=a, target=b, logit=_logit(min(edge_probability, 0.95 * MAX_IN_DEGREE / fan_in[b]))) for a, b in pairs
        )
        return cls(stage=stage, slots=tuple(slots), edges=edges, max_solvers=max_solvers)

    # -- views -----------------------------------------------------------------------------------

    @cached_property
    def _position(self) -> dict[str, int]:
        return {slot.id: i for i, slot in enumerate(self.slots)}

    @cached_property
    def _by_id(self) -> dict[str, Slot]:
        return {slot.id: slot for slot in self.slots}

    @cached_property
    def _edge_map(self) -> dict[tuple[str, str], Edge]:
        return {edge.key: edge for edge in self.edges}

    def slot(self, slot_id: str) -> Slot:
        try:
            return self._by_id[slot_id]
        except KeyError:
            raise KeyError(f"no slot {slot_id!r} in the graph of stage {self.stage!r}") from None

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({slot.model for slot in self.slots}))

    def inclusion_probability(self, slot_id: str) -> float:
        """Probability that ``slot_id`` is drawn (before the repairs of ``sample``)."""
        slot = self.slot(slot_id)
        if slot.role is Role.AGGREGATOR:
            aggs = [s for s in self.slots if s.role is Role.AGGREGATOR]
            probs = _softmax([0.0, *(s.include_logit for s in aggs)])
            return probs[1 + aggs.index(slot)]
        return 1.0 if slot.required else _sigmoid(slot.include_logit)

    def edge_probability(self, source: str, target: str) -> float:
        """Probability of ``source -> target`` given both slots are drawn; 0 for a pair that is no candidate."""
        self.slot(source)
        self.slot(target)
        edge = self._edge_map.get((source, target))
        return 0.0 if edge is None else edge.probability

    # -- sampling --------------------------------------------------------------------------------

    def sample(self, rng: random.Random) -> StageGraph:
        """A random ``StageGraph`` of this distribution; always valid (see the module docstring)."""

        def pick(weights: Sequence[float]) -> int:
            return rng.choices(range(len(weights)), weights=weights)[0]

        return self._realize(lambda p: rng.random() < p, pick)

    def most_likely(self) -> StageGraph:
        """The mode, slot by slot: slots and edges at probability >= 0.5, the likeliest count."""

        def argmax(weights: Sequence[float]) -> int:
            return max(range(len(weights)), key=lambda i: (weights[i], -i))

        return self._realize(lambda p: p >= 0.5, argmax)

    def _realize(self, coin: Callable[[float], bool], pick: Callable[[Sequence[float]], int]) -> StageGraph:
        counts: dict[str, int] = {}
        for slot in self.slots:
            if slot.role is not Role.AGGREGATOR and (slot.required or coin(_sigmoid(slot.include_logit))):
                counts[slot.id] = slot.counts[pick(_softmax(slot.count_logits))]
        aggs = [s for s in self.slots if s.role is Role.AGGREGATOR]
        if aggs:
            chosen = pick(_softmax([0.0, *(s.include_logit for s in aggs)]))
            if chosen:
                slot = aggs[chosen - 1]
                counts[slot.id] = slot.counts[pick(_softmax(slot.count_logits))]
        solvers = [s for s in self.slots if s.role is Role.SOLVER]
        drawn = [s for s in solvers if s.id in counts]
        if not drawn:
            slot = solvers[pick([self.inclusion_probability(s.id) for s in solvers])]
            counts[slot.id] = slot.counts[pick(_softmax(slot.count_logits))]
        elif self.max_solvers is not None and len(drawn) > self.max_solvers:
            keep: list[Slot] = [s for s in drawn if s.required][: self.max_solvers]
            pool = [s for s in drawn if s not in keep]
            while len(keep) < self.max_solvers:
                chosen_slot = pool.pop(pick([self.inclusion_probability(s.id) for s in pool]))
                keep.append(chosen_slot)
            for slot in drawn:
                if slot not in keep:
                    del counts[slot.id]
        # edges between drawn slots, then each target's inputs trimmed to the bound (likeliest kept)
        incoming: dict[str, list[Edge]] = {}
        for edge in self.edges:
            if edge.source in counts and edge.target in counts and coin(edge.probability):
                incoming.setdefault(edge.target, []).append(edge)
        edges: set[tuple[str, str]] = set()
        for found in incoming.values():
            found.sort(key=lambda e: (-e.logit, self._position[e.source]))
            edges.update(e.key for e in found[: self.max_in_degree])
        present = [s for s in self.slots if s.id in counts]
        self._prune(present, counts, edges)
        present = [s for s in self.slots if s.id in counts]
        decision = DecisionRule.MAJORITY_VOTE
        agg = next((s for s in present if s.role is Role.AGGREGATOR), None)
        if agg is not None:
            if self._wire_aggregator(agg, present, edges):
                decision = DecisionRule.FUSION
            else:
                del counts[agg.id]
                edges = {e for e in edges if agg.id not in e}
                present = [s for s in self.slots if s.id in counts]
                self._prune(present, counts, edges)
                present = [s for s in self.slots if s.id in counts]
        nodes = tuple(Node(id=s.id, role=s.role, model=s.model, n=counts[s.id], max_tokens=s.max_tokens) for s in present)
        return StageGraph(stage=self.stage, nodes=nodes, edges=tuple(sorted(edges)), decision=decision)

    def _prune(self, present: list[Slot], counts: dict[str, int], edges: set[tuple[str, str]]) -> None:
        """Drop helpers without an answer to work on (forward) and reviews nobody reads (backward)."""
        for slot in present:
            if slot.role is Role.SOLVER or slot.id not in counts:
                continue
            inputs = [u for u, v in edges if v == slot.id and u in counts and self._by_id[u].role in _ANSWERS]
            if not inputs:
                del counts[slot.id]
                edges.difference_update({e for e in edges if slot.id in e})
        for slot in reversed(present):
            if slot.role is Role.REVIEWER and slot.id in counts and not any(u == slot.id for u, _ in edges):
                del counts[slot.id]
                edges.difference_update({e for e in edges if slot.id in e})

    def _wire_aggregator(self, agg: Slot, present: list[Slot], edges: set[tuple[str, str]]) -> bool:
        """Make ``agg`` the only sink within the in-degree bound; ``False`` if the sinks alone exceed it."""
        sources = {u for u, _ in edges}
        edges.update((s.id, agg.id) for s in present if s.id != agg.id and s.id not in sources)
        inputs = [u for u, v in edges if v == agg.id]
        out_degree = {u: sum(1 for a, _ in edges if a == u) for u in inputs}
        needed = [u for u in inputs if out_degree[u] == 1]  # the aggregator is all they feed
        if len(needed) > self.max_in_degree:
            return False
        removable = sorted(
            (u for u in inputs if out_degree[u] > 1), key=lambda u: (self._edge_logit(u, agg.id), -self._position[u])
        )
        for u in removable[: max(0, len(inputs) - self.max_in_degree)]:
            edges.discard((u, agg.id))
        return True

    def _edge_logit(self, source: str, target: str) -> float:
        edge = self._edge_map.get((source, target))
        return -math.inf if edge is None else edge.logit

    # -- the score-function gradient ---------------------------------------------------------------

    def score_function(self, graph: StageGraph) -> dict[str, Any]:
        """``d log p(graph) / d logits`` for a sampled ``graph``, treating its slots, counts and edges as
        drawn independently (the GPTSwarm approximation): ``{"include": {slot: g}, "count": {slot:
        [g, ...]}, "edge": {(source, target): g}}``."""
        nodes = {node.id: node for node in graph.nodes if node.id in self._by_id}
        edges = set(graph.edges)
        include: dict[str, float] = {}
        count: dict[str, list[float]] = {}
        aggs = [s for s in self.slots if s.role is Role.AGGREGATOR]
        agg_probs = _softmax([0.0, *(s.include_logit for s in aggs)])[1:] if aggs else []
        for slot in self.slots:
            here = slot.id in nodes and nodes[slot.id].model == slot.model
            if slot.role is Role.AGGREGATOR:
                include[slot.id] = float(here) - agg_probs[aggs.index(slot)]
            elif not slot.required:
                include[slot.id] = float(here) - _sigmoid(slot.include_logit)
            if here and len(slot.counts) > 1 and nodes[slot.id].n in slot.counts:
                probs = _softmax(slot.count_logits)
                k = slot.counts.index(nodes[slot.id].n)
                count[slot.id] = [float(i == k) - p for i, p in enumerate(probs)]
        edge_grad = {
            edge.key: float(edge.key in edges) - edge.probability
            for edge in self.edges
            if edge.source in nodes and edge.target in nodes
        }
        return {"include": include, "count": count, "edge": edge_grad}

    # -- serialisation -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.model_dump(mode="json")}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> ProbabilisticGraph:
        """Parse ``to_json`` or ``to_dict`` output; ``InvalidPlan`` (one line) if it is not a valid graph."""
        try:
            data = json.loads(text) if isinstance(text, str | bytes) else dict(text)
        except json.JSONDecodeError as exc:
            raise InvalidPlan(f"probabilistic graph is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidPlan("a probabilistic graph is a JSON object")
        fmt = data.pop("format", FORMAT)
        if fmt != FORMAT:
            raise InvalidPlan(f"unknown probabilistic graph format {fmt!r}: expected {FORMAT!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            message = str(first.get("msg", exc)).removeprefix("Value error, ")
            raise InvalidPlan(f"invalid probabilistic graph: {where + ': ' if where else ''}{message}") from exc

    def to_probabilities(self) -> dict[str, Any]:
        """The graph as probabilities (what a reviewer or a planner LLM reads and may rewrite)."""
        return {
            "stage": self.stage,
            "slots": [
                {
                    "id": s.id,
                    "role": s.role.value,
                    "model": s.model,
                    "include_probability": round(self.inclusion_probability(s.id), 4),
                    "counts": {str(n): round(p, 4) for n, p in s.count_probabilities.items()},
                }
                for s in self.slots
            ],
            "edges": [{"source": e.source, "target": e.target, "probability": round(e.probability, 4)} for e in self.edges],
        }

    # -- review ------------------------------------------------------------------------------------

    def diff(self, other: ProbabilisticGraph, *, tolerance: float = 1e-6) -> GraphDiff:
        """What changed from ``self`` to ``other``: added and removed slots, slots whose inclusion or count
        distribution moved, and every edge whose probability moved by more than ``tolerance``."""
        mine, theirs = self._by_id, other._by_id
        changes = []
        for sid in (s.id for s in self.slots if s.id in theirs):
            before, after = self.inclusion_probability(sid), other.inclusion_probability(sid)
            cb, ca = mine[sid].count_probabilities, theirs[sid].count_probabilities
            moved = any(abs(cb.get(n, 0.0) - ca.get(n, 0.0)) > tolerance for n in set(cb) | set(ca))
            if abs(before - after) > tolerance or moved:
                changes.append(
                    SlotChange(
                        id=sid,
                        role=theirs[sid].role,
                        model=theirs[sid].model,
                        inclusion_before=before,
                        inclusion_after=after,
                        counts_before=cb,
                        counts_after=ca,
                    )
                )
        keys = list(dict.fromkeys([e.key for e in self.edges] + [e.key for e in other.edges]))
        edge_changes = []
        for src, dst in keys:
            before = self._edge_map[(src, dst)].probability if (src, dst) in self._edge_map else 0.0
            after = other._edge_map[(src, dst)].probability if (src, dst) in other._edge_map else 0.0
            if abs(after - before) > tolerance:
                edge_changes.append(EdgeChange(source=src, target=dst, before=before, after=after))
        return GraphDiff(
            added_slots=tuple(s.id for s in other.slots if s.id not in mine),
            removed_slots=tuple(s.id for s in self.slots if s.id not in theirs),
            slot_changes=tuple(changes),
            edge_changes=tuple(edge_changes),
        )

    # -- the update rules --------------------------------------------------------------------------

    def apply_update(
        self,
        proposed: ProbabilisticGraph | Mapping[str, Any],
        evidence: Evidence,
        *,
        allowed_models: Iterable[str] | None = None,
        allowed_roles: Iterable[Role | str] | None = None,
        allowed_counts: Mapping[str, Sequence[int]] | None = None,
    ) -> GraphUpdate:
        """Accept what the rules allow of ``proposed`` and report the rest (see the module docstring).

        Args:
            proposed: a rewritten graph, or its ``to_dict`` / ``to_probabilities`` form as a planner wrote
                it (lenient: unknown or broken parts are dropped and reported). In that form a missing
                ``slots`` or ``edges`` key keeps this graph's; a present list is the complete new list.
            evidence: the sampled graphs (this stage's) and their scores since the last update.
            allowed_models, allowed_roles: what a slot may use (models the stage offers, roles the
                environment runs); others are dropped.
            allowed_counts: sample counts each model may draw; other count options are dropped.

        Returns:
            The graph that holds the rules, and every violation that was clipped.
        """
        data = proposed.to_dict() if isinstance(proposed, ProbabilisticGraph) else dict(proposed)
        return _Updater(self, evidence, allowed_models, allowed_roles, allowed_counts).run(data)


GraphUpdate.model_rebuild()


# -- apply_update's machinery ----------------------------------------------------------------------------


class _Updater:
    def __init__(
        self,
        base: ProbabilisticGraph,
        evidence: Evidence,
        models: Iterable[str] | None,
        roles: Iterable[Role | str] | None,
        counts: Mapping[str, Sequence[int]] | None,
    ) -> None:
        self.base = base
        self.models = None if models is None else set(models)
        self.roles = set(GRAPH_ROLES) if roles is None else {Role(r) for r in roles} & set(GRAPH_ROLES)
        self.roles.add(Role.SOLVER)
        self.counts = None if counts is None else {m: set(ns) for m, ns in counts.items()}
        self.violations: list[Violation] = []
        rows = [(g, float(s)) for g, s in evidence if g.stage == base.stage and math.isfinite(float(s))]
        self.mean = fmean(s for _, s in rows) if rows else None
        self.rows = [({n.id: n for n in g.nodes}, set(g.edges), s) for g, s in rows]

    def flag(self, kind: str, target: str, detail: str) -> None:
        self.violations.append(Violation(kind=kind, target=target, detail=detail))

    def proven(self, used: Callable[[dict[str, Node], set[tuple[str, str]]], bool]) -> bool:
        """Did the sampled graphs that used this element score above the mean of all sampled graphs?"""
        scores = [s for nodes, edges, s in self.rows if used(nodes, edges)]
        return bool(scores) and self.mean is not None and fmean(scores) > self.mean + _EPS

    def run(self, data: dict[str, Any]) -> GraphUpdate:
        base = self.base
        if data.get("stage", base.stage) != base.stage:
            self.flag("invalid", str(data.get("stage")), f"the update is for stage {base.stage!r}; stage kept")
        for key in ("max_in_degree", "max_solvers"):
            if key in data and data[key] != getattr(base, key):
                self.flag("limits", key, f"{key} is fixed at {getattr(base, key)}; kept")
        slots = self.slots(data)
        edges = self.edges(data, slots)
        graph = ProbabilisticGraph(
            stage=base.stage,
            slots=tuple(slots),
            edges=tuple(edges),
            max_in_degree=base.max_in_degree,
            max_solvers=base.max_solvers,
        )
        graph = self.bound_in_degree(graph)
        return GraphUpdate(graph=graph, violations=tuple(self.violations))

    # slots

    def slots(self, data: dict[str, Any]) -> list[Slot]:
        base = self.base
        if "slots" not in data:
            wanted = [s.model_dump() for s in base.slots]
        elif not isinstance(data["slots"], list):
            self.flag("invalid", "slots", "not a list; slots kept")
            wanted = [s.model_dump() for s in base.slots]
        else:
            wanted = data["slots"]
        parsed: dict[str, Slot] = {}
        order: list[str] = []
        for raw in wanted:
            slot = self.slot(raw)
            if slot is None:
                continue
            if slot.id in parsed:
                self.flag("invalid", slot.id, "slot listed twice; the first kept")
                continue
            parsed[slot.id] = slot
            order.append(slot.id)
        if not any(s.role is Role.SOLVER for s in parsed.values()):
            self.flag("no_solver", base.stage, "the update removed every solver; the old solver slots kept")
            for slot in base.slots:
                if slot.role is Role.SOLVER:
                    parsed[slot.id] = slot
                    order.insert(0, slot.id)
        parsed = self.rule_inclusion(parsed)
        # the fixed order: kept slots in the old order, new ones after them, stably grouped by role rank
        old = [s.id for s in base.slots if s.id in parsed]
        new = [sid for sid in order if sid not in base._by_id]
        ids = sorted(old + new, key=lambda sid: _RANK[parsed[sid].role])
        return [parsed[sid] for sid in ids]

    def slot(self, raw: Any) -> Slot | None:
        base = self.base
        if not isinstance(raw, Mapping):
            self.flag("invalid", str(raw)[:40], "a slot is an object; dropped")
            return None
        sid = raw.get("id")
        old = base._by_id.get(sid) if isinstance(sid, str) else None
        try:
            role = Role(raw.get("role", old.role if old else Role.SOLVER))
        except ValueError:
            self.flag("role", str(sid), f"unknown role {raw.get('role')!r}; slot dropped")
            return None
        model = raw.get("model", old.model if old else None)
        if not isinstance(model, str) or not model:
            self.flag("invalid", str(sid), "a slot needs a model; dropped")
            return None
        if not isinstance(sid, str):
            sid = slot_id(role, model)
            old = base._by_id.get(sid)
        if old is not None and (old.role, old.model) != (role, model):
            self.flag("slot_changed", sid, f"slot is {old.role}:{old.model}, not {role}:{model}; role and model kept")
            role, model = old.role, old.model
        if role not in self.roles:
            self.flag("role", sid, f"role {role} is not run here; slot dropped")
            return None
        if self.models is not None and model not in self.models:
            self.flag("model", sid, f"model {model!r} is not available for stage {base.stage!r}; slot dropped")
            return None
        include = _number(raw.get("include_logit"))
        if include is None:
            p = _number(raw.get("include_probability"))
            include = None if p is None else _logit(min(max(p, 0.0), 1.0))
        if include is None or (old is not None and old.required):
            include = old.include_logit if old else 0.0
        counts, logits = self.count_options(sid, model, raw, old)
        try:
            return Slot(
                id=sid,
                role=role,
                model=model,
                include_logit=_clip(include),
                required=bool(old.required) if old else False,
                counts=counts,
                count_logits=logits,
                max_tokens=old.max_tokens if old else _int_or_none(raw.get("max_tokens")),
            )
        except ValidationError as exc:
            self.flag("invalid", sid, f"{exc.errors()[0].get('msg')}; dropped")
            return None

    def count_options(
        self, sid: str, model: str, raw: Mapping[str, Any], old: Slot | None
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The slot's count distribution after the rules: unproven options never gain probability."""
        proposal: dict[int, float] = {}
        if isinstance(raw.get("counts"), Sequence) and isinstance(raw.get("count_logits"), Sequence):
            try:
                pairs = zip([int(n) for n in raw["counts"]], [float(z) for z in raw["count_logits"]], strict=True)
                table = dict(pairs)
                probs = _softmax(list(table.values()))
                proposal = dict(zip(table, probs, strict=True))
            except (TypeError, ValueError):
                proposal = {}
        elif isinstance(raw.get("counts"), Mapping):
            for key, value in raw["counts"].items():
                n, p = _int_or_none(key), _number(value)
                if n is None or n < 1 or p is None or p < 0:
                    self.flag("count", sid, f"count option {key!r}: {value!r} is not a count and a probability; dropped")
                    continue
                proposal[n] = p
        if not proposal:
            if old is not None:
                return old.counts, old.count_logits
            proposal = {1: 1.0}
        allowed = self.counts.get(model) if self.counts is not None else None
        if allowed is not None:
            for n in [n for n in proposal if n not in allowed]:
                self.flag("count", sid, f"{n} samples of {model} are not allowed; option dropped")
                del proposal[n]
            if not proposal:
                if old is not None:
                    return old.counts, old.count_logits
                proposal = {min(allowed): 1.0}
        total = sum(proposal.values())
        if total <= 0:
            if old is not None:
                return old.counts, old.count_logits
            proposal, total = dict.fromkeys(proposal, 1.0), float(len(proposal))
        proposal = {n: p / total for n, p in sorted(proposal.items())}
        if old is None:  # a new slot: its inclusion is what the rules cap
            counts = tuple(proposal)
            return counts, _logits_of([proposal[n] for n in counts])
        before = old.count_probabilities
        caps: dict[int, float] = {}
        for n in proposal:
            if self.proven(lambda nodes, _edges, n=n: sid in nodes and nodes[sid].n == n and nodes[sid].model == model):
                caps[n] = math.inf
            else:
                caps[n] = before.get(n, 0.0) if n in before else min(NEW_MAX_PROBABILITY, proposal[n])
        capped = {n: min(p, caps[n]) for n, p in proposal.items()}
        deficit = 1.0 - sum(capped.values())
        if deficit > _EPS:
            free = {n: proposal[n] for n in capped if caps[n] == math.inf and proposal[n] > 0}
            room = {n: caps[n] - capped[n] for n in capped if n in before and caps[n] != math.inf and caps[n] > capped[n]}
            if free:
                total = sum(free.values())
                capped = {n: p + deficit * free.get(n, 0.0) / total for n, p in capped.items()}
            elif sum(room.values()) >= deficit - _EPS:
                total = sum(room.values())
                capped = {n: p + deficit * room.get(n, 0.0) / total for n, p in capped.items()}
            else:
                self.flag("unproven_rise", sid, "the count distribution would raise unproven options; kept as before")
                return old.counts, old.count_logits
        if any(capped[n] < proposal[n] - 1e-6 for n in capped):
            raised = [n for n in capped if capped[n] < proposal[n] - 1e-6]
            self.flag("unproven_rise", sid, f"count options {raised} were not used by above-mean graphs; not raised")
        counts = tuple(sorted(capped))
        return counts, _logits_of([capped[n] for n in counts])

    def rule_inclusion(self, parsed: dict[str, Slot]) -> dict[str, Slot]:
        """Clip inclusion rises of unproven slots (aggregators as one exclusive group)."""
        base = self.base
        out = dict(parsed)

        def used(sid: str, model: str) -> bool:
            return self.proven(lambda nodes, _edges: sid in nodes and nodes[sid].model == model)

        for sid, slot in parsed.items():
            if slot.role is Role.AGGREGATOR or slot.required:
                continue
            old = base._by_id.get(sid)
            cap = old.include_logit if old is not None else _logit(NEW_MAX_PROBABILITY)
            if slot.include_logit > cap + _EPS and not used(sid, slot.model):
                kind = "unproven_rise" if old is not None else "new_probability"
                self.flag(kind, sid, f"inclusion {_sigmoid(slot.include_logit):.3f} clipped to {_sigmoid(cap):.3f}")
                out[sid] = slot.model_copy(update={"include_logit": cap})
        aggs = [s for s in parsed.values() if s.role is Role.AGGREGATOR]
        if aggs:
            proposed = _softmax([0.0, *(s.include_logit for s in aggs)])[1:]
            target = []
            for slot, p in zip(aggs, proposed, strict=True):
                old = base._by_id.get(slot.id)
                cap = base.inclusion_probability(slot.id) if old is not None else NEW_MAX_PROBABILITY
                if p > cap + 1e-9 and not used(slot.id, slot.model):
                    kind = "unproven_rise" if old is not None else "new_probability"
                    self.flag(kind, slot.id, f"inclusion {p:.3f} clipped to {cap:.3f}")
                    p = cap
                target.append(p)
            total = sum(target)
            if total > 1.0 - 1e-3:  # lowering keeps the rules: leave room for "no aggregator"
                target = [p * (1.0 - 1e-3) / total for p in target]
            none = 1.0 - sum(target)
            for slot, p in zip(aggs, target, strict=True):
                out[slot.id] = slot.model_copy(update={"include_logit": _clip(math.log(max(p, 1e-12) / none))})
        return out

    # edges

    def edges(self, data: dict[str, Any], slots: list[Slot]) -> list[Edge]:
        base = self.base
        position = {s.id: i for i, s in enumerate(slots)}
        by_id = {s.id: s for s in slots}
        if "edges" not in data:
            wanted: list[Any] = [e.model_dump() for e in base.edges if e.source in by_id and e.target in by_id]
        elif not isinstance(data["edges"], list):
            self.flag("invalid", "edges", "not a list; edges kept")
            wanted = [e.model_dump() for e in base.edges]
        else:
            wanted = data["edges"]
        out: dict[tuple[str, str], Edge] = {}
        for raw in wanted:
            if not isinstance(raw, Mapping):
                self.flag("invalid", str(raw)[:40], "an edge is an object; dropped")
                continue
            src, dst = raw.get("source"), raw.get("target")
            name = f"{src}->{dst}"[:80]
            if not isinstance(src, str) or not isinstance(dst, str) or src not in by_id or dst not in by_id:
                self.flag("unknown_slot", name, "an end of the edge is not a slot of the graph; dropped")
                continue
            if position[src] >= position[dst]:
                self.flag("cycle", name, "the edge points backwards in the fixed slot order; dropped")
                continue
            if by_id[dst].role is Role.SOLVER or by_id[src].role is Role.AGGREGATOR:
                self.flag("invalid", name, "solvers take no inputs and aggregators feed nothing; dropped")
                continue
            if (src, dst) in out:
                self.flag("invalid", name, "edge listed twice; the first kept")
                continue
            logit = _number(raw.get("logit"))
            if logit is None:
                p = _number(raw.get("probability"))
                if p is None:
                    old = base._edge_map.get((src, dst))
                    logit = old.logit if old is not None else _logit(NEW_MAX_PROBABILITY)
                else:
                    logit = _logit(min(max(p, 0.0), 1.0))
            logit = _clip(logit)
            old = base._edge_map.get((src, dst))
            cap = old.logit if old is not None else _logit(NEW_MAX_PROBABILITY)
            if logit > cap + _EPS and not self.proven(lambda _nodes, edges, key=(src, dst): key in edges):
                kind = "unproven_rise" if old is not None else "new_probability"
                self.flag(kind, name, f"probability {_sigmoid(logit):.3f} clipped to {_sigmoid(cap):.3f}")
                logit = cap
            out[(src, dst)] = Edge(source=src, target=dst, logit=logit)
        return list(out.values())

    def bound_in_degree(self, graph: ProbabilisticGraph) -> ProbabilisticGraph:
        """Scale down a slot's input probabilities where their sum (expected in-degree) exceeds the bound."""
        expected: dict[str, float] = {}
        for edge in graph.edges:
            expected[edge.target] = expected.get(edge.target, 0.0) + edge.probability
        over = {t: s for t, s in expected.items() if s > graph.max_in_degree + _EPS}
        if not over:
            return graph
        edges = []
        for edge in graph.edges:
            if edge.target in over:
                p = edge.probability * graph.max_in_degree / over[edge.target] * (1 - 1e-6)
                edge = edge.model_copy(update={"logit": min(edge.logit, _logit(p))})
            edges.append(edge)
        for target, total in over.items():
            self.flag("in_degree", target, f"expected in-degree {total:.2f} > {graph.max_in_degree}; inputs scaled down")
        return _rebuild(graph, edges=tuple(edges))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _int_or_none(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


# -- the numeric REINFORCE step -------------------------------------------------------------------------


def reinforce_step(
    graph: ProbabilisticGraph,
    evidence: Evidence,
    *,
    baseline: float,
    learning_rate: float = 0.5,
    normalize: bool = True,
) -> ProbabilisticGraph:
    """One GPTSwarm step: ``logits += lr * mean_i(A_i * d log p(G_i) / d logits)`` with advantages
    ``A_i = score_i - baseline`` (divided by the scores' standard deviation when ``normalize`` and it is
    not 0). Returns the *proposed* graph: pass it through ``apply_update`` so the rules hold."""
    rows = [(g, float(s)) for g, s in evidence if g.stage == graph.stage]
    if not rows:
        return graph
    spread = pstdev([s for _, s in rows]) if normalize and len(rows) > 1 else 0.0
    scale = learning_rate / len(rows) / (spread if spread > 1e-9 else 1.0)
    include: dict[str, float] = {}
    count: dict[str, list[float]] = {}
    edge: dict[tuple[str, str], float] = {}
    for sampled, score in rows:
        advantage = score - baseline
        grads = graph.score_function(sampled)
        for sid, g in grads["include"].items():
            include[sid] = include.get(sid, 0.0) + advantage * g
        for sid, gs in grads["count"].items():
            acc = count.setdefault(sid, [0.0] * len(gs))
            count[sid] = [a + advantage * g for a, g in zip(acc, gs, strict=True)]
        for key, g in grads["edge"].items():
            edge[key] = edge.get(key, 0.0) + advantage * g
    slots = []
    for slot in graph.slots:
        update: dict[str, Any] = {"include_logit": _clip(slot.include_logit + scale * include.get(slot.id, 0.0))}
        if slot.id in count:
            moved = [z + scale * g for z, g in zip(slot.count_logits, count[slot.id], strict=True)]
            update["count_logits"] = _logits_of(_softmax(moved))
        slots.append(slot.model_copy(update=update))
    edges = tuple(e.model_copy(update={"logit": _clip(e.logit + scale * edge.get(e.key, 0.0))}) for e in graph.edges)
    return _rebuild(graph, slots=tuple(slots), edges=edges)
