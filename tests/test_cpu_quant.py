"""The C FP8 quantizer (kernels/cpu/quant_fp8.c) against ``dsv3lab.fp8.weight_quant``, the torch
definition: the same e4m3 codes and scales, bit for bit (one IEEE division and a
round-to-nearest-even conversion per weight: no other kernel path can give other values), on
random weights, on every e4m3 rounding tie, on subnormals, all-zero blocks and NaN, for bf16 and
fp32 weights, plain and UE8M0 scales; and the loader's quantize-at-load uses it."""

import pytest
import torch

from dsv3lab.fp8 import scale_of_amax, weight_quant
from dsv3lab.kernels import cpu_quant

pytestmark = pytest.mark.skipif(cpu_quant.library() is None, reason="no C compiler: the C quantizer is not built")


def c_quant(w, block=128, scale_fmt=None):
    s = scale_of_amax(cpu_quant.block_amax(w, block), scale_fmt)
    return cpu_quant.quant_fp8(w, s, block), s


def same(a, b):
    qa, sa = a
    qb, sb = b
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8))
    assert torch.equal(sa.view(torch.int32), sb.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(128, 128), (300, 260), (1, 5), (257, 129)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_random_weights_match_torch(dtype, shape, scale_fmt):
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(4) * 0.05).to(dtype)
    same(c_quant(w, scale_fmt=scale_fmt), weight_quant(w, 128, scale_fmt=scale_fmt))


def test_every_tie_subnormal_zero_block_and_nan():
    """w / s lands exactly halfway between two e4m3 values (every pair, subnormal and normal,
    both signs), on e4m3's subnormal grid, and past 448; one block is all zeros (scale 0, divided
    by 1), one holds a NaN (its scale NaN, its other weights divided by 1, as torch.where has it)."""
    codes = torch.arange(0, 0x7f, dtype=torch.uint8)                # every finite positive e4m3
    vals = codes.view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2                                # exact in fp32
    row = torch.cat([vals, mids, -mids, vals / 3, torch.tensor([448.0, 460.0, 464.0, 1e-9, 0.0])])
    w = torch.zeros(256, 640)
    w[0, :row.numel()] = row                                         # block row 0: scales 464/448 and others
    ties = torch.cat([vals, mids, -mids])                            # block row 1: scale exactly 1, so w / s
    w[131, 128:128 + ties.numel()] = ties                            # is the tie itself
    w[130, 128:512:128] = 448.0
    w[200, 520] = float("nan")                                       # block (1, 4)
    w[201, 521] = 3.0
    # block (1, 0) is all zeros
    for dtype in (torch.float32, torch.bfloat16):
        x = w.to(dtype)
        for fmt in (None, "ue8m0"):
            same(c_quant(x, scale_fmt=fmt), weight_quant(x, 128, scale_fmt=fmt))
    q, s = c_quant(w)
    assert s[1, 0] == 0 and torch.isnan(s[1, 4]) and (s[1, 1:4] == 1.0).all()
    assert q.view(torch.uint8)[200, 520] & 0x7f == 0x7f and q[201, 521].float() == 3.0
    # ties to even, by hand: halfway between codes 0 and 1 goes to 0, between 1 and 2 to 2, 2 and 3 to 2
    assert q.view(torch.uint8)[131, 128 + 127:128 + 130].tolist() == [0, 2, 2]


def test_strided_rows_and_bad_input():
    w = torch.randn(256, 300)[:, :256]                               # rows 300 apart
    same(c_quant(w), weight_quant(w.contiguous(), 128))
    with pytest.raises(ValueError, match=r"quant_fp8: scale_inv \(1, 1\)"):
        cpu_quant.quant_fp8(w, torch.ones(1, 1))
    with pytest.raises(ValueError, match="block_amax: w .* torch.float16"):
        cpu_quant.block_amax(w.half())
    with pytest.raises(ValueError, match="unit stride"):
        cpu_quant.block_amax(w.t())


def test_quantize_at_load_is_the_torch_quantization(tmp_path, monkeypatch):
    """dsv3lab.load(fp8="quantize") of a bf16 checkpoint: the same e4m3 weights and scales with the
    C quantizer as with the torch one (kernel backend "torch")."""
    import dsv3lab
    from dsv3lab.config import ModelConfig
    from dsv3lab.kernels import backend
    cfg = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
    path = dsv3lab.save(dsv3lab.build(cfg, seed=0), tmp_path / "bf16")
    c = dsv3lab.load(path, fp8="quantize")
    with backend.use_backend("torch"):
        t = dsv3lab.load(path, fp8="quantize")
    tq = dict(t.named_parameters())
    n = 0
    for name, p in c.named_parameters():
        if p.dtype == torch.float8_e4m3fn:
            assert torch.equal(p.view(torch.uint8), tq[name].view(torch.uint8)), name
            n += 1
    assert n > 0
    for name, b in c.named_buffers():
        if name.endswith("weight_scale_inv"):
            assert torch.equal(b, dict(t.named_buffers())[name]), name
