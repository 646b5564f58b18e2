"""Absorbed MLA (the official default): cache the latent, decode in the latent space.

W_UK folds into the query and W_UV into the output, so the cache holds only [c_kv ; k_pe] --
c + r = 576 values per token per layer for V3, one row shared by all heads (MQA-like):
  q_lat = q_nope W_UK          [B,S,H,c];   q_cat = [q_lat ; q_pe]   [B,S,H,c+r]
  p     = softmax(q_cat . latent_t * scale)                          [B,H,S,T]
  o_h   = W_UV,h (sum_t p_t c_kv,t)                                  [B,S,H,v]
Decoding one token is then attention of H query rows against one [T, 576] key/value matrix
(what FlashMLA does). For a prefill chunk (S > 1) the latent is still what is *cached*, but by
default attention is *computed* by expanding the latent through kv_b into per-head K/V and
calling SDPA: (n+r)+v = 320 multiply-adds per (query, key, head) instead of 2c+r = 1088.
``mla.absorb_prefill = True`` forces the absorbed arithmetic for chunks too (tests compare both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3lab.model.attention import Attention, AttnInput, Cache, allowed, expand_kv, sdpa


class LatentCache(Cache):
    """Per layer one [B, max_len, kv_lora_rank + rope] buffer: row t holds the post-norm latent
    c_kv (first c values) and the rotated shared key k_pe."""

    mode = "absorbed"

    def __init__(self, cfg, n_layers: int, batch: int, max_len: int, dtype, device,
                 n_heads: int | None = None):
        super().__init__(batch, max_len)
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.layers = [torch.zeros(batch, max_len, width, dtype=dtype, device=device) for _ in range(n_layers)]


def latent_attention(q_cat: torch.Tensor, latent: torch.Tensor, scale: float, c: int, start: int,
                     keep: torch.Tensor | None = None, probs_hook=None) -> torch.Tensor:
    """Attention in the latent space: q_cat [B,S,H,c+r] against latent [B,T,c+r], whose rows are
    the keys and whose first c columns are the values -> o_lat [B,S,H,c] (before W_UV).

    Causal over absolute positions (queries at start..start+S-1), and restricted to ``keep``
    [B,S,T] when given. ``probs_hook`` sees and may replace the probabilities [B,H,S,T]."""
    B, S, H, _ = q_cat.shape
    M = S * H
    hooked = probs_hook is not None and probs_hook.active
    if S == 1 and keep is None and not hooked:
        from dsv3lab.kernels import backend                             # Triton decode on CUDA
        o_lat = backend.mla_decode(q_cat.view(B, H, -1), latent, scale, c)   # [B,H,c] or None
        if o_lat is not None:
            return o_lat.view(B, 1, H, c)
        # one fused pass over the cache (torch's flash attention): the latent is a single
        # key/value head and the H heads are its H query rows (MQA), so every cache row is read
        # once for all heads, with an online softmax, instead of by two matmuls with a
        # materialised [T, H] score matrix between them. Values are the whole rows (keys ==
        # values, one tensor); the rope columns of the output are dropped after.
        nt = torch.get_num_threads()
        if (B == 1 and nt > 1 and latent.device.type == "cpu" and latent.shape[1] >= SPLIT_MIN_ROWS * nt
                and latent.is_contiguous()):
            return split_latent_attention(q_cat, latent, scale, c, nt)
        kv = latent[:, None]                                              # [B,1,T,c+r]
        o = F.scaled_dot_product_attention(q_cat.view(B, 1, H, -1), kv, kv, scale=scale)
        return o[..., :c]                                                 # [B,1(=S),H,c]
    q = q_cat.reshape(B, M, q_cat.shape[-1])
    # scores laid out [B, T, S*H]: the cache is the row-major left operand, never transposed
    scores = torch.bmm(latent, q.transpose(1, 2)).float() * scale
    if S > 1 or keep is not None:
        mask = allowed(S, start, keep, latent.device).transpose(-1, -2)     # [T,S] or [B,T,S]
        scores = scores.view(B, -1, S, H).masked_fill(~mask[..., None], float("-inf")).view(B, -1, M)
    probs = scores.softmax(dim=1)
    if hooked:
        hooked_p = probs_hook(probs.view(B, -1, S, H).permute(0, 3, 2, 1))   # [B,H,S,T]
        probs = hooked_p.permute(0, 3, 2, 1).reshape(B, -1, M)
    # multiply by the whole [T, c+r] rows and drop the rope columns after: slicing the
    # cache first would make bmm copy the strided [T, c] view every step
    o_lat = torch.bmm(probs.transpose(1, 2).to(latent.dtype), latent)[..., :c]   # [B, S*H, c]
    return o_lat.reshape(B, S, H, c)


SPLIT_MIN_ROWS = 1024   # cache rows per thread below which one thread's pass is as fast


def split_latent_attention(q_cat: torch.Tensor, latent: torch.Tensor, scale: float, c: int, n: int) -> torch.Tensor:
    """One query per head against one sequence's latent [1, T, c+r], the cache split into ``n``
    pieces of rows that run as ``n`` batch entries of one flash-attention call (so ``n`` threads
    share the pass: with a single key/value head, torch's CPU flash attention otherwise runs one
    query block on one thread), merged by their log-sum-exps: o = sum_i o_i exp(lse_i - lse).
    The rows left over by the split (fewer than ``n``) are a piece of their own."""
    _, _, H, D = q_cat.shape
    T = latent.shape[1]
    per = T // n
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    kv = latent[0, :per * n].view(n, 1, per, D)
    o, lse = flash(q_cat.view(1, 1, H, D).expand(n, 1, H, D), kv, kv, 0.0, False, scale=scale)
    outs, lses = [o[..., :c]], [lse]                                    # [n,1,H,c], [n,1,H]
    if per * n < T:
        rest = latent[:, per * n:, None].transpose(1, 2)                  # [1,1,T-per*n,D]
        o_r, lse_r = flash(q_cat.view(1, 1, H, D), rest, rest, 0.0, False, scale=scale)
        outs.append(o_r[..., :c])
        lses.append(lse_r)
    w = torch.cat(lses).softmax(dim=0)                                    # [pieces,1,H] fp32
    o = (torch.cat(outs).float() * w[..., None]).sum(dim=0, keepdim=True)
    return o.to(latent.dtype)                                             # [1,1,H,c]


class AbsorbedAttention(Attention):
    name = "absorbed"
    cache_cls = LatentCache

    def __call__(self, a: AttnInput, cache: LatentCache | None, slot: int) -> torch.Tensor:
        return self.attend(a, self.write(a, cache, slot))

    def write(self, a: AttnInput, cache: LatentCache | None, slot: int) -> torch.Tensor:
        """Store [c_kv ; k_pe] at positions [start, end); return the latent [B, end, c+r] to attend
        over (without a cache: just this chunk's)."""
        if cache is None:
            return torch.cat([a.c_kv, a.k_pe], dim=-1)
        B, c = a.c_kv.shape[0], self.mla.c
        buf = cache.layers[slot]
        buf[:B, a.start:a.end, :c] = a.c_kv
        buf[:B, a.start:a.end, c:] = a.k_pe
        return buf[:B, :a.end]

    def attend(self, a: AttnInput, latent: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head outputs [B,S,H,v] over ``latent`` [B,T,c+r], optionally only the keys in
        ``keep`` [B,S,T]: latent-space arithmetic for one token (or when asked or hooked), the
        expanded per-head form for prefill chunks."""
        mla = self.mla
        if a.q_nope.shape[1] == 1 or mla.absorb_prefill or mla.hook_attn_probs.active:
            return self.absorbed(a.q_nope, a.q_pe, latent, a.start, keep)
        return self.expanded(a.q_nope, a.q_pe, latent, a.start, keep)

    # --- the two computations -------------------------------------------------------------
    def absorbed_weights(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK as [H, n, c] and W_UV^T as [H, c, v], contiguous in ``dtype``, cached until
        kv_b_proj's weight changes: both products are then plain batched GEMVs over heads, with
        no per-step strided copy or cast of the weight."""
        mla = self.mla
        w = mla.kv_b_proj.weight
        key = (w.data_ptr(), w._version, dtype, w.device, mla.n_heads)
        if getattr(self, "_absorbed_key", None) != key:
            kvb = mla.kv_b_weight()
            self._absorbed = (kvb[:, :mla.n].to(dtype).contiguous(),
                              kvb[:, mla.n:].transpose(1, 2).to(dtype).contiguous())
            self._absorbed_key = key
        return self._absorbed

    def w_uv_t(self, dtype) -> torch.Tensor:
        """W_UV^T [H, c, v] (see ``absorbed_weights``)."""
        return self.absorbed_weights(dtype)[1]

    def absorbed(self, q_nope, q_pe, latent, start, keep=None) -> torch.Tensor:
        mla = self.mla
        B, S, H, n = q_nope.shape
        c = mla.c
        w_uk, w_uv_t = self.absorbed_weights(q_nope.dtype)
        # per head: q_lat = q_nope W_UK, as one batched GEMM over heads
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * S, n), w_uk)
        q_lat = q_lat.view(H, B, S, c).permute(1, 2, 0, 3)                 # [B,S,H,c]
        q_cat = torch.cat([q_lat, q_pe], dim=-1)
        o_lat = latent_attention(q_cat, latent, mla.scale, c, start, keep, mla.hook_attn_probs)
        o = torch.bmm(o_lat.permute(2, 0, 1, 3).reshape(H, B * S, c), w_uv_t.to(o_lat.dtype))
        return o.view(H, B, S, -1).permute(1, 2, 0, 3)                     # [B,S,H,v]

    def expanded(self, q_nope, q_pe, latent, start, keep=None) -> torch.Tensor:
        mla = self.mla
        k, v = expand_kv(mla.kv_b_weight(), latent[..., :mla.c], latent[..., mla.c:], mla.n)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        return sdpa(q, k, v, mla.scale, start, keep)
