"""Multi-head Latent Attention (MLA), naive and absorbed, over a preallocated cache.

Shapes (B batch, S new tokens, T = start + S attended positions, H heads, c = kv_lora_rank,
r = qk_rope_head_dim, n = qk_nope_head_dim, v = v_head_dim):

  q     = q_b(q_norm(q_a(x)))  or q_proj(x)         [B,S,H,n+r] -> q_nope [B,S,H,n], q_pe [B,S,H,r]
  kv_a  = kv_a_proj_with_mqa(x)                      [B,S,c+r]   -> c_kv = kv_norm(.[:c]), k_pe = rope(.[c:])
  kv_b  = kv_b_proj.weight.view(H, n+v, c)           W_UK = kv_b[:, :n], W_UV = kv_b[:, n:]

Naive: k_h = [W_UK,h c_kv ; k_pe], v_h = W_UV,h c_kv; the cache holds K [B,T,H,n+r] and V [B,T,H,v].

Absorbed (the official default): W_UK folds into the query and W_UV into the output, so the cache
holds only [c_kv ; k_pe] -- c + r = 576 values per token per layer for V3, one row shared by all
heads:
  q_lat = q_nope W_UK          [B,S,H,c];   q_cat = [q_lat ; q_pe]   [B,S,H,c+r]
  p     = softmax(q_cat . latent_t * scale)                          [B,H,S,T]
  o_h   = W_UV,h (sum_t p_t c_kv,t)                                  [B,S,H,v]
Decoding one token is then two batched matmuls against the [B,T,576] cache (what FlashMLA does).
For a prefill chunk (S > 1) the absorbed mode still *caches* only the latent, but by default
*computes* attention by expanding the latent through kv_b into per-head K/V and calling SDPA:
that costs (n+r)+v = 320 multiply-adds per (query, key, head) instead of 2c+r = 1088.
``absorb_prefill=True`` forces the absorbed arithmetic for chunks too (tests compare both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3lab.config import ModelConfig
from dsv3lab.model.layers import HookPoint, Linear, RMSNorm, linear
from dsv3lab.model.rope import apply_rope


class LatentCache:
    """Preallocated absorbed-MLA cache: per layer one [B, max_len, kv_lora_rank + rope] buffer.

    Row t holds the post-norm latent c_kv (first c values) and the rotated shared key k_pe.
    """

    mode = "absorbed"

    def __init__(self, cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype, device):
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.max_len, self.batch = max_len, batch
        self.layers = [torch.zeros(batch, max_len, width, dtype=dtype, device=device) for _ in range(n_layers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)


class KVCache:
    """Preallocated naive cache: per layer K [B, max_len, H, n+r] and V [B, max_len, H, v]."""

    mode = "naive"

    def __init__(self, cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype, device,
                 n_heads: int | None = None):
        H = n_heads or cfg.num_attention_heads
        self.max_len, self.batch = max_len, batch
        self.layers = [(torch.zeros(batch, max_len, H, cfg.qk_head_dim, dtype=dtype, device=device),
                        torch.zeros(batch, max_len, H, cfg.v_head_dim, dtype=dtype, device=device))
                       for _ in range(n_layers)]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def _causal_mask(S: int, start: int, device) -> torch.Tensor:
    """Boolean [S, start+S]: query i (absolute start+i) may see keys 0..start+i."""
    q = torch.arange(start, start + S, device=device)[:, None]
    k = torch.arange(start + S, device=device)[None, :]
    return k <= q


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None, n_heads: int | None = None):
        super().__init__()
        self.cfg = cfg
        # n_heads < num_attention_heads when tensor parallelism splits the heads
        self.n_heads = H = n_heads or cfg.num_attention_heads
        self.n, self.r, self.v, self.c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.mode = "absorbed"          # "absorbed" or "naive"; the model sets it for every layer
        self.absorb_prefill = False
        D = cfg.hidden_size
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, dtype, device)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype, device)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, dtype, device)
        else:
            self.q_proj = Linear(D, H * cfg.qk_head_dim, dtype, device)
        self.kv_a_proj_with_mqa = Linear(D, self.c + self.r, dtype, device)
        self.kv_a_layernorm = RMSNorm(self.c, cfg.rms_norm_eps, dtype, device)
        self.kv_b_proj = Linear(self.c, H * (self.n + self.v), dtype, device)
        self.o_proj = Linear(H * self.v, D, dtype, device)
        self.hook_q_nope = HookPoint("[B,S,H,qk_nope]")
        self.hook_q_pe = HookPoint("[B,S,H,qk_rope] rotated")
        self.hook_kv_latent = HookPoint("[B,S,kv_lora_rank] post-norm c_kv (what is cached)")
        self.hook_k_pe = HookPoint("[B,S,qk_rope] rotated shared key (what is cached)")
        self.hook_attn_probs = HookPoint("[B,H,S,T] softmax probabilities (computed only when hooked)")
        self.hook_out = HookPoint("[B,S,H*v] per-head outputs before o_proj")

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
        B, S, _ = x.shape
        H, n, r, c = self.n_heads, self.n, self.r, self.c
        if self.cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, S, H, n + r)
        q_nope = self.hook_q_nope(q[..., :n])
        q_pe = self.hook_q_pe(apply_rope(q[..., n:], cos[:, None], sin[:, None]))
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.hook_kv_latent(self.kv_a_layernorm(kv[..., :c]))
        k_pe = self.hook_k_pe(apply_rope(kv[..., c:], cos, sin))
        end = start + S
        if cache is not None and end > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions per sequence; asked for {end}")

        if self.mode == "naive":
            out = self._naive(q_nope, q_pe, c_kv, k_pe, start, cache, layer)
        else:
            if cache is not None:
                buf = cache.layers[layer]
                buf[:B, start:end, :c] = c_kv
                buf[:B, start:end, c:] = k_pe
                latent = buf[:B, :end]
            else:
                latent = torch.cat([c_kv, k_pe], dim=-1)
            if S == 1 or self.absorb_prefill or self.hook_attn_probs.active:
                out = self._absorbed(q_nope, q_pe, latent, start)
            else:
                out = self._expanded(q_nope, q_pe, latent, start)
        out = self.hook_out(out.reshape(B, S, H * self.v))
        return self.o_proj(out)

    def _w_uv_t(self, dtype) -> torch.Tensor:
        """W_UV as [H, c, v], contiguous, cached until kv_b_proj's weight changes: the output
        product o_lat @ W_UV^T is then a plain batched GEMV (no per-step transposed copy)."""
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w._version, dtype, w.device)
        if getattr(self, "_uv_key", None) != key:
            self._uv_t = self.kv_b_weight()[:, self.n:].transpose(1, 2).to(dtype).contiguous()
            self._uv_key = key
        return self._uv_t

    def _absorbed(self, q_nope, q_pe, latent, start):
        """Attention in the latent space; latent [B,T,c+r]."""
        B, S, H, _ = q_nope.shape
        c, M = self.c, S * H
        w_uk = self.kv_b_weight()[:, :self.n].to(q_nope.dtype)             # [H,n,c] (a view)
        w_uv_t = self._w_uv_t(q_nope.dtype)                                # [H,c,v]
        # per head: q_lat = q_nope W_UK, as one batched GEMM over heads
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * S, self.n), w_uk)
        q_lat = q_lat.view(H, B, S, c).permute(1, 2, 0, 3)                 # [B,S,H,c]
        q_cat = torch.cat([q_lat, q_pe], dim=-1).reshape(B, M, c + self.r)

        def out_proj(o_lat):                                               # [B,S,H,c] -> [B,S,H,v]
            o = torch.bmm(o_lat.permute(2, 0, 1, 3).reshape(H, B * S, c), w_uv_t.to(o_lat.dtype))
            return o.view(H, B, S, -1).permute(1, 2, 0, 3)

        if S == 1 and not self.hook_attn_probs.active:
            from dsv3lab.kernels import dispatch                         # Triton decode on CUDA
            o_lat = dispatch.mla_decode(q_cat, latent, self.scale, c)      # [B, H, c] or None
            if o_lat is not None:
                return out_proj(o_lat.view(B, 1, H, c))
        # scores laid out [B, T, S*H]: the cache is the row-major left operand, never transposed
        scores = torch.bmm(latent, q_cat.transpose(1, 2)).float() * self.scale
        if S > 1:
            mask = _causal_mask(S, start, latent.device).T                 # [T,S]
            scores = scores.view(B, -1, S, H).masked_fill(~mask[None, :, :, None], float("-inf"))
            scores = scores.view(B, -1, M)
        probs = scores.softmax(dim=1)
        if self.hook_attn_probs.active:
            hooked = self.hook_attn_probs(probs.view(B, -1, S, H).permute(0, 3, 2, 1))   # [B,H,S,T]
            probs = hooked.permute(0, 3, 2, 1).reshape(B, -1, M)
        # multiply by the whole [T, c+r] rows and drop the rope columns after: slicing the
        # cache first would make bmm copy the strided [T, c] view every step
        o_lat = torch.bmm(probs.transpose(1, 2).to(latent.dtype), latent)[..., :c]   # [B, S*H, c]
        return out_proj(o_lat.reshape(B, S, H, c))

    def _expand(self, c_kv, k_pe):
        """Per-head K [B,H,T,n+r] and V [B,H,T,v] from latents c_kv [B,T,c], k_pe [B,T,r]."""
        B, T, _ = c_kv.shape
        H, n = self.n_heads, self.n
        kvb = linear(c_kv, self.kv_b_weight().reshape(H * (n + self.v), self.c).to(c_kv.dtype))
        kvb = kvb.view(B, T, H, n + self.v)
        k = torch.cat([kvb[..., :n], k_pe[:, :, None, :].expand(B, T, H, self.r)], dim=-1)
        return k.transpose(1, 2), kvb[..., n:].transpose(1, 2)

    def _sdpa(self, q, k, v, start):
        """q [B,H,S,n+r], k [B,H,T,n+r], v [B,H,T,v] -> [B,S,H,v] with causal masking."""
        S, T = q.shape[2], k.shape[2]
        dv = v.shape[-1]
        if q.device.type == "cpu" and dv != q.shape[-1]:
            # torch's fused CPU attention needs equal q/k and v head dims (192 vs 128 here);
            # otherwise it falls back to the materialising math path, ~3.5x slower. Zero
            # columns in V change nothing in the first dv output columns.
            v = F.pad(v, (0, q.shape[-1] - dv))
        if S == T:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        elif S == 1:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(S, start, q.device),
                                               scale=self.scale)
        return o[..., :dv].transpose(1, 2)

    def _expanded(self, q_nope, q_pe, latent, start):
        k, v = self._expand(latent[..., :self.c], latent[..., self.c:])
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        return self._sdpa(q, k, v, start)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, start, cache, layer):
        B, S = q_nope.shape[:2]
        k, v = self._expand(c_kv, k_pe)                                   # [B,H,S,*]
        if cache is not None:
            kc, vc = cache.layers[layer]
            kc[:B, start:start + S] = k.transpose(1, 2)
            vc[:B, start:start + S] = v.transpose(1, 2)
            k, v = kc[:B, :start + S].transpose(1, 2), vc[:B, :start + S].transpose(1, 2)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        if self.hook_attn_probs.active:
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.scale
            if S > 1:
                scores = scores.masked_fill(~_causal_mask(S, start, q.device), float("-inf"))
            probs = self.hook_attn_probs(scores.softmax(-1))
            return (probs.to(v.dtype) @ v).transpose(1, 2)
        return self._sdpa(q, k, v, start)
