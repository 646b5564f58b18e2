"""DeepSeek-V4's compressed KV: a learned pooling of every m tokens into one entry, and CSA's indexer.

A ``WindowPool`` turns the tokens of one sequence into compressed entries (V4 report sec. 2.3):

  C = x W_kv,  Z = x W_gate + B        per token, B = ``position_bias`` [m, .] by place in window
  entry_w = kv_norm( sum_j softmax_j(Z_j) * C_j )        j over the window's slots, per channel
  rope at position w * m (the window's first token), "compress" table, on the last r channels

- HCA (heavily compressed, m' = 128): non-overlapping windows [w m', (w+1) m').
- CSA (compressed sparse, m = 4): ``overlap``: each token projects to 2d channels, two series
  Ca = [:d] and Cb = [d:]; entry w pools Ca of window w-1 and Cb of window w (2m slots, stride m),
  so neighbouring entries share information; window 0's Ca slots have gate -inf (weight 0).

An entry exists once its window has closed: query t sees entry w iff (w+1) m - 1 <= t, i.e.
w < (t+1) // m. Tokens of an unclosed window wait in the state's buffer; the last closed window's
Ca waits as ``prev`` for the next entry. A forward without a cache runs the same code on a fresh
state (a pool over [0, S)), so a cached decode computes exactly what a full forward computes.

CSA adds a lightning indexer (``Indexer``) with its own pool at ``index_head_dim``: queries
q = q_b_proj(q_latent) [B,S,H_I,D_I] (RoPE at the query positions), score
I[t,w] = sum_h w_h(x_t) relu(q_th . K_w) D_I^-1/2 with w_h = weights_proj(x) H_I^-1/2, future
entries -inf; each query keeps top-min(index_topk, entries) (equal scores: the lower index) and
slots pointing past its visible entries hold -1.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3lab.model.layers import HookPoint, Linear
from dsv3lab.model.v4_layers import RMSNormF32, rope_tail


class PoolState:
    """What a pool keeps between calls for B sequences: the unclosed window's projected tokens
    (< m rows), the last closed window's Ca (CSA), and the entries so far (preallocated)."""

    def __init__(self, batch: int, capacity: int, width: int, dtype, device):
        self.buf_kv = self.buf_gate = None          # [B, <m, X]
        self.prev_kv = self.prev_gate = None        # [B, m, d]   (overlapping pools only)
        self.entries = torch.zeros(batch, capacity, width, dtype=dtype, device=device)
        self.count = 0

    def tensors(self):
        for t in (self.buf_kv, self.buf_gate, self.prev_kv, self.prev_gate, self.entries):
            if t is not None:
                yield t

    def mark(self) -> tuple:
        """A restore point. Buffers are replaced, never written, and ``append`` writes past
        ``count`` only, so references and the count restore the state exactly."""
        return self.buf_kv, self.buf_gate, self.prev_kv, self.prev_gate, self.entries, self.count

    def rewind(self, mark: tuple) -> None:
        self.buf_kv, self.buf_gate, self.prev_kv, self.prev_gate, self.entries, self.count = mark

    def append(self, new: torch.Tensor) -> torch.Tensor:
        n = new.shape[1]
        if self.count + n > self.entries.shape[1]:
            grown = self.entries.new_zeros(self.entries.shape[0], self.count + n, self.entries.shape[2])
            grown[:, :self.count] = self.entries[:, :self.count]
            self.entries = grown
        self.entries[:, self.count:self.count + n] = new.to(self.entries.dtype)
        self.count += n
        return self.entries[:, :self.count]


