"""DeepSeek-V4's KV accounting equals the engine's cache, and the presets' figures at 1M tokens."""

import pytest
import torch

import dsv3lab
from dsv3lab.probes import v4_cost


@pytest.mark.parametrize("T", [3, 8, 13, 32, 37])
def test_kv_bytes_equal_the_cache_after_T_tokens(T):
    model = dsv3lab.build("v4-tiny")
    cache = model.new_cache(2, T)
    x = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        model(x[:, :T // 2 + 1], start=0, cache=cache)
        for t in range(T // 2 + 1, T):
            model(x[:, t:t + 1], start=t, cache=cache)
    assert cache.nbytes() == 2 * v4_cost.kv_bytes("v4-tiny", T, dtype_bytes=4)["total"]


def test_per_token_at_one_million_against_v32():
    # V4-Flash: 21 CSA layers x (512 + 128) / 4 + 20 HCA layers x 512 / 128 values, bf16
    assert v4_cost.per_token("v4-flash") == (21 * 160 + 20 * 4) * 2 == 6880
    # V4-Pro: 29 CSA + 32 HCA layers
    assert v4_cost.per_token("v4-pro") == (29 * 160 + 32 * 4) * 2 == 9536
    r = v4_cost.against_v32("v4-pro")
    assert r["v32"] == 78324 and 0.12 < r["ratio"] < 0.125      # card: 10% (its storage is FP8)
    assert v4_cost.kv_bytes("v4-flash", 1 << 20)["total"] / (1 << 20) == pytest.approx(6880, rel=1e-3)


@pytest.mark.parametrize("t", [0, 3, 9, 17, 40])
def test_attention_flops_equal_a_counted_decode_step(t):
    model = dsv3lab.build("v4-tiny")
    x = torch.randint(0, 512, (1, t + 1), generator=torch.Generator().manual_seed(t))
    cache = model.new_cache(1, t + 1)
    with torch.no_grad():
        if t:
            model(x[:, :t], start=0, cache=cache)
    got = v4_cost.measured_attention_flops(model, x[:, t:], start=t, cache=cache)
    assert got == v4_cost.attention_flops("v4-tiny", t)["total"]


def test_per_token_flops_at_one_million_against_v32():
    """V4-Pro at 1M tokens: 25.7% of V3.2's forward FLOPs per token (card: 27%)."""
    r = v4_cost.per_token_flops("v4-pro", 1 << 20)
    assert 0.25 < r["ratio"] < 0.27
    assert v4_cost.per_token_flops("v4-flash", 1 << 20)["ratio"] < r["ratio"]
