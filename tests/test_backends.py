"""Executors' plumbing without a server: LiteLLMBackend (litellm's mock responses and fake transports),
error translation, limits, n top-up, token accounting, the budget meter and the sample store.

The real llama.cpp server is exercised in tests/test_llama_e2e.py; these tests are about the logic.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executors.backends import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BudgetExhausted,
    CompletionRequest,
    CompletionResult,
    ContextTooLong,
    MissingAPIKey,
    MockBackend,
    RateLimited,
)
from executors.budget import BudgetMeter, MeteredBackend, worst_case_cost
from executors.litellm_backend import LiteLLMBackend, ModelLimits, TokenBucket, redact_secrets, translate_errors
from executors.sample_store import CachedBackend, SampleStore, params_hash, prompt_hash, sample_key
from graphs.cost import Budget, Cost, ModelSpec, call_flops, decode_flops, prefill_flops
from graphs.errors import BudgetError, UnknownModel
from planner.storage import InMemoryStorage, SampleRecord, SQLStorage

LOCAL = ModelSpec(
    name="local",
    params_b=0.27,
    layers=18,
    hidden=640,
    route="hosted_vllm/local",
    api_base="http://127.0.0.1:9/v1",  # nothing listens there: every test here answers from a mock
    context=1024,
)
PRICED = ModelSpec(
    name="priced",
    params_b=8,
    route="hosted_vllm/priced",
    api_base="http://127.0.0.1:9/v1",
    input_usd_per_mtok=1.0,
    output_usd_per_mtok=4.0,
    context=4096,
)
HOSTED = ModelSpec(name="hosted", params_b=8, route="openai/gpt-4o-mini")
CATALOG = {spec.name: spec for spec in (LOCAL, PRICED, HOSTED)}


def _request(model: str = "local", text: str = "What is 2+2?", **kwargs: Any) -> CompletionRequest:
    return CompletionRequest(model, ({"role": "user", "content": text},), **kwargs)


def _response(texts: list[str], *, prompt: int = 12, completion: int | None = None, reasons: list[str] | None = None) -> Any:
    """A litellm ModelResponse as a server would send it."""
    reasons = reasons or ["stop"] * len(texts)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
    ]
    completion = sum(max(1, len(t.split())) for t in texts) if completion is None else completion
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return litellm.ModelResponse(model="local", choices=choices, usage=usage)


class FakeTransport:
    """Stands in for ``litellm.acompletion``: answers from a script, records every call's kwargs."""

    def __init__(self, script: Any = None, *, delay: float = 0.0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.script = script
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            outcome = self.script(len(self.calls), kwargs) if callable(self.script) else None
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:
                return outcome
            return _response([f"answer {kwargs.get('seed')} {i}" for i in range(kwargs["n"])])
        finally:
            self.in_flight -= 1


def _backend(transport: FakeTransport | None = None, **kwargs: Any) -> LiteLLMBackend:
    kwargs.setdefault("backoff_s", 0.001)
    kwargs.setdefault("seed", 0)
    return LiteLLMBackend(CATALOG, completion_fn=transport, **kwargs)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _gather(coros: Any) -> list[Any]:
    async def main() -> list[Any]:
        return list(await asyncio.gather(*coros))

    return _run(main())


# --- LiteLLMBackend: calls and accounting ------------------------------------------------------------------


def test_mock_response_through_litellm_is_accounted() -> None:
    backend = LiteLLMBackend(CATALOG, extra_params={"mock_response": "The answer is 4."})
    result = _run(backend.complete(_request(n=1, max_tokens=16)))
    (generation,) = result.generations
    assert generation.text == "The answer is 4."
    assert generation.prompt_tokens > 0 and generation.output_tokens > 0
    p, o = generation.prompt_tokens, generation.output_tokens
    assert result.cost.flops == pytest.approx(float(call_flops(LOCAL, p, o, 1)))
    assert (result.cost.prompt_tokens, result.cost.output_tokens) == (p, o)
    assert result.cost.usd == 0.0  # self-hosted and unpriced: free per call
    assert backend.stats.calls == 1 and backend.stats.samples == 1


def test_prefill_once_decodes_per_sample_and_catalog_prices() -> None:
    transport = FakeTransport(lambda i, kw: _response(["a b c", "a b c d e f g"], prompt=100, completion=10))
    result = _run(
        _backend(transport, default_limits=ModelLimits(usage_covers_all_choices=True)).complete(_request("priced", n=2))
    )
    outputs = [g.output_tokens for g in result.generations]
    assert sum(outputs) == 10 and outputs[0] < outputs[1]  # usage split in proportion to local counts
    expected = float(prefill_flops(PRICED, 100.0)) + sum(float(decode_flops(PRICED, 100.0, float(o))) for o in outputs)
    assert result.cost.flops == pytest.approx(expected)
    assert result.cost.usd == pytest.approx((100 * 1.0 + 10 * 4.0) / 1e6)
    assert sum(g.usd or 0 for g in result.generations) == pytest.approx(result.cost.usd)


def test_usage_of_one_choice_only_is_detected_and_counted_locally() -> None:
    # llama.cpp's usage counts one choice of an n>1 call: the sum must come from local counts
    texts = ["one two three four five six seven eight", "alpha beta gamma delta epsilon zeta eta theta", "x y z w v u t s"]
    one = litellm.token_counter(model="hosted_vllm/local", text=texts[0], count_response_tokens=True)
    transport = FakeTransport(lambda i, kw: _response(texts, completion=one))
    result = _run(_backend(transport).complete(_request(n=3)))
    assert result.cost.output_tokens > 2 * one
    local = [litellm.token_counter(model="hosted_vllm/local", text=t, count_response_tokens=True) for t in texts]
    assert [g.output_tokens for g in result.generations] == local


def test_usage_covering_all_choices_is_trusted() -> None:
    texts = ["one two three", "four five six"]
    transport = FakeTransport(lambda i, kw: _response(texts, completion=14))
    result = _run(_backend(transport).complete(_request(n=2)))
    assert result.cost.output_tokens == 14


def test_a_choice_cut_at_max_tokens_has_exactly_max_tokens() -> None:
    transport = FakeTransport(lambda i, kw: _response(["short", "cut off here"], completion=3, reasons=["stop", "length"]))
    result = _run(
        _backend(transport, default_limits=ModelLimits(usage_covers_all_choices=False)).complete(_request(n=2, max_tokens=7))
    )
    assert result.generations[1].output_tokens == 7 and result.generations[1].finish_reason == "length"


def test_request_parameters_reach_litellm_and_no_hidden_retries() -> None:
    transport = FakeTransport()
    _run(_backend(transport, timeout_s=9).complete(_request(n=2, temperature=0.3, max_tokens=5, seed=11, stop=("\n",))))
    (call,) = transport.calls
    assert call["model"] == "hosted_vllm/local" and call["api_base"] == LOCAL.api_base
    assert (call["n"], call["temperature"], call["max_tokens"], call["seed"], call["stop"]) == (2, 0.3, 5, 11, ["\n"])
    assert call["timeout"] == 9 and call["num_retries"] == 0 and call["max_retries"] == 0
    assert "api_key" not in call


# --- n: caps, top-ups, separate calls --------------------------------------------------------------------


def test_server_that_caps_n_is_topped_up_and_remembered() -> None:
    transport = FakeTransport(lambda i, kw: _response([f"s{kw['seed']}-{j}" for j in range(min(kw["n"], 2))]))
    backend = _backend(transport)
    result = _run(backend.complete(_request(n=5, seed=100)))
    assert len(result.generations) == 5
    assert [c["n"] for c in transport.calls] == [5, 2, 1]  # asked 5, got 2: the other 3 in calls of at most 2
    assert len({g.text for g in result.generations}) == 5  # seeds offset per call: no repeated sample
    assert backend.stats.top_ups == 2
    transport.calls.clear()
    _run(backend.complete(_request(n=4, seed=0)))
    assert [c["n"] for c in transport.calls] == [2, 2]  # the cap is remembered


def test_backend_that_ignores_n_gets_separate_calls() -> None:
    transport = FakeTransport(lambda i, kw: _response([f"seed {kw['seed']}"]))  # always one choice
    result = _run(_backend(transport, default_limits=ModelLimits(max_n=1)).complete(_request(n=4, seed=7)))
    assert [c["n"] for c in transport.calls] == [1, 1, 1, 1]
    assert sorted(c["seed"] for c in transport.calls) == [7, 8, 9, 10]
    assert len(result.generations) == 4
    assert result.cost.prompt_tokens == 4 * 12  # every call pays its own prefill


def test_provider_without_n_gets_one_call_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0000000000")
    catalog = {"claude": ModelSpec(name="claude", params_b=8, route="anthropic/claude-3-5-haiku-20241022")}
    transport = FakeTransport(lambda i, kw: _response([f"sample {i}"]))
    result = _run(LiteLLMBackend(catalog, completion_fn=transport).complete(_request("claude", n=3, seed=4)))
    assert len(result.generations) == 3 and len(transport.calls) == 3
    assert all("n" not in call and "seed" not in call for call in transport.calls)  # litellm: anthropic takes neither


def test_server_returning_no_choices_is_an_error() -> None:
    transport = FakeTransport(lambda i, kw: _response([]))
    with pytest.raises(BackendError, match="no choices"):
        _run(_backend(transport).complete(_request(n=2)))


# --- retries and backoff -----------------------------------------------------------------------------------


def _rate_limit(retry_after: str | None = None) -> Exception:
    headers = {"retry-after": retry_after} if retry_after else {}
    response = httpx.Response(429, headers=headers, request=httpx.Request("POST", "http://127.0.0.1:9/v1"))
    return litellm.RateLimitError("slow down", llm_provider="hosted_vllm", model="local", response=response)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Records the delays the backend sleeps between attempts (and does not really sleep them)."""
    delays: list[float] = []
    real = asyncio.sleep

    async def fake(delay: float, *args: Any, **kwargs: Any) -> Any:
        delays.append(delay)
        return await real(0)

    monkeypatch.setattr("executors.litellm_backend.asyncio.sleep", fake)
    yield delays


@pytest.mark.parametrize(
    "failure",
    [
        _rate_limit(),
        litellm.InternalServerError("boom", llm_provider="hosted_vllm", model="local"),
        litellm.ServiceUnavailableError("overloaded", llm_provider="hosted_vllm", model="local"),
        litellm.InternalServerError("Cannot connect to host 127.0.0.1:9", llm_provider="hosted_vllm", model="local"),
        httpx.ConnectError("connection refused"),
    ],
    ids=["429", "500", "503", "connect-as-500", "httpx-connect"],
)
def test_transient_failures_are_retried_with_growing_backoff(failure: Exception, sleeps: list[float]) -> None:
    transport = FakeTransport(lambda i, kw: failure if i <= 3 else None)
    backend = _backend(transport, max_attempts=5, backoff_s=0.1, max_backoff_s=10)
    result = _run(backend.complete(_request()))
    assert len(result.generations) == 1 and len(transport.calls) == 4
    assert backend.stats.retries == 3
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):  # 0.1 * 2**attempt, with jitter x0.5 .. x1.5
        assert 0.05 * 2**attempt <= delay <= 0.15 * 2**attempt


def test_backoff_is_capped_and_retry_after_honoured(sleeps: list[float]) -> None:
    transport = FakeTransport(lambda i, kw: _rate_limit("0.7") if i <= 2 else None)
    _run(_backend(transport, max_attempts=3, backoff_s=0.01, max_backoff_s=5).complete(_request()))
    assert sleeps and all(delay >= 0.7 for delay in sleeps)
    sleeps.clear()
    transport = FakeTransport(lambda i, kw: _rate_limit("120") if i <= 1 else None)
    _run(_backend(transport, max_attempts=3, backoff_s=0.01, max_backoff_s=2).complete(_request()))
    assert sleeps == [2]


@pytest.mark.parametrize(
    ("failure", "error", "words"),
    [
        (_rate_limit(), RateLimited, "rate limits"),
        (litellm.InternalServerError("boom", llm_provider="hosted_vllm", model="local"), BackendUnavailable, "server error 500"),
        (httpx.ConnectError("connection refused"), BackendUnavailable, "cannot be reached"),
    ],
)
def test_retries_are_bounded(failure: Exception, error: type[Exception], words: str, sleeps: list[float]) -> None:
    transport = FakeTransport(lambda i, kw: failure)
    backend = _backend(transport, max_attempts=3)
    with pytest.raises(error, match=words) as caught:
        _run(backend.complete(_request()))
    assert "gave up after 3 attempts" in str(caught.value)
    assert len(transport.calls) == 3 and len(sleeps) == 2
    assert backend.stats.failures == 1 and backend.stats.errors == {error.__name__: 1}


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (litellm.BadRequestError("bad temperature", llm_provider="hosted_vllm", model="local"), BackendError),
        (litellm.Timeout("took too long", model="local", llm_provider="hosted_vllm"), BackendTimeout),
        (litellm.NotFoundError("no such model", llm_provider="hosted_vllm", model="local"), BackendError),
    ],
)
def test_non_transient_failures_are_not_retried(failure: Exception, error: type[Exception], sleeps: list[float]) -> None:
    transport = FakeTransport(lambda i, kw: failure)
    with pytest.raises(error):
        _run(_backend(transport, max_attempts=4).complete(_request()))
    assert len(transport.calls) == 1 and not sleeps


def test_timeouts_can_be_retried(sleeps: list[float]) -> None:
    transport = FakeTransport(
        lambda i, kw: litellm.Timeout("slow", model="local", llm_provider="hosted_vllm") if i == 1 else None
    )
    result = _run(_backend(transport, retry_timeouts=True).complete(_request()))
    assert len(result.generations) == 1 and len(transport.calls) == 2


def test_a_transport_that_hangs_is_cut_by_the_timeout() -> None:
    transport = FakeTransport(delay=30)
    backend = _backend(transport, default_limits=ModelLimits(timeout_s=0.05))
    started = time.perf_counter()
    with pytest.raises(BackendTimeout, match=r"did not answer within 0\.05 s"):
        _run(backend.complete(_request()))
    assert time.perf_counter() - started < 10


def test_split_request_keeps_what_returned_before_a_failure(sleeps: list[float]) -> None:
    # the second of three calls fails for good: the first's samples come back as ``partial``
    transport = FakeTransport(lambda i, kw: httpx.ConnectError("refused") if kw["seed"] == 2 else None)
    backend = _backend(transport, default_limits=ModelLimits(max_n=2), max_attempts=2)
    with pytest.raises(BackendUnavailable) as caught:
        _run(backend.complete(_request(n=6, seed=0)))
    partial = caught.value.partial
    assert partial is not None and len(partial.generations) == 4
    assert partial.cost.output_tokens > 0


# --- limits -----------------------------------------------------------------------------------------------


def test_concurrency_limit_per_model() -> None:
    transport = FakeTransport(delay=0.02)
    backend = _backend(transport, limits={"local": ModelLimits(max_concurrency=2)})

    async def main() -> None:
        await asyncio.gather(*(backend.complete(_request(text=f"q{i}")) for i in range(8)))
        await asyncio.gather(*(backend.complete(_request("priced", text=f"q{i}")) for i in range(8)))

    _run(main())
    assert transport.max_in_flight == 8  # "priced" has no limit of its own (default 16)
    transport.max_in_flight = 0
    _gather(backend.complete(_request(text=f"r{i}")) for i in range(8))
    assert transport.max_in_flight == 2


def test_catalog_max_concurrency_is_the_default_limit() -> None:
    transport = FakeTransport(delay=0.02)
    catalog = {"one": LOCAL.model_copy(update={"name": "one", "max_concurrency": 1})}
    backend = LiteLLMBackend(catalog, completion_fn=transport)
    _gather(backend.complete(_request("one", text=f"q{i}")) for i in range(4))
    assert transport.max_in_flight == 1


def test_backend_survives_several_event_loops() -> None:
    backend = _backend(FakeTransport(), limits={"local": ModelLimits(max_concurrency=1)})
    for _ in range(3):  # a semaphore bound to a closed loop would raise here
        assert len(_run(backend.complete(_request())).generations) == 1


def test_token_bucket_refills_and_carries_debt() -> None:
    now = [0.0]
    bucket = TokenBucket(600, clock=lambda: now[0])  # 10 per second, bursts of 600
    assert bucket.wait_time(600) == 0
    _run(bucket.acquire(600))
    assert bucket.wait_time(10) == pytest.approx(1.0)
    now[0] += 0.5
    assert bucket.wait_time(10) == pytest.approx(0.5)
    bucket.adjust(20)  # a call used 20 more than it held: debt
    assert bucket.wait_time(10) == pytest.approx(2.5)
    bucket.adjust(-1000)  # refunds never overfill
    assert bucket._level == bucket.capacity
    assert bucket.wait_time(5000) == 0  # more than the capacity waits for a full bucket only


def test_requests_and_tokens_per_minute_throttle() -> None:
    transport = FakeTransport(lambda i, kw: _response(["ok"], prompt=10, completion=1))
    backend = _backend(transport, limits={"local": ModelLimits(requests_per_minute=600, tokens_per_minute=6000)})

    async def main() -> float:
        state = backend._state("local")
        assert state.rpm is not None
        state.rpm._level = 0  # drained: 10 requests per second from now
        started = time.perf_counter()
        await asyncio.gather(*(backend.complete(_request(text=f"q{i}", max_tokens=10)) for i in range(3)))
        return time.perf_counter() - started

    elapsed = _run(main())
    assert 0.2 <= elapsed < 5
    assert backend.stats.waited_s >= 0.2
    state = backend._state("local")
    assert state.tpm is not None and state.tpm._level > 6000 - 100  # settled with the actual tokens


# --- checks before a call, and error translation ----------------------------------------------------------


def test_unknown_catalog_name_names_the_known_ones() -> None:
    with pytest.raises(UnknownModel, match=r"'nope' is not in the catalog \(known: hosted, local, priced\)"):
        _run(_backend(FakeTransport()).complete(_request("nope")))


def test_unknown_route_is_refused_before_a_call() -> None:
    transport = FakeTransport()
    catalog = {"odd": ModelSpec(name="odd", params_b=1, route="nosuchprovider/model-x")}
    with pytest.raises(UnknownModel, match=r"route 'nosuchprovider/model-x'.*litellm does not know"):
        _run(LiteLLMBackend(catalog, completion_fn=transport).complete(_request("odd")))
    catalog = {"bare": ModelSpec(name="bare", params_b=1)}  # no route: the name is not a route either
    with pytest.raises(UnknownModel, match="hosted_vllm/NAME with an api_base"):
        _run(LiteLLMBackend(catalog, completion_fn=transport).complete(_request("bare")))
    assert not transport.calls


def test_missing_api_key_is_named_and_no_call_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    transport = FakeTransport()
    with pytest.raises(MissingAPIKey, match="needs OPENAI_API_KEY set in the environment"):
        _run(_backend(transport).complete(_request("hosted")))
    assert not transport.calls
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-123456")
    _run(_backend(transport).complete(_request("hosted")))
    assert len(transport.calls) == 1 and "api_key" not in transport.calls[0]


def test_prompt_longer_than_the_context_is_refused_before_a_call() -> None:
    transport = FakeTransport()
    with pytest.raises(ContextTooLong, match="exceeds its context of 1024 tokens"):
        _run(_backend(transport).complete(_request(text="word " * 2000, max_tokens=16)))
    with pytest.raises(ContextTooLong):  # prompt fits, prompt + max_tokens does not
        _run(_backend(transport).complete(_request(text="word " * 500, max_tokens=900)))
    assert not transport.calls


def _translated(exc: BaseException, **kwargs: Any) -> BaseException:
    try:
        with translate_errors("m", route="hosted_vllm/m", api_base="http://127.0.0.1:8/v1", **kwargs):
            raise exc
    except Exception as caught:
        assert caught.__cause__ is exc or isinstance(exc, BackendError)
        return caught
    raise AssertionError("nothing raised")


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (litellm.Timeout("t", model="m", llm_provider="hosted_vllm"), BackendTimeout, "did not answer"),
        (httpx.ReadTimeout("read timed out"), BackendTimeout, "did not answer"),
        (TimeoutError(), BackendTimeout, "did not answer"),
        (_rate_limit(), RateLimited, "rate limits"),
        (litellm.ContextWindowExceededError("too long", model="m", llm_provider="hosted_vllm"), ContextTooLong, "context"),
        (
            litellm.BadRequestError(
                "the request exceeds the available context size, try increasing it", model="m", llm_provider="hosted_vllm"
            ),
            ContextTooLong,
            "shorten the prompt",
        ),
        (
            litellm.InternalServerError("Cannot connect to host 127.0.0.1:8", model="m", llm_provider="hosted_vllm"),
            BackendUnavailable,
            r"cannot be reached.*http://127.0.0.1:8/v1 is running",
        ),
        (
            litellm.APIConnectionError("Connection error.", model="m", llm_provider="openai"),
            BackendUnavailable,
            "cannot be reached",
        ),
        (httpx.ConnectError("All connection attempts failed"), BackendUnavailable, "cannot be reached"),
        (ConnectionResetError("reset by peer"), BackendUnavailable, "cannot be reached"),
        (
            litellm.ServiceUnavailableError("loading", model="m", llm_provider="hosted_vllm"),
            BackendUnavailable,
            "server error 503",
        ),
        (litellm.NotFoundError("model x not found", model="m", llm_provider="hosted_vllm"), BackendError, "not found"),
        (litellm.BadRequestError("invalid n", model="m", llm_provider="hosted_vllm"), BackendError, "BadRequestError"),
        (ValueError("odd"), BackendError, "ValueError: odd"),
    ],
)
def test_translate_errors(exc: BaseException, kind: type[BaseException], words: str) -> None:
    caught = _translated(exc, timeout_s=3)
    assert type(caught) is kind
    assert "model 'm'" in str(caught)
    assert re.search(words, str(caught)), str(caught)
    assert "\n" not in str(caught)


def test_translate_errors_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    exc = litellm.AuthenticationError("Incorrect API key provided", llm_provider="openai", model="m")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert type(_translated(exc, key_names=["OPENAI_API_KEY"])) is MissingAPIKey
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-but-set-0000")
    caught = _translated(exc, key_names=["OPENAI_API_KEY"])
    assert type(caught) is BackendError and "check OPENAI_API_KEY" in str(caught)


def test_secrets_never_reach_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-live-very-secret-abcdef123456"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    assert redact_secrets(f"header Authorization: Bearer {secret}") == "header Authorization: Bearer ***"
    caught = _translated(litellm.AuthenticationError(f"Incorrect API key provided: {secret}", llm_provider="openai", model="m"))
    assert secret not in str(caught)


def test_allot_errors_pass_through() -> None:
    original = RateLimited("already translated")
    assert _translated(original) is original


# --- budget meter -----------------------------------------------------------------------------------------


def test_meter_reserves_settles_and_refuses() -> None:
    meter = BudgetMeter(Budget(limit=100, unit="tokens"))
    first = meter.reserve(Cost(prompt_tokens=10, output_tokens=50))
    assert (meter.spent, meter.reserved, meter.remaining) == (0, 60, 40)
    with pytest.raises(BudgetExhausted, match="may cost 50 but only 40 is left"):
        meter.reserve(50.0)
    assert meter.refused == 1 and meter.exhausted
    assert meter.settle(first, Cost(prompt_tokens=10, output_tokens=5)) == 15
    assert (meter.spent, meter.reserved, meter.remaining) == (15, 0, 85)
    with pytest.raises(KeyError):
        meter.settle(first, 1.0)
    second = meter.reserve(85.0)
    meter.release(second)
    meter.release(second)  # idempotent
    assert meter.remaining == 85
    with meter.holding(80.0) as hold:
        hold.settle(80.0)
    with pytest.raises(RuntimeError), meter.holding(5.0):
        raise RuntimeError("the call failed")
    assert (meter.spent, meter.reserved) == (95, 0)


def test_meter_in_every_unit() -> None:
    worst = worst_case_cost(PRICED, 100, 4, 50)
    assert worst.output_tokens == 200 and worst.usd == pytest.approx((100 * 1 + 200 * 4) / 1e6)
    assert worst.flops == pytest.approx(float(call_flops(PRICED, 100.0, 50.0, 4)))
    for unit in ("flops", "agenttts", "call1b", "tokens", "usd"):
        meter = BudgetMeter(Budget(limit=1e30, unit=unit))
        meter.settle(meter.reserve(worst), worst)
        assert meter.spent == pytest.approx(Budget(limit=1, unit=unit).spent(worst))
    with pytest.raises(BudgetError, match="needs prices"):
        BudgetMeter(Budget(limit=1, unit="usd")).reserve(worst_case_cost(HOSTED, 10, 1, 10))
    with pytest.raises(BudgetError, match="no worst case"):
        worst_case_cost(HOSTED, 10, 1, None)
    assert worst_case_cost(LOCAL, 24, 1, None).output_tokens == 1000  # up to the context


# Interleavings: each call reserves its worst case, then (later, in any order) settles at most that, or fails.
_calls = st.lists(
    st.tuples(st.floats(0, 40, allow_nan=False), st.floats(0, 1), st.booleans()),
    min_size=1,
    max_size=24,
)


@given(limit=st.floats(1, 200), calls=_calls, order=st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_spent_never_exceeds_the_limit_in_any_interleaving(
    limit: float, calls: list[tuple[float, float, bool]], order: Any
) -> None:
    meter = BudgetMeter(Budget(limit=limit, unit="tokens"))
    steps = [i for i in range(len(calls)) for _ in range(2)]  # call i's first step reserves, its second finishes
    order.shuffle(steps)
    held: dict[int, Any] = {}
    settled = 0.0
    for i in steps:
        worst, fraction, fails = calls[i]
        if i not in held:
            try:
                held[i] = meter.reserve(worst)
            except BudgetExhausted:
                held[i] = None
                left = Fraction(limit) - meter._spent - sum(meter._held.values(), Fraction(0))  # exact
                assert Fraction(worst) > left
        elif held[i] is not None:
            if fails:
                meter.release(held[i])
            else:
                meter.settle(held[i], worst * fraction)
                settled += worst * fraction
            held[i] = None
        assert meter.spent <= limit and meter.spent + meter.reserved <= limit * (1 + 1e-12)
    assert meter.reserved == 0 and meter.spent == pytest.approx(settled)


def test_meter_is_thread_safe() -> None:
    meter = BudgetMeter(Budget(limit=1000, unit="tokens"))
    barrier = threading.Barrier(8)

    def work(seed: int) -> int:
        barrier.wait()
        granted = 0
        for k in range(500):
            amount = 1 + (seed * 7 + k) % 5
            try:
                reservation = meter.reserve(float(amount))
            except BudgetExhausted:
                continue
            granted += 1
            meter.settle(reservation, float(amount - (k % 2)))
        return granted

    with ThreadPoolExecutor(8) as pool:
        granted = sum(pool.map(work, range(8)))
    assert granted > 0 and meter.refused > 0
    assert meter.spent <= 1000 and meter.reserved == 0


def test_metered_backend_refuses_before_calling() -> None:
    mock = MockBackend(lambda r: ["x" * 40] * r.n)
    meter = BudgetMeter(Budget(limit=200, unit="tokens"))
    backend = MeteredBackend(mock, meter, catalog=CATALOG)

    async def main() -> list[Any]:
        requests = [_request(text=f"question {i}", n=2, max_tokens=30) for i in range(10)]
        return await asyncio.gather(*(backend.complete(r) for r in requests), return_exceptions=True)

    outcomes = _run(main())
    refused = [o for o in outcomes if isinstance(o, BudgetExhausted)]
    done = [o for o in outcomes if isinstance(o, CompletionResult)]
    assert refused and done and len(refused) + len(done) == 10
    assert len(mock.requests) == len(done)  # refused calls were never made
    assert meter.spent == pytest.approx(sum(r.cost.tokens for r in done)) and meter.spent <= 200


def test_metered_backend_uses_the_backends_estimate_and_charges_partial_results(sleeps: list[float]) -> None:
    transport = FakeTransport(lambda i, kw: httpx.ConnectError("refused") if kw["seed"] == 2 else None)
    inner = _backend(transport, default_limits=ModelLimits(max_n=2), max_attempts=1)
    meter = BudgetMeter(Budget(limit=10_000, unit="tokens"))
    with pytest.raises(BackendUnavailable) as caught:
        _run(MeteredBackend(inner, meter).complete(_request(n=4, seed=0, max_tokens=20)))
    assert caught.value.partial is not None
    assert meter.spent == caught.value.partial.cost.tokens > 0 and meter.reserved == 0


# --- sample store ----------------------------------------------------------------------------------------

STORE_MODES = ["memory", "sqlite-memory", "sqlite-file", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=STORE_MODES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    if request.param == "memory":
        return None
    if request.param == "sqlite-memory":
        return "sqlite://"
    if request.param == "sqlite-file":
        return f"sqlite:///{tmp_path / 'samples.db'}"
    url = str(request.getfixturevalue("postgres_url"))  # one database per session; samples cleared here
    storage = SQLStorage(url)
    with storage.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM allot_samples")
    storage.close()
    return url


@pytest.fixture
def store(store_url: str | None) -> Iterator[SampleStore]:
    sample_store = SampleStore(InMemoryStorage() if store_url is None else SQLStorage(store_url))
    yield sample_store
    sample_store.storage.close()


def _record(index: int, key: str = "p", text: str | None = None) -> SampleRecord:
    return SampleRecord("m", key * 64, "q" * 64, index, text or f"t{index}", 10, 5, 0.1, None)


def test_storage_samples_are_idempotent_and_ordered(store: SampleStore) -> None:
    assert store.add([_record(3), _record(0), _record(1)]) == 3
    assert store.add([_record(1, text="other"), _record(2)]) == 1  # index 1 is kept as first stored
    assert [s.sample_index for s in store.get("m", "p" * 64, "q" * 64)] == [0, 1, 2, 3]
    assert store.get("m", "p" * 64, "q" * 64, limit=2)[1].text == "t1"
    assert store.get("m", "x" * 64, "q" * 64) == []
    assert store.add([]) == 0
    with pytest.raises(ValueError):
        store.add([_record(-1)])


def test_storage_samples_from_many_threads(store: SampleStore) -> None:
    with ThreadPoolExecutor(6) as pool:
        added = sum(pool.map(lambda k: store.add([_record(i, text=f"w{k}") for i in range(20)]), range(6)))
    assert added == 20 and len(store.get("m", "p" * 64, "q" * 64)) == 20


def _echo(request: CompletionRequest) -> list[str]:
    return [f"{request.messages[-1]['content']} #{request.seed}.{request.offset + i}" for i in range(request.n)]


def test_keys_are_canonical() -> None:
    a = _request(text="hi", temperature=0.5, max_tokens=10)
    b = CompletionRequest("local", ({"content": "hi", "role": "user"},), temperature=0.5, max_tokens=10)
    assert sample_key(a) == sample_key(b)
    assert sample_key(a) != sample_key(_request(text="hi", temperature=0.6, max_tokens=10))
    assert prompt_hash(a.messages) != prompt_hash(({"role": "system", "content": "hi"},))
    assert params_hash({"a": 1, "b": [1]}) == params_hash({"b": [1], "a": 1})
    assert len(prompt_hash(a.messages)) == 64


def test_8_of_an_earlier_16_are_served_from_the_store(store: SampleStore) -> None:
    mock = MockBackend(_echo)
    backend = CachedBackend(mock, store, catalog=CATALOG)
    first = _run(backend.complete(_request(n=16, seed=0)))
    second = _run(backend.complete(_request(n=8, seed=0)))
    assert len(mock.requests) == 1
    assert second.generations == first.generations[:8] or [g.text for g in second.generations] == [
        g.text for g in first.generations[:8]
    ]
    assert second.reused == 8 and second.paid == Cost() and second.cost.tokens > 0
    assert backend.stats.generated_samples == 16 and backend.stats.reused_samples == 8
    # the cost of served samples is what they cost when generated (one prefill, their decodes)
    eight = [g.output_tokens for g in first.generations[:8]]
    p = first.generations[0].prompt_tokens
    expected = float(prefill_flops(LOCAL, float(p))) + sum(float(decode_flops(LOCAL, float(p), float(o))) for o in eight)
    assert second.cost.flops == pytest.approx(expected)


def test_more_samples_than_stored_generates_only_the_missing(store: SampleStore) -> None:
    mock = MockBackend(_echo)
    backend = CachedBackend(mock, store, catalog=CATALOG)
    _run(backend.complete(_request(n=8, seed=5)))
    result = _run(backend.complete(_request(n=12, seed=5)))
    assert [r.n for r in mock.requests] == [8, 4]
    assert (mock.requests[1].offset, mock.requests[1].seed) == (8, 5)  # samples 8.. : new ones, not the stored ones
    texts = [g.text for g in result.generations]
    assert len(set(texts)) == 12 and result.reused == 8
    model, p, k = sample_key(_request(n=12, seed=5))
    assert [s.sample_index for s in store.get(model, p, k)] == list(range(12))
    assert result.generated_cost is not None and result.generated_cost.output_tokens < result.cost.output_tokens
    stats = backend.stats
    assert (stats.generated_samples, stats.reused_samples) == (12, 8)
    assert stats.without_reuse.output_tokens == stats.generated.output_tokens + stats.reused.output_tokens


def test_offsets_and_gaps(store: SampleStore) -> None:
    mock = MockBackend(_echo)
    backend = CachedBackend(mock, store, catalog=CATALOG)
    first = _run(backend.complete(_request(n=4, seed=1)))
    batch = _run(backend.complete(_request(n=4, seed=1, offset=4)))  # samples 4..7: an early stop's next batch
    assert (mock.requests[-1].offset, mock.requests[-1].n) == (4, 4) and batch.reused == 0
    again = _run(backend.complete(_request(n=3, seed=1, offset=2)))  # samples 2..4: all stored
    assert len(mock.requests) == 2 and again.reused == 3
    assert [g.text for g in again.generations] == [g.text for g in (*first.generations[2:], batch.generations[0])]
    model, p, k = sample_key(_request(seed=2))
    store.add([SampleRecord(model, p, k, i, f"old {i}", 10, 5) for i in (0, 1, 4)])
    result = _run(backend.complete(_request(n=6, seed=2)))
    assert [(r.offset, r.n) for r in mock.requests[2:]] == [(2, 2), (5, 1)]  # one request per run of missing
    assert [g.text for g in result.generations][:2] == ["old 0", "old 1"] and result.generations[4].text == "old 4"
    assert [s.sample_index for s in store.get(model, p, k)] == list(range(6))


def test_stage_prefix_is_reused_by_a_later_plan(store: SampleStore) -> None:
    """Two plans share stage 1 (same prompt, model, params) and differ in stage 2: stage 1 runs once."""
    mock = MockBackend(_echo)
    backend = CachedBackend(mock, store, catalog=CATALOG)

    async def plan(stage2_model: str, stage2_n: int) -> list[str]:
        first = await backend.complete(_request(text="decompose: Q", n=4, seed=0))
        context = " | ".join(g.text for g in first.generations)
        second = await backend.complete(_request(stage2_model, text=f"answer given {context}", n=stage2_n, seed=0))
        return [g.text for g in second.generations]

    _run(plan("local", 2))
    _run(plan("priced", 3))
    stage1 = [r for r in mock.requests if r.messages[0]["content"] == "decompose: Q"]
    assert len(stage1) == 1 and len(mock.requests) == 3
    assert backend.stats.reused_samples == 4
    assert backend.stats.saved_fraction > 0


def test_samples_survive_the_process_and_a_failure_mid_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'samples.db'}"
    calls = itertools.count()

    def flaky(request: CompletionRequest) -> list[str]:
        if next(calls) >= 3:
            raise BackendUnavailable("server went away")
        return _echo(request)

    backend = CachedBackend(MockBackend(flaky), SampleStore(url), catalog=CATALOG)

    async def run_all(b: CachedBackend) -> list[Any]:
        return await asyncio.gather(*(b.complete(_request(text=f"q{i}", n=2)) for i in range(6)), return_exceptions=True)

    outcomes = _run(run_all(backend))
    done = [o for o in outcomes if isinstance(o, CompletionResult)]
    assert len(done) == 3 and sum(isinstance(o, BackendUnavailable) for o in outcomes) == 3
    backend.store.close()
    # a new process: a fresh store on the same file serves what was generated before the failure
    mock = MockBackend(_echo)
    again = CachedBackend(mock, SampleStore(url), catalog=CATALOG)
    outcomes = _run(run_all(again))
    assert all(isinstance(o, CompletionResult) for o in outcomes)
    assert len(mock.requests) == 3 and again.stats.reused_samples == 6 and again.stats.generated_samples == 6
    again.store.close()


def test_partial_results_of_a_failed_call_are_stored(sleeps: list[float]) -> None:
    transport = FakeTransport(lambda i, kw: httpx.ConnectError("refused") if kw["seed"] == 2 else None)
    inner = _backend(transport, default_limits=ModelLimits(max_n=2), max_attempts=1)
    backend = CachedBackend(inner, SampleStore())
    with pytest.raises(BackendUnavailable):
        _run(backend.complete(_request(n=6, seed=0)))
    model, p, k = sample_key(_request(n=6, seed=0))
    assert len(backend.store.get(model, p, k)) == 4
    transport.script = None  # the server is back
    result = _run(backend.complete(_request(n=6, seed=0)))
    assert result.reused == 4 and transport.calls[-1]["n"] == 2 and transport.calls[-1]["seed"] == 4


def test_concurrent_requests_for_one_key_generate_once() -> None:
    async def slow(request: CompletionRequest) -> list[str]:
        await asyncio.sleep(0.02)
        return _echo(request)

    mock = MockBackend(slow)
    backend = CachedBackend(mock, SampleStore(), catalog=CATALOG)

    async def main() -> list[CompletionResult]:
        return await asyncio.gather(*(backend.complete(_request(n=4)) for _ in range(5)))

    results = _run(main())
    assert len(mock.requests) == 1
    assert len({tuple(g.text for g in r.generations) for r in results}) == 1
    assert backend._locks._locks == {} or all(not v for v in backend._locks._locks.values())


def test_served_generations_keep_what_matters() -> None:
    backend = CachedBackend(MockBackend(lambda r: ["x" * 400] * r.n), SampleStore(), catalog=CATALOG)
    _run(backend.complete(_request(n=1, max_tokens=100)))
    (served,) = _run(backend.complete(_request(n=1, max_tokens=100))).generations
    assert served.output_tokens == 100 and served.finish_reason == "length"


def test_sample_store_from_a_path(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "samples.db")
    store.add([_record(0)])
    store.close()
    again = SampleStore(str(tmp_path / "samples.db"))
    assert [s.text for s in again.get("m", "p" * 64, "q" * 64)] == ["t0"]
    again.close()


def test_backend_logs_no_secret(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-unit-secret-9f8e7d6c5b4a"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    backend = LiteLLMBackend(CATALOG, extra_params={"mock_response": "fine"})
    _run(backend.complete(_request("hosted")))
    assert secret not in caplog.text and secret not in repr(backend.stats) and secret not in repr(backend)
