"""FP8 training of every eligible Linear, simulated: the report's recipe (sec. 3.3, Figure 6).

What one FP8 Linear y = x W^T does in the report, and what this file does on a CPU:

  Fprop   y  = Q_tile(x) Q_block(W)^T           x in 1x128 tiles along K, W in 128x128 blocks
  Dgrad   dx = Q_tile(dy) Q_block(W)            dy in 1x128 tiles along N (the contracted axis)
  Wgrad   dW = Q_col(dy)^T Q_col(x)             dy and x in 128x1 tiles: along the token axis M,
                                                which Wgrad contracts
  outputs y and dx are rounded to BF16 (the report keeps activations between GEMMs in BF16);
  dW stays FP32 and goes into the FP32 master weights and the FP32 AdamW of the loop.

Q is e4m3 with one scale per tile or block from its online amax (``dsv3lab.fp8`` through
``dsv3lab.fp8sim.fake_quant``: quantize, then dequantize). The GEMM is then an fp32 matmul of the
dequantized operands. That is exactly a block-scaled FP8 GEMM whose accumulator is FP32 -- what
the report's promotion (FP32 accumulation every N_C = 128 products on the CUDA cores) buys back;
the error of the tensor cores' ~14-bit accumulation between promotions is not simulated here (it
is measured on its own in ``dsv3lab.fp8sim.accumulation_error``). A CPU has no FP8 GEMM, so this
measures the rounding of the operands, which is what the training-loss comparison is about.

Tiles that do not fill 128 (a K or M that is not a multiple of 128) are zero-padded, which leaves
every tile's amax unchanged. Small presets have K = 64 or M < 128, where a 1x128 tile is a whole
row and a 128x128 block a whole (small) weight: fine-grained and per-tensor then differ mainly in
the activations and gradients, whose per-row scales follow per-token outliers.

Modes of ``gemm_precision(model, mode)``:
  "fp32"        nothing changes (the reference)
  "bf16"        x, W, dy rounded to BF16, fp32 accumulation, outputs BF16 (BF16 training's GEMMs)
  "fp8"         the fine-grained recipe above
  "fp8_tensor"  the same with ONE scale per tensor for x, W and dy (why granularity matters)

Only the FP8-eligible Linears change (``dsv3lab.fp8sim.fp8_linears``: attention projections,
dense MLPs, experts, shared experts); embedding, head, router, MTP projection, norms and the
attention core stay as they are (fp32 in the loop), as in the report's precision map.
"""

from __future__ import annotations

import contextlib

import torch

from dsv3lab.fp8sim import fake_quant, fp8_linears

MODES = ("fp32", "bf16", "fp8", "fp8_tensor")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _q(t: torch.Tensor, mode: str, kind: str) -> torch.Tensor:
    """Quantize-dequantize operand ``t`` [rows, cols] for ``mode``; ``kind`` says its tiling:
    "row" 1x128 tiles along the last axis, "col" 128x1 tiles along the first, "block" 128x128."""
    if mode == "bf16":
        return _bf16(t)
    if mode == "fp8_tensor":
        return fake_quant(t, "tensor")
    if kind == "row":
        return fake_quant(t, "tile128")
    if kind == "col":
        return fake_quant(t.t(), "tile128").t()
    return fake_quant(t, "block128")


class _QuantLinear(torch.autograd.Function):
    """y = x W^T with every GEMM's operands rounded as ``mode`` says (the three GEMMs above).
    Q(W) is kept from the forward for Dgrad, as the FP8 weight is in the report; x is kept in
    full precision and re-tiled 128x1 for Wgrad (per tensor the same Q(x) serves both)."""

    @staticmethod
    def forward(ctx, x, w, mode):
        x2 = x.reshape(-1, x.shape[-1]).float()
        xq, wq = _q(x2, mode, "row"), _q(w.float(), mode, "block")
        y = xq @ wq.t()
        ctx.save_for_backward(xq if mode != "fp8" else x2, wq)
        ctx.mode = mode
        ctx.in_shape = x.shape
        ctx.w_dtype = w.dtype
        return _bf16(y).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_saved, wq = ctx.saved_tensors
        mode = ctx.mode
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        dyq_row = _q(dy2, mode, "row")
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _bf16(dyq_row @ wq).to(dy.dtype).reshape(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            if mode == "fp8":            # Wgrad contracts tokens: 128x1 tiles of dy and x
                dw = _q(dy2, mode, "col").t() @ _q(x_saved, mode, "col")
            else:                        # bf16 / per tensor: the tiling does not matter
                dw = dyq_row.t() @ x_saved
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None


def quant_linear(x: torch.Tensor, w: torch.Tensor, mode: str = "fp8") -> torch.Tensor:
    """x [..., K] @ w [N, K]^T under ``mode`` (see the module docstring); differentiable in both."""
    if mode not in MODES:
        raise ValueError(f"gemm precision must be one of {MODES}, got {mode!r}")
    if mode == "fp32":
        return torch.nn.functional.linear(x, w)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"quant_linear: x has {x.shape[-1]} features, weight {tuple(w.shape)} expects {w.shape[1]}")
    return _QuantLinear.apply(x, w, mode)


@contextlib.contextmanager
def gemm_precision(model, mode: str = "fp8"):
    """Within the block every FP8-eligible Linear of ``model`` computes its Fprop, Dgrad and Wgrad
    GEMMs under ``mode``; the weights themselves stay as they are (the fp32 master copy).
    Yields the names of the Linears changed; restores them on exit, exceptions included."""
    if mode not in MODES:
        raise ValueError(f"gemm precision must be one of {MODES}, got {mode!r}")
    layers = [] if mode == "fp32" else fp8_linears(model)
    try:
        for _, m in layers:
            m.forward = lambda x, m=m: quant_linear(x, m.weight, mode)
        yield [n for n, _ in layers]
    finally:
        for _, m in layers:
            m.__dict__.pop("forward", None)
