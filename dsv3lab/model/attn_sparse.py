"""DeepSeek Sparse Attention (V3.2): absorbed MLA restricted to the keys the indexer selects.

Per layer, for the S new queries at positions [start, start + S) (V3.2 report, sec. 2.1):

1. the lightning indexer (``indexer.py``, submodule ``self_attn.indexer``) scores every visible
   key and returns k = min(index_topk, T) positions per query, [B,S,k] (-1 = unused slot);
2. MLA attends to those keys only, in the latent space (the "MQA mode" of MLA the report
   builds DSA on: one [c_kv ; k_pe] row per key shared by all heads):
     rows  = latent[idx]                                    [B,S,k,c+r]  gathered, not masked
     o_lat = softmax(q_cat . rows * scale) rows[:, :c]      [B,S,H,c]    over k keys, not T
   A decode step therefore reads k latent rows of the cache instead of T: core attention is
   O(k) per token, the indexer O(T) with H_I x D_I = 64 x 128 multiply-adds per key against
   MLA's H x (2c + r) = 128 x 1088 (V3.2's sizes).
3. when k == T every visible key is selected and the layer runs the absorbed implementation's
   own dense code: ``index_topk >= context`` is dense MLA exactly, not approximately.

Decode (one new token per sequence) has a fast path, taken unless something is hooked on the
indexer's scores or selection, on MLA's probabilities, or on the dense-probability probe: the
indexer's ``decode_select`` (one product against its key cache, an unsorted top-k), then the k
selected latent rows copied (``index_select``; the CPU fast path's C gather in
dsv3lab/fast/sparse.py) into one contiguous [B,k,c+r] buffer, shared by
all layers and reused every step, and the absorbed implementation's own one-token decode
(``AbsorbedAttention.absorbed``: W_UK, the fused latent attention, W_UV) run on those rows as if
they were the whole cache. Per layer and step it reads the indexer cache (T x D_I) and k rows of
the latent cache, and builds no [B,S,T] mask. With a hook active the step takes the general path
below (masks, sorted selection, every hook point fired); both give the same logits (tested).

GLM-5 (``cfg.indexer_types``) has "shared" layers with no indexer: such a layer attends to the
keys the last full layer before it selected for the same queries (transformers' GlmMoeDsaAttention
passes ``prev_topk_indices`` up the stack). The layers of one forward run in order in one thread,
so the full layer leaves its selection [B,S,k] in a per-thread slot (``_SELECTION``) and the
shared layers read it, checked against the layer, positions and batch they expect (a shared
layer run on its own, or before its source layer, is refused by name). A shared layer caches no
indexer keys (its slot of ``index_keys`` is empty) and its decode gathers the same rows positions
from its own latent cache.

The cache is the absorbed latent cache plus the indexer's key cache (``SparseCache``); its
key format ("model", "bf16" or "fp8", see indexer.py) is the indexer's, set for every layer by
``set_key_format(model, fmt)`` before the cache is made. ``model.set_attn_mode("absorbed")`` on a
V3.2 model runs dense MLA with the indexer ignored: the same model without DSA.
With ``hook_attn_probs`` hooked the probabilities come back dense, [B,H,S,T], zero off the selection.
"""

from __future__ import annotations

import threading

import torch

from dsv3lab.model.attention import AttnInput, keep_from_indices
from dsv3lab.model.attn_absorbed import AbsorbedAttention, LatentCache, latent_attention
from dsv3lab.model.indexer import KEY_FORMATS, Indexer, IndexerKeyCache
from dsv3lab.model.layers import hooked

# gathered latent values held at once in a prefill chunk (batch x queries x k x (c + r))
_GATHER_CHUNK_ELEMS = 1 << 23
# the decode step's gathered rows, one buffer per (device, dtype, thread) shared by every layer:
# a step gathers into it and attends over it before the next layer does (so it stays in cache,
# and memory does not grow with the layer count); per thread, so concurrent decodes in one
# process do not share it
_DECODE_ROWS = threading.local()         # .bufs: {(device, dtype): (flat tensor, shape, view)}, freed with the thread
# the last full layer's selection for GLM-5's shared layers, per thread: .last = (slot, start, idx [B,S,k])
_SELECTION = threading.local()