class WindowPool(nn.Module):
    """kv_proj, gate_proj, position_bias, kv_norm: the learned pooling of one compressed series."""

    def __init__(self, dim: int, width: int, rate: int, overlap: bool, eps: float, dtype=None, device=None):
        super().__init__()
        self.width, self.rate, self.overlap = width, rate, overlap
        out = 2 * width if overlap else width
        self.kv_proj = Linear(dim, out, dtype, device)
        self.gate_proj = Linear(dim, out, dtype, device)
        self.position_bias = nn.Parameter(torch.empty(rate, out, dtype=torch.float32, device=device))
        self.kv_norm = RMSNormF32(width, eps, device)

    def new_state(self, batch: int, max_len: int, dtype, device) -> PoolState:
        return PoolState(batch, max_len // self.rate, self.width, dtype, device)

    def pool(self, x: torch.Tensor, state: PoolState, rope) -> torch.Tensor:
        """Feed x [B,S,D] (the next S positions), return every entry so far [B, n, width]."""
        B = x.shape[0]
        m, d = self.rate, self.width
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        if state.buf_kv is not None and state.buf_kv.shape[1]:
            kv, gate = torch.cat([state.buf_kv, kv], 1), torch.cat([state.buf_gate, gate], 1)
        first = state.count * m
        usable = kv.shape[1] // m * m
        state.buf_kv, state.buf_gate = kv[:, usable:], gate[:, usable:]
        nw = usable // m
        if nw == 0:
            return state.entries[:, :state.count]
        ckv = kv[:, :usable].view(B, nw, m, -1)
        cg = gate[:, :usable].view(B, nw, m, -1) + self.position_bias
        if self.overlap:
            slots_kv = ckv.new_zeros(B, nw, 2 * m, d)
            slots_g = cg.new_full((B, nw, 2 * m, d), float("-inf"))
            slots_kv[:, :, m:], slots_g[:, :, m:] = ckv[..., d:], cg[..., d:]
            if nw > 1:
                slots_kv[:, 1:, :m], slots_g[:, 1:, :m] = ckv[:, :-1, :, :d], cg[:, :-1, :, :d]
            if state.prev_kv is not None:
                slots_kv[:, 0, :m], slots_g[:, 0, :m] = state.prev_kv.to(slots_kv.dtype), state.prev_gate.to(slots_g.dtype)
            state.prev_kv, state.prev_gate = ckv[:, -1, :, :d].clone(), cg[:, -1, :, :d].clone()
            ckv, cg = slots_kv, slots_g
        pooled = (ckv * cg.softmax(dim=2, dtype=torch.float32).to(ckv.dtype)).sum(dim=2)
        pooled = self.kv_norm(pooled)
        pos = torch.arange(nw, device=x.device) * m + first
        cos, sin = rope("compress", pos)
        return state.append(rope_tail(pooled, cos, sin))


def visible_entries(positions: torch.Tensor, rate: int) -> torch.Tensor:
    """How many compressed entries each query position may see: (t + 1) // m, [S]."""
    return (positions + 1) // rate


class Indexer(WindowPool):
    """CSA's lightning indexer over compressed entries (its own pool at ``index_head_dim``)."""

    def __init__(self, cfg, rate: int, dtype=None, device=None):
        super().__init__(cfg.hidden_size, cfg.index_head_dim, rate, True, cfg.rms_norm_eps, dtype, device)
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, dtype, device)
        self.weights_proj = Linear(cfg.hidden_size, cfg.index_n_heads, dtype, device)
        self.hook_keys = HookPoint("[B,n,D_I] compressed indexer keys so far")
        self.hook_scores = HookPoint("[B,S,n] index scores over compressed entries (-inf: not yet closed)")
        self.hook_topk_indices = HookPoint("[B,S,k] chosen compressed entries, -1 = unused slot")

    def forward(self, x, q_latent, positions, state: PoolState, rope) -> torch.Tensor:
        B, S, _ = x.shape
        keys = self.hook_keys(self.pool(x, state, rope))                        # [B,n,D_I]
        cos, sin = rope("compress", positions)
        q = self.q_b_proj(q_latent).view(B, S, self.n_heads, -1)
        q = rope_tail(q, cos[:, None], sin[:, None])
        scores = (q.float() @ keys.float()[:, None].transpose(-1, -2)).relu() * q.shape[-1] ** -0.5   # [B,S,H,n]
        w = self.weights_proj(x).float() * self.n_heads ** -0.5
        scores = (scores * w[..., None]).sum(dim=2)                             # [B,S,n]
        n = keys.shape[1]
        k = min(self.topk, n)
        if n == 0:
            return torch.empty(B, S, 0, dtype=torch.long, device=x.device)
        vis = visible_entries(positions, self.rate)                            # [S]
        future = torch.arange(n, device=x.device)[None, :] >= vis[:, None]      # [S,n]
        scores = self.hook_scores(scores.masked_fill(future, float("-inf")))
        # equal scores (relu zeroes every head for some entries) go to the lower entry index, so
        # a decode step and a full forward choose alike
        idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        idx = torch.where(idx >= vis[None, :, None], torch.full_like(idx, -1), idx)
        return self.hook_topk_indices(idx)


class Compressor(WindowPool):
    """The layer's compressed KV: HCA (no overlap, no indexer) or CSA (overlap + ``indexer``)."""

    def __init__(self, cfg, sparse: bool, dtype=None, device=None):
        rate = cfg.csa_rate if sparse else cfg.hca_rate
        super().__init__(cfg.hidden_size, cfg.head_dim, rate, sparse, cfg.rms_norm_eps, dtype, device)
        self.indexer = Indexer(cfg, rate, dtype, device) if sparse else None
        self.hook_entries = HookPoint("[B,n,d] compressed KV entries so far (what the cache holds)")

    def forward(self, x, q_latent, positions, state: "CompressedState", rope):
        """-> entries [B,n,d] and what each query attends to: HCA ``keep`` [B,S,n] bool over all
        entries; CSA the indexer's ``idx`` [B,S,k] (-1 = unused slot)."""
        entries = self.hook_entries(self.pool(x, state.kv, rope))
        n = entries.shape[1]
        if self.indexer is None:
            vis = visible_entries(positions, self.rate)
            keep = torch.arange(n, device=x.device)[None, :] < vis[:, None]      # [S,n]
            return entries, keep[None].expand(x.shape[0], -1, -1)
        return entries, self.indexer(x, q_latent, positions, state.index, rope)


class CompressedState:
    """One layer's compressor state: the KV pool's and (CSA) the indexer's."""

    def __init__(self, comp: Compressor, batch: int, max_len: int, dtype, device):
        self.kv = comp.new_state(batch, max_len, dtype, device)
        self.index = comp.indexer.new_state(batch, max_len, dtype, device) if comp.indexer is not None else None

    def tensors(self):
        yield from self.kv.tensors()
        if self.index is not None:
            yield from self.index.tensors()

    def mark(self) -> tuple:
        return self.kv.mark(), self.index.mark() if self.index is not None else None

    def rewind(self, mark: tuple) -> None:
        self.kv.rewind(mark[0])
        if self.index is not None:
            self.index.rewind(mark[1])
