"""Counts derived from a config: parameters (total, activated, MTP), KV-cache bytes, FLOPs.

Counts come from the model built on the meta device (so they are the engine's own tensors, not a
second formula); the FLOP model is the usual 2 FLOPs per multiply-add:
  forward matmul FLOPs per token = 2 * (activated parameters - embedding)      (the head counts)
  attention FLOPs per token      = 2 * layers * heads * (qk_head_dim + v_head_dim) * keys attended
Training = 3 x forward. For a training sequence of length L each token attends L/2 keys on average
(causal); at L = 4096 this gives 250 GFLOPs/token for V3, the ISCA paper's Table 2 figure.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from dsv3lab.config import ModelConfig
from dsv3lab.probes.memory import bytes_per_token


def kv_cache_bytes_per_token(cfg: ModelConfig | str, dtype: torch.dtype = torch.bfloat16,
                             mode: str | None = None, include_mtp: bool = False, context: int | None = None):
    """Bytes of cache one token occupies across all layers: ``mode`` "absorbed" (the default: the
    latent, 61 x 576 x 2 = 70,272 B for V3) or "naive" (per-head K and V). A DeepSeek-V4 config or
    preset: its sliding + compressed cache at ``context`` tokens (a float; its limit without
    ``context``). The one definition, with the layouts MLA replaces, is
    ``dsv3lab.probes.memory.bytes_per_token``."""
    return bytes_per_token(cfg, dtype, layout=mode, include_mtp=include_mtp, context=context)


@lru_cache(maxsize=32)
def _counts(cfg: ModelConfig) -> dict:
    from dsv3lab.model.build import build
    model = build(cfg, device="meta")

    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    main = n(model) - n(model.mtp)
    emb, head = model.embed_tokens.weight.numel(), model.lm_head.weight.numel()
    expert = (n(model.layers[cfg.first_k_dense_replace].mlp.experts[0])
              if cfg.n_moe_layers > 0 else 0)
    idle = cfg.n_routed_experts - cfg.num_experts_per_tok
    activated = main - cfg.n_moe_layers * idle * expert
    # MTP and checkpoint counts include the gate's e_score_correction_bias buffers, as the
    # checkpoint stores them (README_WEIGHTS' 11.5B MTP / 685B figures); the main-model count
    # (671B) does not, matching transformers' num_parameters().
    biases = sum(b.numel() for name, b in model.mtp.named_buffers() if name.endswith("correction_bias"))
    all_biases = sum(b.numel() for name, b in model.named_buffers() if name.endswith("correction_bias"))
    mtp = n(model.mtp) + biases
    mtp_expert = n(model.mtp[0].mlp.experts[0]) if len(model.mtp) else 0
    mtp_act = (mtp - biases - len(model.mtp) * idle * mtp_expert + emb + head) if len(model.mtp) else 0
    attn = n(model.layers[0].self_attn)
    return dict(total_params=main, activated_params=activated, mtp_params=mtp,
                mtp_activated_params=mtp_act, embedding_params=emb, head_params=head,
                expert_params=expert, attention_params=attn,
                checkpoint_params=main + all_biases - biases + mtp + len(model.mtp) * (emb + head))


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs for one token attending ``context`` keys."""
    c = _counts(cfg)
    matmul = 2 * (c["activated_params"] - c["embedding_params"])
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * context
    return float(matmul + attn)


def model_stats(cfg: ModelConfig | str, context: int = 4096, train_seq_len: int = 4096) -> dict:
    """Everything ``dsv3lab info`` prints (a V4 config: ``probes.v4_cost.v4_stats``)."""
    from dsv3lab.family import is_v4
    if is_v4(cfg):
        from dsv3lab.probes.v4_cost import v4_stats
        return v4_stats(cfg, context)
    if isinstance(cfg, str):
        cfg = ModelConfig.preset(cfg)
    c = dict(_counts(cfg))
    c.update(
        name=cfg.name,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(cfg),
        # what a server also caches for the MTP layers when it decodes speculatively (dsv3lab plan)
        kv_cache_bytes_per_token_with_mtp=kv_cache_bytes_per_token(cfg, include_mtp=True),
        kv_cache_bytes_per_token_naive=kv_cache_bytes_per_token(cfg, mode="naive"),
        forward_flops_per_token=flops_per_token(cfg, context),
        forward_flops_context=context,
        train_flops_per_token=3 * flops_per_token(cfg, train_seq_len / 2),
        train_seq_len=train_seq_len,
        softmax_scale=cfg.softmax_scale,
    )
    return c
