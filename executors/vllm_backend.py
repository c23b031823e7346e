"""An in-process vLLM engine as a model backend (optional: ``pip install "allot-planner[vllm]"``, needs a GPU).

Most deployments reach vLLM through its OpenAI-compatible server (``hosted_vllm/NAME`` with an
``api_base``, via ``LiteLLMBackend``); this backend is for one process that owns the GPU and wants no HTTP
hop. ``vllm`` is imported only when an engine is built here, so Allot and its tests never need it.

``VLLMEngineBackend(catalog, engines=None)``: ``engines`` maps catalog model names to ready engines
(anything with vLLM's ``AsyncLLMEngine`` surface: ``generate(prompt, sampling_params, request_id)`` as
an async iterator of request outputs, and ``get_tokenizer()``); a catalog model without one gets an
``AsyncLLMEngine`` built from ``paths[model]`` (a Hugging Face id or a local directory; default the name)
on first use. A request's
``n`` samples are one vLLM request (``SamplingParams(n=...)``); chat messages go through the model's chat
template; token counts are the engine's own, FLOPs and dollars follow the catalog.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from executors.backends import BackendError, CompletionRequest, CompletionResult, Generation, ModelBackend
from executors.budget import worst_case_cost
from graphs.cost import Cost, ModelSpec, call_flops, sample_usd
from graphs.errors import UnknownModel

__all__ = ["VLLMEngineBackend", "sampling_params"]

INSTALL_HINT = (
    'the in-process vLLM backend needs vllm: pip install "allot-planner[vllm]" (a GPU machine), or serve the model '
    "with vLLM's OpenAI-compatible server and use hosted_vllm/NAME with an api_base"
)


def sampling_params(request: CompletionRequest) -> dict[str, Any]:
    """The ``SamplingParams`` fields of ``request`` (seeded per sample index so offsets are reproducible)."""
    params: dict[str, Any] = {"n": request.n, "temperature": request.temperature}
    if request.max_tokens is not None:
        params["max_tokens"] = request.max_tokens
    if request.stop:
        params["stop"] = list(request.stop)
    if request.seed is not None:
        params["seed"] = request.seed + request.offset
    return params


def _build_engine(route: str) -> Any:
    try:
        from vllm import AsyncEngineArgs, AsyncLLMEngine  # type: ignore[import-not-found]
    except ImportError:
        raise BackendError(INSTALL_HINT) from None
    return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=route))


def _default_params_factory(fields: dict[str, Any]) -> Any:
    try:
        from vllm import SamplingParams  # type: ignore[import-not-found]
    except ImportError:
        raise BackendError(INSTALL_HINT) from None
    return SamplingParams(**fields)


class VLLMEngineBackend(ModelBackend):
    """Runs requests on in-process vLLM engines, one per catalog model (see the module docstring)."""

    def __init__(
        self,
        catalog: Mapping[str, ModelSpec],
        engines: Mapping[str, Any] | None = None,
        *,
        paths: Mapping[str, str] | None = None,
        build_engine: Callable[[str], Any] = _build_engine,
        params_factory: Callable[[dict[str, Any]], Any] = _default_params_factory,
        timeout_s: float = 600.0,
    ) -> None:
        self.catalog = dict(catalog)
        self._engines: dict[str, Any] = dict(engines or {})
        self.paths = dict(paths or {})
        """Catalog name -> Hugging Face id or local directory of the weights (default: the name itself)."""
        self._build_engine = build_engine
        self._params = params_factory
        self.timeout_s = timeout_s

    def _engine(self, model: str) -> Any:
        spec = self.catalog.get(model)
        if spec is None:
            raise UnknownModel(f"unknown model {model!r}: the catalog has {', '.join(sorted(self.catalog)) or 'none'}")
        if model not in self._engines:
            self._engines[model] = self._build_engine(self.paths.get(model, model))
        return self._engines[model]

    async def _prompt(self, engine: Any, request: CompletionRequest) -> str:
        tokenizer = engine.get_tokenizer()
        if asyncio.iscoroutine(tokenizer):
            tokenizer = await tokenizer
        template = getattr(tokenizer, "apply_chat_template", None)
        messages = [dict(m) for m in request.messages]
        if template is not None and getattr(tokenizer, "chat_template", None):
            return str(template(messages, tokenize=False, add_generation_prompt=True))
        return "\n\n".join(str(m.get("content", "")) for m in messages)

    def estimate(self, request: CompletionRequest) -> Cost:
        """Worst case for a ``BudgetMeter``: a prompt of ~4 characters per token (padded), ``n * max_tokens``."""
        spec = self.catalog.get(request.model)
        if spec is None:
            raise UnknownModel(f"unknown model {request.model!r}: the catalog has {', '.join(sorted(self.catalog)) or 'none'}")
        prompt = sum(len(str(m.get("content", ""))) for m in request.messages) / 3.0 + 32
        max_tokens = request.max_tokens or max(1, int((spec.context or 8192) - prompt))
        return worst_case_cost(spec, prompt, request.n, max_tokens, usd=sample_usd(spec, prompt, max_tokens, request.n))

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        engine = self._engine(request.model)
        spec = self.catalog[request.model]
        start = time.perf_counter()
        prompt = await self._prompt(engine, request)
        params = self._params(sampling_params(request))
        final = None

        async def consume() -> Any:
            last = None
            async for output in engine.generate(prompt, params, f"allot-{uuid.uuid4().hex}"):
                last = output
            return last

        try:
            final = await asyncio.wait_for(consume(), timeout=self.timeout_s)
        except TimeoutError:
            from executors.backends import BackendTimeout

            raise BackendTimeout(f"vLLM engine for {request.model} did not answer within {self.timeout_s:g} s") from None
        if final is None or len(getattr(final, "outputs", ())) != request.n:
            got = 0 if final is None else len(final.outputs)
            raise BackendError(f"vLLM engine for {request.model} returned {got} outputs for n={request.n}")
        prompt_tokens = len(getattr(final, "prompt_token_ids", None) or ()) or max(1, len(prompt) // 4)
        latency = time.perf_counter() - start
        generations = []
        output_tokens = 0
        for out in final.outputs:
            tokens = len(getattr(out, "token_ids", None) or ()) or max(1, len(out.text) // 4)
            output_tokens += tokens
            usd = sample_usd(spec, prompt_tokens / request.n, tokens)
            generations.append(Generation(out.text, prompt_tokens, tokens, latency, str(out.finish_reason or "stop"), usd))
        flops = call_flops(spec, prompt_tokens, 0, 1) + sum(
            call_flops(spec, prompt_tokens, g.output_tokens, 1) - call_flops(spec, prompt_tokens, 0, 1) for g in generations
        )
        usd = sample_usd(spec, prompt_tokens, output_tokens / request.n, request.n)
        return CompletionResult(tuple(generations), Cost(float(flops), float(prompt_tokens), float(output_tokens), usd), latency)
