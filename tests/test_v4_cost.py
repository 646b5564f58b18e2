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


@pytest.mark.parametrize("T", [5, 16, 37])
def test_lab_accounting_takes_v4_configs_analytic_equals_measured(T):
    """dsv3lab.kv_cache_bytes_per_token and probes.memory take V4 configs: the analytic bytes per
    token at T equal the measured cache of a lab-size model fed T tokens (batch 2, fp32 and bf16)."""
    from dsv3lab.probes.memory import bytes_per_token, measured_bytes_per_token
    cfg = dsv3lab.build("v4-tiny", device="meta").cfg
    for dtype in (torch.float32, torch.bfloat16):
        model = dsv3lab.build(cfg, dtype=dtype)
        measured = measured_bytes_per_token(model, dtype=dtype, batch=2, max_len=T)
        assert dsv3lab.kv_cache_bytes_per_token(cfg, dtype, context=T) == measured
        assert bytes_per_token("v4-tiny", dtype, context=T) == measured
    # without a context: the limit as context grows (window and state amortised)
    assert dsv3lab.kv_cache_bytes_per_token("v4-pro") == v4_cost.per_token("v4-pro") == 9536
    with pytest.raises(ValueError, match="layout 'naive'.*own cache"):
        dsv3lab.kv_cache_bytes_per_token("v4-tiny", mode="naive")
    # with the MTP block: what a main layer of its attention type caches, counted and measured
    for t in ("sliding_attention", "heavily_compressed_attention"):
        c = cfg.replace(num_nextn_predict_layers=1, mtp_layer_types=(t,))
        model = dsv3lab.build(c, dtype=torch.bfloat16)
        with_mtp = measured_bytes_per_token(model, dtype=torch.bfloat16, batch=2, max_len=T)
        assert dsv3lab.kv_cache_bytes_per_token(c, context=T, include_mtp=True) == with_mtp
        assert with_mtp > measured_bytes_per_token(model, dtype=torch.bfloat16, batch=2, max_len=T,
                                                   include_mtp=False) == dsv3lab.kv_cache_bytes_per_token(c, context=T)


def test_info_and_model_stats_take_v4(capsys):
    from dsv3lab.cli import main
    s = dsv3lab.model_stats("v4-tiny", context=37)
    assert s["kv_cache_bytes_per_token"] == v4_cost.kv_bytes("v4-tiny", 37)["total"] / 37
    m = dsv3lab.build("v4-tiny", device="meta")
    assert s["total_params"] == sum(p.numel() for p in m.parameters())
    assert main(["info", "v4-tiny", "--context", "37"]) == 0
    out = capsys.readouterr().out
    assert "DeepSeek-V4" in out and f"{s['kv_cache_bytes_per_token']:,.1f}" in out and f"{s['total_params']:,}" in out


def test_card_rows_are_the_labs_accounting():
    """The V4 card's 27% / 10% as derived rows: the lab column is per_token_flops / against_v32 at
    2^20 tokens, the status follows from the whole-percent tolerance (not typed)."""
    from dsv3lab import replicate as R
    rows = {r["id"]: r for r in R.replicate("v4_card")}
    f, k = rows["v4_pro_flops_vs_v32_1m"], rows["v4_pro_kv_vs_v32_1m"]
    assert (f["paper"], k["paper"], f["kind"], k["kind"]) == (27, 10, "derived", "derived")
    assert f["lab"] == 100 * v4_cost.per_token_flops("v4-pro", 1 << 20)["ratio"]
    assert k["lab"] == 100 * v4_cost.against_v32("v4-pro", 1 << 20)["ratio"]
    for r in (f, k):
        assert r["status"] == R.status(r["lab"], r["paper"], r["tol"]) == ("match" if abs(r["lab"] - r["paper"]) <= 0.5
                                                                         else "close" if abs(r["lab"] - r["paper"]) <= 1
                                                                         else "differs")
    assert rows["v4_pro_params_total"]["status"] == "match"
