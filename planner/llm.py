"""The planner LLM: any litellm model, asked for JSON that is validated, repaired or re-asked.

Agents never trust the planner's words: every answer is parsed against a pydantic schema; text around
the JSON, code fences and trailing commas are repaired; a reply that still fails is re-asked with the
validation error, a bounded number of times; after that the call returns ``None`` and the agent falls
back to the insight heuristic. Every call's tokens, dollars and latency are counted (``usage``), so a
study reports what its planner cost beside what its evaluations cost.

A call that fails (unreachable, timed out, over the model's context) is not retried: the agent falls back
at once, and the error is recorded as one line (the provider's message, without litellm's wrapping).

Tests and CI use ``scripted_model``: a deterministic local fake registered as a litellm provider
(``allot-scripted/<name>``), so parsing, repair, re-asking and fallback run through litellm for real.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from graphs.cost import Cost

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__all__ = ["PlannerCall", "PlannerLLM", "extract_json", "planner_llm", "scripted_model"]

Schema = TypeVar("Schema", bound=BaseModel)
Message = dict[str, str]
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_LITELLM_PREFIX = re.compile(r"^(?:litellm\.)?[A-Za-z_]*(?:Error|Exception|Timeout)\s*(?:[:-]\s*)?")
_MAX_OPENERS = 20  # positions tried by the prefix repair (a JSON value followed by junk)
SELF_HOSTED = frozenset({"hosted_vllm", "vllm", "ollama", "ollama_chat", "lm_studio", "llamafile", "openai_like"})
"""litellm providers that are servers of one's own: they need no API key (as in ``executors.litellm_backend``)."""


@dataclass
class PlannerCall:
    """One ``ask_json``: how many attempts, what went wrong, what it cost."""

    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    seconds: float = 0.0
    ok: bool = False

    @property
    def cost(self) -> Cost:
        return Cost(0.0, float(self.prompt_tokens), float(self.output_tokens), self.usd)


def extract_json(text: str) -> Any:
    """The JSON value in a reply: the whole text, a fenced block, the outermost {...} / [...], or the first
    complete value followed by anything (a small model often keeps writing brackets after it).

    Repairs trailing commas. Raises ``ValueError`` when nothing parses.
    """
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
            try:
                return json.loads(attempt)
            except (json.JSONDecodeError, ValueError):
                continue
    decoder = json.JSONDecoder()
    for source in (text, _TRAILING_COMMA.sub(r"\1", text)):
        starts = [i for i, char in enumerate(source) if char in "{["][:_MAX_OPENERS]
        for start in starts:
            try:
                value, _ = decoder.raw_decode(source, start)
            except (json.JSONDecodeError, ValueError):
                continue
            if isinstance(value, dict) or (isinstance(value, list) and value):
                return value
    raise ValueError("no JSON object found in the reply")


