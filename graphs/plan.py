"""Plans: per-stage collaboration graphs, as immutable values with a stable identity.

A plan says, for every stage of a task, which nodes run (role, model, samples, decoding limits), how
their outputs flow (edges u -> v append u's output to v's context) and how the stage's answer is decided.
An AgentTTS allocation (one model and a sample count per stage) is the simplest plan:
``Plan.allocation({"answer": ("Qwen3-4B", 8)})``.

Plans serialise to canonical JSON; its sha256 is the plan's id, its dedup key and its replay key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from typing import Any

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graphs.errors import InvalidPlan

__all__ = ["DecisionRule", "Node", "Plan", "Role", "StageGraph"]

MAX_IN_DEGREE = 8


class Role(StrEnum):
    """What a node does with its context."""

    SOLVER = "solver"  # answers the stage's prompt (the papers' "assistant")
    AGGREGATOR = "aggregator"  # fuses its predecessors' answers into one
    REVIEWER = "reviewer"  # criticises its predecessors' answers
    REVISER = "reviser"  # rewrites an answer given reviews
    VERIFIER = "verifier"  # scores candidate answers for best-of-n


class DecisionRule(StrEnum):
    """How a stage turns its answer nodes' outputs into the stage's answer."""

    MAJORITY_VOTE = "majority_vote"
    BEST_OF_N = "best_of_n"  # the verifier node scores every candidate; the best wins
    FUSION = "fusion"  # the single aggregator sink writes the answer


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Node(_Value):
    """One LLM call site: ``n`` samples of ``model`` in ``role``."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    role: Role = Role.SOLVER
    model: str = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=4096)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)


