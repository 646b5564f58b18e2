"""Multi-head Latent Attention (MLA): the projections every attention variant shares.

Shapes (B batch, S new tokens, T = start + S attended positions, H heads, c = kv_lora_rank,
r = qk_rope_head_dim, n = qk_nope_head_dim, v = v_head_dim):

  q     = q_b(q_norm(q_a(x)))  or q_proj(x)         [B,S,H,n+r] -> q_nope [B,S,H,n], q_pe [B,S,H,r]
  kv_a  = kv_a_proj_with_mqa(x)                      [B,S,c+r]   -> c_kv = kv_norm(.[:c]), k_pe = rope(.[c:])
  kv_b  = kv_b_proj.weight.view(H, n+v, c)           W_UK = kv_b[:, :n], W_UV = kv_b[:, n:]
  out   = o_proj(attention(...))                     [B,S,D]

The attention between the projections and o_proj -- what is cached, how prefill and decode are
computed -- is ``self.impl``, an implementation chosen by name from ``ATTENTION`` (the seam is
described in attention.py): "absorbed" (latent cache, attn_absorbed.py; the default), "naive"
(per-head K/V cache, attn_naive.py) or "sparse" (V3.2's DSA: latent cache plus the indexer's keys,
attn_sparse.py; the default for configs with an indexer).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3lab.config import ModelConfig
from dsv3lab.model.attention import Attention, AttnInput
from dsv3lab.model.attn_absorbed import AbsorbedAttention, LatentCache
from dsv3lab.model.attn_naive import KVCache, NaiveAttention
from dsv3lab.model.attn_sparse import SparseAttention
from dsv3lab.model.layers import HookPoint, Linear, RMSNorm
from dsv3lab.model.rope import apply_rope

# name -> implementation; a new variant is one file and one line here
ATTENTION: dict[str, type[Attention]] = {
    "absorbed": AbsorbedAttention,
    "naive": NaiveAttention,
    "sparse": SparseAttention,          # V3.2's DSA; the default for configs with an indexer
}

__all__ = ["MLA", "ATTENTION", "attention_class", "LatentCache", "KVCache"]


class QueryScaledRMSNorm(RMSNorm):
    """The q latent's RMSNorm in a model whose queries are scaled by position (Mistral 4,
    ``cfg.attn_scale_beta``): the same arithmetic as RMSNorm. Its own type makes the fused CPU
    decode step (``dsv3lab.fast``), which does not apply the scaling and takes only plain
    RMSNorms, leave these layers to the module path."""


class QueryScaledLinear(Linear):
    """``q_proj`` of a position-scaled model without q low rank (as ``QueryScaledRMSNorm``)."""


# the q and kv latents' RMSNorms: eps 1e-6 whatever the config's rms_norm_eps (which is the block
# norms'), as the official inference (RMSNorm's default) and every transformers model of the family
# build them; it shows in models whose rms_norm_eps is not 1e-6 (GLM-4.7-Flash, GLM-5: 1e-5)
LATENT_NORM_EPS = 1e-6


def attention_class(name: str) -> type[Attention]:
    try:
        return ATTENTION[name]
    except KeyError:
        raise ValueError(f"attn_mode must be one of {sorted(ATTENTION)}, got {name!r}") from None


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None, n_heads: int | None = None, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer = layer              # decides per-layer weights (GLM-5's layers without an indexer)
        # n_heads < num_attention_heads when tensor parallelism splits the heads
        self.n_heads = H = n_heads or cfg.num_attention_heads
        self.n, self.r, self.v, self.c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.absorb_prefill = False     # compute prefill chunks in the latent space too (absorbed)
        D = cfg.hidden_size
        scaled = cfg.attn_scale_beta > 0            # Mistral 4's query scaling (forward)
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, dtype, device)
            self.q_a_layernorm = (QueryScaledRMSNorm if scaled else RMSNorm)(cfg.q_lora_rank, LATENT_NORM_EPS,
                                                                             dtype, device)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, dtype, device)
        else:
            self.q_proj = (QueryScaledLinear if scaled else Linear)(D, H * cfg.qk_head_dim, dtype, device)
        self.kv_a_proj_with_mqa = Linear(D, self.c + self.r, dtype, device)
        self.kv_a_layernorm = RMSNorm(self.c, LATENT_NORM_EPS, dtype, device)
        self.kv_b_proj = Linear(self.c, H * (self.n + self.v), dtype, device)
        self.o_proj = Linear(H * self.v, D, dtype, device)
        self.hook_q_nope = HookPoint("[B,S,H,qk_nope]")
        self.hook_q_pe = HookPoint("[B,S,H,qk_rope] rotated")
        self.hook_kv_latent = HookPoint("[B,S,kv_lora_rank] post-norm c_kv (what is cached)")
        self.hook_k_pe = HookPoint("[B,S,qk_rope] rotated shared key (what is cached)")
        self.hook_attn_probs = HookPoint("[B,H,S,T] softmax probabilities (computed only when hooked)")
        self.hook_out = HookPoint("[B,S,H*v] per-head outputs before o_proj")
        # weights that only some variants have (the DSA indexer), decided by the config
        for impl in ATTENTION.values():
            for name, module in impl.layer_submodules(cfg, layer, dtype, device).items():
                self.add_module(name, module)
        self.impl: Attention = SparseAttention(self) if cfg.has_indexer else AbsorbedAttention(self)

    # --- which attention --------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.impl.name

    def set_attention(self, name: str) -> None:
        """Use the implementation registered as ``name`` (see ``ATTENTION``)."""
        if name != self.impl.name:
            self.impl = attention_class(name)(self)

    # --- weights ----------------------------------------------------------------------------
    def kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj weight as [H, n+v, c] in a compute dtype (FP8 is dequantized)."""
        w = self.kv_b_proj.weight
        if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            from dsv3lab.fp8 import weight_dequant
            w = weight_dequant(w, self.kv_b_proj.weight_scale_inv)
        return w.view(self.n_heads, self.n + self.v, self.c)

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0,
                cache=None, layer: int = 0) -> torch.Tensor:
        """x [B,S,D] at positions [start, start+S) -> [B,S,D]; ``layer`` is the cache slot."""
        B, S, _ = x.shape
        H, n, c = self.n_heads, self.n, self.c
        q_latent = None
        if self.cfg.q_lora_rank:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        else:
            q = self.q_proj(x)
        q = q.view(B, S, H, n + self.r)
        if self.cfg.attn_scale_beta:
            # Mistral 4 (llama-4 scaling): queries at position t times 1 + beta ln(1 + floor(t / len))
            t = torch.arange(start, start + S, device=q.device, dtype=torch.float32)
            scale = 1 + self.cfg.attn_scale_beta * torch.log(1 + torch.floor(t / self.cfg.attn_scale_len))
            q = q * scale.to(q.dtype)[None, :, None, None]
        q_nope = self.hook_q_nope(q[..., :n])
        q_pe = self.hook_q_pe(apply_rope(q[..., n:], cos[:, None], sin[:, None]))
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.hook_kv_latent(self.kv_a_layernorm(kv[..., :c]))
        k_pe = self.hook_k_pe(apply_rope(kv[..., c:], cos, sin))
        if cache is not None:
            if not isinstance(cache, self.impl.cache_cls):
                raise ValueError(f"cache is a {type(cache).__name__} (for {cache.mode!r} attention) but "
                                 f"this model runs {self.impl.name!r} attention; make it with model.new_cache")
            cache.check(B, start + S)
        a = AttnInput(x, q_latent, q_nope, q_pe, c_kv, k_pe, cos, sin, start)
        out = self.hook_out(self.impl(a, cache, layer).reshape(B, S, H * self.v))
        return self.o_proj(out)
