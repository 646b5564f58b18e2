"""``dsv3lab bench released``: the random checkpoints are in the official layout (the keys ``save``
writes, FP8 where the release is FP8), load kept and quantized, and the bench runs end to end on
a tiny preset standing in for the released shapes (the full shapes are a benchmark, not a test)."""

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dsv3lab
from dsv3lab.bench import released
from dsv3lab.config import ModelConfig


def keys_of(d):
    return set(json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"])


def test_random_checkpoints_have_the_official_layout(tmp_path):
    cfg = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
    fp8 = released.write_random(cfg, str(tmp_path / "fp8"), fp8=True, shard_bytes=100_000)
    bf16 = released.write_random(cfg, str(tmp_path / "bf16"), fp8=False)
    ref = dsv3lab.save(dsv3lab.build(cfg), tmp_path / "ref", fp8=True)
    assert keys_of(fp8) == keys_of(ref)
    assert keys_of(bf16) == {k for k in keys_of(ref) if not k.endswith("_scale_inv")}
    assert len([f for f in os.listdir(fp8) if f.endswith(".safetensors")]) > 1
    kept = dsv3lab.load(fp8, fp8="keep")
    assert kept._dsv3_load["own"] == 0
    quant = dsv3lab.load(bf16, fp8="quantize")
    for m in (kept, quant):
        assert any(p.dtype == torch.float8_e4m3fn for p in m.parameters())
        logits = m(torch.tensor([[1, 2, 3]]))
        assert torch.isfinite(logits).all()


def test_released_shapes():
    from dsv3lab.stats import model_stats
    for name, preset in (("moonlight", "moonlight-16b"), ("v2-lite", "v2-lite-16b")):
        cfg = released.config_of(name, 2)
        assert cfg.num_hidden_layers == 2 and cfg.num_nextn_predict_layers == 0
        full = released.config_of(name, None)
        assert model_stats(full)["total_params"] == model_stats(ModelConfig.preset(preset).replace(
            num_nextn_predict_layers=0))["total_params"]


def test_bench_runs_on_a_stand_in(tmp_path, monkeypatch):
    monkeypatch.setitem(released.MODELS, "tiny", ("tiny", True))
    args = SimpleNamespace(models="tiny", layers=None, dir=str(tmp_path), prefill=8, context=8, decode_steps=2,
                           page_fraction=0.5, threads=1, no_paged=False, out=str(tmp_path / "out.json"))
    assert released.run(args) == 0
    saved = json.load(open(tmp_path / "out.json"))
    rows = saved["rows"]
    # where the figures came from: the command, when, and the commit (this checkout's HEAD)
    made_by = saved["made_by"]
    head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or None
    assert made_by["commit"] == head and made_by["dirty"] in (True, False, None)
    assert made_by["command"] and made_by["utc"].endswith("+00:00")
    main = rows[0]
    assert main["own_GB"] == 0 and main["decode_tok_s"] > 0 and main["limit_tok_s"] > 0
    paged = [r for r in rows if r.get("mode") == "paged"]
    assert [r["prefetch"] for r in paged] == [False, True]
    assert all(0 <= r["hit_rate"] <= 1 and r["decode_tok_s"] > 0 for r in paged)


def test_bench_generates_the_same_tokens_paged(tmp_path, monkeypatch):
    """--tokens: greedy tokens of the model held whole and paged under a cap of a fraction of
    the model (--cap-of-model), with and without prefetch; paging must not change them."""
    monkeypatch.setitem(released.MODELS, "tiny", ("tiny", True))
    args = SimpleNamespace(models="tiny", layers=None, dir=str(tmp_path), prefill=8, context="8,80", decode_steps=4,
                           page_fraction=0.25, cap_of_model=0.9, threads=1, no_paged=False, tokens=True,
                           context_fill="tiled", out=str(tmp_path / "out.json"))
    assert released.run(args) == 0
    rows = json.load(open(tmp_path / "out.json"))["rows"]
    assert len(rows[0]["tokens"]) == 4 and "fused" in rows[0]
    assert set(rows[0]["decode_tok_s_by_context"]) == {"8", "80"}
    paged = [r for r in rows if r.get("mode") == "paged"]
    assert len(paged) == 2 and all(r["same_tokens_as_no_prefetch"] for r in paged)
    assert all(r["tokens"] == paged[0]["tokens"] and r["MB_read_from_disk"] > 0 for r in paged)
    args.cap_of_model = 0.01
    import pytest
    with pytest.raises(SystemExit, match="does not hold the dense part"):
        released.run(args)


def test_peer_summary_medians_and_ratio():
    """The summary's medians, ranges and ratio, against values worked by hand."""
    rows = [dict(model="m", layers=2, engine="dsv3lab", round=0, prefill_tok_s=10.0,
                 decode_tok_s_by_context={"1024": 3.0, "4096": 2.0}),
            dict(model="m", layers=2, engine="llama.cpp", round=0, prefill_tok_s=20.0,
                 decode_tok_s_by_context={"1024": 2.0}),
            dict(model="m", layers=2, engine="llama.cpp", round=1, prefill_tok_s=40.0,
                 decode_tok_s_by_context={"1024": 4.0}),
            dict(model="m", layers=2, engine="dsv3lab", round=1, prefill_tok_s=14.0,
                 decode_tok_s_by_context={"1024": 5.0, "4096": 2.0})]
    s = {r["context"]: r for r in released.peer_summary(rows)}
    assert set(s) == {"1024", "prefill"}                       # 4096: llama.cpp has no figure there
    assert s["1024"]["dsv3lab_tok_s"] == 4.0 and s["1024"]["peer_tok_s"] == 3.0
    assert abs(s["1024"]["ratio"] - 4 / 3) < 1e-12 and s["1024"]["rounds"] == 2
    assert s["1024"]["dsv3lab_range"] == "3-5" and s["1024"]["peer_range"] == "2-4"
    assert s["prefill"]["ratio"] == 12.0 / 30.0


def test_bench_beside_llamacpp_on_a_stand_in(tmp_path, monkeypatch):
    """--peer llama.cpp: the same checkpoint converted by llama.cpp's own converter to Q8_0,
    engines alternating over two rounds, every figure positive and the summary beside them."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional benchmark dependency, "
                                            "docs/performance.md)")
    pytest.importorskip("gguf", reason="gguf not installed (optional benchmark dependency)")
    from dsv3lab.bench.gguf_export import find_converter
    try:
        find_converter(None)
    except FileNotFoundError as e:
        pytest.skip(f"llama.cpp's converter not installed (optional benchmark dependency): {e}")
    monkeypatch.setitem(released.MODELS, "tiny", ("tiny", True))
    args = SimpleNamespace(models="tiny", layers=None, dir=str(tmp_path), prefill=8, context="8", decode_steps=2,
                           page_fraction=0.5, threads=1, no_paged=True, peer="llama.cpp", rounds=2,
                           out=str(tmp_path / "out.json"))
    assert released.run(args) == 0
    rows = json.load(open(tmp_path / "out.json"))["rows"]
    assert [(r["engine"], r["round"]) for r in rows] == [("dsv3lab", 0), ("llama.cpp", 0), ("llama.cpp", 1),
                                                         ("dsv3lab", 1)]
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_GB"] > 0
    ggufs = [f for f in os.listdir(tmp_path) if f.endswith(".Q8_0.gguf")]
    assert len(ggufs) == 1 and os.path.getsize(os.path.join(tmp_path, ggufs[0])) > 0     # made once, kept