class StageGraph(_Value):
    """The collaboration graph of one stage: a DAG of nodes plus a decision rule."""

    stage: str = Field(min_length=1, max_length=64)
    nodes: tuple[Node, ...] = Field(min_length=1)
    edges: tuple[tuple[str, str], ...] = ()
    decision: DecisionRule = DecisionRule.MAJORITY_VOTE
    early_stop: int | None = Field(default=None, ge=2)
    """Majority vote only: stop drawing samples once this many answers agree."""

    @field_validator("nodes")
    @classmethod
    def _sorted_nodes(cls, nodes: tuple[Node, ...]) -> tuple[Node, ...]:
        ids = [node.id for node in nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"node ids must be unique, got {ids}")
        return tuple(sorted(nodes, key=lambda node: node.id))

    @field_validator("edges")
    @classmethod
    def _sorted_edges(cls, edges: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(set(edges)))

    @model_validator(mode="after")
    def _check_graph(self) -> StageGraph:
        ids = {node.id for node in self.nodes}
        for src, dst in self.edges:
            if src not in ids or dst not in ids:
                raise ValueError(f"edge {src}->{dst} names a node that is not in stage {self.stage!r}")
            if src == dst:
                raise ValueError(f"edge {src}->{dst} is a self-loop")
        if self.edges:  # independent samples (the common case) need no graph checks
            graph = self.to_networkx()
            if not nx.is_directed_acyclic_graph(graph):
                cycle = nx.find_cycle(graph)
                raise ValueError(f"stage {self.stage!r} has a cycle: {cycle}")
            worst = max((deg for _, deg in graph.in_degree()), default=0)
            if worst > MAX_IN_DEGREE:
                raise ValueError(f"a node of stage {self.stage!r} has in-degree {worst} > {MAX_IN_DEGREE}")
        verifiers = [node for node in self.nodes if node.role is Role.VERIFIER]
        sinks = self.answer_nodes
        if not sinks:
            raise ValueError(f"stage {self.stage!r} has no answer node")
        if self.decision is DecisionRule.BEST_OF_N and len(verifiers) != 1:
            raise ValueError(f"best_of_n in stage {self.stage!r} needs exactly one verifier node")
        if self.decision is not DecisionRule.BEST_OF_N and verifiers:
            raise ValueError(f"stage {self.stage!r} has a verifier node but decides by {self.decision}")
        if self.decision is DecisionRule.FUSION and (len(sinks) != 1 or sinks[0].role is not Role.AGGREGATOR):
            raise ValueError(f"fusion in stage {self.stage!r} needs exactly one aggregator sink node")
        if self.early_stop is not None and self.decision is not DecisionRule.MAJORITY_VOTE:
            raise ValueError("early_stop applies to majority_vote only")
        return self

    def to_networkx(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        graph.add_nodes_from((node.id, {"node": node}) for node in self.nodes)
        graph.add_edges_from(self.edges)
        return graph

    @property
    def answer_nodes(self) -> tuple[Node, ...]:
        """Nodes whose outputs the decision rule sees: sinks that are not the verifier."""
        has_out = {src for src, _ in self.edges}
        return tuple(n for n in self.nodes if n.id not in has_out and n.role is not Role.VERIFIER)

    def node(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({node.model for node in self.nodes}))

    def summary(self) -> str:
        parts = []
        for node in self.nodes:
            text = f"{node.model}x{node.n}"
            if node.role is not Role.SOLVER:
                text = f"{node.role}:{text}"
            if node.max_tokens is not None:
                text += f"@{node.max_tokens}"
            parts.append(text)
        text = "+".join(parts)
        if self.edges:
            text += f" [{len(self.edges)} edges]"
        if self.decision is not DecisionRule.MAJORITY_VOTE:
            text += f" ({self.decision})"
        if self.early_stop is not None:
            text += f" (stop@{self.early_stop} agree)"
        return text


AllocationSpec = str | tuple[str, int] | tuple[str, int, int | None]


class Plan(_Value):
    """A candidate allocation for a whole task: one collaboration graph per stage."""

    stages: tuple[StageGraph, ...] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique_stages(cls, stages: tuple[StageGraph, ...]) -> tuple[StageGraph, ...]:
        names = [stage.stage for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages

    @classmethod
    def allocation(cls, spec: Mapping[str, AllocationSpec], *, early_stop: int | None = None) -> Plan:
        """An AgentTTS allocation: ``{"stage": (model, n)}`` or ``(model, n, max_tokens)`` per stage."""
        stages = []
        for stage, value in spec.items():
            model, n, cap = _unpack(value)
            node = {"id": "s0", "model": model, "n": n, "max_tokens": cap}
            stages.append({"stage": stage, "nodes": (node,), "early_stop": early_stop})
        return cls.build(stages=tuple(stages))

    @classmethod
    def build(cls, **fields: Any) -> Plan:
        """Validate fields into a plan, turning pydantic's errors into one ``InvalidPlan`` line."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise InvalidPlan(_one_line(exc)) from exc

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> Plan:
        try:
            data = json.loads(text) if isinstance(text, str | bytes) else dict(text)
        except json.JSONDecodeError as exc:
            raise InvalidPlan(f"plan is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidPlan("plan JSON must be an object with a 'stages' list")
        return cls.build(**data)

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @cached_property
    def plan_id(self) -> str:
        """sha256 of the canonical JSON: equal plans have equal ids, whatever order they were built in."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def stage(self, name: str) -> StageGraph:
        for stage in self.stages:
            if stage.stage == name:
                return stage
        raise KeyError(name)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({m for stage in self.stages for m in stage.models}))

    def summary(self) -> str:
        return "; ".join(f"{stage.stage}: {stage.summary()}" for stage in self.stages)

    def __hash__(self) -> int:
        return hash(self.plan_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and other.plan_id == self.plan_id


def _unpack(value: AllocationSpec) -> tuple[str, int, int | None]:
    if isinstance(value, str):
        return value, 1, None
    if len(value) == 2:
        return value[0], value[1], None
    return value[0], value[1], value[2]


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", str(exc)).removeprefix("Value error, ")
    return f"invalid plan: {where + ': ' if where else ''}{message}"
