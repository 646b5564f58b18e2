"""The DeepSeek-V4 transformer: embedding into mHC streams, blocks, hyper head, final norm, head.

  X_0   = n copies of embed(tokens)                                    [B,S,n,D]
  block: post, comb, a_in = attn_hc(X);   X = post (x) attn(attn_norm(a_in)) + comb^T X
         post, comb, f_in = ffn_hc(X);    X = post (x) moe(ffn_norm(f_in), tokens) + comb^T X
  logits = lm_head(norm(hc_head(X)))

Every block is MoE (learned or hash-routed); attention is sliding-only, CSA or HCA per
``cfg.layer_types`` (v4_attention.py). Module names follow transformers' ``DeepseekV4ForCausalLM``
(less the ``model.`` prefix; experts one module each, as in V3); the official checkpoint names
(``layers.N.attn.wq_a``, ``ffn.experts.E.w1``, ``hc_attn_fn`` ...) map onto them in
``dsv3lab/checkpoint/v4.py``.

MTP (``num_nextn_predict_layers`` blocks, the release's ``mtp.K.*``; transformers has none): a
full block (layer id num_hidden_layers + K, learned gate, attention ``cfg.mtp_layer_types[K]``)
fed the previous depth's streams X (the main model's after its last block, before the hyper
head) and the embedding of the next token, with its own hyper head and norm before the shared head:

  X'     = e_proj(enorm(embed(t_{i+1+K}))) (+ on every stream) h_proj(hnorm(X_i))    [B,S,n,D]
  X''    = block(X');   logits = lm_head(norm(hc_head(X'')))       predicts t_{i+2+K}

``model(tokens)`` gives logits for every position; ``cache=model.new_cache(B, max_len)`` with
``start=`` feeds positions in order (prefill, then decode); ``model.generate`` is the lab's.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3lab.model.layers import HookPoint, Linear
from dsv3lab.model.v4_attention import V4Attention, V4LayerCache
from dsv3lab.model.v4_layers import RMSNormF32, RotaryPair
from dsv3lab.model.v4_mhc import HyperConnection, HyperHead
from dsv3lab.model.v4_moe import V4MoE


class V4Block(nn.Module):
    def __init__(self, cfg, layer: int, dtype=None, device=None):
        super().__init__()
        self.layer = layer
        self.attn_hc = HyperConnection(cfg, device)
        self.input_layernorm = RMSNormF32(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.self_attn = V4Attention(cfg, layer, dtype, device)
        self.ffn_hc = HyperConnection(cfg, device)
        self.post_attention_layernorm = RMSNormF32(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.mlp = V4MoE(cfg, layer, dtype, device)
        self.hook_resid_pre = HookPoint("[B,S,n,D] mHC streams into the block (V4's residual)")
        self.hook_attn_in = HookPoint("[B,S,D] collapsed streams into attention (before attn_norm)")
        self.hook_attn_out = HookPoint("[B,S,D] attention output")
        self.hook_resid_mid = HookPoint("[B,S,n,D] streams after attention")
        self.hook_mlp_in = HookPoint("[B,S,D] collapsed streams into the MoE (before ffn_norm)")
        self.hook_mlp_out = HookPoint("[B,S,D] MoE output")
        self.hook_resid_post = HookPoint("[B,S,n,D] streams out of the block")

    def forward(self, X, tokens, rope, start=0, cache=None):
        X = self.hook_resid_pre(X)
        post, comb, a_in = self.attn_hc(X)
        a = self.hook_attn_out(self.self_attn(self.input_layernorm(self.hook_attn_in(a_in)), rope, start, cache))
        X = self.hook_resid_mid(HyperConnection.merge(post, comb, a, X))
        post, comb, f_in = self.ffn_hc(X)
        m = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(self.hook_mlp_in(f_in)), tokens))
        return self.hook_resid_post(HyperConnection.merge(post, comb, m, X))


class V4MTPBlock(V4Block):
    """MTP depth K of the release (``mtp.K.*``; DeepSeek-V3 report sec. 2.2 for MTP, the V4
    release's inference code for this form). The embedding and the output head are the main
    model's, passed in by the caller, not stored again."""

    def __init__(self, cfg, layer: int, dtype=None, device=None):
        super().__init__(cfg, layer, dtype, device)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.e_proj = Linear(D, D, dtype, device)
        self.h_proj = Linear(D, D, dtype, device)
        self.enorm = RMSNormF32(D, eps, device)
        self.hnorm = RMSNormF32(D, eps, device)
        self.hc_head = HyperHead(cfg, device)
        self.norm = RMSNormF32(D, eps, device)
        self.hook_h_in = HookPoint("[B,S,n,D] streams from the previous depth (depth 0: the main model's)")
        self.hook_mtp_out = HookPoint("[B,S,D] after this depth's hyper head, before its norm")

    def forward(self, X, emb_next, tokens_next, rope, start=0, cache=None):
        """X [B,S,n,D], emb_next [B,S,D] (embedding of the next tokens) -> streams out [B,S,n,D]."""
        X = self.hook_h_in(X)
        X = self.e_proj(self.enorm(emb_next)).unsqueeze(2) + self.h_proj(self.hnorm(X))
        return super().forward(X, tokens_next, rope, start, cache)


class V4Cache:
    """Per layer a ``V4LayerCache`` (window rows + compressor state) for ``batch`` sequences;
    ``mtp`` one per MTP block (fed by ``mtp_logits``, accepted positions only)."""

    mode = "v4"

    def __init__(self, model: "V4Transformer", batch: int, max_len: int, dtype, device):
        self.batch, self.max_len = batch, max_len
        self.layers = [V4LayerCache(blk.self_attn, batch, max_len, dtype, device) for blk in model.layers]
        self.mtp = [V4LayerCache(blk.self_attn, batch, max_len, dtype, device) for blk in model.mtp]

    def tensors(self, include_mtp: bool = True):
        for c in self.layers + (self.mtp if include_mtp else []):
            yield from c.tensors()

    def mark(self) -> list:
        """A restore point of the main layers. The window and the pools are fed in order and
        cannot overwrite a position the way V3's latent cache does, so speculative decoding
        (generate.py) comes back here when the main model rejects a draft."""
        return [c.mark() for c in self.layers]

    def rewind(self, mark: list) -> None:
        for c, m in zip(self.layers, mark):
            c.rewind(m)

    def nbytes(self, include_mtp: bool = True) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors(include_mtp))

    def check(self, batch: int, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions per sequence; asked for {end}")
        if batch > self.batch:
            raise ValueError(f"cache holds {self.batch} sequences; the input has {batch}")


class V4Transformer(nn.Module):
    def __init__(self, cfg, dtype=None, device=None):
        super().__init__()
        self.unused_mtp: list[str] = []    # mtp.* checkpoint keys left unloaded (load_v4 loads all or fails)
        self.cfg = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = nn.Embedding(V, D, dtype=dtype, device=device)
        self.layers = nn.ModuleList([V4Block(cfg, i, dtype, device) for i in range(cfg.num_hidden_layers)])
        self.hc_head = HyperHead(cfg, device)
        self.norm = RMSNormF32(D, cfg.rms_norm_eps, device)
        self.lm_head = Linear(D, V, dtype, device)
        self.mtp = nn.ModuleList([V4MTPBlock(cfg, cfg.num_hidden_layers + k, dtype, device)
                                  for k in range(cfg.num_nextn_predict_layers)])
        self.rope = RotaryPair(cfg)
        self.hook_embed = HookPoint("[B,S,D] token embeddings")
        self.hook_final = HookPoint("[B,S,D] after the hyper head, before the final norm")
        self.hook_logits = HookPoint("[B,S,V] logits")

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def attn_mode(self) -> str:
        return "v4"

    def set_attn_mode(self, mode: str | None = None, absorb_prefill=None) -> "V4Transformer":
        from dsv3lab.family import check_v4_options
        check_v4_options(attn_mode=mode, absorb_prefill=absorb_prefill, where="set_attn_mode")
        return self

    def new_cache(self, batch: int, max_len: int, mode: str | None = None, dtype=None) -> V4Cache:
        self.set_attn_mode(mode)
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
        return V4Cache(self, batch, max_len, dtype or self.dtype, self.device)

    def check_tokens(self, tokens: torch.Tensor, start: int = 0) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if start + tokens.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {start + tokens.shape[1]} positions exceeds the model's context "
                             f"(max_position_embeddings={self.cfg.max_position_embeddings})")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def streams(self, tokens: torch.Tensor, start: int = 0, cache: V4Cache | None = None) -> torch.Tensor:
        """The mHC streams after the last block [B,S,n,D]."""
        self.check_tokens(tokens, start)
        if cache is not None:
            cache.check(tokens.shape[0], start + tokens.shape[1])
        e = self.hook_embed(self.embed(tokens))
        X = e.unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1).contiguous()
        for i, blk in enumerate(self.layers):
            X = blk(X, tokens, self.rope.at, start, cache.layers[i] if cache is not None else None)
        return X

    def hidden(self, tokens: torch.Tensor, start: int = 0, cache: V4Cache | None = None) -> torch.Tensor:
        """The collapsed hidden state before the final norm [B,S,D]."""
        return self.hook_final(self.hc_head(self.streams(tokens, start, cache)))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of a hidden state [B,S,D], or of mHC streams [B,S,n,D] (collapsed by the hyper
        head first: the logit lens reads each block's ``hook_resid_post`` this way)."""
        if h.dim() == 4:
            h = self.hc_head(h)
        return self.lm_head(self.norm(h))

    def forward(self, tokens: torch.Tensor, start: int = 0, cache: V4Cache | None = None,
                last_only: bool = False, return_hidden: bool = False):
        """tokens [B,S] -> logits [B,S,V] (or [B,1,V] with last_only). ``return_hidden`` also
        gives the streams after the last block [B,S,n,D]: what ``mtp_logits`` reads (V3 gives
        its one hidden state; ``head`` takes either)."""
        X = self.streams(tokens, start, cache)
        h = self.hook_final(self.hc_head(X))
        logits = self.hook_logits(self.head(h[:, -1:] if last_only else h))
        return (logits, X) if return_hidden else logits

    def mtp_missing(self, what: str) -> ValueError:
        """The named error for asking a model without MTP blocks for them."""
        return ValueError(f"{what} needs DeepSeek-V4's multi-token-prediction block; this model has none "
                          f"(num_nextn_predict_layers={self.cfg.num_nextn_predict_layers}: a transformers-written "
                          "checkpoint holds no mtp.* tensors, and load_v4 then builds none)")

    def mtp_logits(self, h: torch.Tensor, tokens: torch.Tensor, start: int = 0, cache: V4Cache | None = None,
                   depth: int | None = None) -> list[torch.Tensor]:
        """Logits of the MTP depths, as V3's ``mtp_logits``: h [B,S,n,D] the main streams at
        positions start..start+S-1 (``forward(..., return_hidden=True)``), tokens [B,S] the tokens
        at positions start+1..start+S. Depth k returns logits [B,S-k,V] predicting the token at
        position i+1+k from position i; with ``cache`` depth k feeds ``cache.mtp[k]`` in order."""
        if not len(self.mtp):
            raise self.mtp_missing("mtp_logits")
        if h.dim() != 4 or h.shape[2] != self.cfg.hc_mult:
            raise ValueError(f"mtp_logits: h must be the mHC streams [B,S,{self.cfg.hc_mult},D] "
                             f"(forward(..., return_hidden=True)), got shape {tuple(h.shape)}")
        if h.shape[0] != tokens.shape[0] or h.shape[1] < tokens.shape[1]:
            raise ValueError(f"mtp_logits: streams {tuple(h.shape[:2])} must cover the next tokens "
                             f"{tuple(tokens.shape)} (one position per token, same batch)")
        self.check_tokens(tokens, start)
        if cache is not None:
            cache.check(tokens.shape[0], start + tokens.shape[1])
        out = []
        depth = len(self.mtp) if depth is None else depth
        for k, blk in enumerate(self.mtp[:depth]):
            S = tokens.shape[1] - k
            if S <= 0:
                break
            nxt = tokens[:, k:k + S]
            h = blk(h[:, :S], self.embed(nxt), nxt, self.rope.at, start, cache.mtp[k] if cache is not None else None)
            out.append(self.lm_head(blk.norm(blk.hook_mtp_out(blk.hc_head(h)))))
        return out

    @torch.no_grad()
    def generate(self, *args, **kw):
        if kw.get("speculative") and not len(self.mtp):
            raise self.mtp_missing("speculative decoding")
        from dsv3lab.generate import generate
        return generate(self, *args, **kw)
