"""Model backends: the one seam between plans and models, like an httpx transport.

``ModelBackend.complete(request) -> CompletionResult`` is async; ``LiteLLMBackend`` (in
``executors.litellm_backend``) reaches every route litellm knows (hosted APIs, vLLM and other
OpenAI-compatible servers via ``hosted_vllm/...`` and an ``api_base``); ``MockBackend(handler)`` answers
from a function, for tests about something else. Errors are translated at this edge into Allot's own
(``BackendError`` and its subclasses), each one line naming the problem and the fix.
"""

from __future__ import annotations

import abc
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphs.cost import Cost
from graphs.errors import AllotError

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "BudgetExhausted",
    "CompletionRequest",
    "CompletionResult",
    "ContextTooLong",
    "Generation",
    "MissingAPIKey",
    "MockBackend",
    "ModelBackend",
    "RateLimited",
]


class BackendError(AllotError, RuntimeError):
    """A model call failed; the message names the model and what to do.

    ``partial`` holds the generations a call did get before it failed (a request split into several
    calls, some of which returned), so a caller such as the sample store can keep them.
    """

    def __init__(self, *args: object, partial: CompletionResult | None = None) -> None:
        super().__init__(*args)
        self.partial = partial


class BackendTimeout(BackendError):
    """The model did not answer in time."""


class BackendUnavailable(BackendError):
    """The model's server cannot be reached (down, refused, DNS)."""


class RateLimited(BackendError):
    """The provider refused for rate limits, after retries."""


class MissingAPIKey(BackendError):
    """The provider needs an API key that is not in the environment (the message names the variable)."""


class ContextTooLong(BackendError):
    """The prompt (plus max_tokens) does not fit the model's context window."""


class BudgetExhausted(AllotError, RuntimeError):
    """A call was refused before it was made because it could exceed the job's budget."""


@dataclass(frozen=True)
class CompletionRequest:
    """One call: ``n`` samples of ``model`` (a catalog name) on ``messages``."""

    model: str
    messages: tuple[Mapping[str, str], ...]
    n: int = 1
    temperature: float = 0.7
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    offset: int = 0
    """Index of the first sample asked for: the request is for samples ``offset .. offset + n - 1`` of this
    prompt (a sample store keys samples by index; early stop draws in batches). Not a decoding parameter."""

    def params(self) -> dict[str, Any]:
        """Decoding parameters that change what is sampled (part of the sample store's key)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "stop": list(self.stop), "seed": self.seed}


@dataclass(frozen=True)
class Generation:
    """One sample: its text and what it cost."""

    text: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float = 0.0
    finish_reason: str = "stop"
    usd: float | None = None
    """This sample's share of the call's dollars (the prompt split evenly); None where unpriced."""


@dataclass(frozen=True)
class CompletionResult:
    generations: tuple[Generation, ...]
    cost: Cost = field(default_factory=Cost)
    """Accounted cost of the whole call: FLOPs (prefill once, every sample's decode), tokens, dollars.
    With a sample store in front, what the samples cost whether generated now or earlier."""
    latency_s: float = 0.0
    reused: int = 0
    """How many of ``generations`` a sample store served instead of generating them."""
    generated_cost: Cost | None = None
    """What this call actually generated now, when a store served some samples (``None``: all of ``cost``)."""

    @property
    def paid(self) -> Cost:
        """The cost actually incurred by this call (``cost`` minus what a store served)."""
        return self.cost if self.generated_cost is None else self.generated_cost


class ModelBackend(abc.ABC):
    """Answers completion requests. Lifecycle: build, ``await complete(...)`` concurrently, ``aclose()``."""

    @abc.abstractmethod
    async def complete(self, request: CompletionRequest) -> CompletionResult:
        """Return exactly ``request.n`` generations or raise a ``BackendError``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


Handler = Callable[[CompletionRequest], Sequence[str] | Awaitable[Sequence[str]]]


class MockBackend(ModelBackend):
    """Answers with ``handler(request) -> n texts`` (sync or async). Tokens are counted as len(text) // 4."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[CompletionRequest] = []

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        self.requests.append(request)
        start = time.perf_counter()
        texts = self.handler(request)
        if inspect.isawaitable(texts):
            texts = await texts
        texts = list(texts)  # type: ignore[arg-type]
        if len(texts) != request.n:
            raise BackendError(f"mock handler returned {len(texts)} texts for n={request.n}")
        prompt = sum(len(str(m.get("content", ""))) for m in request.messages) // 4
        gens = tuple(Generation(t, prompt, max(1, len(t) // 4)) for t in texts)
        out = sum(g.output_tokens for g in gens)
        return CompletionResult(gens, Cost(0.0, float(prompt), float(out), 0.0), time.perf_counter() - start)
