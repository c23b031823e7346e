"""Hard budgets for live calls: reserve the worst case before a call, settle the actual cost after.

``BudgetMeter(budget)`` is shared by every call of one job (or one task input of an evaluation). Its
lifecycle per call:

1. ``reserve(worst)``: the call's worst case (prompt tokens + ``n * max_tokens`` in the budget's unit) is
   held; if what is spent plus what is held plus this would pass the limit, ``BudgetExhausted`` is raised
   and nothing is held. The call is then never made.
2. ``settle(reservation, actual)``: after the call, the actual cost replaces the hold.
   ``release(reservation)`` drops a hold whose call failed without generating anything.

Accounting is exact (rational numbers), under one lock, so the meter is safe from threads and from
concurrent tasks alike, and ``spent`` never exceeds the limit as long as every call costs at most what
was reserved for it. Should a call cost more (a local tokenizer undercounted the prompt), the cost is
still charged in full, and the excess is reported in ``overrun``; reservations therefore pad the prompt
estimate (``PROMPT_MARGIN``).

``MeteredBackend(inner, meter)`` applies this to every request of any backend.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

from executors.backends import BackendError, BudgetExhausted, CompletionRequest, CompletionResult, ModelBackend
from graphs.cost import Budget, BudgetUnit, Cost, ModelSpec, call_flops, sample_usd
from graphs.errors import BudgetError, UnknownModel

__all__ = [
    "PROMPT_MARGIN",
    "BudgetMeter",
    "MeteredBackend",
    "Reservation",
    "estimate_prompt_tokens",
    "worst_case_cost",
]

PROMPT_MARGIN = (1.15, 16)
"""A reservation counts ``prompt_tokens * 1.15 + 16``: local tokenizers differ from the server's."""


@dataclass(frozen=True)
class Reservation:
    """A hold on part of a budget, for one call. Settle or release it exactly once."""

    reservation_id: int
    amount: float
    """The hold, in the budget's unit."""
    worst: Cost | None = None


def worst_case_cost(spec: ModelSpec, prompt_tokens: float, n: int, max_tokens: int | None, *, usd: float | None = None) -> Cost:
    """The most a call of ``n`` samples of at most ``max_tokens`` each can cost.

    Args:
        spec: the model (sizes for FLOPs, prices, context).
        prompt_tokens: the prompt's token count (pad it for tokenizer differences: ``PROMPT_MARGIN``).
        n: samples.
        max_tokens: the cap per sample; ``None`` means up to the model's context.
        usd: the dollars of the worst case where the catalog has no prices (e.g. from litellm's price
            map); ``None`` with no catalog prices means unknown, except for a self-hosted model (an
            ``api_base`` and no price), which costs nothing per call.

    Raises:
        BudgetError: ``max_tokens`` is ``None`` and the catalog gives no context for the model.
    """
    if max_tokens is None:
        if spec.context is None:
            raise BudgetError(
                f"model {spec.name!r}: a call without max_tokens has no worst case; set max_tokens on the "
                "node or the model's context in the catalog"
            )
        max_tokens = max(1, int(spec.context - prompt_tokens))
    dollars = sample_usd(spec, prompt_tokens, max_tokens, n)
    if dollars is None:
        dollars = usd if usd is not None else (0.0 if spec.api_base else None)
    return Cost(
        flops=float(call_flops(spec, float(prompt_tokens), float(max_tokens), n)),
        prompt_tokens=float(prompt_tokens),
        output_tokens=float(n * max_tokens),
        usd=dollars,
    )


def estimate_prompt_tokens(request: CompletionRequest) -> int:
    """A backend-free upper estimate of a prompt's tokens: one per 3 characters plus 4 per message."""
    chars = sum(len(str(message.get("content", ""))) for message in request.messages)
    return math.ceil(chars / 3) + 4 * len(request.messages) + 3