def _gather_buffer(shape: tuple, dtype, device) -> torch.Tensor:
    """A contiguous tensor of ``shape`` on the decode gather's buffer, grown when too small (the
    view for the last shape asked for is kept: a decode step asks for the same one every layer)."""
    bufs = _DECODE_ROWS.__dict__.setdefault("bufs", {})
    key = (device, dtype)
    entry = bufs.get(key)
    if entry is not None and entry[1] == shape:
        return entry[2]
    n = 1
    for s in shape:
        n *= s
    buf = entry[0] if entry is not None and entry[0].numel() >= n else torch.empty(n, dtype=dtype, device=device)
    view = buf[:n].view(shape)
    bufs[key] = (buf, shape, view)
    return view


class SparseCache(LatentCache):
    """The latent cache of absorbed MLA plus the indexer's per-layer key cache ``index_keys``."""

    mode = "sparse"

    def __init__(self, cfg, n_layers: int, batch: int, max_len: int, dtype, device,
                 n_heads: int | None = None, key_format: str = "model"):
        super().__init__(cfg, n_layers, batch, max_len, dtype, device, n_heads)
        # shared layers (GLM-5) run no indexer and keep no keys
        self.index_keys = IndexerKeyCache(cfg.index_head_dim, n_layers, batch, max_len, key_format,
                                          dtype, device, cfg.scale_fmt,
                                          keyed=[not cfg.indexer_shared(i) for i in range(n_layers)])

    def tensors(self):
        yield from super().tensors()
        for buf in self.index_keys.layers:
            yield from (buf if isinstance(buf, tuple) else (buf,))


