"""Shared set-up for the tests that compare with transformers' DeepSeek models (V3 and V3.2).

A random model from transformers' own init is made less trivial before it is saved: gate biases of
both signs (the group mask must use -inf, not 0: docs/references.md#transformers, trap 5) and norm
weights away from 1, so a port that ignored a norm weight or a bias would be caught.
"""

import torch


def roughen(model, cfg) -> None:
    """Both-sign gate biases and non-trivial norm weights, in place."""
    norm_sizes = (cfg.hidden_size, cfg.kv_lora_rank, cfg.q_lora_rank or -1)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
            for p in layer.parameters():
                if p.dim() == 1 and p.shape[0] in norm_sizes:
                    p.uniform_(0.5, 1.5)


def eager_model(config_cls, model_cls, **cfg_kwargs):
    """A transformers model built from ``cfg_kwargs`` with seed 0, eager attention, fp32, in eval
    mode, its norm weights drawn from U(0.5, 1.5) (ones would hide a norm applied to the wrong
    tensor)."""
    torch.manual_seed(0)
    cfg = config_cls(**cfg_kwargs)
    cfg._attn_implementation = "eager"
    m = model_cls(cfg).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


def save_eager(model, path) -> None:
    """Save with transformers' eager experts (the grouped kernels differ only in speed)."""
    try:
        model.set_experts_implementation("eager")
    except Exception:   # older transformers have one implementation only
        pass
    model.save_pretrained(path)
