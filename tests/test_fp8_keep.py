"""Weights as stored: ``load(fp8="keep")`` maps the shards instead of copying them, FP8 Linear
weights stay e4m3 and compute through ``dsv3lab.fp8.fp8_linear`` (dequantized a band of blocks at
a time), and ``fp8="quantize"`` turns a bf16/fp32 release into the same format at load.

Bounds stated here:
- keep against dequant: the same dequantized weight values, multiplied in another order ->
  fp32 logits within 1e-4 of the logits' scale, bf16 within 2^-6 (a few bf16 roundings);
  greedy generation gives the same tokens.
- quantize: each weight within e4m3's rounding of the stored one, |w - dq(q(w))| <= 2^-4 |w| +
  2^-10 scale (half a unit in the last place of 3 mantissa bits, or half the smallest subnormal),
  and exactly ``dsv3lab.fp8.weight_quant`` of it.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

import dsv3lab
from lab_models import tiny_with_biases
from dsv3lab import fp8 as F8
from dsv3lab.checkpoint import load_summary
from dsv3lab.model.layers import Linear


tiny = tiny_with_biases


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("keep")
    m = tiny()
    return dict(model=m, fp8=dsv3lab.save(m, d / "fp8", fp8=True), fp32=dsv3lab.save(m, d / "fp32"))


def fp8_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear) and m.weight.dtype == F8.E4M3]


def test_keep_maps_the_shards_and_copies_nothing(ckpts):
    model = dsv3lab.load(ckpts["fp8"], fp8="keep")
    stats = model._dsv3_load
    assert stats["own"] == 0 and stats["mapped"] > 0, stats
    unique = {(p.data_ptr(), p.numel()): p for p in model.state_dict().values()}
    assert stats["mapped"] == sum(p.numel() * p.element_size() for p in unique.values()), stats
    lins = fp8_linears(model)
    assert lins and all(lin.weight_scale_inv.dtype == torch.float32 for _, lin in lins)
    # a view of the mapped file: its storage is the whole shard, not the weight
    for _, lin in lins:
        assert lin.weight.untyped_storage().nbytes() > lin.weight.numel()
    for key in ("seconds", "rss", "peak_rss"):
        assert stats[key] > 0, stats
    assert "mapped from the shards" in load_summary(stats)


def test_writing_a_kept_weight_leaves_the_file(ckpts, tmp_path):
    import shutil
    d = shutil.copytree(ckpts["fp8"], tmp_path / "c")
    before = {f: (d / f).read_bytes() for f in os.listdir(d) if f.endswith(".safetensors")}
    model = dsv3lab.load(d, fp8="keep")
    _, lin = fp8_linears(model)[0]
    with torch.no_grad():
        lin.weight.view(torch.uint8).fill_(0)
    assert (lin.weight.view(torch.uint8) == 0).all()
    assert before == {f: (d / f).read_bytes() for f in before}
    del model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_computes_as_the_dequantized_model(ckpts, dtype):
    deq = dsv3lab.load(ckpts["fp8"], dtype=dtype, fp8="dequant")
    kept = dsv3lab.load(ckpts["fp8"], dtype=dtype, fp8="keep")
    assert fp8_linears(kept) and not fp8_linears(deq)
    x = torch.randint(0, deq.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = deq(x).float(), kept(x).float()
    tol = (1e-4 if dtype == torch.float32 else 2 ** -6) * a.abs().max().item()
    assert (a - b).abs().max().item() <= tol
    if dtype == torch.float32:              # decode through the cache: the same greedy tokens
        prompts = [[1, 2, 3, 4], [5, 6]]
        assert deq.generate(prompts, max_new_tokens=8) == kept.generate(prompts, max_new_tokens=8)


def test_fp8_linear_bands_match_weight_dequant(monkeypatch):
    monkeypatch.setattr(F8, "DEQUANT_BAND", 128 * 200)           # several bands, a ragged last one
    g = torch.Generator().manual_seed(1)
    for N, K in ((700, 200), (512, 256), (130, 129)):
        q, s = F8.weight_quant(torch.randn(N, K, generator=g) * 0.05)
        for M in (1, 5):
            x = torch.randn(3, M, K, generator=g)
            ref = torch.nn.functional.linear(x, F8.weight_dequant(q, s, 128, x.dtype))
            torch.testing.assert_close(F8.fp8_linear(x, q, s), ref, rtol=1e-5, atol=1e-5)


def test_dequant_at_load_in_bands_is_weight_dequant():
    """The loader dequantizes a band of block rows at a time (few MB of fp32 transients whatever
    the weight): the same values as one ``weight_dequant`` of the whole window, for windows that
    start inside a scale block (a rank's rows or columns), several bands and a ragged last one."""
    from dsv3lab.checkpoint.loading import _dequant_in_bands
    g = torch.Generator().manual_seed(2)
    for (M, N), (r0, c0) in (((3000, 700), (0, 0)), ((2900, 300), (40, 100)), ((130, 129), (5, 0))):
        q, s = F8.weight_quant(torch.randn(M + r0, N + c0, generator=g) * 0.05)
        win = q[r0:, c0:]
        for dtype in (torch.bfloat16, torch.float32):
            out = _dequant_in_bands(win, s, 128, dtype, offset=(r0, c0))
            assert out.is_contiguous() and out.dtype == dtype
            assert torch.equal(out, F8.weight_dequant(q, s, 128, dtype)[r0:, c0:])


def test_sharded_quantize_needs_block_aligned_splits_of_fp8_stored_weights(ckpts):
    """``load_sharded(fp8="quantize")`` keeps weights stored FP8 as they are, as "keep" does, so
    it needs the same 128-block splits (tiny's 48-row q_b shards are not): a LayoutError naming
    the mode, before anything is read; a bf16-stored checkpoint quantizes each rank's window."""
    from dsv3lab.parallel import load_sharded
    from dsv3lab.parallel.layout import Layout, LayoutError
    with pytest.raises(LayoutError, match="fp8='quantize'"):
        load_sharded(ckpts["fp8"], Layout(tp=2, ep=2), rank=0, fp8="quantize")
    m = load_sharded(ckpts["fp32"], Layout(tp=2, ep=2), rank=0, fp8="quantize")
    assert any(p.dtype == F8.E4M3 for p in m.parameters())


def test_quantize_at_load_is_the_fp8_recipe(ckpts):
    stored = {}
    for f in os.listdir(ckpts["fp32"]):
        if f.endswith(".safetensors"):
            stored.update(load_file(os.path.join(ckpts["fp32"], f)))
    model = dsv3lab.load(ckpts["fp32"], fp8="quantize")
    lins = fp8_linears(model)
    assert lins and model._dsv3_load["own"] > 0
    from dsv3lab.checkpoint import hf_key, is_fp8_key
    for name, lin in lins:
        key = hf_key(model.cfg, name + ".weight")
        assert is_fp8_key(key)
        w = stored[key]
        q, s = F8.weight_quant(w, 128)
        assert torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(lin.weight_scale_inv, s)
        err = (F8.weight_dequant(q, s, 128) - w).abs()
        scale = s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
        assert (err <= 2 ** -4 * w.abs() + 2 ** -10 * scale + 1e-12).all(), name
    # everything else as stored, mapped
    assert not any(p.dtype == torch.float32 and "experts" in n and n.endswith("proj.weight")
                   for n, p in model.named_parameters())
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = ckpts["model"](x), model(x)
    assert (a - b).abs().max().item() <= 0.1 * a.abs().max().item()   # e4m3 weights: a loose sanity bound



def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssAnon is Linux's")
def test_trim_heap_returns_free_chunks_between_kept_ones():
    """The pattern a quantizing load leaves: chunks freed between chunks kept. glibc keeps their
    pages resident until malloc_trim; trim_heap gives them back (without it a full-size
    V2-Lite quantized at load held ~23 GB of anonymous memory for 15.3 GB of weights)."""
    from dsv3lab.checkpoint.loading import _malloc_trim, trim_heap
    if _malloc_trim() is None:
        pytest.skip("no glibc malloc_trim here: trim_heap does nothing")
    chunks = [torch.ones(100_000, dtype=torch.uint8) for _ in range(3000)]       # 300 MB, touched
    del chunks[::2]                                                               # 150 MB of holes
    before = _rss_anon()
    trim_heap()
    assert before - _rss_anon() > 100e6


def test_quantizing_load_trims_the_heap_as_it_goes(ckpts, monkeypatch):
    """The loader trims every TRIM_EVERY bytes it reads, and once at the end."""
    from dsv3lab.checkpoint import loading
    calls = []
    monkeypatch.setattr(loading, "trim_heap", lambda: calls.append(1))
    monkeypatch.setattr(loading, "TRIM_EVERY", 1 << 40)
    dsv3lab.load(ckpts["fp32"], fp8="quantize")
    assert len(calls) == 1                                   # the end's only
    calls.clear()
    monkeypatch.setattr(loading, "TRIM_EVERY", 1)
    model = dsv3lab.load(ckpts["fp32"], fp8="quantize")
    assert len(calls) > len(fp8_linears(model))              # after every tensor read, and at the end

_RSS_CHILD = """
import os, sys, json, torch, dsv3lab
from dsv3lab.checkpoint import rss_bytes
path, mode, warm = sys.argv[1], sys.argv[2], sys.argv[3]
def hwm():                            # the process's peak RSS (VmHWM), bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
dsv3lab.load(warm, fp8=mode)          # the first load imports and builds what loading needs
base = rss_bytes()[0]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                      # resets VmHWM to the current RSS
m = dsv3lab.load(path, fp8=mode)
print(json.dumps(dict(base=base, peak=hwm(), mapped=m._dsv3_load["mapped"], own=m._dsv3_load["own"])))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_peak_rss_of_a_kept_load_is_the_file_once(tmp_path):
    """A ~60 MB FP8 checkpoint: loading it kept raises the process's peak RSS by about the file
    (its pages, touched once by the finiteness check), where dequantizing to bf16 takes ~2x."""
    import json
    import subprocess
    import sys
    from dsv3lab.bench.released import write_random
    from dsv3lab.config import ModelConfig
    cfg = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0, hidden_size=512, moe_intermediate_size=512,
                                             intermediate_size=1024, n_routed_experts=32, vocab_size=4096)
    path = write_random(cfg, str(tmp_path / "fp8"), fp8=True)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    assert size > 50e6
    warm = dsv3lab.save(dsv3lab.build("tiny"), tmp_path / "warm", fp8=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = {}
    for mode in ("keep", "dequant"):
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, path, mode, str(warm)], capture_output=True,
                             text=True, env=env, check=True).stdout
        r[mode] = json.loads(out.strip().splitlines()[-1])
    assert r["keep"]["own"] == 0 and r["keep"]["mapped"] > 0.9 * size
    assert r["keep"]["peak"] - r["keep"]["base"] < 1.1 * size + 10e6, (r, size)
    assert r["dequant"]["peak"] - r["dequant"]["base"] > 1.5 * size, (r, size)
