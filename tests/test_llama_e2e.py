"""End to end against a real llama.cpp server (Gemma 3 270M on the CPU), through litellm.

The ``llama`` fixture (tests/conftest.py) runs ``llama-server`` on loopback; requests go through
``LiteLLMBackend`` with route ``hosted_vllm/gemma`` and its ``api_base``, as they would to a vLLM server.
Every wait is bounded: request timeouts, retry counts, and the test timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from executors.backends import (
    BackendTimeout,
    BackendUnavailable,
    BudgetExhausted,
    CompletionRequest,
    CompletionResult,
    ContextTooLong,
    MissingAPIKey,
)
from executors.budget import BudgetMeter, MeteredBackend
from executors.litellm_backend import LiteLLMBackend, ModelLimits
from executors.sample_store import CachedBackend, SampleStore, sample_key
from graphs.cost import Budget, call_flops
from graphs.errors import UnknownModel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _backend(llama: Any, *, catalog: dict[str, Any] | None = None, **kwargs: Any) -> LiteLLMBackend:
    kwargs.setdefault("timeout_s", 60)
    kwargs.setdefault("max_attempts", 3)
    kwargs.setdefault("backoff_s", 0.05)
    kwargs.setdefault("seed", 0)
    return LiteLLMBackend(catalog or {"gemma": llama.model_spec()}, **kwargs)


def _request(text: str, **kwargs: Any) -> CompletionRequest:
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("temperature", 0.8)
    return CompletionRequest("gemma", ({"role": "user", "content": text},), **kwargs)


def _tokenize(llama: Any, text: str) -> int:
    """The server's own token count of ``text`` (llama.cpp's /tokenize)."""
    body = json.dumps({"content": text, "add_special": False}).encode()
    request = urllib.request.Request(f"{llama.url}/tokenize", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return len(json.load(response)["tokens"])


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _gather(coros: Any) -> list[Any]:
    async def main() -> list[Any]:
        return list(await asyncio.gather(*coros, return_exceptions=True))

    return _run(main())


def test_a_real_call_with_real_token_counts(llama: Any) -> None:
    backend = _backend(llama)
    result = _run(backend.complete(_request("Name a fruit.", max_tokens=12, seed=1)))
    (generation,) = result.generations
    assert generation.text and generation.latency_s > 0
    assert generation.prompt_tokens > _tokenize(llama, "Name a fruit.")  # the chat template's tokens too
    # usage covers the single choice: its count is the server's (the text, plus a stop token if it stopped)
    assert _tokenize(llama, generation.text) <= generation.output_tokens <= 12
    assert generation.output_tokens >= _tokenize(llama, generation.text) - 1
    spec = llama.model_spec()
    assert result.cost.flops == pytest.approx(float(call_flops(spec, generation.prompt_tokens, generation.output_tokens)))
    assert result.cost.usd == 0.0
    assert backend.stats.calls == 1 and backend.stats.retries == 0


def test_n_samples_in_one_call_with_local_counts(llama: Any) -> None:
    backend = _backend(llama)
    request = _request("Answer with one word: what color is the sky?", n=4, max_tokens=24, temperature=1.0, seed=3, stop=("\n",))
    result = _run(backend.complete(request))
    assert len(result.generations) == 4 and backend.stats.calls == 1  # n honoured in one request
    assert len({g.text for g in result.generations}) > 1  # distinct samples, not 4 copies
    # llama.cpp's usage counts the first choice only; every choice is counted here
    server = [_tokenize(llama, g.text) + (g.finish_reason == "stop") for g in result.generations]
    ours = [g.output_tokens for g in result.generations]
    assert ours[0] == server[0]
    assert abs(sum(ours) - sum(server)) <= max(4, 0.2 * sum(server)), (ours, server)
    assert result.cost.output_tokens == sum(ours)
    assert result.cost.prompt_tokens == result.generations[0].prompt_tokens  # prefill paid once


def test_n_larger_than_the_slots_is_split_and_topped_up(llama: Any) -> None:
    backend = _backend(llama, default_limits=ModelLimits(max_n=3))
    result = _run(backend.complete(_request("Say a number.", n=7, max_tokens=6, seed=11)))
    assert len(result.generations) == 7 and backend.stats.calls == 3


def test_concurrency_limit_is_what_reaches_the_server(llama: Any) -> None:
    """``max_concurrency`` bounds the calls in flight to the real server, and concurrent calls each get
    their own complete answer. (Throughput is measured by benchmarks/executor_overhead.py, not here.)"""
    import litellm

    prompts = [f"Count from {i} to {i + 20}:" for i in range(8)]

    def run(concurrency: int) -> tuple[int, list[Any]]:
        in_flight = peak = 0

        async def spy(**kwargs: Any) -> Any:  # the real litellm call, counted
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await litellm.acompletion(**kwargs)
            finally:
                in_flight -= 1

        backend = _backend(llama, default_limits=ModelLimits(max_concurrency=concurrency), completion_fn=spy)
        results = _gather(backend.complete(_request(p, max_tokens=16, temperature=0.0, seed=0)) for p in prompts)
        return peak, results

    sequential_peak, sequential = run(1)
    concurrent_peak, concurrent = run(8)
    assert sequential_peak == 1
    assert concurrent_peak > 1  # eight requests were on the server together
    for results in (sequential, concurrent):
        assert all(isinstance(r, CompletionResult) for r in results), results
        assert all(len(r.generations) == 1 and r.generations[0].text and r.cost.output_tokens > 0 for r in results)


def test_killed_server_keeps_stored_samples_and_resume_generates_only_the_rest(llama: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'samples.db'}"
    requests = [_request(f"Write a short line about the number {i}.", n=2, max_tokens=16, seed=i) for i in range(12)]
    backend = _backend(llama, default_limits=ModelLimits(max_concurrency=2), max_attempts=2)
    cached = CachedBackend(backend, SampleStore(url))

    async def run_and_kill() -> list[Any]:
        async def killer() -> None:
            deadline = time.monotonic() + 120
            while cached.stats.generated_samples < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(llama.kill)

        kill = asyncio.create_task(killer())
        outcomes = await asyncio.gather(*(cached.complete(r) for r in requests), return_exceptions=True)
        await kill
        return list(outcomes)

    try:
        outcomes = _run(run_and_kill())
    finally:
        cached.store.close()
    done = {i: o for i, o in enumerate(outcomes) if isinstance(o, CompletionResult)}
    failed = [o for o in outcomes if not isinstance(o, CompletionResult)]
    assert len(done) >= 3 and failed, [repr(o) if isinstance(o, BaseException) else "ok" for o in outcomes]
    for error in failed:
        assert isinstance(error, BackendUnavailable), repr(error)
        assert "cannot be reached" in str(error) and llama.api_base in str(error), str(error)
    store = SampleStore(url)
    stored = [store.get(*sample_key(r)) for r in requests]
    for i, result in done.items():  # everything generated before the kill is stored
        assert [s.text for s in stored[i]] == [g.text for g in result.generations]
    kept = sum(len(samples) for samples in stored)
    assert kept >= 2 * len(done)

    llama.restart()
    resumed_backend = _backend(llama, default_limits=ModelLimits(max_concurrency=4), timeout_s=120)
    resumed = CachedBackend(resumed_backend, store)
    outcomes = _gather(resumed.complete(r) for r in requests)
    errors = [repr(o) for o in outcomes if not isinstance(o, CompletionResult)]
    assert not errors, errors
    assert resumed.stats.reused_samples == kept  # nothing stored is generated again
    assert resumed.stats.generated_samples == 2 * len(requests) - kept
    assert resumed_backend.stats.samples == 2 * len(requests) - kept
    for i, result in done.items():
        assert [g.text for g in outcomes[i].generations] == [g.text for g in result.generations]
    store.close()


def test_server_down_is_unavailable_with_a_clear_message(llama: Any) -> None:
    spec = llama.model_spec().model_copy(update={"api_base": "http://127.0.0.1:9/v1"})  # nothing listens on port 9
    backend = _backend(llama, catalog={"gemma": spec}, max_attempts=2)
    started = time.perf_counter()
    with pytest.raises(BackendUnavailable, match=r"cannot be reached.*127\.0\.0\.1:9/v1 is running.*after 2 attempts"):
        _run(backend.complete(_request("hello")))
    assert time.perf_counter() - started < 30


def test_timeout(llama: Any) -> None:
    backend = _backend(llama, timeout_s=0.2, max_attempts=3)
    long_prompt = "Tell a very long story about a dragon. " * 20
    with pytest.raises(BackendTimeout, match=r"did not answer within 0\.2 s"):
        _run(backend.complete(_request(long_prompt, max_tokens=400)))
    assert backend.stats.attempts == 1  # timeouts are not retried unless asked


def test_prompt_longer_than_the_context(llama: Any) -> None:
    backend = _backend(llama)
    long_prompt = "hello world " * 700  # about 1400 tokens; a slot holds 1024
    with pytest.raises(ContextTooLong, match="exceeds its context of 1024 tokens"):
        _run(backend.complete(_request(long_prompt)))
    assert backend.stats.calls == 0 and backend.stats.attempts == 0  # refused before a call
    # without a context in the catalog, the server refuses, and says so
    spec = llama.model_spec().model_copy(update={"context": None})
    backend = _backend(llama, catalog={"gemma": spec})
    with pytest.raises(ContextTooLong, match=r"does not fit its context.*exceeds the available context size"):
        _run(backend.complete(_request(long_prompt)))
    assert backend.stats.attempts == 1


def test_unknown_model_and_route(llama: Any) -> None:
    backend = _backend(llama)
    with pytest.raises(UnknownModel, match=r"'gemma-9b' is not in the catalog \(known: gemma\)"):
        _run(backend.complete(CompletionRequest("gemma-9b", ({"role": "user", "content": "hi"},))))
    spec = llama.model_spec().model_copy(update={"route": "nosuchprovider/gemma"})
    with pytest.raises(UnknownModel, match="litellm does not know"):
        _run(_backend(llama, catalog={"gemma": spec}).complete(_request("hi")))


def test_missing_api_key_is_named_and_a_set_key_is_never_logged(
    llama: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = llama.model_spec().model_copy(update={"route": "openai/gemma"})  # llama.cpp speaks the OpenAI API too
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = _backend(llama, catalog={"gemma": spec})
    with pytest.raises(MissingAPIKey, match="needs OPENAI_API_KEY set in the environment"):
        _run(backend.complete(_request("hi")))
    assert backend.stats.attempts == 0

    secret = "sk-e2e-secret-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)  # llama.cpp accepts any key
    caplog.set_level(logging.DEBUG)
    store = SampleStore()
    cached = CachedBackend(backend, store)
    result = _run(cached.complete(_request("Say hi.", max_tokens=8)))
    assert result.generations[0].output_tokens > 0
    stored = store.get(*sample_key(_request("Say hi.", max_tokens=8)))
    captured = capfd.readouterr()
    for text in (caplog.text, captured.out, captured.err, repr(backend.stats), repr(cached.stats), repr(stored)):
        assert secret not in text


def test_budget_meter_stops_calls_before_they_are_made(llama: Any) -> None:
    backend = _backend(llama)
    meter = BudgetMeter(Budget(limit=250, unit="tokens"))  # about 5 calls of 13 + 32 tokens
    metered = MeteredBackend(backend, meter)
    outcomes = [_gather([metered.complete(_request(f"Say {i}.", max_tokens=32, seed=i))])[0] for i in range(8)]
    done = [o for o in outcomes if isinstance(o, CompletionResult)]
    refused = [o for o in outcomes if isinstance(o, BudgetExhausted)]
    assert done and refused and len(done) + len(refused) == 8
    assert backend.stats.calls == len(done)
    assert meter.spent == pytest.approx(sum(r.cost.tokens for r in done)) and meter.spent <= 250
