"""DeepSeek-V4 attention: shared-KV MQA with sinks over a sliding window plus compressed entries.

Per layer (V4 report sec. 2.3; transformers' ``DeepseekV4Attention``), for S new tokens at
positions [start, start + S), B batch, H heads, d = head_dim, r = qk_rope_head_dim:

  q_latent = q_a_norm(q_a_proj(x))                              [B,S,q_lora_rank]
  q        = unit_rms(q_b_proj(q_latent))  per head, RoPE on the last r channels   [B,S,H,d]
  kv       = kv_norm(kv_proj(x)), RoPE on the last r channels  [B,S,d]   ONE head, key AND value
  keys     = the sliding window (query t sees positions t-W+1 .. t)
             + compressed entries (CSA: the indexer's top-k; HCA: every closed window)
  logits   = q . keys * d^-1/2,  plus one learned logit ``sinks[h]`` per head with no value:
  p        = softmax([logits ; sink])[:-1]      the sink takes probability mass and returns nothing
  o        = p @ keys, then RoPE at -position on the last r channels (values carry RoPE too,
             since they ARE the keys; rotating back leaves each key's contribution a function of
             the distance t - s only)                           [B,S,H,d]
  out      = o_b_proj(o_a_proj(o grouped in o_groups))          [B,S,D]

Sliding layers use the "main" RoPE (``rope_theta``); CSA/HCA layers and their compressors the
"compress" one (``compress_rope_theta`` + YaRN).

The cache (``V4LayerCache``) holds the last W-1 window rows and the compressor's state: per
token of context a CSA layer keeps d/m + D_I/m values (plus the constant window), an HCA layer
d/m', a sliding layer nothing that grows. Decode with a cache runs the same code as a full
forward (the window and the pools are fed chunk by chunk), so they agree (tests/test_v4.py).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3lab.model.layers import HookPoint, Linear
from dsv3lab.model.v4_compressor import CompressedState, Compressor
from dsv3lab.model.v4_layers import GroupedLinear, RMSNormF32, rms_unit, rope_tail


class V4LayerCache:
    """One layer's state for B sequences: the window's last W-1 rows and the compressor state."""

    def __init__(self, attn: "V4Attention", batch: int, max_len: int, dtype, device):
        W = attn.cfg.sliding_window
        self.window = torch.zeros(batch, max(W - 1, 0), attn.head_dim, dtype=dtype, device=device)
        self.filled = 0                               # valid rows at the end of ``window``
        self.length = 0                               # positions fed so far
        self.comp = (CompressedState(attn.compressor, batch, max_len, dtype, device)
                     if attn.compressor is not None else None)

    def tensors(self):
        yield self.window
        if self.comp is not None:
            yield from self.comp.tensors()

    def mark(self) -> tuple:
        """A restore point: the window is written in place (copied), the rest only replaced."""
        return self.window.clone(), self.filled, self.length, self.comp.mark() if self.comp is not None else None

    def rewind(self, mark: tuple) -> None:
        window, self.filled, self.length, comp = mark
        self.window.copy_(window)
        if comp is not None:
            self.comp.rewind(comp)


class V4Attention(nn.Module):
    def __init__(self, cfg, layer: int, dtype=None, device=None):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        n = cfg.num_hidden_layers             # layers past n are the MTP blocks
        self.layer_type = cfg.layer_types[layer] if layer < n else cfg.mtp_layer_types[layer - n]
        self.rope_kind = "main" if self.layer_type == "sliding_attention" else "compress"
        D, H, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.eps = H, d, cfg.rms_norm_eps
        self.q_a_proj = Linear(D, cfg.q_lora_rank, dtype, device)
        self.q_a_norm = RMSNormF32(cfg.q_lora_rank, cfg.rms_norm_eps, device)
        self.q_b_proj = Linear(cfg.q_lora_rank, H * d, dtype, device)
        self.kv_proj = Linear(D, d, dtype, device)
        self.kv_norm = RMSNormF32(d, cfg.rms_norm_eps, device)
        self.o_a_proj = GroupedLinear(H * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, cfg.o_groups, dtype, device)
        self.o_b_proj = Linear(cfg.o_groups * cfg.o_lora_rank, D, dtype, device)
        self.sinks = nn.Parameter(torch.empty(H, dtype=torch.float32, device=device))
        self.compressor = (None if self.layer_type == "sliding_attention" else
                           Compressor(cfg, self.layer_type == "compressed_sparse_attention", dtype, device))
        self.hook_q = HookPoint("[B,S,H,d] rotated queries")
        self.hook_kv = HookPoint("[B,S,d] rotated shared key/value of the new tokens (window rows)")
        self.hook_attn_probs = HookPoint("[B,H,S,T] probabilities over window rows then compressed entries, "
                                         "sink dropped (computed only when hooked)")
        self.hook_sink_share = HookPoint("[B,H,S] probability mass the sink absorbed (computed only when hooked)")
        self.hook_out = HookPoint("[B,S,H,d] per-head outputs, rotated back, before the grouped projection")

    def forward(self, x: torch.Tensor, rope, start: int = 0, cache: V4LayerCache | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        H, d, W = self.n_heads, self.head_dim, self.cfg.sliding_window
        pos = torch.arange(start, start + S, device=x.device)
        cos, sin = rope(self.rope_kind, pos)
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = rms_unit(self.q_b_proj(q_latent).view(B, S, H, d), self.eps)
        q = self.hook_q(rope_tail(q, cos[:, None], sin[:, None]))
        kv = self.hook_kv(rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin))

        # window rows: the cached tail (positions start-filled .. start-1) then the new tokens
        if cache is not None:
            if start != cache.length:
                raise ValueError(f"V4 caches are fed in order: this layer holds {cache.length} positions, "
                                 f"the call starts at {start}")
            rows = torch.cat([cache.window[:B, cache.window.shape[1] - cache.filled:], kv], dim=1)
            row_pos = torch.arange(start - cache.filled, start + S, device=x.device)
        else:
            if start != 0:
                raise ValueError("a forward without a cache starts at position 0")
            rows, row_pos = kv, pos
        see = (row_pos[None, :] <= pos[:, None]) & (row_pos[None, :] > pos[:, None] - W)      # [S,R]
        see = see[None].expand(B, -1, -1)
        extra = extra_ok = None                      # compressed keys: [B,n,d] for all, or [B,S,k,d] gathered
        if self.compressor is not None:
            state = cache.comp if cache is not None else CompressedState(self.compressor, B, S, x.dtype, x.device)
            entries, chosen = self.compressor(x, q_latent, pos, state, rope)
            entries = entries.to(kv.dtype)
            if chosen.dtype == torch.bool:           # HCA: every closed window, masked per query
                extra, extra_ok = entries, chosen
            else:                                    # CSA: only the indexer's top-k, gathered
                extra_ok = chosen >= 0
                g = chosen.clamp(min=0)
                self.last_entries, self.last_chosen = entries.shape[1], g
                extra = torch.gather(entries[:, None].expand(B, S, -1, -1), 2,
                                     g[..., None].expand(-1, -1, -1, entries.shape[-1]))
        if cache is not None:
            tail = rows[:, -cache.window.shape[1]:] if cache.window.shape[1] else rows[:, :0]
            n = tail.shape[1]
            if n:
                cache.window[:B, cache.window.shape[1] - n:] = tail
            cache.filled = min(cache.window.shape[1], cache.filled + S)
            cache.length = start + S

        o = self.attend(q, rows, see, extra, extra_ok)                               # [B,S,H,d]
        o = self.hook_out(rope_tail(o, cos[:, None], -sin[:, None]))
        o = self.o_a_proj(o.reshape(B, S, self.cfg.o_groups, -1)).flatten(2)
        return self.o_b_proj(o)

    def attend(self, q, rows, see, extra=None, extra_ok=None) -> torch.Tensor:
        """q [B,S,H,d] over window rows [B,R,d] (``see`` [B,S,R]) and compressed keys: all
        entries [B,n,d] with ``extra_ok`` [B,S,n] (HCA) or each query's gathered ones [B,S,k,d]
        with ``extra_ok`` [B,S,k] (CSA); keys are their own values; one softmax with the sink."""
        B, S, H, d = q.shape
        # matmuls, not einsums: torch's flop counter (probes/v4_cost.py) then sees every product
        qh, scale = q.float().transpose(1, 2), d ** -0.5                       # [B,H,S,d]
        rows_f = rows.float()[:, None]                                          # [B,1,R,d]
        parts = [(qh @ rows_f.transpose(-1, -2)).masked_fill(~see[:, None], float("-inf")) * scale]
        if extra is not None:
            ef = extra.float()
            if ef.dim() == 4:                        # per query: [B,S,H,d] @ [B,S,d,k] -> [B,H,S,k]
                lc = (q.float() @ ef.transpose(-1, -2)).transpose(1, 2)
            else:
                lc = qh @ ef[:, None].transpose(-1, -2)
            parts.append(lc.masked_fill(~extra_ok[:, None], float("-inf")) * scale)
        parts.append(self.sinks.float().view(1, H, 1, 1).expand(B, H, S, 1))
        full = torch.cat(parts, dim=-1)
        probs = (full - full.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        if self.hook_sink_share.active:
            self.hook_sink_share(probs[..., -1])
        R = rows.shape[1]
        p_rows, p_extra = probs[..., :R], probs[..., R:-1]
        if self.hook_attn_probs.active:
            dense = p_extra
            if extra is not None and extra.dim() == 4:      # scatter the gathered columns back over entries
                n = self.last_entries
                dense = p_extra.new_zeros(B, H, S, n + 1).scatter_add_(
                    -1, torch.where(extra_ok, self.last_chosen, n)[:, None].expand(-1, H, -1, -1), p_extra)[..., :n]
            p = self.hook_attn_probs(torch.cat([p_rows, dense], dim=-1))
            p_rows, p_extra = p[..., :R], p[..., R:]
            if extra is not None and extra.dim() == 4:      # a replaced view is read back at the selection
                p_extra = torch.gather(p_extra, -1, self.last_chosen[:, None].expand(-1, H, -1, -1)) * extra_ok[:, None]
        o = p_rows @ rows_f                                                     # [B,H,S,d]
        if extra is not None:
            if ef.dim() == 4:
                o = o + (p_extra.transpose(1, 2) @ ef).transpose(1, 2)
            else:
                o = o + p_extra @ ef[:, None]
        return o.transpose(1, 2).to(q.dtype)
