"""The lightning indexer of DeepSeek-V3.2 (DeepSeek Sparse Attention, DSA), and its key cache.

Every V3.2 layer scores each query s against every earlier key t with a cheap, separate attention
and lets MLA see only the ``index_topk`` best keys (V3.2 report, sec. 2.1). Shapes (B batch, S new
queries, T = start + S visible keys, H = index_n_heads, D = index_head_dim, r = qk_rope_head_dim):

  q   = wq_b(q_latent)              [B,S,H,D]  q_latent = q_a_layernorm(q_a_proj(x)), shared with MLA
  k   = k_norm(wk(x))               [B,S,D]    one key per token, shared by all indexer heads
        k_norm is a LayerNorm with a bias (not an RMSNorm like the rest of the model)
  RoPE on the *first* r dims of q and k, half-split pairs (i, i + r/2): not interleaved like MLA's,
        and in the order [rope, rest], the reverse of MLA's [nope, rope]. GLM-5's indexer
        (``cfg.index_rope_interleave``) rotates interleaved pairs (2i, 2i+1) like MLA instead;
        transformers writes those rotated pairs de-interleaved ([evens ; odds]), the same
        permutation for q and k, so its scores are these and its hook_q/hook_k layout is not
  w   = weights_proj(x) * H^-0.5    [B,S,H]    per-query head weights (fp32 weights, fp32 arithmetic)
  I[s,t] = sum_h w[s,h] * relu(q[s,h] . k[t]) * D^-0.5              [B,S,T], -inf for t > s
  topk_indices = top-k(I[s], min(index_topk, T))                    [B,S,k]

Slots of a query that sees fewer than k keys (early positions in a prefill) hold -1. Main attention
then attends to the selected keys only (``attn_sparse.py``); with ``index_topk >= T`` every visible
key is selected and DSA is dense MLA exactly.

Two entry points: ``forward`` (any S; fires every hook point, returns [B,S,k] in score order) and
``decode_select`` (one query per sequence, the attention's fast decode path while nothing is hooked
on the scores or the selection): one [T,D] x [D,H] product per sequence straight from the key
cache, ReLU, the head-weighted sum, an unsorted top-k -- no [B,S,T] -inf mask, no future-key
masking (a decode query sees every cached key), no sort. Both select the same key set, ties
included (``select_topk``'s rule). The CPU decode fast path (``dsv3lab/fast/sparse.py``) runs the
same selection as one C call per sequence in a bf16 model; this module is its reference.

Key formats (``Indexer.key_format``; the cache follows it):
  "model"  keys kept in the model's dtype, no rotation: the arithmetic transformers uses.
  "bf16"   keys stored in bf16 (queries stay in the model dtype); scores in fp32.
  "fp8"    the official inference layout: q and k are first rotated by an orthonormal Hadamard
           matrix (``hadamard.py``), then quantized to e4m3 with one fp32 scale per 128 values
           (``fp8.act_quant``; one scale per key at D = 128): 128 + 4 = 132 bytes per token per
           layer. Scores are computed from the dequantized values in fp32.
What the rotation does: an outlier channel of q or k is spread evenly over all D values, so the
amax of each 128-block -- the FP8 scale -- is set by the vector's norm rather than its largest
entry, and small channels keep more of e4m3's 3 mantissa bits. What it does not do: change any
score in exact arithmetic (H is orthogonal: (qH).(kH) = q.k), so without quantization it is a
no-op up to float rounding (tested). FP8 selections differ from the exact ones only where two
keys' scores are closer than the quantization error (near-ties; ``tests/test_dsa.py``).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from dsv3lab.model.hadamard import hadamard
from dsv3lab.model.layers import HookPoint, LayerNorm, Linear, hooked, linear
from dsv3lab.model.rope import apply_rope, apply_rope_half

KEY_FORMATS = ("model", "bf16", "fp8")
FP8_BLOCK = 128
# query rows x keys x heads held at once while scoring a prefill chunk (fp32: 4 bytes each)
_SCORE_CHUNK_ELEMS = 1 << 24
_KEY_CHUNK = 4096          # fp32 key rows scored at a time
# a decode step scores bf16 keys in row counts rounded up to this: the count then changes once
# per _KEY_BUCKET steps, not every step, and the oneDNN GEMM set up for a new shape (~1 ms at 8K
# keys, more than the product) is reused in between
_KEY_BUCKET = 256


def fp8_block(head_dim: int) -> int:
    """Values per FP8 scale: 128 (the official layout), or the whole key when D < 128."""
    return min(FP8_BLOCK, head_dim)


def fp8_roundtrip(x: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """Quantize x [..., D] to e4m3 with one fp32 scale per block of the last dim and back (fp32)."""
    from dsv3lab.fp8 import act_dequant, act_quant
    b = fp8_block(x.shape[-1])
    q, s = act_quant(x, b, scale_fmt)
    return act_dequant(q, s, b)


class IndexerKeyCache:
    """The indexer's per-layer key cache: [B, max_len, D] in the model dtype or bf16, or (for
    ``key_format="fp8"``) e4m3 [B, max_len, D] plus fp32 scales [B, max_len, D / 128]."""

    def __init__(self, head_dim: int, n_layers: int, batch: int, max_len: int, key_format: str,
                 dtype, device, scale_fmt: str | None = None, keyed: list[bool] | None = None):
        """``keyed[i]`` False: slot i has no indexer (a GLM-5 shared layer) and holds no keys (an
        empty [batch, 0, D] tensor, so a write there fails instead of going unnoticed)."""
        if key_format not in KEY_FORMATS:
            raise ValueError(f"indexer key_format must be one of {KEY_FORMATS}, got {key_format!r}")
        self.key_format, self.scale_fmt = key_format, scale_fmt
        self.head_dim, self.batch, self.max_len = head_dim, batch, max_len
        keyed = [True] * n_layers if keyed is None else list(keyed)
        if len(keyed) != n_layers:
            raise ValueError(f"keyed needs one entry per cache slot ({n_layers}), got {len(keyed)}")
        if key_format == "fp8":
            nb = head_dim // fp8_block(head_dim)
            self.layers = [(torch.zeros(batch, max_len if on else 0, head_dim, dtype=torch.float8_e4m3fn, device=device),
                            torch.zeros(batch, max_len if on else 0, nb, dtype=torch.float32, device=device))
                           for on in keyed]
        else:
            dt = torch.bfloat16 if key_format == "bf16" else dtype
            self.layers = [torch.zeros(batch, max_len if on else 0, head_dim, dtype=dt, device=device)
                           for on in keyed]

    def write(self, layer: int, k: torch.Tensor, start: int) -> None:
        """Store keys k [B,S,D] (already rotated when the format is fp8) at [start, start+S)."""
        B, S, _ = k.shape
        buf = self.layers[layer]
        if self.key_format == "fp8":
            from dsv3lab.fp8 import act_quant
            q, s = act_quant(k, fp8_block(self.head_dim), self.scale_fmt)
            buf[0][:B, start:start + S] = q
            buf[1][:B, start:start + S] = s
        else:
            buf[:B, start:start + S] = k

    def read(self, layer: int, batch: int, end: int) -> torch.Tensor:
        """Keys of positions [0, end) as [B, end, D]: the stored tensor (a view), or for fp8 the
        dequantized values in fp32."""
        buf = self.layers[layer]
        if self.key_format == "fp8":
            from dsv3lab.fp8 import act_dequant
            return act_dequant(buf[0][:batch, :end], buf[1][:batch, :end], fp8_block(self.head_dim))
        return buf[:batch, :end]

    def read_bucketed(self, layer: int, batch: int, end: int, bucket: int) -> torch.Tensor:
        """The stored keys of positions [0, end') with end' = end rounded up to ``bucket`` (at most
        max_len): a view, for the "model" and "bf16" formats; rows past ``end`` hold whatever the
        buffer holds there (zeros or a longer sequence's keys) and must not be used."""
        if self.key_format == "fp8":
            raise ValueError("read_bucketed reads the stored tensor; fp8 keys are read dequantized (read)")
        return self.layers[layer][:batch, :min(self.max_len, -(-end // bucket) * bucket)]

    def nbytes(self) -> int:
        n = 0
        for buf in self.layers:
            for t in (buf if isinstance(buf, tuple) else (buf,)):
                n += t.numel() * t.element_size()
        return n


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, start: int) -> torch.Tensor:
    """I[b,s,t] = sum_h w[b,s,h] relu(q[b,s,h] . keys[b,t]) in fp32, -inf where t > start + s.

    q [B,S,H,D], w [B,S,H] (fp32, the D^-0.5 and H^-0.5 folded in), keys [B,T,D] -> [B,S,T].
    The keys are the left operand ([t,D] @ [D,s*H]), so the cache is read row-major and never
    transposed. Queries are taken in chunks (bounding the [t, s*H] buffer of a long prefill).
    fp32 keys (the "model" format of an fp32 model, dequantized FP8) are scored in fp32, in
    blocks of _KEY_CHUNK rows (blocks entirely after a chunk's last query are skipped); bf16 keys
    by one bf16 GEMM per sequence (see below).
    """
    B, S, H, D = q.shape
    T = keys.shape[1]
    if S == 1 and keys.dtype == torch.bfloat16:
        return decode_scores(q[:, 0], w[:, 0], keys)[:, None]              # [B,1,T]
    out = torch.full((B, S, T), float("-inf"), dtype=torch.float32, device=q.device)
    tstep = _KEY_CHUNK
    rows = T if keys.dtype == torch.bfloat16 else min(T, tstep)            # keys scored at once
    sstep = max(1, _SCORE_CHUNK_ELEMS // max(1, rows * H))
    wf = w.float()
    for s0 in range(0, S, sstep):
        s1 = min(S, s0 + sstep)
        n = s1 - s0
        if keys.dtype == torch.bfloat16:
            # bf16 keys: q.k by the engine's bf16 GEMM policy (``layers.linear``: native bf16
            # where the CPU has bf16 units, else upcast), the logits rounded to bf16 -- 2^-9
            # relative, the rounding the keys were stored with -- before the fp32 head sum
            qb = q[:, s0:s1].reshape(B, n * H, D).to(torch.bfloat16)
            logits = torch.stack([linear(keys[b], qb[b]) for b in range(B)]).float().clamp_min_(0)
            out[:, s0:s1] = torch.einsum("btsh,bsh->bst", logits.view(B, T, n, H), wf[:, s0:s1])
            continue
        qc = q[:, s0:s1].float().reshape(B, n * H, D).transpose(1, 2)      # [B,D,s*H]
        for t0 in range(0, min(T, start + s1), tstep):
            t1 = min(T, t0 + tstep)
            logits = torch.bmm(keys[:, t0:t1].float(), qc).clamp_min_(0)    # relu, [B,t,s*H]
            out[:, s0:s1, t0:t1] = torch.einsum("btsh,bsh->bst", logits.view(B, t1 - t0, n, H),
                                                wf[:, s0:s1])
    if S > 1:
        qpos = torch.arange(start, start + S, device=q.device)[:, None]
        future = torch.arange(T, device=q.device)[None, :] > qpos                # [S,T]
        out.masked_fill_(future[None], float("-inf"))
    return out


def decode_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One query per sequence: I[b,t] = sum_h w[b,h] relu(q[b,h] . keys[b,t]) -> [B,T] fp32, every
    key visible. q [B,H,D], w [B,H] fp32, keys [B,T,D] bf16 (read once, in place) or fp32.

    bf16 keys: [T,D] @ [D,H] by the engine's bf16 GEMM policy (``layers.linear``), logits rounded
    to bf16 (as in ``index_scores``), then ReLU and the fp32 head sum as one [T,H] x [H] GEMV;
    fp32 keys: the same in fp32. Nothing of size T x D is copied or converted."""
    B, T = keys.shape[0], keys.shape[1]
    qk, wf = q.to(keys.dtype), w.float()

    def one(b: int, out=None) -> torch.Tensor:
        logits = linear(keys[b], qk[b]) if keys.dtype == torch.bfloat16 else torch.mm(keys[b], qk[b].T)
        return torch.mv(logits.float().clamp_min_(0), wf[b], out=out)      # [T]
    if B == 1:
        return one(0)[None]
    out = torch.empty(B, T, dtype=torch.float32, device=keys.device)
    for b in range(B):
        one(b, out[b])
    return out


def decode_topk(scores: torch.Tensor, index_topk: int) -> torch.Tensor:
    """Top-min(index_topk, T) positions of decode scores [B,T] (every key visible) -> [B,k] int64,
    in no particular order: the same key set as ``select_topk`` (ties included), without its sort."""
    T = scores.shape[-1]
    k = min(index_topk, T)
    if k >= T:
        return torch.arange(T, device=scores.device).expand(scores.shape[0], T)
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    thr = vals.amin(-1, keepdim=True)                                      # the k-th best score
    # each row has k scores >= its k-th best; more means a key left out ties with one kept
    if int(torch.count_nonzero(scores >= thr)) > idx.numel():
        # an exact tie at the k-th score (rare in decode but possible): the reference tie rule
        return select_topk(scores[:, None], index_topk)[:, 0]
    return idx


def select_topk(scores: torch.Tensor, index_topk: int) -> torch.Tensor:
    """Top-min(index_topk, T) key positions per query [B,S,k] (int64); -1 where the query sees
    fewer than k keys (its remaining top-k entries would be masked, -inf, positions)."""
    k = min(index_topk, scores.shape[-1])
    vals, idx = scores.topk(k, dim=-1)
    thr = vals[..., -1:]                                                   # the k-th best score
    tied = (scores == thr) & (thr > float("-inf"))
    if k < scores.shape[-1] and bool((tied.sum(-1) > 1).any()):
        # Exact ties at the k-th score (all-zero relu sums are common): topk breaks them by its
        # own algorithm, which differs between a [T] decode row and an [S,T] prefill; take the
        # earliest tied positions instead, so every path selects the same keys.
        need = k - (scores > thr).sum(-1, keepdim=True)
        sel = (scores > thr) | (tied & (tied.cumsum(-1) <= need))
        pos = torch.arange(scores.shape[-1], device=scores.device)
        # the k selected positions, earliest first (a selected slot scores T - t > 0)
        order = torch.where(sel, scores.shape[-1] - pos, 0).topk(k, dim=-1).indices
        idx = torch.where(torch.gather(sel, -1, order), order, idx)
    return idx.masked_fill_(vals == float("-inf"), -1)


class Indexer(nn.Module):
    """The lightning indexer of one layer (submodule ``self_attn.indexer``, checkpoint keys
    ``wq_b``, ``wk``, ``k_norm.{weight,bias}``, ``weights_proj``)."""

    def __init__(self, cfg, dtype=None, device=None):
        super().__init__()
        if not cfg.q_lora_rank:
            raise ValueError("the V3.2 indexer reads the q latent: q_lora_rank must be > 0")
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.index_topk = cfg.qk_rope_head_dim, cfg.index_topk
        # pairs (2i, 2i+1) (GLM-5) or (i, i + r/2) (V3.2); the CPU fast path's C rotates half-split only
        self.rope_interleave = cfg.index_rope_interleave
        if self.rope_dim > self.head_dim:
            raise ValueError(f"index_head_dim {self.head_dim} must be >= qk_rope_head_dim {self.rope_dim}")
        self.scale_fmt = getattr(cfg, "scale_fmt", None)
        self.key_format = "model"      # "model", "bf16" or "fp8"; the model sets it for every layer
        H, D = self.n_heads, self.head_dim
        self.wq_b = Linear(cfg.q_lora_rank, H * D, dtype, device)
        self.wk = Linear(cfg.hidden_size, D, dtype, device)
        self.k_norm = LayerNorm(D, 1e-6, dtype, device)
        # fp32 as transformers keeps it: the head weights decide which keys win
        self.weights_proj = Linear(cfg.hidden_size, H, torch.float32, device)
        self.hook_q = HookPoint("[B,S,H_I,D_I] indexer queries after RoPE")
        self.hook_k = HookPoint("[B,S,D_I] indexer keys after k_norm and RoPE (what is cached)")
        self.hook_weights = HookPoint("[B,S,H_I] fp32 head weights, H_I^-0.5 * D_I^-0.5 folded in")
        self.hook_scores = HookPoint("[B,S,T] fp32 index scores I[s,t]; -inf for t > s")
        self.hook_topk_indices = HookPoint("[B,S,k] int64 selected key positions, k = min(index_topk, T); -1 = none")
        # fired by the sparse attention, not here: what the selection is measured against
        self.hook_dense_probs = HookPoint("[B,H,S,T] MLA's dense softmax over every visible key (computed only when hooked)")

    @property
    def rotate(self) -> bool:
        return self.key_format == "fp8"

    def project(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries [B,S,H,D], keys [B,S,D] (rotated by RoPE) and head weights [B,S,H] (fp32)."""
        B, S, _ = x.shape
        H, D, r = self.n_heads, self.head_dim, self.rope_dim
        k = self.k_norm(self.wk(x))
        # the H queries and the key share positions: one RoPE over [B,S,H+1,r] instead of two
        # (a decode step is made of small ops; each one costs about as much as its arithmetic)
        qk = torch.cat([self.wq_b(q_latent).view(B, S, H, D), k[:, :, None]], dim=2)
        rope = apply_rope if self.rope_interleave else apply_rope_half
        qk = torch.cat([rope(qk[..., :r], cos[:, None], sin[:, None]), qk[..., r:]], dim=-1)
        q, k = qk[:, :, :H], qk[:, :, H]
        w = F.linear(x.float(), self.weights_proj.weight.float()) * (H ** -0.5 * D ** -0.5)
        return self.hook_q(q), self.hook_k(k), self.hook_weights(w)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int = 0, cache: IndexerKeyCache | None = None, layer: int = 0) -> torch.Tensor:
        """x [B,S,hidden], q_latent [B,S,q_lora_rank] -> selected key positions [B,S,k] (int64)."""
        q, w, keys = self.scoring_inputs(x, q_latent, cos, sin, start, cache, layer)
        scores = self.hook_scores(index_scores(q, w, keys, start))
        return self.hook_topk_indices(select_topk(scores, self.index_topk))

    @property
    def fast_decode_ok(self) -> bool:
        """``decode_select`` may stand in for ``forward``: nothing would see the scores, the
        selection or the module's own call."""
        mods = self._modules                     # by dict: called every layer of every decode step
        return not hooked(self, mods["hook_scores"], mods["hook_topk_indices"])

    def decode_select(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      start: int, cache: IndexerKeyCache, layer: int = 0) -> torch.Tensor:
        """One decode step (x [B,1,hidden] at position ``start``, keys [0, start] in ``cache``) ->
        the selected positions [B,k], unordered: ``forward``'s key set without its [B,S,T] masking
        and sort, and without firing ``hook_scores``/``hook_topk_indices`` (see ``fast_decode_ok``)."""
        if x.shape[1] != 1:
            raise ValueError(f"decode_select takes one query per sequence, got x of shape {tuple(x.shape)}")
        q, w, keys = self.scoring_inputs(x, q_latent, cos, sin, start, cache, layer)
        T = start + 1
        if self.index_topk >= T:                 # every key: no scores needed (dense MLA follows)
            return torch.arange(T, device=x.device).expand(x.shape[0], T)
        if keys.dtype == torch.bfloat16 and cache.key_format != "fp8":
            keys = cache.read_bucketed(layer, x.shape[0], T, _KEY_BUCKET)
            scores = decode_scores(q[:, 0], w[:, 0], keys)[:, :T]            # rows past T dropped
        elif keys.dtype in (torch.bfloat16, torch.float32):
            scores = decode_scores(q[:, 0], w[:, 0], keys)
        else:
            scores = index_scores(q, w, keys, start)[:, 0]
        return decode_topk(scores, self.index_topk)

    def scoring_inputs(self, x, q_latent, cos, sin, start, cache, layer):
        """Queries [B,S,H,D], head weights [B,S,H] and the keys [B,start+S,D] to score against
        (this chunk's keys written to ``cache`` first, when there is one)."""
        B, S, _ = x.shape
        q, k, w = self.project(x, q_latent, cos, sin)
        if self.rotate:
            q, k = hadamard(q.float()), hadamard(k.float())
        if self.key_format == "fp8":
            q = fp8_roundtrip(q, self.scale_fmt)          # the official scorer quantizes q too
        if cache is not None:
            if cache.key_format != self.key_format:
                raise ValueError(f"indexer cache holds {cache.key_format!r} keys but the indexer "
                                 f"scores with {self.key_format!r}; build the cache after set_indexer_format")
            cache.write(layer, k, start)
            keys = cache.read(layer, B, start + S)
        elif self.key_format == "fp8":
            keys = fp8_roundtrip(k, self.scale_fmt)
        elif self.key_format == "bf16":
            keys = k.to(torch.bfloat16)
        else:
            keys = k
        return q, w, keys
