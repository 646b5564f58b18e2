"""The attention seam: MLA computes its projections, one implementation does the attention.

MLA (``mla.py``) is the part every variant shares, laid out as in the checkpoint: the low-rank
query (q_a -> q_a_layernorm -> q_b), the compressed key/value (kv_a_proj_with_mqa -> kv_a_layernorm),
RoPE on the 64-wide shared key and the query's rope part, ``kv_b_proj`` (W_UK and W_UV), ``o_proj``
and the hook points. What differs between variants is what sits between the projections and
``o_proj``: what is cached, how a prefill chunk and a one-token decode step are computed, and
which keys a query may see. That part is an ``Attention`` object, one per MLA layer, chosen by
name from the registry ``ATTENTION`` in ``mla.py``:

  absorbed  (attn_absorbed.py) caches the latent [c_kv ; k_pe]; decode in the latent space
  naive     (attn_naive.py)    caches per-head K and V; plain multi-head attention
  sparse    (attn_sparse.py)   V3.2's DeepSeek Sparse Attention: the absorbed latent cache plus
                               the lightning indexer's key cache; each query attends to the top-k
                               keys the indexer picks (the default for configs with an indexer)

The contract, in the order a forward runs:

1. ``MLA.forward`` computes the tensors of ``AttnInput`` for the S new tokens at positions
   [start, start + S): the block's normalised input ``x``, the normalised q latent, q_nope, the
   rotated q_pe, the post-norm latent c_kv and the rotated shared key k_pe, plus cos/sin of those
   positions. Hook points fire here, so every variant sees (and is patched by) the same hooks.
2. ``impl(a, cache, slot)`` writes what it keeps into ``cache`` (its own ``Cache`` subclass, slot
   ``slot`` = layer index, MTP blocks after the main blocks), attends over every cached position
   up to start + S and returns the per-head outputs [B, S, H, v_head_dim]; MLA applies ``o_proj``.
   Without a cache the chunk attends to itself (a plain forward from position 0).
3. The cache is the implementation's: ``Transformer.new_cache`` allocates ``impl.cache_cls``, and
   the cache says how many bytes it holds. A cache of the wrong kind is refused by name.

What a new variant does, e.g. DeepSeek Sparse Attention (V3.2: a lightning indexer picks the
top-k keys for every query):

- own weights: ``submodules(cfg, ...)`` returns {name: module}; MLA registers them under its own
  name, so their keys are ``layers.N.self_attn.<name>.*`` as in the checkpoint (the indexer:
  ``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}``). It returns {} for configs without
  them, so other models are unchanged. The implementation reaches them as ``self.mla.<name>``.
- own cache state: subclass a cache and keep more per-layer tensors beside ``layers`` (the
  indexer's key cache); ``tensors()`` lists them so ``nbytes()`` counts them.
- its own key selection: the core attention functions (``sdpa`` here, ``latent_attention`` in
  attn_absorbed.py) take ``keep``, a bool [B, S, T] mask of the keys each query may see on top of
  causality; ``keep_from_indices`` turns a per-query index set [B, S, k] into that mask. A
  variant subclasses ``AbsorbedAttention``, computes its selection from ``a.x`` and ``a.q_latent``
  and calls the same prefill / decode code with ``keep``.
- one line in ``ATTENTION``; then ``model.set_attn_mode(name)`` and ``model.new_cache`` use it.

Options that apply to every layer (``absorb_prefill``: compute prefill chunks in the latent space
too) are attributes of MLA, read by the implementations that honour them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3lab.model.layers import linear


@dataclass
class AttnInput:
    """What MLA computed for S new tokens at positions [start, start + S) of one layer."""
    x: torch.Tensor                     # [B,S,D] the block's normalised input
    q_latent: torch.Tensor | None       # [B,S,q_lora_rank] q_a_layernorm(q_a_proj(x)); None without q_lora_rank
    q_nope: torch.Tensor                # [B,S,H,n]
    q_pe: torch.Tensor                  # [B,S,H,r] rotated
    c_kv: torch.Tensor                  # [B,S,c] post-norm latent
    k_pe: torch.Tensor                  # [B,S,r] rotated shared key
    cos: torch.Tensor                   # [S,r/2] rotary table rows of these positions
    sin: torch.Tensor
    start: int

    @property
    def end(self) -> int:
        return self.start + self.q_nope.shape[1]


class Cache:
    """Preallocated per-layer state of one implementation for ``batch`` sequences of up to
    ``max_len`` positions. ``layers[i]`` is slot i's main state (a tensor or a tuple of tensors).

    Subclasses take ``(cfg, n_layers, batch, max_len, dtype, device, n_heads=None)``; ``n_heads``
    is the heads of this rank (tensor parallelism splits them), for caches that store heads."""

    mode = ""                           # the registry name of the implementation that writes it

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.layers: list = []

    def tensors(self):
        """Every tensor the cache holds (for ``nbytes``); subclasses with more state extend it."""
        for state in self.layers:
            yield from (state if isinstance(state, tuple) else (state,))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def check(self, batch: int, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions per sequence; asked for {end}")
        if batch > self.batch:
            raise ValueError(f"cache holds {self.batch} sequences; the input has {batch}")


class Attention:
    """One way to compute MLA's attention; one instance per MLA layer (``mla.impl``)."""

    name = ""                           # the key in ``mla.ATTENTION``
    cache_cls: type[Cache] = Cache

    def __init__(self, mla: nn.Module):
        self.mla = mla                  # weights, head count and hook points are read from it per call

    @staticmethod
    def submodules(cfg, dtype=None, device=None) -> dict[str, nn.Module]:
        """Extra weights this variant needs for ``cfg`` (registered on MLA by name); usually none."""
        return {}

    @classmethod
    def layer_submodules(cls, cfg, layer: int, dtype=None, device=None) -> dict[str, nn.Module]:
        """Extra weights of layer ``layer``: ``submodules``, unless the variant's layers differ
        (GLM-5's shared-selection layers have no indexer)."""
        return cls.submodules(cfg, dtype, device)

    def cache_kwargs(self) -> dict:
        """Extra keyword arguments ``Transformer.new_cache`` passes to ``cache_cls`` (a runtime
        choice such as the DSA indexer's key format); usually none."""
        return {}

    def __call__(self, a: AttnInput, cache: Cache | None, slot: int) -> torch.Tensor:
        """Write ``a`` into ``cache[slot]``, attend, return per-head outputs [B,S,H,v]."""
        raise NotImplementedError


