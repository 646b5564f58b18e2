"""The torch FP8 references in dsv3lab.fp8 (the kernels are checked against these)."""

import torch

from dsv3lab.fp8 import act_dequant, act_quant, fp8_gemm_ref, weight_dequant, weight_quant


def test_zero_blocks_quantize_to_zero_not_nan():
    w = torch.zeros(200, 300)
    w[150:, 200:] = torch.randn(50, 100)
    q, s = weight_quant(w)
    assert s.shape == (2, 3) and s[0, 0] == 0
    assert not torch.isnan(q.float()).any() and (q[:128, :128].float() == 0).all()
    x = torch.zeros(3, 256)
    y, sc = act_quant(x)
    assert (y.float() == 0).all() and torch.allclose(sc, torch.full((3, 2), 1e-4 / 448))


def test_scale_is_amax_over_448_and_blocks_pad():
    w = torch.randn(576, 300)
    q, s = weight_quant(w)
    assert s.shape == (5, 3)
    assert torch.isclose(s[4, 2], w[512:, 256:].abs().max() / 448)
    assert q.float().abs().max() == 448
    back = weight_dequant(q, s)
    assert ((back - w).abs() <= w.abs() / 16 + s.max() * 2 ** -9).all()


def test_ue8m0_rounds_scale_up_to_power_of_two():
    x = torch.zeros(4, 128)
    x[0, 0] = 448 * 2 ** -10                       # exactly a power of two: kept
    x[1, 0] = 448 * 2 ** -10 * (1 + 2 ** -20)      # just above: the next power
    x[2, 0] = 3.0
    _, s = act_quant(x, scale_fmt="ue8m0")
    assert s[0, 0] == 2 ** -10 and s[1, 0] == 2 ** -9 and s[2, 0] == 2 ** -7
    y, s = act_quant(x * 1000, scale_fmt="ue8m0")
    assert y.float().abs().max() <= 448


def test_gemm_reference_equals_dequantized_matmul():
    a = torch.randn(8, 256)
    b = torch.randn(130, 256)
    qa, sa = act_quant(a)
    qb, sb = weight_quant(b)
    ref = act_dequant(qa, sa) @ weight_dequant(qb, sb).T
    torch.testing.assert_close(fp8_gemm_ref(qa, sa, qb, sb), ref, rtol=1e-5, atol=1e-4)