class BudgetMeter:
    """Reserve, then settle: a hard limit on what a job's calls may spend. See the module docstring.

    Args:
        budget: the limit and its unit (FLOPs, ``agenttts``/``call1b`` units, tokens or dollars).
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._limit = Fraction(budget.limit)
        self._spent = Fraction(0)
        self._held: dict[int, Fraction] = {}
        self._overrun = Fraction(0)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.refused = 0
        """How many reservations were refused."""

    def __repr__(self) -> str:
        return f"BudgetMeter({self.budget}, spent={self.spent:.4g}, reserved={self.reserved:.4g})"

    @property
    def limit(self) -> float:
        return float(self._limit)

    @property
    def spent(self) -> float:
        """Settled cost, in the budget's unit."""
        with self._lock:
            return float(self._spent)

    @property
    def reserved(self) -> float:
        """What calls in flight hold."""
        with self._lock:
            return float(sum(self._held.values(), Fraction(0)))

    @property
    def remaining(self) -> float:
        """What a new reservation may still hold: limit - spent - reserved (never negative)."""
        with self._lock:
            return float(max(Fraction(0), self._limit - self._spent - sum(self._held.values(), Fraction(0))))

    @property
    def overrun(self) -> float:
        """Total by which settled calls cost more than they had reserved (0 when estimates held)."""
        with self._lock:
            return float(self._overrun)

    @property
    def exhausted(self) -> bool:
        """True once a reservation was refused (a job stopped at its budget)."""
        return self.refused > 0

    def amount(self, cost: Cost | float) -> float:
        """``cost`` in the budget's unit. Raises ``BudgetError`` for a dollar budget and unpriced cost."""
        return float(cost) if isinstance(cost, int | float) else self.budget.spent(cost)

    def reserve(self, worst: Cost | float, *, what: str = "a call") -> Reservation:
        """Hold ``worst`` (a ``Cost`` or an amount in the budget's unit) or raise ``BudgetExhausted``."""
        value = self.amount(worst)
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"a reservation must be a finite amount >= 0, got {value}")
        exact = Fraction(value)
        with self._lock:
            held = sum(self._held.values(), Fraction(0))
            if self._spent + held + exact > self._limit:
                self.refused += 1
                left = max(Fraction(0), self._limit - self._spent - held)
                raise BudgetExhausted(
                    f"budget {self.budget} would be exceeded: {what} may cost {value:.4g} but only {float(left):.4g} "
                    f"is left ({float(self._spent):.4g} spent, {float(held):.4g} held by calls in flight)"
                )
            reservation = Reservation(next(self._ids), value, worst if isinstance(worst, Cost) else None)
            self._held[reservation.reservation_id] = exact
            return reservation

    def settle(self, reservation: Reservation, actual: Cost | float) -> float:
        """Replace the hold by the actual cost; returns the amount charged. Raises ``KeyError`` if the
        reservation was settled or released already."""
        value = Fraction(self.amount(actual))
        with self._lock:
            held = self._held.pop(reservation.reservation_id, None)
            if held is None:
                raise KeyError(f"reservation {reservation.reservation_id} is not held (settled or released already)")
            if value > held:
                self._overrun += value - held
            self._spent += value
            return float(value)

    def release(self, reservation: Reservation) -> None:
        """Drop a hold without charging (its call failed before generating). Idempotent."""
        with self._lock:
            self._held.pop(reservation.reservation_id, None)

    @contextmanager
    def holding(self, worst: Cost | float, *, what: str = "a call") -> Iterator[_Hold]:
        """``with meter.holding(worst) as hold: ...; hold.settle(actual)``; unsettled holds are released."""
        hold = _Hold(self, self.reserve(worst, what=what))
        try:
            yield hold
        finally:
            if not hold.settled:
                self.release(hold.reservation)


class _Hold:
    def __init__(self, meter: BudgetMeter, reservation: Reservation) -> None:
        self.meter = meter
        self.reservation = reservation
        self.settled = False

    def settle(self, actual: Cost | float) -> float:
        self.settled = True
        return self.meter.settle(self.reservation, actual)


class MeteredBackend(ModelBackend):
    """Any backend under a ``BudgetMeter``: each request reserves its worst case first.

    The worst case comes from ``inner.estimate(request)`` where the backend has one (``LiteLLMBackend``,
    ``CachedBackend``), else from ``catalog`` with ``estimate_prompt_tokens``. The charge is
    ``result.cost``: what the samples cost, also when a sample store served them, so a plan costs the
    same whether or not its samples were reused (and never less than was really paid).
    A failed call is charged what it returned before failing (``BackendError.partial``), else nothing.
    """

    def __init__(
        self,
        inner: ModelBackend,
        meter: BudgetMeter,
        *,
        catalog: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        self.inner = inner
        self.meter = meter
        self.catalog = dict(catalog if catalog is not None else getattr(inner, "catalog", None) or {})
        self._estimate: Callable[[CompletionRequest], Cost] | None = getattr(inner, "estimate", None)

    def estimate(self, request: CompletionRequest) -> Cost:
        """The worst-case cost of ``request``."""
        if self._estimate is not None:
            return self._estimate(request)
        spec = self.catalog.get(request.model)
        if spec is None:
            known = ", ".join(sorted(self.catalog)) or "none"
            raise UnknownModel(f"model {request.model!r} is not in the catalog (known: {known})")
        scale, extra = PROMPT_MARGIN
        prompt = estimate_prompt_tokens(request) * scale + extra
        return worst_case_cost(spec, prompt, request.n, request.max_tokens)

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        worst = self.estimate(request)
        if self.meter.budget.unit is BudgetUnit.USD and worst.usd is None:
            raise BudgetError(f"a dollar budget needs prices for model {request.model!r}: add them to the catalog")
        with self.meter.holding(worst, what=f"{request.n} sample(s) of {request.model}") as hold:
            try:
                result = await self.inner.complete(request)
            except BackendError as exc:
                if exc.partial is not None:
                    hold.settle(exc.partial.cost)
                raise
            hold.settle(result.cost)
            return result

    async def aclose(self) -> None:
        await self.inner.aclose()
