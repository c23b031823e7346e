"""``LiteLLMBackend``: every model litellm can reach, behind Allot's ``ModelBackend`` seam.

A catalog entry (``graphs.cost.ModelSpec``) gives the litellm route (``openai/gpt-4o-mini``,
``anthropic/...``, ``hosted_vllm/qwen3-8b`` with an ``api_base`` for a vLLM or llama.cpp server), the
prices, the context window and the concurrency limit. One ``complete(request)``:

1. checks what can be checked before paying: the model is in the catalog (``UnknownModel`` naming the
   known ones), litellm knows its route (``UnknownModel``), the provider's API key is set
   (``MissingAPIKey`` naming the variable, never its value), the prompt plus ``max_tokens`` fits the
   context (``ContextTooLong``);
2. waits for the model's limits: concurrency (a semaphore), requests and tokens per minute (token
   buckets);
3. calls ``litellm.acompletion`` with a timeout, retrying rate limits (429), server errors (5xx) and
   connection errors with exponential backoff and jitter, a bounded number of times;
4. asks for ``n`` samples in as few calls as the model allows (``max_n``) and tops up with more calls
   when a server returns fewer choices than asked for (it then remembers the server's cap);
5. accounts every call: prompt tokens (prefill paid once per call), output tokens per sample (from
   ``usage`` where it covers all choices; counted locally with ``litellm.token_counter`` where it does
   not, as llama.cpp's ``usage`` counts one choice only), FLOPs (``graphs.cost``), dollars (the
   catalog's prices, else litellm's price map; a self-hosted model without prices costs 0), latency.

Every litellm, openai, httpx or aiohttp exception is translated in one place, ``translate_errors``,
into ``BackendTimeout``, ``BackendUnavailable``, ``RateLimited``, ``ContextTooLong``, ``MissingAPIKey``
or ``BackendError``, each one line naming the model, the problem and the fix. API keys are never passed,
stored or logged by Allot: litellm reads them from the provider's environment variables, and any
environment secret found in an error message is masked.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import random
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from executors.backends import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CompletionRequest,
    CompletionResult,
    ContextTooLong,
    Generation,
    MissingAPIKey,
    ModelBackend,
    RateLimited,
)
from executors.budget import PROMPT_MARGIN, worst_case_cost
from graphs.cost import Cost, ModelSpec, decode_flops, prefill_flops
from graphs.errors import AllotError, UnknownModel

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__all__ = [
    "BackendStats",
    "LiteLLMBackend",
    "ModelLimits",
    "TokenBucket",
    "redact_secrets",
    "translate_errors",
]

CompletionFn = Callable[..., Awaitable[Any]]

_SELF_HOSTED = frozenset({"hosted_vllm", "vllm", "ollama", "ollama_chat", "lm_studio", "llamafile", "openai_like"})
_CONTEXT_PHRASES = (
    "context length",
    "context size",
    "context window",
    "maximum context",
    "exceeds the available context",
    "too many tokens",
    "prompt is too long",
    "exceed_context_size",
)
_CONNECT_PHRASES = (
    "cannot connect",
    "connection error",
    "connection refused",
    "connect call failed",
    "server disconnected",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "all connection attempts failed",
)
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.I)


@dataclass(frozen=True)
class ModelLimits:
    """Per-model limits and quirks (catalog entries give ``max_concurrency``; the rest is set here).

    Attributes:
        max_concurrency: calls in flight at once (``None``: the catalog's ``max_concurrency``, else 16).
        requests_per_minute: token bucket on calls (``None``: unlimited).
        tokens_per_minute: token bucket on prompt + output tokens; a call holds its worst case while in
            flight and is settled with the actual count (``None``: unlimited).
        max_n: the most samples one call may ask for (``None``: no cap until a server returns fewer;
            1: a backend that ignores ``n``).
        timeout_s: per-call timeout (``None``: the backend's).
        usage_covers_all_choices: whether ``usage.completion_tokens`` counts every choice of an ``n>1``
            call (OpenAI, vLLM: yes; llama.cpp: no, one choice only). ``None``: decide per call from
            local counts.
    """

    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_n: int | None = None
    timeout_s: float | None = None
    usage_covers_all_choices: bool | None = None


@dataclass
class BackendStats:
    """Running totals of one backend (every model). ``own_s`` is the executor's own time: the wall time
    of ``complete`` minus time inside litellm, waiting for limits and sleeping between retries."""

    requests: int = 0
    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    top_ups: int = 0
    samples: int = 0
    cost: Cost = field(default_factory=Cost)
    call_s: float = 0.0
    waited_s: float = 0.0
    own_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


class TokenBucket:
    """``per_minute`` units per minute, bursting up to a minute's worth. Safe across tasks of one loop.

    ``acquire(amount)`` waits until the bucket holds ``amount`` (capped at its capacity) and takes it;
    ``adjust(delta)`` gives back (negative) or takes more (positive) once the real amount is known, and
    may leave the bucket in debt, which later acquisitions wait out.
    """

    def __init__(self, per_minute: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("a rate limit must be > 0 per minute")
        self.capacity = float(per_minute)
        self.rate = float(per_minute) / 60.0
        self._clock = clock
        self._level = self.capacity
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` can be taken (0 if now)."""
        self._refill()
        need = min(amount, self.capacity)
        return max(0.0, (need - self._level) / self.rate)

    async def acquire(self, amount: float) -> float:
        """Take ``amount``; returns the seconds waited."""
        waited = 0.0
        need = min(float(amount), self.capacity)
        while True:
            delay = self.wait_time(need)
            if delay <= 0:
                self._level -= need
                return waited
            await asyncio.sleep(delay)
            waited += delay

    def adjust(self, delta: float) -> None:
        self._refill()
        self._level = min(self.capacity, self._level - delta)


def redact_secrets(text: str) -> str:
    """``text`` with the value of every environment variable that looks like a secret masked."""
    for name, value in os.environ.items():
        if len(value) >= 6 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip()
    for prefix in ("litellm.", "InternalServerError: ", "APIConnectionError: "):
        text = text.removeprefix(prefix)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or type(exc).__name__
    line = redact_secrets(line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status(exc: BaseException) -> int | None:
    for item in _chain(exc):
        status = getattr(item, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _retry_after(exc: BaseException) -> float | None:
    """The server's ``Retry-After`` in seconds, where it sent one."""
    for item in _chain(exc):
        response = getattr(item, "response", None)
        headers = getattr(response, "headers", None)
        if headers is None:
            continue
        try:
            value = headers.get("retry-after")
        except Exception:  # a mock response without real headers
            return None
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    return None


def _is_timeout(exc: BaseException) -> bool:
    import httpx
    import openai

    kinds: tuple[type[BaseException], ...] = (openai.APITimeoutError, httpx.TimeoutException, TimeoutError)
    try:
        import aiohttp

        kinds += (aiohttp.ServerTimeoutError,)
    except ImportError:  # pragma: no cover - litellm installs aiohttp
        pass
    return any(isinstance(item, kinds) for item in _chain(exc))


def _is_connection(exc: BaseException) -> bool:
    import httpx
    import openai

    kinds: tuple[type[BaseException], ...] = (openai.APIConnectionError, httpx.TransportError, ConnectionError)
    try:
        import aiohttp

        kinds += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    except ImportError:  # pragma: no cover
        pass
    if any(isinstance(item, kinds) for item in _chain(exc)):
        return True
    text = str(exc).lower()
    return any(phrase in text for phrase in _CONNECT_PHRASES)


@contextmanager
def translate_errors(
    model: str,
    *,
    route: str | None = None,
    api_base: str | None = None,
    timeout_s: float | None = None,
    key_names: Sequence[str] = (),
) -> Iterator[None]:
    """Re-raise litellm/openai/httpx/aiohttp exceptions as Allot's ``BackendError`` subclasses (``from`` the
    original). Allot's own errors pass through. The message names the model and the fix, never a key."""
    try:
        yield
    except AllotError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise _translate(exc, model, route=route, api_base=api_base, timeout_s=timeout_s, key_names=key_names) from exc


def _where(model: str, route: str | None, api_base: str | None) -> str:
    at = f" at {api_base}" if api_base else ""
    return f"model {model!r} ({route}{at})" if route else f"model {model!r}"


def _translate(
    exc: BaseException,
    model: str,
    *,
    route: str | None,
    api_base: str | None,
    timeout_s: float | None,
    key_names: Sequence[str],
) -> BackendError:
    import litellm

    where = _where(model, route, api_base)
    detail = _first_line(exc)
    status = _status(exc)
    lower = str(exc).lower()
    if isinstance(exc, litellm.ContextWindowExceededError) or (
        status in (400, 413, None) and any(phrase in lower for phrase in _CONTEXT_PHRASES)
    ):
        return ContextTooLong(
            f"{where}: the prompt plus max_tokens does not fit its context ({detail}): shorten the prompt or lower max_tokens"
        )
    if _is_timeout(exc):
        within = f" within {timeout_s:g} s" if timeout_s else " in time"
        return BackendTimeout(f"{where} did not answer{within}: raise the timeout, lower max_tokens or check the server's load")
    if isinstance(exc, litellm.RateLimitError) or status == 429:
        return RateLimited(f"{where} refused for rate limits ({detail}): lower requests/tokens per minute or concurrency")
    if isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError) or status in (401, 403):
        names = ", ".join(key_names) or "the provider's API key variable"
        missing = [name for name in key_names if not os.environ.get(name)]
        if missing:
            return MissingAPIKey(f"{where} needs {', '.join(missing)} set in the environment")
        return BackendError(f"{where} refused the credentials ({detail}): check {names}")
    if _is_connection(exc) and status in (None, 500):
        target = api_base or "its provider"
        return BackendUnavailable(f"{where} cannot be reached ({detail}): check that the server at {target} is running")
    if status is not None and status >= 500:
        return BackendUnavailable(f"{where} answered with server error {status} ({detail}): the server is failing or overloaded")
    if isinstance(exc, litellm.NotFoundError) or status == 404:
        return BackendError(f"{where} was not found by the provider ({detail}): check the route and api_base in the catalog")
    return BackendError(f"{where} failed: {type(exc).__name__}: {detail}")


_RETRYABLE = (RateLimited, BackendUnavailable)


@dataclass
class _ModelState:
    """Limits of one model that live across calls (token buckets, learned caps)."""

    limits: ModelLimits
    max_n: int | None
    rpm: TokenBucket | None
    tpm: TokenBucket | None
    usage_all: bool | None
    supported: frozenset[str]
    """OpenAI parameters litellm knows the provider to take (empty: unknown, send everything)."""


@dataclass
class _Clock:
    """Where one ``complete`` spent its time."""

    call_s: float = 0.0
    waited_s: float = 0.0


def _canonical_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([dict(m) for m in messages], sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def _count_messages(route: str, messages_json: str) -> int:
    """Prompt tokens of a conversation; cached, as one prompt is usually sampled many times."""
    import litellm

    return int(litellm.token_counter(model=route, messages=json.loads(messages_json)))


class LiteLLMBackend(ModelBackend):
    """``litellm.acompletion`` for every model of a catalog, with limits, retries and accounting.

    Args:
        catalog: catalog name -> ``ModelSpec`` (route, api_base, sizes, prices, context, max_concurrency).
        limits: per catalog name, the model's ``ModelLimits``; models not named get ``default_limits``.
        timeout_s: per-call timeout, seconds.
        max_attempts: attempts per call for retryable failures (rate limits, 5xx, connection errors).
        backoff_s: first retry delay; doubles per attempt, with jitter (x0.5 to x1.5), capped at
            ``max_backoff_s``; a server's ``Retry-After`` is honoured up to that cap.
        retry_timeouts: also retry calls that timed out (off: a timeout usually means the call is too
            big, and retrying multiplies the wait).
        completion_fn: the function called instead of ``litellm.acompletion`` (tests: a fake transport).
        extra_params: extra keyword arguments for every call (e.g. ``mock_response`` in tests).
        seed: seeds the retry jitter.
    """

    def __init__(
        self,
        catalog: Mapping[str, ModelSpec],
        *,
        limits: Mapping[str, ModelLimits] | None = None,
        default_limits: ModelLimits | None = None,
        timeout_s: float = 120.0,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        retry_timeouts: bool = False,
        completion_fn: CompletionFn | None = None,
        extra_params: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        import litellm

        litellm.suppress_debug_info = True
        self.catalog: dict[str, ModelSpec] = dict(catalog)
        self.limits = dict(limits or {})
        self.default_limits = default_limits or ModelLimits()
        self.timeout_s = float(timeout_s)
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.retry_timeouts = retry_timeouts
        self.extra_params = dict(extra_params or {})
        self.stats = BackendStats()
        self._completion_fn = completion_fn
        self._rng = random.Random(seed)
        self._states: dict[str, _ModelState] = {}
        self._routes: dict[str, tuple[str, str]] = {}
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary()
        )
        self._prices: dict[str, tuple[float, float] | None] = {}

    def __repr__(self) -> str:
        return f"LiteLLMBackend(models={sorted(self.catalog)})"

    # -- what can be known before a call --------------------------------------------------------------

    def spec(self, model: str) -> ModelSpec:
        """The catalog entry of ``model``; ``UnknownModel`` naming the known ones."""
        try:
            return self.catalog[model]
        except KeyError:
            known = ", ".join(sorted(self.catalog)) or "none"
            raise UnknownModel(f"model {model!r} is not in the catalog (known: {known})") from None

    def route(self, model: str) -> tuple[str, str]:
        """``(route, provider)`` of a catalog model; ``UnknownModel`` when litellm does not know the route."""
        if model in self._routes:
            return self._routes[model]
        import litellm

        spec = self.spec(model)
        route = spec.route or spec.name
        try:
            _, provider, _, _ = litellm.get_llm_provider(route, api_base=spec.api_base)
        except Exception:
            raise UnknownModel(
                f"model {model!r} has route {route!r}, which litellm does not know: give the catalog entry a route "
                "with a provider prefix, e.g. openai/gpt-4o-mini, anthropic/..., or hosted_vllm/NAME with an api_base"
            ) from None
        self._routes[model] = (route, provider)
        return route, provider

    def missing_keys(self, model: str) -> list[str]:
        """Environment variables the model's provider needs and that are unset (names only)."""
        import litellm

        route, provider = self.route(model)
        if provider in _SELF_HOSTED:
            return []
        try:
            report = litellm.validate_environment(model=route, api_base=self.spec(model).api_base)
        except Exception:  # a provider litellm cannot check reports problems on the call itself
            return []
        return [] if report.get("keys_in_environment") else [str(k) for k in report.get("missing_keys") or ()]

    def count_prompt_tokens(self, request: CompletionRequest) -> int:
        """The prompt's tokens, counted locally (litellm's tokenizer for the route)."""
        route, _ = self.route(request.model)
        return _count_messages(route, _canonical_messages(request.messages))

    def count_text_tokens(self, model: str, text: str) -> int:
        import litellm

        route, _ = self.route(model)
        return int(litellm.token_counter(model=route, text=text, count_response_tokens=True)) if text else 0

    def estimate(self, request: CompletionRequest) -> Cost:
        """The worst-case cost of ``request`` (for a ``BudgetMeter``): padded prompt, ``n * max_tokens``."""
        spec = self.spec(request.model)
        scale, extra = PROMPT_MARGIN
        prompt = self.count_prompt_tokens(request) * scale + extra
        max_tokens = request.max_tokens
        if max_tokens is None and spec.context is not None:
            max_tokens = max(1, int(spec.context - prompt))
        price = self._price(request.model)
        usd = None if price is None or max_tokens is None else prompt * price[0] + request.n * max_tokens * price[1]
        return worst_case_cost(spec, prompt, request.n, max_tokens, usd=usd)

    def _price(self, model: str) -> tuple[float, float] | None:
        """Dollars per prompt token and per output token: the catalog's, else litellm's price map."""
        if model not in self._prices:
            spec = self.spec(model)
            price: tuple[float, float] | None = None
            if spec.input_usd_per_mtok is not None and spec.output_usd_per_mtok is not None:
                price = (spec.input_usd_per_mtok / 1e6, spec.output_usd_per_mtok / 1e6)
            else:
                import litellm

                route, provider = self.route(model)
                try:
                    price = tuple(float(x) for x in litellm.cost_per_token(model=route, prompt_tokens=1, completion_tokens=1))  # type: ignore[assignment]
                except Exception:  # not in litellm's price map
                    price = (0.0, 0.0) if (spec.api_base or provider in _SELF_HOSTED) else None
            self._prices[model] = price
        return self._prices[model]

    def _state(self, model: str) -> _ModelState:
        state = self._states.get(model)
        if state is None:
            limits = self.limits.get(model, self.default_limits)
            supported = self._supported_params(model)
            max_n = limits.max_n
            if max_n is None and supported and "n" not in supported:
                max_n = 1  # the provider takes one sample per call (Anthropic, ...)
            state = _ModelState(
                limits=limits,
                max_n=max_n,
                rpm=TokenBucket(limits.requests_per_minute) if limits.requests_per_minute else None,
                tpm=TokenBucket(limits.tokens_per_minute) if limits.tokens_per_minute else None,
                usage_all=limits.usage_covers_all_choices,
                supported=supported,
            )
            self._states[model] = state
        return state

    def _supported_params(self, model: str) -> frozenset[str]:
        import litellm

        route, provider = self.route(model)
        try:
            names = litellm.get_supported_openai_params(model=route.split("/", 1)[-1], custom_llm_provider=provider)
        except Exception:  # a provider litellm cannot describe: send everything
            return frozenset()
        return frozenset(names or ())

    def _semaphore(self, model: str, state: _ModelState) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        per_loop = self._semaphores.get(loop)
        if per_loop is None:
            per_loop = self._semaphores[loop] = {}
        semaphore = per_loop.get(model)
        if semaphore is None:
            size = state.limits.max_concurrency or self.spec(model).max_concurrency or 16
            semaphore = per_loop[model] = asyncio.Semaphore(size)
        return semaphore

    # -- the call ---------------------------------------------------------------------------------------

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        """Exactly ``request.n`` generations, or a ``BackendError`` (with ``partial`` set when some calls
        of a split request returned before another failed)."""
        started = time.perf_counter()
        clock = _Clock()
        self.stats.requests += 1
        if request.n < 1:
            raise ValueError(f"n must be >= 1, got {request.n}")
        spec = self.spec(request.model)
        route, _provider = self.route(request.model)
        missing = self.missing_keys(request.model)
        if missing:
            raise MissingAPIKey(
                f"model {request.model!r} (route {route}) needs {', '.join(missing)} set in the environment; "
                "Allot reads keys from there and never stores them"
            )
        prompt_tokens = self.count_prompt_tokens(request)
        if spec.context is not None and prompt_tokens + (request.max_tokens or 0) > spec.context:
            raise ContextTooLong(
                f"model {request.model!r}: the prompt (about {prompt_tokens} tokens) plus max_tokens "
                f"({request.max_tokens or 0}) exceeds its context of {spec.context} tokens: "
                "shorten the prompt or lower max_tokens"
            )
        state = self._state(request.model)
        parts: list[CompletionResult] = []
        try:
            await self._generate(request, spec, route, state, prompt_tokens, parts, clock)
        except BackendError as exc:
            self.stats.failures += 1
            self.stats.errors[type(exc).__name__] = self.stats.errors.get(type(exc).__name__, 0) + 1
            if parts:
                exc.partial = _merge(parts, time.perf_counter() - started)
            self._account_time(started, clock)
            raise
        result = _merge(parts, time.perf_counter() - started)
        if len(result.generations) > request.n:
            result = _truncate(result, request.n)
        self.stats.samples += len(result.generations)
        self._account_time(started, clock)
        return result

    def _account_time(self, started: float, clock: _Clock) -> None:
        wall = time.perf_counter() - started
        self.stats.call_s += clock.call_s
        self.stats.waited_s += clock.waited_s
        self.stats.own_s += max(0.0, wall - clock.call_s - clock.waited_s)

    async def _generate(
        self,
        request: CompletionRequest,
        spec: ModelSpec,
        route: str,
        state: _ModelState,
        prompt_tokens: int,
        parts: list[CompletionResult],
        clock: _Clock,
    ) -> None:
        """Fill ``parts`` until they hold ``request.n`` generations: chunks of at most ``max_n`` at once,
        then top-ups for whatever a server left out."""
        have = 0
        rounds = 0
        while have < request.n:
            rounds += 1
            if rounds > request.n + 2:
                raise BackendError(f"model {request.model!r} keeps returning fewer samples than asked for: set max_n=1 for it")
            missing = request.n - have
            cap = state.max_n or missing
            sizes = [min(cap, missing - start) for start in range(0, missing, cap)]
            offsets = [have + start for start in range(0, missing, cap)]
            if rounds > 1:
                self.stats.top_ups += len(sizes)
            tasks = [
                self._call_with_retries(request, spec, route, state, prompt_tokens, size, offset, clock)
                for size, offset in zip(sizes, offsets, strict=True)
            ]
            if len(tasks) == 1:
                outcomes: list[CompletionResult | BaseException] = [await tasks[0]]
            else:
                outcomes = list(await asyncio.gather(*tasks, return_exceptions=True))
            error: BaseException | None = None
            for size, outcome in zip(sizes, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    error = error or outcome
                    continue
                got = len(outcome.generations)
                if got == 0:
                    error = error or BackendError(f"model {request.model!r} returned no choices")
                    continue
                if got < size:  # the server caps or ignores n: remember its cap, top up below
                    state.max_n = min(state.max_n or got, got)
                parts.append(outcome)
                have += got
            if error is not None:
                raise error

    async def _call_with_retries(
        self,
        request: CompletionRequest,
        spec: ModelSpec,
        route: str,
        state: _ModelState,
        prompt_tokens: int,
        n: int,
        offset: int,
        clock: _Clock,
    ) -> CompletionResult:
        timeout = state.limits.timeout_s or self.timeout_s
        retryable: tuple[type[BackendError], ...] = _RETRYABLE + ((BackendTimeout,) if self.retry_timeouts else ())
        key_names = self._key_names(request.model)
        for attempt in range(1, self.max_attempts + 1):
            self.stats.attempts += 1
            try:
                with translate_errors(request.model, route=route, api_base=spec.api_base, timeout_s=timeout, key_names=key_names):
                    return await self._call_once(request, spec, route, state, prompt_tokens, n, offset, timeout, clock)
            except retryable as exc:
                if attempt == self.max_attempts:
                    if self.max_attempts > 1:
                        raise type(exc)(f"{exc} (gave up after {attempt} attempts)") from exc.__cause__
                    raise
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + self._rng.random())
                hint = _retry_after(exc.__cause__) if exc.__cause__ is not None else None
                if hint is not None:
                    delay = min(self.max_backoff_s, max(delay, hint))
                self.stats.retries += 1
                await asyncio.sleep(delay)
                clock.waited_s += delay
        raise AssertionError("unreachable")

    def _key_names(self, model: str) -> list[str]:
        import litellm

        route, provider = self.route(model)
        if provider in _SELF_HOSTED:
            return []
        try:
            report = litellm.validate_environment(model=route)
        except Exception:
            return []
        return [str(k) for k in report.get("missing_keys") or ()] or [f"{provider.upper()}_API_KEY"]

    async def _call_once(
        self,
        request: CompletionRequest,
        spec: ModelSpec,
        route: str,
        state: _ModelState,
        prompt_tokens: int,
        n: int,
        offset: int,
        timeout: float,
        clock: _Clock,
    ) -> CompletionResult:
        params: dict[str, Any] = {
            "model": route,
            "messages": [dict(m) for m in request.messages],
            "temperature": request.temperature,
            "timeout": timeout,
            "num_retries": 0,
            "max_retries": 0,
            "drop_params": True,  # a parameter the provider lacks is dropped, not an error (n: topped up)
        }
        takes = state.supported
        if n > 1 or not takes or "n" in takes:
            params["n"] = n
        if request.max_tokens is not None:
            params["max_tokens"] = request.max_tokens
        if request.seed is not None and (not takes or "seed" in takes):
            # one seed per call: its first sample's index (disjoint calls, distinct seeds)
            params["seed"] = request.seed + request.offset + offset
        if request.stop:
            params["stop"] = list(request.stop)
        if spec.api_base:
            params["api_base"] = spec.api_base
        params.update(self.extra_params)
        worst_tokens = prompt_tokens + n * (request.max_tokens or max(1, (spec.context or 4096) - prompt_tokens))
        semaphore = self._semaphore(request.model, state)
        waited = time.perf_counter()
        async with semaphore:
            if state.rpm is not None:
                await state.rpm.acquire(1)
            if state.tpm is not None:
                await state.tpm.acquire(worst_tokens)
            begun = time.perf_counter()
            clock.waited_s += begun - waited
            fn = self._completion_fn
            if fn is None:
                import litellm

                fn = litellm.acompletion
            try:
                # litellm enforces ``timeout``; the outer bound only guards against a transport that does not
                async with asyncio.timeout(timeout + min(5.0, 0.5 + timeout / 2)):
                    response = await fn(**params)
            except BaseException:
                if state.tpm is not None:  # what a failed call held goes back
                    state.tpm.adjust(-worst_tokens)
                raise
            finally:
                latency = time.perf_counter() - begun
                clock.call_s += latency
        self.stats.calls += 1
        result = self._result(request, spec, state, response, prompt_tokens, latency)
        if state.tpm is not None:
            state.tpm.adjust(result.cost.tokens - worst_tokens)
        return result

    # -- accounting -------------------------------------------------------------------------------------

    def _result(
        self,
        request: CompletionRequest,
        spec: ModelSpec,
        state: _ModelState,
        response: Any,
        prompt_estimate: int,
        latency: float,
    ) -> CompletionResult:
        choices = list(getattr(response, "choices", None) or ())
        texts = [_text(choice) for choice in choices]
        reasons = [str(getattr(choice, "finish_reason", None) or "stop") for choice in choices]
        usage = getattr(response, "usage", None)
        reported_prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        reported_output = int(getattr(usage, "completion_tokens", 0) or 0)
        prompt = reported_prompt or prompt_estimate
        outputs = self._output_tokens(request, state, texts, reasons, reported_output)
        price = self._price(request.model)
        flops = float(prefill_flops(spec, float(prompt))) + sum(
            float(decode_flops(spec, float(prompt), float(o))) for o in outputs
        )
        if price is None:
            usd: float | None = None
            shares: list[float | None] = [None] * len(outputs)
        else:
            usd = prompt * price[0] + sum(outputs) * price[1]
            each_prompt = prompt * price[0] / max(1, len(outputs))
            shares = [each_prompt + o * price[1] for o in outputs]
        generations = tuple(
            Generation(text, prompt, tokens, latency, reason, share)
            for text, tokens, reason, share in zip(texts, outputs, reasons, shares, strict=True)
        )
        cost = Cost(flops, float(prompt), float(sum(outputs)), usd)
        self.stats.cost = self.stats.cost + cost
        return CompletionResult(generations, cost, latency)

    def _output_tokens(
        self,
        request: CompletionRequest,
        state: _ModelState,
        texts: Sequence[str],
        reasons: Sequence[str],
        reported: int,
    ) -> list[int]:
        """Output tokens per choice. One choice: ``usage``. Several: local counts (a choice cut at
        ``max_tokens`` has exactly that many), scaled to ``usage`` when it covers every choice; when it
        counts the first choice only (llama.cpp), that choice gets it and the others' local counts are
        calibrated by the first choice's ratio of server to local count."""
        if len(texts) == 1 and reported > 0:
            return [reported]
        local = [
            request.max_tokens
            if reason == "length" and request.max_tokens
            else max(1, self.count_text_tokens(request.model, text))
            for text, reason in zip(texts, reasons, strict=True)
        ]
        if not texts or reported <= 0:
            return local
        covers = state.usage_all
        if covers is None:
            # usage counts all choices if it is nearer their sum than to any single one (log scale)
            total = sum(local)
            covers = abs(math.log(reported / total)) < min(abs(math.log(reported / c)) for c in local)
        if covers:
            return _apportion(reported, local)
        # usage counted one choice, the first (llama.cpp): take it as exact, and use it to calibrate the
        # local tokenizer, which is not the model's, for the other choices
        ratio = reported / local[0] if local[0] >= 8 else 1.0
        ratio = min(2.0, max(0.5, ratio))
        cap = request.max_tokens or 1 << 30
        calibrated = [reported] + [
            count if reason == "length" else min(cap, max(1, round(count * ratio)))
            for count, reason in zip(local[1:], reasons[1:], strict=True)
        ]
        return calibrated

    async def aclose(self) -> None:
        """Nothing to release: litellm owns its HTTP clients."""


def _text(choice: Any) -> str:
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None) if message is not None else getattr(choice, "text", None)
    return content if isinstance(content, str) else ""


def _apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` into integers that sum to it (largest remainder)."""
    whole = sum(weights)
    raw = [total * w / whole for w in weights]
    parts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _merge(parts: Sequence[CompletionResult], latency: float) -> CompletionResult:
    cost = Cost()
    for part in parts:
        cost = cost + part.cost
    generations = tuple(g for part in parts for g in part.generations)
    return CompletionResult(generations, cost, latency)


def _truncate(result: CompletionResult, n: int) -> CompletionResult:
    """Keep the first ``n`` generations (a server returned more than asked); the cost stays what was paid."""
    return replace(result, generations=result.generations[:n])
