"""Derived rows about the kernels' shapes: FlashMLA's FP8 KV-cache layout and DeepGEMM's GEMM shapes.

Both from the V3 config, through formulas written here once:

* FlashMLA's FP8 KV cache stores per token and layer the 512 latent values as e4m3 (1 B each), one
  fp32 scale per 128 of them (4 x 4 B), and the 64 RoPE key values unquantized in bf16 (2 B each):
  512 + 16 + 128 = 656 B.
* DeepGEMM's README benchmarks the dense GEMMs of V3 as N x K (output x reduction). Each maps to a
  projection of the config: the fused q_a + kv_a down-projection, q_b, kv_b, o_proj, the fused
  gate + up of an expert pair (2 x moe_intermediate) and the expert down-projection.
"""

from __future__ import annotations

from dsv3lab.replicate.core import claim, exact, row

FP8_TILE = 128


def flashmla_fp8_kv_bytes_per_layer(cfg) -> int:
    """Bytes per token per layer of FlashMLA's FP8 latent cache for ``cfg``."""
    latent = cfg.kv_lora_rank
    if latent % FP8_TILE:
        raise ValueError(f"kv_lora_rank {latent} is not a multiple of the {FP8_TILE}-value scale tile")
    return latent * 1 + (latent // FP8_TILE) * 4 + cfg.qk_rope_head_dim * 2


def deepgemm_shapes(cfg) -> dict[str, list[int]]:
    """{layer: [N, K]} of the GEMMs DeepGEMM's README benchmarks, from ``cfg``."""
    H = cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return {
        "q_a_kv_a": [cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size],
        "q_b": [H * qk, cfg.q_lora_rank],
        "kv_b": [H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank],
        "o_proj": [cfg.hidden_size, H * cfg.v_head_dim],
        "gate_up": [2 * cfg.moe_intermediate_size, cfg.hidden_size],
        "down": [cfg.hidden_size, cfg.moe_intermediate_size],
    }


# DeepGEMM README's dense-GEMM table, N x K as printed.
DEEPGEMM_README = {"q_a_kv_a": [2112, 7168], "q_b": [24576, 1536], "kv_b": [32768, 512],
                   "o_proj": [7168, 16384], "gate_up": [4096, 7168], "down": [7168, 2048]}


@claim("kernels", "FlashMLA and DeepGEMM READMEs (deepseek-ai)")
def kernels(quick: bool = False) -> list[dict]:
    from dsv3lab.config import ModelConfig
    cfg = ModelConfig.preset("v3-671b")
    per_layer = flashmla_fp8_kv_bytes_per_layer(cfg)
    out = [row("flashmla_fp8_kv_bytes_per_token", "derived",
               "FP8 KV cache: 656 B per token per layer (512 e4m3 + 4 fp32 scales + 64 bf16)", 656, per_layer,
               "B/token/layer", exact(),
               f"kv_lora_rank {cfg.kv_lora_rank} x 1 B + {cfg.kv_lora_rank // FP8_TILE} scales x 4 B + "
               f"qk_rope_head_dim {cfg.qk_rope_head_dim} x 2 B",
               note=f"all {cfg.num_hidden_layers} layers: {per_layer * cfg.num_hidden_layers:,} B per token, "
                    f"{per_layer / ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2):.3f}x the bf16 latent cache")]
    shapes = deepgemm_shapes(cfg)
    for name, nk in DEEPGEMM_README.items():
        out.append(row(f"deepgemm_shape_{name}", "derived", f"DeepGEMM benchmarks N x K = {nk[0]} x {nk[1]} ({name})",
                       nk, shapes[name], "[N, K]", exact(), "dsv3lab.replicate.kernel_shapes.deepgemm_shapes(v3-671b config)"))
    return out
