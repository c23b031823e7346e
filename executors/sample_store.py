"""Every generation stored, every stored generation reused: ``SampleStore`` and ``CachedBackend``.

A sample is keyed by (model, sha256 of the rendered messages' canonical JSON, sha256 of the decoding
parameters' canonical JSON, sample index). ``CachedBackend(inner, store)`` wraps any backend: a request
for ``n`` samples is served the stored samples with indices ``offset .. offset + n - 1`` (``offset`` is 0
unless a caller draws in batches, as early stop does) and only the missing ones are generated: one inner
request per run of consecutive missing indices, whose ``offset`` is the run's first index
(``LiteLLMBackend`` seeds each call with ``seed + index of its first sample``, so new samples differ from
stored ones). So a plan asking for 8 samples reuses the first 8 of an earlier 16, and a plan sharing a
stage prefix with an earlier one reuses that stage (same prompts, same keys).

Generations are stored as soon as the call that made them returns, also the part of a split request
that returned before another part failed (``BackendError.partial``), so a crash or a dead server loses
only the calls in flight. ``CachedBackend.stats`` counts what was generated, what was reused, and what
everything would have cost without reuse.

Storage is any ``planner.storage.BaseStorage`` (``InMemoryStorage`` or ``SQLStorage``: SQLite file,
PostgreSQL), table ``allot_samples``. Concurrent requests for one key within a process wait for each
other, so a sample is generated once; across processes the first stored sample of a key wins and later
requests are served that one. A stored sample never changes, so a ``SampleStore(..., memory=N)`` keeps up
to ``N`` samples it read in the process and serves a request whose indices it all holds without asking
the database (a service worker runs the same inputs again and again).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from executors.backends import BackendError, CompletionRequest, CompletionResult, Generation, ModelBackend
from graphs.cost import Cost, ModelSpec, decode_flops, prefill_flops
from graphs.errors import UnknownModel
from planner.storage import BaseStorage, InMemoryStorage, SampleRecord, get_storage

__all__ = [
    "CachedBackend",
    "ReuseStats",
    "SampleRecord",
    "SampleStore",
    "params_hash",
    "prompt_hash",
    "sample_key",
]


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_hash(messages: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the rendered messages as canonical JSON (keys sorted, no spaces, UTF-8)."""
    return _sha256_json([dict(message) for message in messages])


def params_hash(params: Mapping[str, Any]) -> str:
    """sha256 of the decoding parameters as canonical JSON (``CompletionRequest.params()``)."""
    return _sha256_json(dict(params))


def sample_key(request: CompletionRequest) -> tuple[str, str, str]:
    """``(model, prompt_hash, params_hash)``: with a sample index, the key of one stored sample."""
    return request.model, prompt_hash(request.messages), params_hash(request.params())


class SampleStore:
    """Stored generations on any ``BaseStorage``.

    Args:
        storage: a ``BaseStorage``; a database URL (``sqlite:///...``, ``postgresql+psycopg://...``); a
            file path (a SQLite file, created with its schema on first use); ``None``: in memory.
    """

    def __init__(self, storage: BaseStorage | str | os.PathLike[str] | None = None, *, memory: int = 0) -> None:
        self._owned = not isinstance(storage, BaseStorage)
        self.memory = max(0, int(memory))
        """Samples read from the storage that are kept in this process (0: none)."""
        self._read: OrderedDict[tuple[str, str, str], dict[int, SampleRecord]] = OrderedDict()
        self._kept = 0
        self._read_lock = threading.Lock()
        if storage is None:
            storage = InMemoryStorage()
        elif not isinstance(storage, BaseStorage):
            text = os.fspath(storage)
            storage = get_storage(text if "://" in text else f"sqlite:///{Path(text).expanduser().absolute()}")
        self.storage: BaseStorage = storage
        self._blocking = not isinstance(storage, InMemoryStorage)
        # database calls run on the store's own threads: the loop's default executor may be busy with
        # other libraries' work (litellm's logging), and a sample lookup should not queue behind it
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="allot-samples") if self._blocking else None

    def __repr__(self) -> str:
        return f"SampleStore({self.storage!r})"

    def get(self, model: str, prompt_hash: str, params_hash: str, limit: int | None = None) -> list[SampleRecord]:
        """Stored samples of one key with ``sample_index < limit``, in index order (gaps possible)."""
        known = self._recall(model, prompt_hash, params_hash, limit)
        if known is not None:
            return known
        found = self.storage.get_samples(model, prompt_hash, params_hash, limit)
        self._remember((model, prompt_hash, params_hash), found)
        return found

    def _recall(self, model: str, prompt_hash: str, params_hash: str, limit: int | None) -> list[SampleRecord] | None:
        """The samples ``get`` would return, if this process holds every index below ``limit``."""
        if not self.memory or limit is None:
            return None
        key = (model, prompt_hash, params_hash)
        with self._read_lock:
            held = self._read.get(key)
            if held is None or any(index not in held for index in range(limit)):
                return None
            self._read.move_to_end(key)
            return [held[index] for index in range(limit)]

    def _remember(self, key: tuple[str, str, str], samples: Sequence[SampleRecord]) -> None:
        if not self.memory or not samples:
            return
        with self._read_lock:
            held = self._read.setdefault(key, {})
            before = len(held)
            held.update((sample.sample_index, sample) for sample in samples)
            self._kept += len(held) - before
            self._read.move_to_end(key)
            while self._kept > self.memory and len(self._read) > 1:
                _, dropped = self._read.popitem(last=False)
                self._kept -= len(dropped)

    def add(self, samples: Iterable[SampleRecord]) -> int:
        """Store samples whose key is new; returns how many were stored (stored keys are kept as they are)."""
        return self.storage.add_samples(list(samples))

    async def aget(self, model: str, prompt_hash: str, params_hash: str, limit: int | None = None) -> list[SampleRecord]:
        """``get`` without blocking the event loop on a database."""
        if self._threads is None:
            return self.get(model, prompt_hash, params_hash, limit)
        known = self._recall(model, prompt_hash, params_hash, limit)
        if known is not None:
            return known
        return await asyncio.get_running_loop().run_in_executor(self._threads, self.get, model, prompt_hash, params_hash, limit)

    async def aadd(self, samples: Iterable[SampleRecord]) -> int:
        """``add`` without blocking the event loop on a database."""
        items = list(samples)
        if self._threads is None:
            return self.add(items)
        return await asyncio.get_running_loop().run_in_executor(self._threads, self.add, items)

    def close(self) -> None:
        """Close the storage if this store opened it, and the store's threads."""
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        if self._owned:
            self.storage.close()