class PlannerLLM:
    """A litellm model answering with JSON. ``model`` is any litellm route (``openai/gpt-4o-mini``,
    ``hosted_vllm/qwen3-8b`` with ``api_base``, ``allot-scripted/...``). API keys come from the
    provider's environment variables and are never stored or logged."""

    def __init__(
        self,
        model: str,
        *,
        api_base: str | None = None,
        temperature: float = 0.2,
        max_tokens: int = 1024,
        max_attempts: int = 3,
        timeout_s: float = 60.0,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.model = model
        self.api_base = api_base
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_attempts = max(1, max_attempts)
        self.timeout_s = timeout_s
        self.usage = PlannerCall()  # running total over every call

    def ask_json(self, messages: Sequence[Message], schema: type[Schema]) -> tuple[Schema | None, PlannerCall]:
        """Ask until the reply validates against ``schema`` (at most ``max_attempts`` calls).

        Returns ``(None, call)`` when every attempt failed, including when the model cannot be reached;
        ``call.errors`` says why, one line each.
        """
        import litellm

        _register_scripted()
        call = PlannerCall()
        history = list(messages)
        start = time.perf_counter()
        missing = self.missing_keys()
        if missing:
            call.errors.append(f"planner model {self.model} needs {', '.join(missing)} set in the environment")
        for _ in range(0 if missing else self.max_attempts):
            call.attempts += 1
            try:
                response = litellm.completion(
                    model=self.model,
                    messages=history,
                    api_base=self.api_base,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    timeout=self.timeout_s,
                    num_retries=0,
                    max_retries=0,  # else the OpenAI client retries twice by itself: 3x the timeout
                )
            except Exception as exc:  # the planner being down is a fallback, not a crash
                call.errors.append(self._describe(exc))
                break
            choice = response.choices[0]
            text = choice.message.content or ""
            usage = getattr(response, "usage", None)
            call.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            call.output_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
            call.usd += _cost_of(response)
            try:
                value = schema.model_validate(extract_json(text))
            except (ValueError, ValidationError) as exc:
                error = _first_line(exc)
                if getattr(choice, "finish_reason", None) == "length":
                    error += f" (the reply was cut off at max_tokens={self.max_tokens})"
                call.errors.append(error)
                history += [
                    {"role": "assistant", "content": text[:4000]},
                    {"role": "user", "content": f"That reply was not valid: {error}. Answer again with JSON only."},
                ]
                continue
            call.ok = True
            break
        call.seconds = time.perf_counter() - start
        self._add(call)
        return (value if call.ok else None), call

    def missing_keys(self) -> list[str]:
        """Environment variables the model's provider needs and that are not set (never their values)."""
        import litellm

        provider = self.model.split("/", 1)[0] if "/" in self.model else ""
        if provider == "allot-scripted" or provider in SELF_HOSTED:
            return []
        try:
            report = litellm.validate_environment(model=self.model, api_base=self.api_base)
        except Exception:  # an unknown provider is reported by the call itself
            return []
        return [] if report.get("keys_in_environment") else list(report.get("missing_keys") or [])

    def _describe(self, exc: Exception) -> str:
        """One line about a failed call: the exception's kind and the provider's own message."""
        kind = type(exc).__name__
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        detail = _provider_message(text) or first
        while True:  # litellm wraps as "litellm.Timeout: Timeout Error: Hosted_vllmException - ..."
            shorter = _LITELLM_PREFIX.sub("", detail, count=1).strip()
            if shorter == detail or not shorter:
                break
            detail = shorter
        if "timeout" in kind.lower() or "timed out" in detail.lower():
            detail = f"no answer within {self.timeout_s:g} s ({detail})"
        return f"{kind}: {detail}"[:300]

    def _add(self, call: PlannerCall) -> None:
        total = self.usage
        total.attempts += call.attempts
        total.prompt_tokens += call.prompt_tokens
        total.output_tokens += call.output_tokens
        total.usd += call.usd
        total.seconds += call.seconds
        total.errors += call.errors


def planner_llm(
    model: str | None, *, api_base: str | None, batch: int, max_attempts: int, max_tokens: int, timeout_s: float
) -> PlannerLLM | None:
    """An agent's planner (``None`` without a model), after checking the settings every agent shares, so a
    bad one fails when the strategy is built, with a planner model or without."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if not model:
        return None
    return PlannerLLM(model, api_base=api_base, max_attempts=max_attempts, max_tokens=max_tokens, timeout_s=timeout_s)


def _first_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(exc).splitlines()[0]


def _provider_message(text: str) -> str:
    """The ``error.message`` of a JSON error body inside an exception's text (OpenAI-style servers)."""
    start = text.find("{")
    if start < 0:
        return ""
    try:
        body, _ = json.JSONDecoder().raw_decode(text, start)
    except (json.JSONDecodeError, ValueError):
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
    return " ".join(str(message).split()) if message else ""


def _cost_of(response: Any) -> float:
    import litellm

    try:
        return float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:  # local and scripted models have no price
        return 0.0


# -- scripted planner model (tests, CI, demos without a key) ----------------------------------------------

ScriptFn = Callable[[list[Message]], str]
_SCRIPTS: dict[str, ScriptFn] = {}
_registered = False


def scripted_model(name: str, script: ScriptFn) -> str:
    """Register a deterministic planner: ``script(messages) -> reply text``. Returns the litellm route
    (``allot-scripted/<name>``) to pass as ``PlannerLLM(model=...)``."""
    _SCRIPTS[name] = script
    _register_scripted()
    return f"allot-scripted/{name}"


def _register_scripted() -> None:
    global _registered
    if _registered:
        return
    import litellm
    from litellm import CustomLLM

    litellm.suppress_debug_info = True
    from litellm.types.utils import ModelResponse

    class _Scripted(CustomLLM):
        def completion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> ModelResponse:
            name = model.split("/", 1)[-1]
            if name not in _SCRIPTS:
                raise ValueError(f"no scripted planner named {name!r}")
            text = _SCRIPTS[name](list(messages))
            prompt = sum(len(str(m.get("content", ""))) for m in messages) // 4
            return litellm.ModelResponse(
                model=model,
                choices=[{"message": {"role": "assistant", "content": text}, "finish_reason": "stop", "index": 0}],
                usage={"prompt_tokens": prompt, "completion_tokens": len(text) // 4, "total_tokens": prompt + len(text) // 4},
            )

    litellm.custom_provider_map = [
        *[p for p in litellm.custom_provider_map if p.get("provider") != "allot-scripted"],
        {"provider": "allot-scripted", "custom_handler": _Scripted()},
    ]
    _registered = True
