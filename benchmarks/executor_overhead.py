"""The executor's own cost per call against a bare ``litellm.acompletion``, and throughput with concurrency.

Everything runs against a real llama.cpp server (Gemma 3 270M on the CPU, started here on loopback) in
the same run:

1. Per call, one request at a time, interleaved so that server load drifts alike for all: a bare
   ``litellm.acompletion``; ``LiteLLMBackend.complete``; ``CachedBackend`` (in memory and on a SQLite
   file) on misses, i.e. looking up, generating and storing. Every call has its own prompt, so the
   server's prompt cache favours none. The executor's own time is measured directly (wall time of
   ``complete`` minus the time inside litellm), since a difference of two server-bound medians is noise.
2. Throughput at concurrency 1, 4 and 8 (the server has 8 slots): bare litellm under a semaphore, and
   ``LiteLLMBackend`` with ``max_concurrency``.

    python benchmarks/executor_overhead.py [--calls 40] [--requests 16] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from rich.console import Console  # after the environment litellm reads at import
from rich.table import Table

from executors.backends import CompletionRequest, CompletionResult, ModelBackend
from executors.litellm_backend import LiteLLMBackend, ModelLimits
from executors.llama_server import LlamaServer
from executors.sample_store import CachedBackend, SampleStore

ROOT = Path(__file__).resolve().parent.parent


class Timed(ModelBackend):
    """Measures the time spent inside another backend."""

    def __init__(self, inner: ModelBackend) -> None:
        self.inner = inner
        self.catalog = getattr(inner, "catalog", {})
        self.inside_s = 0.0

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        started = time.perf_counter()
        try:
            return await self.inner.complete(request)
        finally:
            self.inside_s += time.perf_counter() - started


def prompt(variant: str, i: int) -> str:
    return f"[{variant}{i:04d}] Name one animal that lives in the sea."


async def per_call(server: LlamaServer, calls: int, max_tokens: int, db_dir: Path) -> list[tuple[str, list[float], list[float]]]:
    import litellm

    spec = server.model_spec()
    backend = LiteLLMBackend({"gemma": spec}, timeout_s=60)
    mem_inner = LiteLLMBackend({"gemma": spec}, timeout_s=60)
    mem_timed = Timed(mem_inner)
    memory = CachedBackend(mem_timed, SampleStore())
    sql_inner = LiteLLMBackend({"gemma": spec}, timeout_s=60)
    sql_timed = Timed(sql_inner)
    sqlite = CachedBackend(sql_timed, SampleStore(db_dir / "samples.db"))

    def request(variant: str, i: int) -> CompletionRequest:
        messages = ({"role": "user", "content": prompt(variant, i)},)
        return CompletionRequest("gemma", messages, max_tokens=max_tokens, temperature=0.0)

    async def bare(i: int) -> tuple[float, float]:
        started = time.perf_counter()
        await litellm.acompletion(
            model=spec.route,
            api_base=spec.api_base,
            messages=[{"role": "user", "content": prompt("B", i)}],
            max_tokens=max_tokens,
            temperature=0.0,
            n=1,
            timeout=60,
            num_retries=0,
            max_retries=0,
        )
        return time.perf_counter() - started, 0.0

    async def via_backend(i: int) -> tuple[float, float]:
        before = backend.stats.own_s
        started = time.perf_counter()
        await backend.complete(request("L", i))
        return time.perf_counter() - started, backend.stats.own_s - before

    async def via_cache(i: int, cached: CachedBackend, timed: Timed, inner: LiteLLMBackend, variant: str) -> tuple[float, float]:
        inside_before, own_before = timed.inside_s, inner.stats.own_s
        started = time.perf_counter()
        await cached.complete(request(variant, i))
        wall = time.perf_counter() - started
        cache_own = wall - (timed.inside_s - inside_before)
        return wall, cache_own + (inner.stats.own_s - own_before)  # both layers' own time

    variants = {
        "bare litellm.acompletion": bare,
        "LiteLLMBackend": via_backend,
        "CachedBackend (memory), miss": lambda i: via_cache(i, memory, mem_timed, mem_inner, "M"),
        "CachedBackend (SQLite file), miss": lambda i: via_cache(i, sqlite, sql_timed, sql_inner, "S"),
    }
    for fn in variants.values():  # warm up: imports, tokenizer, connection pools, the database schema
        for i in range(3):
            await fn(10_000 + i)
    walls: dict[str, list[float]] = {name: [] for name in variants}
    owns: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(calls):
        for name, fn in variants.items():
            wall, own = await fn(i)
            walls[name].append(wall)
            owns[name].append(own)
    sqlite.store.close()
    return [(name, walls[name], owns[name]) for name in variants]


async def throughput(server: LlamaServer, concurrency: int, requests: int, max_tokens: int, tag: str) -> dict[str, float]:
    import litellm

    spec = server.model_spec()
    texts = [f"[{tag}{concurrency}-{i}] Write a sentence about the ocean." for i in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    out: dict[str, float] = {}

    async def bare_one(text: str) -> int:
        async with gate:
            response = await litellm.acompletion(
                model=spec.route,
                api_base=spec.api_base,
                messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens,
                temperature=0.7,
                seed=1,
                timeout=120,
                num_retries=0,
                max_retries=0,
            )
        return int(response.usage.completion_tokens)

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(bare_one("b" + t) for t in texts)))
    elapsed = time.perf_counter() - started
    out["bare_rps"], out["bare_tps"] = requests / elapsed, tokens / elapsed

    backend = LiteLLMBackend({"gemma": spec}, default_limits=ModelLimits(max_concurrency=concurrency), timeout_s=120)
    reqs = [
        CompletionRequest("gemma", ({"role": "user", "content": "l" + t},), max_tokens=max_tokens, temperature=0.7, seed=1)
        for t in texts
    ]
    started = time.perf_counter()
    results: list[Any] = await asyncio.gather(*(backend.complete(r) for r in reqs))
    elapsed = time.perf_counter() - started
    tokens = int(sum(r.cost.output_tokens for r in results))
    out["backend_rps"], out["backend_tps"] = requests / elapsed, tokens / elapsed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="calls per variant for the per-call overhead")
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per call for the per-call overhead")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--throughput-tokens", type=int, default=32)
    args = parser.parse_args()
    console = Console(width=130)
    cache = Path(os.environ.get("ALLOT_CACHE_DIR") or ROOT / ".allot-cache")
    with tempfile.TemporaryDirectory() as tmp, LlamaServer(cache_dir=cache, log_path=Path(tmp) / "llama-server.log") as server:
        console.print(f"llama.cpp server at {server.url} (Gemma 3 270M Q4_K_M, 8 slots), {os.cpu_count()} CPUs")
        rows = asyncio.run(per_call(server, args.calls, args.max_tokens, Path(tmp)))
        bare_median = statistics.median(rows[0][1])
        table = Table(title=f"Per call, one at a time ({args.calls} calls each, interleaved, max_tokens={args.max_tokens})")
        for col in ("path", "median wall ms", "vs bare ms", "executor's own ms (median)", "own / wall"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for name, walls, owns in rows:
            wall = statistics.median(walls)
            if name.startswith("bare"):
                table.add_row(name, f"{wall * 1e3:.1f}", "-", "-", "-")
                continue
            own = statistics.median(owns)
            table.add_row(
                name,
                f"{wall * 1e3:.1f}",
                f"{(wall - bare_median) * 1e3:+.1f}",
                f"{own * 1e3:.3f}",
                f"{sum(owns) / sum(walls):.2%}",
            )
        console.print(table)

        table = Table(title=f"Throughput: {args.requests} requests, max_tokens={args.throughput_tokens}")
        for col in ("concurrency", "bare req/s", "bare out tok/s", "LiteLLMBackend req/s", "LiteLLMBackend out tok/s"):
            table.add_column(col, justify="right")
        for concurrency in (1, 4, 8):
            result = asyncio.run(throughput(server, concurrency, args.requests, args.throughput_tokens, "T"))
            table.add_row(
                str(concurrency),
                f"{result['bare_rps']:.2f}",
                f"{result['bare_tps']:.1f}",
                f"{result['backend_rps']:.2f}",
                f"{result['backend_tps']:.1f}",
            )
        console.print(table)


if __name__ == "__main__":
    main()
