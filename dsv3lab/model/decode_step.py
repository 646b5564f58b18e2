"""One bf16 decode token through the whole model in C kernel calls, when nothing is watching.

A decode step of a small model on a CPU is as much Python as arithmetic: the module tree makes
~650 ATen calls per step (views, casts, hook points, checks) around ~110 MB of weight reads.
``DecodeStep`` is the same computation as ``Transformer.forward`` for one token per sequence at
batch 1, written as a flat list of kernel calls (``kernels/cpu/decode_bf16.c``) over
preallocated buffers: per layer RMSNorm, the q / kv projections, RoPE written straight into the
cache row and into the query buffer, W_UK^T, torch's flash attention over the latent cache (the
one torch call of substance), W_UV, o_proj, the residual, and the FFN (the MoE's expert choice
and experts, or the dense SwiGLU as a one-expert MoE). Each kernel rounds where the module
rounds, so the two agree to bf16 summation order (tests/test_cpu_decode.py compares them).

It runs only when the module path would compute exactly the same thing and nobody would miss a
hook: bf16 on the CPU, absorbed or V3.2 sparse attention (the indexer's selection, then its rows
gathered, as ``SparseAttention`` decodes), batch 1, one token, no autograd, no hook or
interpretability seam set anywhere in the model, no parallel layout, plain bf16 weights. Any
of these off, ``Transformer.forward`` takes the module path, which stays the reference.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
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


def _plain(*linears) -> bool:
    """Plain local Linears with contiguous bf16 weights on the CPU."""
    for lin in linears:
        w = lin.weight
        if type(lin) is not Linear or w.dtype != torch.bfloat16 or not w.is_contiguous() or w.device.type != "cpu":
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
        if (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or getattr(m, "_dsv3_parallel", None) is not None or _watched(m, m.norm, m.embed_tokens)
                or not _plain(m.lm_head) or m.embed_tokens.weight.dtype != torch.bfloat16):
            raise _Fallback
        m.check_tokens(tokens, start)
        lib = cpu_decode.library()
        nt = torch.get_num_threads()
        H, n, r, c, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        D = cfg.hidden_size
        cache.check(1, start + 1)
        cos, sin = m.rope.get(start, start + 1, m.device)
        cs, sn = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        x = m.embed_tokens.weight[tokens.reshape(-1)[0]].reshape(1, D)      # [1, D] bf16 (a view)

        def gemv(w, xin, out):                       # out [M=1, N] from xin [1, K], w [N, K]
            lib.dsv3_gemv(w.data_ptr(), w.stride(0), 0, xin.data_ptr(), 0, 0, out.data_ptr(), 0, 0,
                          1, 1, w.shape[0], w.shape[1], nt)
            return out

        def norm(mod: RMSNorm, xin, out):
            lib.dsv3_rmsnorm(xin.data_ptr(), 0, mod.weight.data_ptr(), float(mod.eps), out.data_ptr(), 0, 1,
                             xin.shape[-1])
            return out

        def rope(src, ld_src, rows, dst, ld_dst):
            lib.dsv3_rope(src.data_ptr(), ld_src, cs.data_ptr(), sn.data_ptr(), dst.data_ptr(), ld_dst, rows, r)

        empty = torch.empty
        bf = torch.bfloat16
        for blk in m.layers:
            attn = blk.self_attn
            projections = ((attn.q_a_proj, attn.q_b_proj) if cfg.q_lora_rank else (attn.q_proj,)) + (
                attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj)
            sparse = type(attn.impl) is SparseAttention
            if (type(attn.impl) not in (AbsorbedAttention, SparseAttention) or attn.absorb_prefill
                    or not _plain(*projections)
                    or _watched(blk, attn, blk.input_layernorm, blk.post_attention_layernorm, *projections)
                    or sparse and (not attn.impl.fast_decode_ok() or _watched(attn.indexer))):
                raise _Fallback
            h = norm(blk.input_layernorm, x, empty(1, D, dtype=bf))
            if cfg.q_lora_rank:
                qa = gemv(attn.q_a_proj.weight, h, empty(1, cfg.q_lora_rank, dtype=bf))
                qa = norm(attn.q_a_layernorm, qa, empty(1, cfg.q_lora_rank, dtype=bf))
                q = gemv(attn.q_b_proj.weight, qa, empty(1, H * (n + r), dtype=bf))
            else:
                q = gemv(attn.q_proj.weight, h, empty(1, H * (n + r), dtype=bf))
            kv = gemv(attn.kv_a_proj_with_mqa.weight, h, empty(1, c + r, dtype=bf))
            row = cache.layers[blk.layer][0, start]                            # [c + r] in the cache
            lib.dsv3_rmsnorm(kv.data_ptr(), 0, attn.kv_a_layernorm.weight.data_ptr(), float(attn.kv_a_layernorm.eps),
                             row.data_ptr(), 0, 1, c)                          # c_kv into the cache row
            rope(kv[0, c:], 0, 1, row[c:], 0)                                  # k_pe into the cache row
            impl = attn.impl
            w_uk_t, w_uv = impl.decode_weights()
            q_cat = empty(1, 1, H, c + r, dtype=bf)
            qh = q.view(H, n + r)
            rope(qh[:, n:], n + r, H, q_cat[0, 0, :, c:], c + r)               # q_pe into q_cat
            lib.dsv3_gemv(w_uk_t.data_ptr(), w_uk_t.stride(1), w_uk_t.stride(0), qh.data_ptr(), 0, n + r,
                          q_cat.data_ptr(), 0, c + r, H, 1, c, n, nt)           # q_lat into q_cat
            latent = cache.layers[blk.layer][:1, :start + 1]
            if sparse:                           # V3.2: the indexer's top-k rows, gathered (attn_sparse.py)
                latent = impl.decode_gathered(h.view(1, 1, D), qa.view(1, 1, -1) if cfg.q_lora_rank else None,
                                              cos, sin, start, cache, blk.layer, latent)
            o_lat = latent_attention(q_cat, latent, attn.scale, c, latent.shape[1] - 1)
            if o_lat.stride(-1) != 1:
                o_lat = o_lat.contiguous()                                     # [1,1,H,c], rows stride(2) apart
            o = empty(1, H * v, dtype=bf)
            lib.dsv3_gemv(w_uv.data_ptr(), w_uv.stride(1), w_uv.stride(0), o_lat.data_ptr(), 0, o_lat.stride(2),
                          o.data_ptr(), 0, v, H, 1, v, c, nt)
            a = gemv(attn.o_proj.weight, o, empty(1, D, dtype=bf))
            x = x + a
            h2 = norm(blk.post_attention_layernorm, x, empty(1, D, dtype=bf))
            mlp = blk.mlp
            if type(mlp) is MoE:
                gate = mlp.gate
                if (_watched(gate) or gate.forced_routing is not None or gate.expert_mask is not None
                        or cfg.scoring_func != "sigmoid"):
                    raise _Fallback
                scores = F.linear(h2.float(), gate.weight.float()).sigmoid()
                ids, w = cpu_decode.route(scores, gate.e_score_correction_bias, cfg.n_group, cfg.topk_group,
                                          cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor)
                mlps = mlp.decode_experts(ids[0].tolist())      # None: hooked, parallel or unfit experts
                if mlps is None or _watched(mlp):
                    raise _Fallback
                y = mlp.decode_cpu(h2, mlps, w[0])
            elif type(mlp) is MLP and _plain(mlp.gate_proj, mlp.up_proj, mlp.down_proj) and not _watched(
                    mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                y = mlp_one(mlp, h2)
            else:
                raise _Fallback
            x = x + y
        hf = norm(m.norm, x, empty(1, D, dtype=bf))
        logits = gemv(m.lm_head.weight, hf, empty(1, cfg.vocab_size, dtype=bf))
        return logits.view(1, 1, -1)


def mlp_one(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU on one row as a one-expert MoE call (weight 1: the same roundings)."""
    y = cpu_decode.moe(x.reshape(-1), [mlp.gate_proj.weight], [mlp.up_proj.weight], [mlp.down_proj.weight],
                       torch.ones(1))
    return y.to(x.dtype).view(1, -1)


def try_decode(model, tokens: torch.Tensor, start: int, cache) -> torch.Tensor | None:
    """Logits of the fused step, or None when the module path must run (see the module docstring)."""
    if (tokens.shape != (1, 1) or cache is None or model.dtype != torch.bfloat16 or model.device.type != "cpu"
            or torch.is_grad_enabled() and any(p.requires_grad for p in model.lm_head.parameters())):
        return None
    from dsv3lab.kernels.dispatch import get_backend
    if get_backend() != "auto":
        return None
    if not isinstance(cache, LatentCache):
        return None
    return DecodeStep(model).run(tokens, start, cache)