# --- shared pieces of the core attention ----------------------------------------------------

def causal_mask(S: int, start: int, device) -> torch.Tensor:
    """Boolean [S, start+S]: query i (absolute start+i) may see keys 0..start+i."""
    q = torch.arange(start, start + S, device=device)[:, None]
    k = torch.arange(start + S, device=device)[None, :]
    return k <= q


def keep_from_indices(idx: torch.Tensor, T: int) -> torch.Tensor:
    """Per-query key index sets idx [B,S,k] (int, -1 = unused slot) -> bool keep mask [B,S,T]."""
    keep = torch.zeros(*idx.shape[:2], T + 1, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, torch.where(idx < 0, T, idx).long(), True)   # -1 lands in the spare column
    return keep[..., :T]


def allowed(S: int, start: int, keep: torch.Tensor | None, device) -> torch.Tensor:
    """Causal mask [S,T], or combined with keep [B,S,T] -> [B,S,T] (True = may attend)."""
    causal = causal_mask(S, start, device)
    if keep is None:
        return causal
    if keep.shape[-2:] != causal.shape:
        raise ValueError(f"keep mask must be [B, {S}, {start + S}] (queries x cached keys), "
                         f"got {tuple(keep.shape)}")
    mask = keep & causal
    if not bool(mask.any(-1).all()):
        raise ValueError("keep mask leaves a query with no key it may attend to (softmax of nothing)")
    return mask


def expand_kv(w_kvb: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, n: int):
    """Per-head K [B,H,T,n+r] and V [B,H,T,v] from latents c_kv [B,T,c], k_pe [B,T,r] through
    kv_b_proj's weight w_kvb [H, n+v, c]."""
    B, T, _ = c_kv.shape
    H, nv, c = w_kvb.shape
    kvb = linear(c_kv, w_kvb.reshape(H * nv, c).to(c_kv.dtype)).view(B, T, H, nv)
    k = torch.cat([kvb[..., :n], k_pe[:, :, None, :].expand(B, T, H, k_pe.shape[-1])], dim=-1)
    return k.transpose(1, 2), kvb[..., n:].transpose(1, 2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int,
         keep: torch.Tensor | None = None, probs_hook=None) -> torch.Tensor:
    """q [B,H,S,d], k [B,H,T,d], v [B,H,T,dv] -> [B,S,H,dv], causal (+ keep [B,S,T]).

    ``probs_hook`` (a HookPoint with something attached) gets the probabilities [B,H,S,T] and
    may replace them: the explicit path then runs instead of the fused one."""
    S, T = q.shape[2], k.shape[2]
    if probs_hook is not None and probs_hook.active:
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if S > 1 or keep is not None:
            mask = allowed(S, start, keep, q.device)
            scores = scores.masked_fill(~(mask[:, None] if mask.dim() == 3 else mask), float("-inf"))
        probs = probs_hook(scores.softmax(-1))
        return (probs.to(v.dtype) @ v).transpose(1, 2)
    dv = v.shape[-1]
    if q.device.type == "cpu" and dv != q.shape[-1]:
        # torch's fused CPU attention needs equal q/k and v head dims (192 vs 128 for V3);
        # otherwise it falls back to the materialising math path, ~3.5x slower. Zero
        # columns in V change nothing in the first dv output columns.
        v = F.pad(v, (0, q.shape[-1] - dv))
    if keep is not None:
        mask = allowed(S, start, keep, q.device)[:, None]                  # [B,1,S,T]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif S == T:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif S == 1:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(S, start, q.device), scale=scale)
    return o[..., :dv].transpose(1, 2)