@dataclass
class ReuseStats:
    """What a ``CachedBackend`` generated and what it served from the store.

    ``generated`` is what was really paid (every call made, including prefills of split calls and
    the part of failed calls that returned); ``reused`` is what the served samples had cost when they
    were generated; ``without_reuse`` is their sum, what the same requests would have cost with no store.
    """

    requests: int = 0
    generated_samples: int = 0
    reused_samples: int = 0
    generated: Cost = field(default_factory=Cost)
    reused: Cost = field(default_factory=Cost)

    @property
    def without_reuse(self) -> Cost:
        return self.generated + self.reused

    @property
    def saved_fraction(self) -> float:
        """Share of the tokens that reuse saved (0 when nothing was requested)."""
        total = self.without_reuse.tokens
        return self.reused.tokens / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "generated_samples": self.generated_samples,
            "reused_samples": self.reused_samples,
            "generated": self.generated.as_dict(),
            "reused": self.reused.as_dict(),
            "without_reuse": self.without_reuse.as_dict(),
        }


class _KeyLocks:
    """One asyncio lock per sample key and event loop, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, list[Any]]] = weakref.WeakKeyDictionary()
        self._guard = threading.Lock()

    @asynccontextmanager
    async def hold(self, key: Any) -> Any:
        loop = asyncio.get_running_loop()
        with self._guard:
            per_loop = self._locks.get(loop)
            if per_loop is None:
                per_loop = self._locks[loop] = {}
            entry = per_loop.setdefault(key, [asyncio.Lock(), 0])
            entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    per_loop.pop(key, None)


class CachedBackend(ModelBackend):
    """Serves stored samples, generates only the missing ones with ``inner``, stores each at once.

    Args:
        inner: the backend that generates (``LiteLLMBackend``, ``MockBackend``, ...).
        store: a ``SampleStore`` (or what ``SampleStore(...)`` accepts: storage, URL, path, ``None``).
        catalog: model sizes, for the FLOPs of served samples (default: ``inner.catalog`` if it has one;
            without a catalog, served samples count tokens and dollars but no FLOPs).

    ``complete`` returns ``CompletionResult`` with ``cost`` = what the samples cost, generated now or
    earlier (so a plan costs the same with or without reuse), ``generated_cost`` = what was paid now,
    and ``reused`` = how many were served.
    """

    def __init__(
        self,
        inner: ModelBackend,
        store: SampleStore | BaseStorage | str | os.PathLike[str] | None = None,
        *,
        catalog: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        self.inner = inner
        self.store = store if isinstance(store, SampleStore) else SampleStore(store)
        self.catalog: dict[str, ModelSpec] = dict(catalog if catalog is not None else getattr(inner, "catalog", None) or {})
        self.stats = ReuseStats()
        self._locks = _KeyLocks()

    def __repr__(self) -> str:
        return f"CachedBackend({self.inner!r}, {self.store!r})"

    def estimate(self, request: CompletionRequest) -> Cost:
        """The worst case of ``request`` as if nothing were stored (what a budget must allow for)."""
        estimate = getattr(self.inner, "estimate", None)
        if estimate is None:
            raise AttributeError(f"{type(self.inner).__name__} has no estimate()")
        return estimate(request)

    def count_prompt_tokens(self, request: CompletionRequest) -> int:
        return self.inner.count_prompt_tokens(request)  # type: ignore[attr-defined]

    def _spec(self, model: str) -> ModelSpec | None:
        if not self.catalog:
            return None
        spec = self.catalog.get(model)
        if spec is None:
            known = ", ".join(sorted(self.catalog)) or "none"
            raise UnknownModel(f"model {model!r} is not in the catalog (known: {known})")
        return spec

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        """Samples ``request.offset .. request.offset + n - 1``: stored ones served, the others generated
        (one inner request per run of consecutive missing indices, with that run's ``offset``)."""
        started = time.perf_counter()
        spec = self._spec(request.model)
        model, p_hash, k_hash = sample_key(request)
        wanted = range(request.offset, request.offset + request.n)
        self.stats.requests += 1
        async with self._locks.hold((model, p_hash, k_hash)):
            found = await self.store.aget(model, p_hash, k_hash, limit=wanted.stop)
            stored = {s.sample_index: s for s in found if s.sample_index >= wanted.start}
            missing = [index for index in wanted if index not in stored]
            runs = _runs(missing)
            outcomes: list[CompletionResult | BaseException]
            if len(runs) == 1:  # the usual case: no task to schedule
                outcomes = [await self._generate(request, model, p_hash, k_hash, runs[0])]
            else:
                outcomes = await asyncio.gather(
                    *(self._generate(request, model, p_hash, k_hash, run) for run in runs), return_exceptions=True
                )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        generated = CompletionResult(())
        made: dict[int, Generation] = {}
        for run, outcome in zip(runs, outcomes, strict=True):
            assert isinstance(outcome, CompletionResult)
            generated = CompletionResult((), generated.cost + outcome.cost)
            made.update(zip(run, outcome.generations, strict=False))
        served = [stored[index] for index in sorted(stored)]
        reused_cost = _served_cost(spec, served, prefill=not missing)
        self.stats.reused_samples += len(served)
        self.stats.reused = self.stats.reused + reused_cost
        by_index: dict[int, Generation] = {s.sample_index: _generation(s, request.max_tokens) for s in served}
        by_index.update(made)
        generations = tuple(by_index[index] for index in wanted)
        return CompletionResult(
            generations,
            generated.cost + reused_cost,
            time.perf_counter() - started,
            reused=len(served),
            generated_cost=generated.cost if served else None,
        )

    async def _generate(
        self, request: CompletionRequest, model: str, p_hash: str, k_hash: str, run: list[int]
    ) -> CompletionResult:
        """Generate the samples of one run of consecutive indices and store them as soon as they return."""
        try:
            result = await self.inner.complete(replace(request, n=len(run), offset=run[0]))
        except BackendError as exc:
            if exc.partial is not None:
                await self._keep(model, p_hash, k_hash, run, exc.partial)
            raise
        await self._keep(model, p_hash, k_hash, run, result)
        return result

    async def _keep(self, model: str, p_hash: str, k_hash: str, indices: Sequence[int], result: CompletionResult) -> None:
        """Store what a call generated and count it (failed calls' partial results included)."""
        self.stats.generated_samples += len(result.generations)
        self.stats.generated = self.stats.generated + result.cost
        records = [
            SampleRecord(
                model=model,
                prompt_hash=p_hash,
                params_hash=k_hash,
                sample_index=index,
                text=g.text,
                prompt_tokens=int(g.prompt_tokens),
                output_tokens=int(g.output_tokens),
                latency_s=g.latency_s,
                usd=g.usd,
            )
            for index, g in zip(indices, result.generations, strict=False)
        ]
        if records:
            await self.store.aadd(records)

    async def aclose(self) -> None:
        await self.inner.aclose()
        self.store.close()


def _runs(indices: Sequence[int]) -> list[list[int]]:
    """``[0, 1, 2, 5, 6]`` -> ``[[0, 1, 2], [5, 6]]``."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] + 1 == index:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _generation(sample: SampleRecord, max_tokens: int | None) -> Generation:
    cut = max_tokens is not None and sample.output_tokens >= max_tokens
    return Generation(
        sample.text,
        sample.prompt_tokens,
        sample.output_tokens,
        sample.latency_s or 0.0,
        "length" if cut else "stop",
        sample.usd,
    )


def _served_cost(spec: ModelSpec | None, served: Sequence[SampleRecord], *, prefill: bool) -> Cost:
    """What ``served`` cost when generated: their decodes, plus the prompt's prefill when ``prefill``
    (no call was made now that paid it)."""
    if not served:
        return Cost()
    prompt = float(max(s.prompt_tokens for s in served))
    flops = 0.0
    if spec is not None:
        flops = sum(float(decode_flops(spec, prompt, float(s.output_tokens))) for s in served)
        if prefill:
            flops += float(prefill_flops(spec, prompt))
    usd: float | None = 0.0
    for sample in served:
        usd = None if usd is None or sample.usd is None else usd + sample.usd
    return Cost(flops, prompt if prefill else 0.0, float(sum(s.output_tokens for s in served)), usd)
