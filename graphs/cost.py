"""The cost model: FLOPs, tokens and dollars of LLM calls, and budgets in any of those units.

FLOPs follow the papers: every token processed costs ``2 * active_params`` plus an attention term
``2 * layers * hidden * context`` where ``context`` is the token's position. The prompt prefill of
``n`` repeated samples is paid once. Two normalisations make numbers comparable with the papers:

- ``agenttts``: one sample of a 3B model (Llama-3.2-3B shape) with 128 prompt and 64 output tokens;
- ``call1b``: one call of a 1B model (Llama-3.2-1B shape) with the same 128 + 64 tokens.

Pure functions and values only; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from graphs.errors import BudgetError

__all__ = [
    "AGENTTTS_UNIT_FLOPS",
    "CALL1B_UNIT_FLOPS",
    "Budget",
    "BudgetUnit",
    "Cost",
    "ModelSpec",
    "call_flops",
    "decode_flops",
    "prefill_flops",
    "sample_usd",
]


Tokens = TypeVar("Tokens", float, np.ndarray)


class ModelSpec(BaseModel):
    """What the cost model needs to know about one model (a catalog entry)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    params_b: float = Field(gt=0, description="total parameters, billions")
    active_params_b: float | None = Field(default=None, gt=0, description="per-token parameters (MoE)")
    layers: int | None = Field(default=None, ge=1)
    hidden: int | None = Field(default=None, ge=1)
    input_usd_per_mtok: float | None = Field(default=None, ge=0)
    output_usd_per_mtok: float | None = Field(default=None, ge=0)
    context: int | None = Field(default=None, ge=1, description="context window, tokens")
    route: str | None = Field(default=None, description="litellm route, e.g. hosted_vllm/qwen3-8b")
    api_base: str | None = None
    max_concurrency: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _active_not_above_total(self) -> ModelSpec:
        if self.active_params_b is not None and self.active_params_b > self.params_b * 1.0001:
            raise ValueError(f"{self.name}: active_params_b exceeds params_b")
        return self

    @property
    def active_params(self) -> float:
        return (self.active_params_b or self.params_b) * 1e9

    @property
    def attention_width(self) -> float:
        """``layers * hidden``; estimated from the parameter count where the catalog does not say.

        A dense transformer has about ``12 * layers * hidden**2`` parameters and ``hidden ~ 128 * layers``
        across common families, which gives ``layers ~ (P / 196608) ** (1/3)``.
        """
        if self.layers is not None and self.hidden is not None:
            return float(self.layers * self.hidden)
        base = (self.active_params_b or self.params_b) * 1e9
        layers = self.layers or max(1.0, (base / 196_608) ** (1 / 3))
        hidden = self.hidden or math.sqrt(base / (12 * layers))
        return float(layers * hidden)


def prefill_flops(spec: ModelSpec, prompt_tokens: Tokens) -> Tokens:
    """FLOPs to read a prompt of ``prompt_tokens``: sum over positions t of 2P + 2LH t."""
    p = prompt_tokens
    return 2 * spec.active_params * p + spec.attention_width * p * (p + 1)


def decode_flops(spec: ModelSpec, prompt_tokens: Tokens, output_tokens: Tokens) -> Tokens:
    """FLOPs to generate ``output_tokens`` after a prompt (one sample). Works elementwise on arrays."""
    p, o = prompt_tokens, output_tokens
    return 2 * spec.active_params * o + 2 * spec.attention_width * (p * o + o * (o + 1) / 2)


def call_flops(spec: ModelSpec, prompt_tokens: Tokens, output_tokens: Tokens, n: int = 1) -> Tokens:
    """One call returning ``n`` samples: the prefill is shared, every sample decodes."""
    return prefill_flops(spec, prompt_tokens) + n * decode_flops(spec, prompt_tokens, output_tokens)


_REF_3B = ModelSpec(name="reference-3b", params_b=3.21, layers=28, hidden=3072)
_REF_1B = ModelSpec(name="reference-1b", params_b=1.24, layers=16, hidden=2048)
AGENTTTS_UNIT_FLOPS = call_flops(_REF_3B, 128, 64)
CALL1B_UNIT_FLOPS = call_flops(_REF_1B, 128, 64)


class BudgetUnit(StrEnum):
    FLOPS = "flops"
    AGENTTTS = "agenttts"  # one 3B sample, 128 prompt + 64 output tokens
    CALL1B = "call1b"  # one 1B call, 128 prompt + 64 output tokens
    TOKENS = "tokens"  # prompt + output tokens
    USD = "usd"


@dataclass(frozen=True, slots=True)
class Cost:
    """What something cost (or is estimated to cost). ``usd`` is None where a price is unknown."""

    flops: float = 0.0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    usd: float | None = 0.0

    def __add__(self, other: Cost) -> Cost:
        usd = None if self.usd is None or other.usd is None else self.usd + other.usd
        return Cost(
            self.flops + other.flops,
            self.prompt_tokens + other.prompt_tokens,
            self.output_tokens + other.output_tokens,
            usd,
        )

    def scaled(self, factor: float) -> Cost:
        usd = None if self.usd is None else self.usd * factor
        return Cost(self.flops * factor, self.prompt_tokens * factor, self.output_tokens * factor, usd)

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.output_tokens

    def in_unit(self, unit: BudgetUnit | str) -> float:
        unit = BudgetUnit(unit)
        if unit is BudgetUnit.FLOPS:
            return self.flops
        if unit is BudgetUnit.AGENTTTS:
            return self.flops / AGENTTTS_UNIT_FLOPS
        if unit is BudgetUnit.CALL1B:
            return self.flops / CALL1B_UNIT_FLOPS
        if unit is BudgetUnit.TOKENS:
            return self.tokens
        if self.usd is None:
            raise BudgetError("a dollar budget needs prices: add input/output_usd_per_mtok to the catalog")
        return self.usd

    def as_dict(self) -> dict[str, float | None]:
        return {
            "flops": self.flops,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "usd": self.usd,
        }


def sample_usd(spec: ModelSpec, prompt_tokens: float, output_tokens: float, n: int = 1) -> float | None:
    """Dollars of a call at the catalog's prices (hosted APIs bill the prompt once per request)."""
    if spec.input_usd_per_mtok is None or spec.output_usd_per_mtok is None:
        return None
    return (prompt_tokens * spec.input_usd_per_mtok + n * output_tokens * spec.output_usd_per_mtok) / 1e6


class Budget(BaseModel):
    """A hard limit on cost per task input, in one unit. Checked before anything is evaluated or run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: float = Field(gt=0)
    unit: BudgetUnit = BudgetUnit.AGENTTTS

    @classmethod
    def parse(cls, limit: float, unit: str) -> Budget:
        try:
            return cls(limit=limit, unit=BudgetUnit(unit))
        except ValueError as exc:
            units = ", ".join(u.value for u in BudgetUnit)
            raise BudgetError(f"invalid budget {limit} {unit}: limit must be > 0 and unit one of {units}") from exc

    def spent(self, cost: Cost) -> float:
        return cost.in_unit(self.unit)

    def allows(self, cost: Cost) -> bool:
        return self.spent(cost) <= self.limit * (1 + 1e-9)

    def __str__(self) -> str:
        return f"{self.limit:.4g} {self.unit.value}"