class SparseAttention(AbsorbedAttention):
    name = "sparse"
    cache_cls = SparseCache

    @staticmethod
    def submodules(cfg, dtype=None, device=None):
        return {"indexer": Indexer(cfg, dtype, device)} if cfg.has_indexer else {}

    @classmethod
    def layer_submodules(cls, cfg, layer: int, dtype=None, device=None):
        # a GLM-5 shared layer has no indexer weights (it reuses an earlier layer's selection)
        return {} if cfg.indexer_shared(layer) else cls.submodules(cfg, dtype, device)

    def __init__(self, mla):
        cfg = mla.cfg
        if not cfg.has_indexer:
            raise ValueError("'sparse' attention needs the V3.2 indexer: a config with index_topk > 0 "
                             "(model_type deepseek_v32 or glm_moe_dsa)")
        super().__init__(mla)
        layer = getattr(mla, "layer", 0)
        self.shared = cfg.indexer_shared(layer)           # reuses index_source's selection (GLM-5)
        self.source = cfg.index_source(layer)
        self.keeps_selection = cfg.indexer_types is not None and not self.shared   # a shared layer may follow
        if not self.shared and not hasattr(mla, "indexer"):
            raise ValueError(f"layer {layer} runs its own indexer but its attention has none "
                             "(build MLA with its layer index)")

    def cache_kwargs(self) -> dict:
        return {"key_format": self.mla.indexer.key_format if not self.shared else "model"}

    def __call__(self, a: AttnInput, cache: SparseCache | None, slot: int) -> torch.Tensor:
        mla = self.mla
        latent = self.write(a, cache, slot)                                   # [B,T,c+r]
        if self.shared:
            idx = self.shared_selection(slot, a.start, a.q_nope.shape[1], a.x.shape[0])   # [B,S,k]
            if (cache is not None and a.q_nope.shape[1] == 1 and self.fast_decode_ok()
                    and idx.shape[-1] < a.end and not bool((idx < 0).any())):
                rows = self.rows(latent, idx[:, 0])
                return self.absorbed(a.q_nope, a.q_pe, rows, rows.shape[1] - 1)
            return self.attend_selected(a, latent, idx)
        if cache is not None and a.q_nope.shape[1] == 1 and self.fast_decode_ok():
            rows = self.decode_gathered(a.x, a.q_latent, a.cos, a.sin, a.start, cache, slot, latent)
            if rows is latent:                          # every key selected: dense MLA
                return self.attend(a, latent)
            return self.absorbed(a.q_nope, a.q_pe, rows, rows.shape[1] - 1)
        idx = mla.indexer(a.x, a.q_latent, a.cos, a.sin, a.start,
                          None if cache is None else cache.index_keys, slot)  # [B,S,k]
        self.keep_selection(slot, a.start, idx)
        if mla.indexer.hook_dense_probs.active:          # recall probes and the KL warm-up
            self.dense_probs(a, latent)
        return self.attend_selected(a, latent, idx)

    def attend_selected(self, a: AttnInput, latent: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Attention of the S queries over their selections idx [B,S,k] (the general path)."""
        T = a.end
        if idx.shape[-1] >= T:                          # every visible key selected: dense MLA
            return self.attend(a, latent)
        if self.mla.hook_attn_probs.active:             # dense probabilities for the hook
            return self.absorbed(a.q_nope, a.q_pe, latent, a.start, keep_from_indices(idx, T))
        return self.gathered(a.q_nope, a.q_pe, latent, idx)

    # --- GLM-5's shared selection ------------------------------------------------------------
    def keep_selection(self, slot: int, start: int, idx: torch.Tensor) -> None:
        """Leave this full layer's selection idx [B,S,k] for the shared layers after it."""
        if self.keeps_selection:
            _SELECTION.last = (slot, start, idx)

    def shared_selection(self, slot: int, start: int, S: int, B: int) -> torch.Tensor:
        """The selection [B,S,k] of ``self.source`` for these queries; a named error when that
        layer has not just run them in this thread."""
        last = getattr(_SELECTION, "last", None)
        if last is None or last[0] != self.source or last[1] != start or last[2].shape[:2] != (B, S):
            got = "nothing" if last is None else (f"layer {last[0]}'s for positions [{last[1]}, "
                                                  f"{last[1] + last[2].shape[1]}) of {last[2].shape[0]} sequences")
            raise RuntimeError(
                f"layer {slot} is a shared indexer layer (indexer_types 'shared'): it attends to the keys "
                f"layer {self.source} selected for positions [{start}, {start + S}) of {B} sequences, but "
                f"this thread holds {got}; run the layers in order in one thread")
        return last[2]

    def fast_decode_ok(self) -> bool:
        """Nothing observes what the decode fast path skips: the indexer's scores and selection,
        MLA's [B,H,S,T] probabilities, the dense-probability probe."""
        mods = self.mla._modules                 # by dict: called every layer of every decode step
        ix = mods.get("indexer")
        if ix is None:                           # a shared layer: only MLA's probabilities
            return not hooked(mods["hook_attn_probs"])
        return ix.fast_decode_ok and not hooked(mods["hook_attn_probs"], ix._modules["hook_dense_probs"])

    def decode_gathered(self, x, q_latent, cos, sin, start: int, cache: SparseCache, slot: int,
                        latent: torch.Tensor) -> torch.Tensor:
        """The latent rows one decode token attends to: the indexer's k selections (any order)
        copied into one contiguous [B,k,c+r] tensor, or ``latent`` itself when k covers every
        key. Every returned row is visible, so the absorbed one-token decode runs over it with
        no mask (start = k - 1)."""
        idx = self.mla._modules["indexer"].decode_select(x, q_latent, cos, sin, start, cache.index_keys, slot)  # [B,k]
        self.keep_selection(slot, start, idx[:, None])
        if idx.shape[1] >= start + 1:
            return latent
        return self.rows(latent, idx)

    def rows(self, latent: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """latent [B,T,W] rows idx [B,k] (all valid) -> [B,k,W]: the shared buffer, or a fresh
        tensor when autograd must see the gather."""
        if torch.is_grad_enabled() and latent.requires_grad:
            return torch.stack([latent[b].index_select(0, idx[b]) for b in range(idx.shape[0])])
        return self.gather_rows(latent, idx)

    def gather_rows(self, latent: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """latent [B,T,W] rows idx [B,k] -> one contiguous [B,k,W] buffer (reused between steps)."""
        B, k = idx.shape
        rows = _gather_buffer((B, k, latent.shape[-1]), latent.dtype, latent.device)
        for b in range(B):
            torch.index_select(latent[b], 0, idx[b], out=rows[b])
        return rows

    def dense_probs(self, a: AttnInput, latent: torch.Tensor) -> None:
        """Fire ``indexer.hook_dense_probs`` with dense MLA's probabilities [B,H,S,T] (no gradient)."""
        mla = self.mla
        with torch.no_grad():
            latent_attention(self.q_cat(a.q_nope, a.q_pe), latent, mla.scale, mla.c, a.start, None,
                             mla.indexer.hook_dense_probs)

    def q_cat(self, q_nope, q_pe) -> torch.Tensor:
        """[q_nope W_UK ; q_pe] [B,S,H,c+r]: the query in the latent space."""
        mla = self.mla
        B, S, H, _ = q_nope.shape
        w_uk = self.absorbed_weights(q_nope.dtype)[0]                       # [H,n,c], cached
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * S, mla.n), w_uk)
        return torch.cat([q_lat.view(H, B, S, mla.c).permute(1, 2, 0, 3), q_pe], dim=-1)

    def gathered(self, q_nope, q_pe, latent, idx) -> torch.Tensor:
        """Absorbed attention of each query over only its k selected latent rows -> [B,S,H,v]."""
        mla = self.mla
        B, S, H, _ = q_nope.shape
        c, k = mla.c, idx.shape[-1]
        W = latent.shape[-1]
        q_cat = self.q_cat(q_nope, q_pe)                                    # [B,S,H,c+r]
        valid = idx >= 0
        rows_of = idx.clamp_min(0)
        o_lat = torch.empty(B, S, H, c, dtype=latent.dtype, device=latent.device)
        step = max(1, _GATHER_CHUNK_ELEMS // max(1, B * k * W))
        for s0 in range(0, S, step):
            s1 = min(S, s0 + step)
            m = B * (s1 - s0)
            # one "batch element" per query: its k rows are its whole key/value set, copied
            # whole (576 wide) by index_select, the fastest row gather on CPU
            rows = torch.stack([latent[b].index_select(0, rows_of[b, s0:s1].reshape(-1)) for b in range(B)])
            rows = rows.view(m, k, W)
            keep = None if bool(valid[:, s0:s1].all()) else valid[:, s0:s1].reshape(m, 1, k)
            # a single query at position k-1 over k keys: the causal mask keeps all of them
            o = latent_attention(q_cat[:, s0:s1].reshape(m, 1, H, W), rows, mla.scale, c, k - 1, keep)
            o_lat[:, s0:s1] = o.view(B, s1 - s0, H, c)
        o = torch.bmm(o_lat.permute(2, 0, 1, 3).reshape(H, B * S, c), self.absorbed_weights(o_lat.dtype)[1])
        return o.view(H, B, S, -1).permute(1, 2, 0, 3)                     # [B,S,H,v]


def set_key_format(model, key_format: str):
    """Score with indexer keys in ``key_format`` ("model", "bf16" or "fp8") in every layer; make
    caches after this call (``model.new_cache``), they take the format from the indexer."""
    if key_format not in KEY_FORMATS:
        raise ValueError(f"indexer key_format must be one of {KEY_FORMATS}, got {key_format!r}")
    found = False
    for m in model.modules():
        if isinstance(m, Indexer):
            m.key_format, found = key_format, True
    if not found:
        raise ValueError("model has no V3.2 indexer (its config has index_topk = 0)")
    return model
