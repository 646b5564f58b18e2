"""Naive MLA: expand the latent into per-head keys and values and cache those.

  k_h = [W_UK,h c_kv ; k_pe],  v_h = W_UV,h c_kv;  the cache holds K [B,T,H,n+r] and V [B,T,H,v]
That is H (n + r + v) = 40,960 values per token per layer for V3 instead of the absorbed 576: the
reference the absorbed form is tested against, and what MLA would cost without the latent cache.
"""

from __future__ import annotations

import torch

from dsv3lab.model.attention import Attention, AttnInput, Cache, expand_kv, sdpa


class KVCache(Cache):
    """Per layer K [B, max_len, H, n+r] and V [B, max_len, H, v] (H = this rank's heads)."""

    mode = "naive"

    def __init__(self, cfg, n_layers: int, batch: int, max_len: int, dtype, device,
                 n_heads: int | None = None):
        super().__init__(batch, max_len)
        H = n_heads or cfg.num_attention_heads
        self.layers = [(torch.zeros(batch, max_len, H, cfg.qk_head_dim, dtype=dtype, device=device),
                        torch.zeros(batch, max_len, H, cfg.v_head_dim, dtype=dtype, device=device))
                       for _ in range(n_layers)]


class NaiveAttention(Attention):
    name = "naive"
    cache_cls = KVCache

    def __call__(self, a: AttnInput, cache: KVCache | None, slot: int) -> torch.Tensor:
        mla = self.mla
        k, v = expand_kv(mla.kv_b_weight(), a.c_kv, a.k_pe, mla.n)        # [B,H,S,*]
        if cache is not None:
            B = a.c_kv.shape[0]
            kc, vc = cache.layers[slot]
            kc[:B, a.start:a.end] = k.transpose(1, 2)
            vc[:B, a.start:a.end] = v.transpose(1, 2)
            k, v = kc[:B, :a.end].transpose(1, 2), vc[:B, :a.end].transpose(1, 2)
        q = torch.cat([a.q_nope, a.q_pe], dim=-1).transpose(1, 2)
        return sdpa(q, k, v, mla.scale, a.start, probs_hook=mla.hook_attn_probs)
