"""The cost model: FLOPs formulas, the papers' normalisations, budgets and costs."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from executors.replay_data import bundled_data_dir
from graphs.cost import (
    AGENTTTS_UNIT_FLOPS,
    CALL1B_UNIT_FLOPS,
    Budget,
    BudgetUnit,
    Cost,
    ModelSpec,
    call_flops,
    decode_flops,
    prefill_flops,
    sample_usd,
)
from graphs.errors import BudgetError

REF_3B = ModelSpec(name="llama-3.2-3b", params_b=3.21, layers=28, hidden=3072)
REF_1B = ModelSpec(name="llama-3.2-1b", params_b=1.24, layers=16, hidden=2048)
DENSE_8B = ModelSpec(name="dense-8b", params_b=8.0, layers=36, hidden=4096)


# -- FLOPs formulas -------------------------------------------------------------------------------------


def test_prefill_and_decode_follow_the_documented_sums() -> None:
    spec = ModelSpec(name="toy", params_b=1e-9, layers=1, hidden=1)  # 1 parameter, width 1
    # prefill: sum over positions t=1..p of 2P + 2 * width * t  = 2Pp + width * p(p+1)
    p, o = 5, 3
    assert prefill_flops(spec, p) == pytest.approx(sum(2 * 1 + 2 * 1 * t for t in range(1, p + 1)))
    # decode: token j (1..o) sits at position p + j
    assert decode_flops(spec, p, o) == pytest.approx(sum(2 * 1 + 2 * 1 * (p + j) for j in range(1, o + 1)))


def test_prompt_prefill_is_shared_across_samples() -> None:
    for spec in (REF_3B, DENSE_8B):
        prefill = prefill_flops(spec, 300)
        decode = decode_flops(spec, 300, 200)
        assert call_flops(spec, 300, 200) == pytest.approx(prefill + decode)
        assert call_flops(spec, 300, 200, n=4) == pytest.approx(prefill + 4 * decode)
        assert call_flops(spec, 300, 200, n=4) < 4 * call_flops(spec, 300, 200)


def test_flops_are_monotone_in_tokens() -> None:
    spec = DENSE_8B
    prompts = [0, 1, 16, 128, 1024, 8192]
    outputs = [0, 1, 64, 512, 4096, 32768]
    for a, b in itertools.pairwise(prompts):
        assert prefill_flops(spec, a) < prefill_flops(spec, b)
        assert call_flops(spec, a, 64) < call_flops(spec, b, 64)
        assert decode_flops(spec, a, 64) < decode_flops(spec, b, 64)
    for a, b in itertools.pairwise(outputs):
        assert decode_flops(spec, 128, a) < decode_flops(spec, 128, b)
        assert call_flops(spec, 128, a, n=3) < call_flops(spec, 128, b, n=3)
    assert call_flops(spec, 128, 64, n=2) < call_flops(spec, 128, 64, n=3)
    assert decode_flops(spec, 128, 0) == 0


def test_flops_are_monotone_in_params() -> None:
    sizes = [0.5, 1, 3, 8, 14, 70, 405]
    estimated = [ModelSpec(name=f"m{s}", params_b=s) for s in sizes]  # width estimated from the size
    for small, big in itertools.pairwise(estimated):
        assert small.attention_width < big.attention_width
        assert call_flops(small, 128, 64) < call_flops(big, 128, 64)
        assert decode_flops(small, 128, 64) < decode_flops(big, 128, 64)
    fixed_shape = [ModelSpec(name=f"f{s}", params_b=s, layers=32, hidden=4096) for s in sizes]
    for small, big in itertools.pairwise(fixed_shape):
        assert call_flops(small, 128, 64) < call_flops(big, 128, 64)


def test_dominant_term_is_two_flops_per_parameter_per_token() -> None:
    # Short contexts: attention is a small correction to 2 * params per token.
    flops = call_flops(DENSE_8B, 128, 64)
    assert 2 * 8e9 * 192 <= flops <= 1.1 * 2 * 8e9 * 192


def test_moe_costs_follow_active_params() -> None:
    moe = ModelSpec(name="moe-30b-a3b", params_b=30, active_params_b=3, layers=48, hidden=2048)
    dense_active = ModelSpec(name="dense-3b", params_b=3, layers=48, hidden=2048)
    dense_total = ModelSpec(name="dense-30b", params_b=30, layers=48, hidden=2048)
    assert moe.active_params == pytest.approx(3e9)
    assert call_flops(moe, 500, 300, n=4) == pytest.approx(call_flops(dense_active, 500, 300, n=4))
    assert call_flops(moe, 500, 300) < call_flops(dense_total, 500, 300)
    # without a layer count, the attention estimate also follows the active size
    unshaped = ModelSpec(name="moe", params_b=30, active_params_b=3)
    assert unshaped.attention_width == pytest.approx(ModelSpec(name="d", params_b=3).attention_width)


def test_active_params_cannot_exceed_total() -> None:
    with pytest.raises(ValueError, match="active_params_b"):
        ModelSpec(name="bad", params_b=3, active_params_b=8)


def test_flops_work_elementwise_on_arrays() -> None:
    prompts = np.array([100.0, 200.0, 300.0])
    outputs = np.array([10.0, 2000.0, 0.0])
    vector = decode_flops(DENSE_8B, prompts, outputs)
    assert vector.shape == (3,)
    for i in range(3):
        assert vector[i] == pytest.approx(decode_flops(DENSE_8B, float(prompts[i]), float(outputs[i])))
    np.testing.assert_allclose(call_flops(DENSE_8B, prompts, outputs, n=2), prefill_flops(DENSE_8B, prompts) + 2 * vector)


# -- normalisations -------------------------------------------------------------------------------------


def test_agenttts_unit_is_one_3b_call_of_128_plus_64_tokens() -> None:
    assert Cost(flops=call_flops(REF_3B, 128, 64)).in_unit("agenttts") == pytest.approx(1.0)
    assert Cost(flops=call_flops(REF_3B, 128, 64, n=1)).in_unit(BudgetUnit.AGENTTTS) == pytest.approx(1.0)
    assert pytest.approx(2 * 3.21e9 * 192, rel=0.05) == AGENTTTS_UNIT_FLOPS
    # four samples of that call share one prefill: 128 + 4 * 64 tokens' worth, about 2 units, not 4
    four = Cost(flops=call_flops(REF_3B, 128, 64, n=4)).in_unit("agenttts")
    assert four == pytest.approx((128 + 4 * 64) / 192, rel=0.05)


def test_call1b_unit_is_one_1b_call_of_128_plus_64_tokens() -> None:
    assert Cost(flops=call_flops(REF_1B, 128, 64)).in_unit("call1b") == pytest.approx(1.0)
    assert pytest.approx(2 * 1.24e9 * 192, rel=0.05) == CALL1B_UNIT_FLOPS
    # one reference 3B call is about 2.6 one-billion calls
    ratio = Cost(flops=AGENTTTS_UNIT_FLOPS).in_unit("call1b")
    assert ratio == pytest.approx(AGENTTTS_UNIT_FLOPS / CALL1B_UNIT_FLOPS)
    assert 2.0 < ratio < 3.5


def test_in_unit_other_units() -> None:
    cost = Cost(flops=5e12, prompt_tokens=100, output_tokens=50, usd=0.25)
    assert cost.in_unit("flops") == 5e12
    assert cost.in_unit("tokens") == 150
    assert cost.tokens == 150
    assert cost.in_unit("usd") == 0.25
    with pytest.raises(ValueError):
        cost.in_unit("bananas")


# -- budgets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "unit"), [(10, "bananas"), (0, "agenttts"), (-1, "flops"), (5, ""), (0, "bananas")])
def test_budget_parse_errors(limit, unit) -> None:
    with pytest.raises(BudgetError) as info:
        Budget.parse(limit, unit)
    message = str(info.value)
    assert "\n" not in message
    assert "agenttts" in message  # names the valid units
    assert isinstance(info.value, ValueError)


def test_budget_parse_ok() -> None:
    budget = Budget.parse(2.5e15, "flops")
    assert budget == Budget(limit=2.5e15, unit=BudgetUnit.FLOPS)
    assert Budget.parse(3, "call1b").unit is BudgetUnit.CALL1B
    assert Budget(limit=1).unit is BudgetUnit.AGENTTTS
    assert "flops" in str(budget)


def test_budget_allows_up_to_the_limit() -> None:
    budget = Budget(limit=10, unit="agenttts")
    assert budget.allows(Cost(flops=10 * AGENTTTS_UNIT_FLOPS))
    assert budget.allows(Cost(flops=3 * AGENTTTS_UNIT_FLOPS))
    assert budget.allows(Cost())
    assert not budget.allows(Cost(flops=10.01 * AGENTTTS_UNIT_FLOPS))
    assert budget.spent(Cost(flops=2 * AGENTTTS_UNIT_FLOPS)) == pytest.approx(2.0)
    tokens = Budget(limit=1000, unit="tokens")
    assert tokens.allows(Cost(prompt_tokens=600, output_tokens=400))
    assert not tokens.allows(Cost(prompt_tokens=600, output_tokens=401))


def test_budget_is_frozen() -> None:
    budget = Budget(limit=1)
    with pytest.raises(ValueError):
        budget.limit = 2  # type: ignore[misc]


# -- costs ----------------------------------------------------------------------------------------------


def test_cost_addition_and_scaling() -> None:
    a = Cost(flops=1.0, prompt_tokens=2.0, output_tokens=3.0, usd=0.5)
    b = Cost(flops=10.0, prompt_tokens=20.0, output_tokens=30.0, usd=1.5)
    total = a + b
    assert total == Cost(11.0, 22.0, 33.0, 2.0)
    assert a + Cost() == a
    assert a.scaled(2) == Cost(2.0, 4.0, 6.0, 1.0)
    assert total.as_dict() == {"flops": 11.0, "prompt_tokens": 22.0, "output_tokens": 33.0, "usd": 2.0}
    assert sum([a, b, a], Cost()) == Cost(12.0, 24.0, 36.0, 2.5)


def test_unknown_usd_propagates() -> None:
    known = Cost(flops=1, usd=0.5)
    unknown = Cost(flops=1, usd=None)
    assert (known + unknown).usd is None
    assert (unknown + known).usd is None
    assert (unknown + known).flops == 2
    assert unknown.scaled(3).usd is None


def test_dollar_budget_without_prices_is_a_budget_error() -> None:
    budget = Budget(limit=1, unit="usd")
    unpriced = Cost(flops=1e12, usd=None)
    with pytest.raises(BudgetError, match="price"):
        budget.allows(unpriced)
    with pytest.raises(BudgetError):
        unpriced.in_unit("usd")
    assert budget.allows(Cost(usd=0.99))
    assert not budget.allows(Cost(usd=1.01))


def test_sample_usd_bills_the_prompt_once() -> None:
    priced = ModelSpec(name="api", params_b=100, input_usd_per_mtok=2.0, output_usd_per_mtok=8.0)
    assert sample_usd(priced, 1e6, 1e6) == pytest.approx(10.0)
    assert sample_usd(priced, 1e6, 1e6, n=3) == pytest.approx(2.0 + 3 * 8.0)
    assert sample_usd(REF_3B, 100, 100) is None
    half = ModelSpec(name="half", params_b=1, input_usd_per_mtok=1.0)
    assert sample_usd(half, 100, 100) is None


# -- attention width estimate ---------------------------------------------------------------------------


def test_attention_width_estimate_is_within_2x_for_qwen3() -> None:
    known = json.loads((bundled_data_dir() / "models.json").read_text())
    assert len(known) >= 4
    for name, fields in known.items():
        real = ModelSpec(name=name, **fields)
        guess = ModelSpec(name=name, params_b=fields["params_b"], active_params_b=fields.get("active_params_b"))
        assert real.attention_width == fields["layers"] * fields["hidden"]
        ratio = guess.attention_width / real.attention_width
        assert 0.5 <= ratio <= 2.0, (name, ratio)


def test_attention_width_uses_what_the_catalog_gives() -> None:
    only_layers = ModelSpec(name="l", params_b=8, layers=32)
    hidden = math.sqrt(8e9 / (12 * 32))
    assert only_layers.attention_width == pytest.approx(32 * hidden)
    only_hidden = ModelSpec(name="h", params_b=8, hidden=4096)
    assert only_hidden.attention_width == pytest.approx(4096 * (8e9 / 196_608) ** (1 / 3))
