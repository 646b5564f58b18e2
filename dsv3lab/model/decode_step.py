"""One decode token through the whole model in C kernel calls, when nothing is watching.

A decode step of a small model on a CPU is as much Python as arithmetic: the module tree makes
~650 ATen calls per step (views, casts, hook points, checks) around ~110 MB of weight reads.
``DecodeStep`` is the same computation as ``Transformer.forward`` for one token per sequence at
batch 1, written as a flat list of kernel calls (``kernels/cpu/decode_bf16.c``, in bf16 or their
fp32 twins) over fresh buffers: per layer RMSNorm, the q / kv projections, RoPE written straight
into the cache row and into the query buffer, W_UK^T, torch's flash attention over the latent
cache (the one torch call of substance), W_UV, o_proj, the residual, and the FFN (the gate's own
selection, then its experts in one call, or the dense SwiGLU as a one-expert MoE). Each kernel
rounds where the module rounds (in bf16; fp32 rounds nowhere), so the two agree to summation
order (tests/test_cpu_decode.py compares them).

It runs only when the module path would compute exactly the same thing and nobody would miss a
hook: a bf16 or fp32 model on the CPU, absorbed or V3.2 sparse attention (the indexer's
selection, then its rows gathered, as ``SparseAttention`` decodes), batch 1, one token, no
autograd, no hook anywhere in the model, no parallel layout, plain weights of the model's dtype.
The gate's seams (forced routing, expert masks) are the gate's own business and work here. Any
of these off, ``Transformer.forward`` takes the module path, which stays the reference.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.modules import module as _torch_module

from dsv3lab.kernels import cpu_decode
from dsv3lab.model.attn_absorbed import AbsorbedAttention, LatentCache, latent_attention
from dsv3lab.model.attn_sparse import SparseAttention
from dsv3lab.model.layers import MLP, HookPoint, Linear, RMSNorm
from dsv3lab.model.moe import MoE


_HOOK_POINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _hook_points(mod) -> list:
    """The HookPoints that are direct children of ``mod`` (cached per module)."""
    hps = _HOOK_POINTS.get(mod)
    if hps is None:
        hps = [c for c in mod._modules.values() if isinstance(c, HookPoint)]
        _HOOK_POINTS[mod] = hps
    return hps


def _watched(*mods) -> bool:
    """Whether a hook is attached to any of ``mods`` or to one of their hook points."""
    for mod in mods:
        if mod._forward_hooks or mod._forward_pre_hooks:
            return True
        for hp in _hook_points(mod):
            if hp._forward_hooks or hp._forward_pre_hooks:
                return True
    return False


def _plain(dtype, *linears) -> bool:
    """Plain local Linears with contiguous ``dtype`` weights on the CPU."""
    for lin in linears:
        w = lin.weight
        if type(lin) is not Linear or w.dtype != dtype or not w.is_contiguous() or w.device.type != "cpu":
            return False
    return True


class _Fallback(Exception):
    """Something in the model needs the module path (raised before the step returns)."""


class DecodeStep:
    """``DecodeStep(model).run(tokens, start, cache)``: logits, or None for the module path.

    Nothing is cached across steps but what the modules cache themselves (W_UK^T / W_UV in the
    attention), so weights, modules and hooks changed between steps are always seen. The checks
    run as the step goes; a step that meets a hook or an unfit weight half way returns None and
    the module path recomputes it from the start (it rewrites the same cache rows)."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg

    # --- the step ---------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, start: int, cache) -> torch.Tensor | None:
        """Logits [1, 1, V] of token ``tokens`` [1, 1] at position ``start``, or None."""
        try:
            return self._run(tokens, start, cache)
        except _Fallback:
            return None

    def _run(self, tokens: torch.Tensor, start: int, cache) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        dt = m.embed_tokens.weight.dtype
        if (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or getattr(m, "_dsv3_parallel", None) is not None or _watched(m, m.norm, m.embed_tokens)
                or dt not in cpu_decode.KERNEL_DTYPES or not _plain(dt, m.lm_head)):
            raise _Fallback
        m.check_tokens(tokens, start)
        gemv_c, norm_c, rope_c = (cpu_decode.kernel(name, dt) for name in ("dsv3_gemv", "dsv3_rmsnorm", "dsv3_rope"))
        nt = torch.get_num_threads()
        H, n, r, c, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        D = cfg.hidden_size
        cache.check(1, start + 1)
        cos, sin = m.rope.get(start, start + 1, m.device)
        cs, sn = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        x = m.embed_tokens.weight[tokens.reshape(-1)[0]].reshape(1, D)      # [1, D] (a view)

        def gemv(w, xin, out):                       # out [M=1, N] from xin [1, K], w [N, K]
            gemv_c(w.data_ptr(), w.stride(0), 0, xin.data_ptr(), 0, 0, out.data_ptr(), 0, 0,
                   1, 1, w.shape[0], w.shape[1], nt)
            return out

        def norm(mod: RMSNorm, xin, out):
            if mod.weight.dtype != dt:
                raise _Fallback
            norm_c(xin.data_ptr(), 0, mod.weight.data_ptr(), float(mod.eps), out.data_ptr(), 0, 1, xin.shape[-1])
            return out

        def rope(src, ld_src, rows, dst, ld_dst):
            rope_c(src.data_ptr(), ld_src, cs.data_ptr(), sn.data_ptr(), dst.data_ptr(), ld_dst, rows, r)

        def empty(*shape):
            return torch.empty(shape, dtype=dt)

        for blk in m.layers:
            attn = blk.self_attn
            projections = ((attn.q_a_proj, attn.q_b_proj) if cfg.q_lora_rank else (attn.q_proj,)) + (
                attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj)
            sparse = type(attn.impl) is SparseAttention
            if (type(attn.impl) not in (AbsorbedAttention, SparseAttention) or attn.absorb_prefill
                    or not _plain(dt, *projections)
                    or _watched(blk, attn, blk.input_layernorm, blk.post_attention_layernorm, *projections)
                    or sparse and (not attn.impl.fast_decode_ok() or _watched(attn.indexer))):
                raise _Fallback
            h = norm(blk.input_layernorm, x, empty(1, D))
            if cfg.q_lora_rank:
                qa = gemv(attn.q_a_proj.weight, h, empty(1, cfg.q_lora_rank))
                qa = norm(attn.q_a_layernorm, qa, empty(1, cfg.q_lora_rank))
                q = gemv(attn.q_b_proj.weight, qa, empty(1, H * (n + r)))
            else:
                q = gemv(attn.q_proj.weight, h, empty(1, H * (n + r)))
            kv = gemv(attn.kv_a_proj_with_mqa.weight, h, empty(1, c + r))
            row = cache.layers[blk.layer][0, start]                            # [c + r] in the cache
            if row.dtype != dt or attn.kv_a_layernorm.weight.dtype != dt:
                raise _Fallback
            norm_c(kv.data_ptr(), 0, attn.kv_a_layernorm.weight.data_ptr(), float(attn.kv_a_layernorm.eps),
                   row.data_ptr(), 0, 1, c)                                    # c_kv into the cache row
            rope(kv[0, c:], 0, 1, row[c:], 0)                                  # k_pe into the cache row
            impl = attn.impl
            w_uk_t, w_uv = impl.decode_weights(dt)
            q_cat = empty(1, 1, H, c + r)
            qh = q.view(H, n + r)
            rope(qh[:, n:], n + r, H, q_cat[0, 0, :, c:], c + r)               # q_pe into q_cat
            gemv_c(w_uk_t.data_ptr(), w_uk_t.stride(1), w_uk_t.stride(0), qh.data_ptr(), 0, n + r,
                   q_cat.data_ptr(), 0, c + r, H, 1, c, n, nt)                 # q_lat into q_cat
            latent = cache.layers[blk.layer][:1, :start + 1]
            if sparse:                           # V3.2: the indexer's top-k rows, gathered (attn_sparse.py)
                latent = impl.decode_gathered(h.view(1, 1, D), qa.view(1, 1, -1) if cfg.q_lora_rank else None,
                                              cos, sin, start, cache, blk.layer, latent)
            o_lat = latent_attention(q_cat, latent, attn.scale, c, latent.shape[1] - 1)
            if o_lat.stride(-1) != 1:
                o_lat = o_lat.contiguous()                                     # [1,1,H,c], rows stride(2) apart
            o = empty(1, H * v)
            gemv_c(w_uv.data_ptr(), w_uv.stride(1), w_uv.stride(0), o_lat.data_ptr(), 0, o_lat.stride(2),
                   o.data_ptr(), 0, v, H, 1, v, c, nt)
            a = gemv(attn.o_proj.weight, o, empty(1, D))
            x = x + a
            h2 = norm(blk.post_attention_layernorm, x, empty(1, D))
            mlp = blk.mlp
            if type(mlp) is MoE:
                if _watched(mlp.gate) or cfg.scoring_func != "sigmoid":
                    raise _Fallback
                ids, w = mlp.gate(h2)               # its own C selection (forced routing, masks: its torch path)
                mlps = mlp.decode_experts(ids[0].tolist(), dt)   # None: hooked, parallel or unfit experts
                if mlps is None or _watched(mlp):
                    raise _Fallback
                y = mlp.decode_cpu(h2, mlps, w[0])
            elif type(mlp) is MLP and _plain(dt, mlp.gate_proj, mlp.up_proj, mlp.down_proj) and not _watched(
                    mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                y = mlp_one(mlp, h2)
            else:
                raise _Fallback
            x = x + y
        hf = norm(m.norm, x, empty(1, D))
        logits = gemv(m.lm_head.weight, hf, empty(1, cfg.vocab_size))
        return logits.view(1, 1, -1)


def mlp_one(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU on one row as a one-expert MoE call (weight 1: the same roundings as the
    module in bf16; fp32 sums in another order in fp32)."""
    y = cpu_decode.moe(x.reshape(-1), [mlp.gate_proj.weight], [mlp.up_proj.weight], [mlp.down_proj.weight],
                       torch.ones(1))
    return y.to(x.dtype).view(1, -1)


def try_decode(model, tokens: torch.Tensor, start: int, cache) -> torch.Tensor | None:
    """Logits of the fused step, or None when the module path must run (see the module docstring)."""
    if (tokens.shape != (1, 1) or cache is None or model.dtype not in cpu_decode.KERNEL_DTYPES
            or model.device.type != "cpu"
            or torch.is_grad_enabled() and any(p.requires_grad for p in model.lm_head.parameters())):
        return None
    from dsv3lab.kernels.dispatch import get_backend
    if get_backend() != "auto" or not cpu_decode.available():
        return None
    if not isinstance(cache, LatentCache):
        return None
    return DecodeStep(model).run(tokens, start, cache)
