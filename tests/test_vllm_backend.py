"""The in-process vLLM backend's contract, with an engine double that records what it is asked.

vLLM itself needs a GPU and is an optional extra; these tests check what Allot owns: request -> sampling
parameters, chat template use, token and cost accounting, errors, and that vllm is imported only when an
engine is actually built (here it is not installed, so building one names the extra to install).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from executors.backends import BackendError, CompletionRequest
from executors.vllm_backend import VLLMEngineBackend, sampling_params
from graphs.cost import ModelSpec, call_flops
from graphs.errors import UnknownModel

SPEC = ModelSpec(name="qwen", params_b=1.5, input_usd_per_mtok=0.1, output_usd_per_mtok=0.2)


@dataclass
class _Out:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"


@dataclass
class _Final:
    outputs: list[_Out]
    prompt_token_ids: list[int]
    finished: bool = True


class _Tokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


@dataclass
class _Engine:
    outputs: int | None = None
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def get_tokenizer(self) -> _Tokenizer:
        return _Tokenizer()

    async def generate(self, prompt: str, params: dict[str, Any], request_id: str):  # type: ignore[no-untyped-def]
        self.calls.append((prompt, params))
        n = params["n"] if self.outputs is None else self.outputs
        yield _Final([], [1] * 7, finished=False)  # a streamed partial first, as vLLM does
        yield _Final([_Out(f"answer {i}", [5] * (3 + i)) for i in range(n)], [1] * 7)


def test_sampling_params_follow_the_request() -> None:
    request = CompletionRequest(
        "qwen", ({"role": "user", "content": "q"},), n=3, temperature=0.2, max_tokens=64, seed=10, stop=("##",), offset=4
    )
    assert sampling_params(request) == {"n": 3, "temperature": 0.2, "max_tokens": 64, "stop": ["##"], "seed": 14}
    assert "seed" not in sampling_params(CompletionRequest("qwen", request.messages))


def test_completion_uses_the_chat_template_and_counts_engine_tokens() -> None:
    engine = _Engine()
    backend = VLLMEngineBackend({"qwen": SPEC}, {"qwen": engine}, params_factory=dict)
    messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"})
    result = asyncio.run(backend.complete(CompletionRequest("qwen", messages, n=2, max_tokens=16, seed=1)))
    prompt, params = engine.calls[0]
    assert prompt == "<system>be brief<user>2+2?<assistant>" and params["n"] == 2 and params["max_tokens"] == 16
    assert [g.text for g in result.generations] == ["answer 0", "answer 1"]
    assert [g.output_tokens for g in result.generations] == [3, 4] and result.generations[0].prompt_tokens == 7
    assert result.cost.prompt_tokens == 7 and result.cost.output_tokens == 7
    expected = call_flops(SPEC, 7, 3) + call_flops(SPEC, 7, 4) - call_flops(SPEC, 7, 0)
    assert result.cost.flops == pytest.approx(expected)
    assert result.cost.usd == pytest.approx((7 * 0.1 + 7 * 0.2) / 1e6)
    assert backend.estimate(CompletionRequest("qwen", messages, n=2, max_tokens=16)).output_tokens == 32


def test_errors_name_the_problem() -> None:
    backend = VLLMEngineBackend({"qwen": SPEC}, {"qwen": _Engine(outputs=1)}, params_factory=dict)
    request = CompletionRequest("qwen", ({"role": "user", "content": "q"},), n=2)
    with pytest.raises(BackendError, match="returned 1 outputs for n=2"):
        asyncio.run(backend.complete(request))
    with pytest.raises(UnknownModel, match="unknown model 'other'"):
        asyncio.run(backend.complete(CompletionRequest("other", request.messages)))


def test_vllm_is_imported_only_when_an_engine_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    probe = "import sys, executors.vllm_backend; print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without the extra: importing it fails
    backend = VLLMEngineBackend({"qwen": SPEC})  # no engine given: built on first use
    with pytest.raises(BackendError, match=r'pip install "allot-planner\[vllm\]"'):
        asyncio.run(backend.complete(CompletionRequest("qwen", ({"role": "user", "content": "q"},))))
