"""The DeepSeek-V3 transformer: embedding, blocks (MLA + dense FFN or MoE), final norm, head, MTP.

Block:  h = x + attn(norm1(x));  out = h + ffn(norm2(h))      (pre-norm, RMSNorm eps 1e-6)
Blocks [0, first_k_dense_replace) use a dense SwiGLU, the rest DeepSeekMoE. The head is untied.
MTP module k (stored as checkpoint layer num_hidden_layers + k) predicts token i+1+k from the
previous depth's hidden state h_i and the embedding of token i+k (``MTPLayer`` below).

``model(tokens)`` returns logits for every position. With ``cache=`` and ``start=`` it runs a
chunk of positions [start, start+S) against a preallocated cache (prefill, then decode).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3lab.config import ModelConfig
from dsv3lab.model.layers import MLP, HookPoint, Linear, RMSNorm
from dsv3lab.model.mla import MLA, attention_class
from dsv3lab.model.moe import MoE
from dsv3lab.model.rope import RotaryTable


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype=None, device=None):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = MLA(cfg, dtype, device, layer=layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = (MoE(cfg, dtype, device) if cfg.is_moe_layer(layer)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device))
        self.hook_resid_pre = HookPoint("[B,S,D] residual stream into the block")
        self.hook_attn_out = HookPoint("[B,S,D] attention output (after o_proj)")
        self.hook_resid_mid = HookPoint("[B,S,D] residual after attention")
        self.hook_mlp_out = HookPoint("[B,S,D] FFN / MoE output")
        self.hook_resid_post = HookPoint("[B,S,D] residual out of the block")

    def forward(self, x, cos, sin, start=0, cache=None, cache_layer=None):
        x = self.hook_resid_pre(x)
        a = self.hook_attn_out(self.self_attn(self.input_layernorm(x), cos, sin, start, cache,
                                              self.layer if cache_layer is None else cache_layer))
        h = self.hook_resid_mid(x + a)
        m = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(h)))
        return self.hook_resid_post(h + m)


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class MTPLayer(Block):
    """Multi-token prediction depth k: h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)]) -> Block.

    Embedding first, as vLLM, SGLang and transformers concatenate (the paper's Eq. 21 writes the
    hidden state first; the released eh_proj weights follow the engines). The embedding and
    output head are the main model's (the checkpoint stores copies; ``load`` checks nothing
    more about them than their shape).
    """

    def __init__(self, cfg: ModelConfig, layer: int, dtype=None, device=None):
        super().__init__(cfg, layer, dtype, device)
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.eh_proj = Linear(2 * D, D, dtype, device)
        self.shared_head = SharedHead(cfg, dtype, device)
        self.hook_h_in = HookPoint("[B,S,D] hidden state from the previous depth")
        self.hook_mtp_out = HookPoint("[B,S,D] block output before shared_head.norm")

    def forward(self, h, emb_next, cos, sin, start=0, cache=None, cache_layer=None):
        h = self.hook_h_in(h)
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h)], dim=-1))
        return self.hook_mtp_out(super().forward(x, cos, sin, start, cache, cache_layer))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = nn.Embedding(V, D, dtype=dtype, device=device)
        self.layers = nn.ModuleList([Block(cfg, i, dtype, device) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.lm_head = Linear(D, V, dtype, device)
        self.mtp = nn.ModuleList([MTPLayer(cfg, cfg.num_hidden_layers + k, dtype, device)
                                  for k in range(cfg.num_nextn_predict_layers)])
        self.rope = RotaryTable(cfg)
        self.hook_embed = HookPoint("[B,S,D] token embeddings")
        self.hook_final = HookPoint("[B,S,D] hidden state after the last block, before the final norm")
        self.hook_logits = HookPoint("[B,S,V] logits")

    # --- configuration ----------------------------------------------------------------------
    @property
    def attn_mode(self) -> str:
        return self.layers[0].self_attn.mode

    def set_attn_mode(self, mode: str | None, absorb_prefill: bool | None = None) -> "Transformer":
        """Attention implementation for every layer, by name (``dsv3lab.model.mla.ATTENTION``):
        'absorbed' (latent cache, the default) or 'naive' (per-head K/V cache); 'sparse' (V3.2's
        DSA, the default when the config has an indexer). None: the config's default.
        ``absorb_prefill`` (None keeps the current setting) computes prefill chunks in the
        latent space too."""
        if mode is None:
            mode = "sparse" if self.cfg.has_indexer else "absorbed"
        attention_class(mode)                       # unknown names fail before anything changes
        for m in self.modules():
            if isinstance(m, MLA):
                m.set_attention(mode)
                if absorb_prefill is not None:
                    m.absorb_prefill = absorb_prefill
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch: int, max_len: int, mode: str | None = None, dtype=None):
        """Preallocated cache for the main blocks plus the MTP blocks (one slot each), of the
        kind the attention implementation keeps; ``mode`` switches the model to it first."""
        mode = mode or self.attn_mode
        if mode != self.attn_mode:
            self.set_attn_mode(mode)
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        n = self.cfg.num_hidden_layers + len(self.mtp)
        attn = self.layers[0].self_attn
        return attn.impl.cache_cls(self.cfg, n, batch, max_len, dtype or self.dtype, self.device,
                                   n_heads=attn.n_heads, **attn.impl.cache_kwargs())

    # --- forward ----------------------------------------------------------------------------
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
        end = start + tokens.shape[1]
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {end} positions exceeds the model's context "
                             f"(max_position_embeddings={self.cfg.max_position_embeddings})")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def hidden(self, tokens: torch.Tensor, start: int = 0, cache=None) -> torch.Tensor:
        """Hidden state after the last block (before the final norm) [B,S,D]."""
        self.check_tokens(tokens, start)
        S = tokens.shape[1]
        cos, sin = self.rope.get(start, start + S, self.device)
        x = self.hook_embed(self.embed(tokens))
        for blk in self.layers:
            x = blk(x, cos, sin, start, cache)
        return self.hook_final(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def forward(self, tokens: torch.Tensor, start: int = 0, cache=None, last_only: bool = False,
                return_hidden: bool = False):
        """tokens [B,S] -> logits [B,S,V] (or [B,1,V] with last_only)."""
        if cache is not None and not return_hidden and tokens.shape[-1] == 1:
            # the one seam to the CPU decode fast path, which reads this model from outside
            # (dsv3lab/fast/): it returns None unless it computes exactly what the code below would
            # (bf16 or fp32 on a CPU, batch 1, nothing hooked); imported here because it imports us
            from dsv3lab.fast import decode
            logits = decode(self, tokens, start, cache)
            if logits is not None:
                return logits
        h = self.hidden(tokens, start, cache)
        logits = self.hook_logits(self.head(h[:, -1:] if last_only else h))
        return (logits, h) if return_hidden else logits

    def mtp_logits(self, h: torch.Tensor, tokens: torch.Tensor, start: int = 0, cache=None,
                   depth: int | None = None) -> list[torch.Tensor]:
        """Logits of the MTP depths. h [B,S,D] main hidden states at positions start..start+S-1,
        tokens [B,S] the tokens at positions start+1..start+S (next tokens). Depth k returns
        logits [B,S-k+1,V] predicting the token at position i+1+k from position i."""
        out = []
        depth = len(self.mtp) if depth is None else depth
        for k, layer in enumerate(self.mtp[:depth]):
            S = tokens.shape[1] - k
            if S <= 0:
                break
            cos, sin = self.rope.get(start, start + S, self.device)
            h = layer(h[:, :S], self.embed(tokens[:, k:k + S]), cos, sin, start, cache,
                      self.cfg.num_hidden_layers + k)
            out.append(self.lm_head(layer.shared_head.norm(h)))
        return out

    @torch.no_grad()
    def generate(self, *args, **kw):
        from dsv3lab.generate import generate
        return generate(self, *args, **kw)
