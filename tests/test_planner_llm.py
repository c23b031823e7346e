"""The planner LLM's plumbing without a server: JSON repair, keys, call parameters, one-line errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from planner.llm import PlannerLLM, extract_json, scripted_model


class Answer(BaseModel):
    a: int


def test_extract_json_repairs_what_small_models_write() -> None:
    # a real reply of Gemma 3 270M to the gradient question: a complete object, then brackets it kept writing
    gemma = '```json\n{"stage":"answer","slots":[{"id":"s","n":2}],"edges":[]}]}]}]}]}]'
    assert extract_json(gemma) == {"stage": "answer", "slots": [{"id": "s", "n": 2}], "edges": []}
    assert extract_json('Sure: {"a": 1}. Use {b} wisely.') == {"a": 1}  # braces in the text after it
    assert extract_json('{"a": [1, 2,],}') == {"a": [1, 2]}  # trailing commas
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('noise [] then {"a": 2} and more]') == {"a": 2}  # an empty list is not an answer
    for text in ("no JSON at all", "{unclosed", "[]]"):
        with pytest.raises(ValueError, match="no JSON object found"):
            extract_json(text)


def test_a_missing_key_is_named_even_with_an_api_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """``openai/...`` at a local server still needs OPENAI_API_KEY (any value): said before any call."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm = PlannerLLM("openai/gemma", api_base="http://127.0.0.1:9/v1")
    assert llm.missing_keys() == ["OPENAI_API_KEY"]
    answer, call = llm.ask_json([{"role": "user", "content": "hi"}], Answer)
    assert answer is None and call.attempts == 0
    assert call.errors == ["planner model openai/gemma needs OPENAI_API_KEY set in the environment"]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    assert llm.missing_keys() == []
    assert PlannerLLM("hosted_vllm/gemma", api_base="http://127.0.0.1:9/v1").missing_keys() == []  # a server of one's own


def test_calls_are_made_once_with_the_timeout_and_max_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """No retries hidden inside litellm or the OpenAI client: a timeout of T s costs T s, not 3 T."""
    import litellm

    seen: list[dict[str, Any]] = []
    real = litellm.completion

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(litellm, "completion", spy)
    route = scripted_model("params", lambda messages: json.dumps({"a": 1}))
    answer, call = PlannerLLM(route, max_tokens=77, timeout_s=4.5).ask_json([{"role": "user", "content": "x"}], Answer)
    assert answer == Answer(a=1) and call.ok
    (kwargs,) = seen
    assert (kwargs["max_tokens"], kwargs["timeout"], kwargs["num_retries"], kwargs["max_retries"]) == (77, 4.5, 0, 0)
    for bad in ({"max_tokens": 0}, {"timeout_s": 0.0}):
        with pytest.raises(ValueError):
            PlannerLLM(route, **bad)  # type: ignore[arg-type]


def test_failed_calls_are_one_readable_line() -> None:
    import litellm

    llm = PlannerLLM("hosted_vllm/gemma", timeout_s=2.5)
    body = json.dumps(
        {
            "error": {
                "code": 400,
                "message": "request (1054 tokens) exceeds the available context size (1024 tokens), try increasing it",
            }
        }
    )
    too_long = litellm.ContextWindowExceededError(
        message=f"litellm.BadRequestError: ContextWindowExceededError: Hosted_vllmException - {body}",
        model="gemma",
        llm_provider="hosted_vllm",
    )
    assert llm._describe(too_long) == (
        "ContextWindowExceededError: request (1054 tokens) exceeds the available context size (1024 tokens), try increasing it"
    )
    timeout = litellm.Timeout(
        message="Timeout Error: Hosted_vllmException - litellm.Timeout: Connection timed out after 2.5 seconds.",
        model="gemma",
        llm_provider="hosted_vllm",
    )
    assert llm._describe(timeout) == "Timeout: no answer within 2.5 s (Connection timed out after 2.5 seconds.)"
    assert llm._describe(ConnectionError("[Errno 111] Connection refused")) == "ConnectionError: [Errno 111] Connection refused"
    assert llm._describe(RuntimeError("x" * 1000)).startswith("RuntimeError: xxx")
    assert len(llm._describe(RuntimeError("x" * 1000))) == 300
