"""Derived rows about the architecture: parameters, KV bytes, training FLOPs, YaRN.

Every lab value comes from the engine: parameter counts from the 671B / 236B models built on the
meta device (``dsv3lab.stats``), KV bytes from the ``nbytes`` of the engine's latent cache, YaRN from
``dsv3lab.model.rope.inv_freq``.
"""

from __future__ import annotations

import functools
import math

from dsv3lab.replicate.core import claim, exact, printed, row

GB = 1e9


@functools.lru_cache(maxsize=None)
def _stats(preset: str) -> dict:
    from dsv3lab.stats import model_stats
    return model_stats(preset)


@claim("params", "DeepSeek-V3 report p.1; README_WEIGHTS (parameters)")
def params(quick: bool = False) -> list[dict]:
    s = _stats("v3-671b")
    from dsv3lab.config import ModelConfig
    cfg = ModelConfig.preset("v3-671b")
    eh_proj = cfg.hidden_size * 2 * cfg.hidden_size          # MTP's eh_proj [D, 2D], no bias
    m = "dsv3lab.stats.model_stats('v3-671b'): the model built on the meta device"
    act, emb, head = s["activated_params"], s["embedding_params"], s["head_params"]
    return [
        row("params_total", "derived", "total parameters: 671B", 671, s["total_params"] / GB, "B",
            printed(0), m + f" ({s['total_params']:,})"),
        row("params_activated", "derived", "activated parameters per token: 37B", 37, act / GB, "B",
            printed(0), m + f"; embedding and head included ({act:,})",
            note="37.55B rounds to 38B; the paper's 37B reads as truncated"),
        row("params_activated_readme", "derived",
            "README: 36.7B activated, including 0.9B embedding and 0.9B head", 36.7, act / GB, "B",
            printed(1), m,
            note=f"without the embedding lookup {(act - emb) / GB:.2f}B, without both {(act - emb - head) / GB:.2f}B: "
                 "no split of ours gives 36.7B"),
        row("params_mtp", "derived", "README: MTP module 11.5B unique parameters", 11.5, s["mtp_params"] / GB, "B",
            printed(1), m + f"; MTP block + eh_proj + norms + router bias ({s['mtp_params']:,})",
            note=f"without eh_proj ({eh_proj / GB:.2f}B) it is {(s['mtp_params'] - eh_proj) / GB:.3f}B: "
                 "the README seems to leave eh_proj out"),
        row("params_mtp_activated", "derived", "README: MTP module 2.4B activated parameters", 2.4,
            s["mtp_activated_params"] / GB, "B", printed(1), m + "; incl. the embedding and head copies",
            note=f"without eh_proj {(s['mtp_activated_params'] - eh_proj) / GB:.2f}B; the gap is eh_proj (0.10B)"),
        row("params_checkpoint", "derived", "README: 685B in the checkpoint = 671B main + 14B MTP", 685,
            s["checkpoint_params"] / GB, "B", printed(0),
            m + f"; main + MTP + MTP's stored embedding and head ({s['checkpoint_params']:,})",
            note="the README adds 671 + 14 after rounding each part up (the MTP part is 13.46B)"),
    ]


@claim("kv_cache", "ISCA '25 Table 1 (KV cache per token, BF16)")
def kv_cache(quick: bool = False) -> list[dict]:
    from dsv3lab.probes.memory import kv_comparison, measured_bytes_per_token
    by = {r["model"]: r for r in kv_comparison()}
    v3 = measured_bytes_per_token("v3-671b", include_mtp=False)
    out = [row("kv_bytes_per_token_v3", "derived", "DeepSeek-V3 caches 70.272 KB per token (all layers)",
               70272, v3, "B/token", exact(),
               "nbytes of the engine's LatentCache allocated for the v3-671b config, per token")]
    for key, name, paper_bytes, ratio, dec in (("qwen25_72b", "Qwen-2.5 72B", 327680, 4.66, 2),
                                               ("llama31_405b", "LLaMA-3.1 405B", 516096, 7.28, 2)):
        r = by[name]
        out.append(row(f"kv_bytes_per_token_{key}", "derived", f"{name} (GQA) caches {paper_bytes / 1000:g} KB per token",
                       paper_bytes, r["bytes_per_token"], "B/token", exact(),
                       f"dsv3lab.probes.memory.kv_comparison: {r['layout']} x 2 B"))
        out.append(row(f"kv_ratio_{key}", "derived", f"{name} needs {ratio}x DeepSeek-V3's KV cache", ratio,
                       r["bytes_per_token"] / v3, "x", printed(dec), f"{name} bytes / the engine's V3 bytes",
                       note="" if key == "qwen25_72b" else
                       "the byte counts the paper lists give 7.34x; the printed 7.28x does not follow from them"))
    return out


@claim("flops", "ISCA '25 Table 2 (training compute per token)")
def flops(quick: bool = False) -> list[dict]:
    m = ("dsv3lab.stats: 3 x (2 x (activated - embedding) + attention 2 x layers x heads x (192 + 128) "
         "x 2048 keys), sequence 4096")
    return [row(id_, "derived", f"{name}: {paper} training GFLOPs per token", paper,
                _stats(preset)["train_flops_per_token"] / GB, "GFLOPs", printed(0), m)
            for id_, name, preset, paper in (("train_gflops_per_token_v3", "DeepSeek-V3 671B", "v3-671b", 250),
                                             ("train_gflops_per_token_v2", "DeepSeek-V2 236B", "v2-236b", 155))]


@claim("yarn", "DeepSeek-V3 report sec. 4.3 (YaRN); official inference code")
def yarn(quick: bool = False) -> list[dict]:
    import torch
    from dsv3lab.config import ModelConfig
    from dsv3lab.model.rope import inv_freq
    cfg = ModelConfig.preset("v3-671b")
    y = cfg.yarn
    mscale = 0.1 * math.log(y["factor"]) + 1
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    base_f = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f, _ = inv_freq(cfg)
    ratio = base_f / f.double()
    last_kept = max(i for i in range(d // 2) if abs(ratio[i] - 1) < 1e-5)
    first_scaled = min(i for i in range(d // 2) if abs(ratio[i] - y["factor"]) < 1e-3)
    # The paper's side: its constants (s = 40, beta = 32 / 1, original context 4K, rope dim 64,
    # theta 10000) through its formulas; the lab's side: what the engine's config and rope compute.
    S, BETA_FAST, BETA_SLOW, L0, D, THETA = 40, 32, 1, 4096, 64, 10000
    c = lambda r: D * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(THETA))  # noqa: E731
    rope = "dsv3lab.model.rope.inv_freq('v3-671b') against the plain RoPE frequencies"
    return [
        row("softmax_scale_yarn", "derived", "softmax scale = 192^-0.5 x (0.1 ln s + 1)^2 with s = 40",
            (128 + 64) ** -0.5 * (0.1 * math.log(S) + 1) ** 2, cfg.softmax_scale, "", printed(9),
            "ModelConfig.preset('v3-671b').softmax_scale; paper column: the formula at the paper's s",
            note=f"mscale 0.1 ln 40 + 1 = {mscale:.6f}"),
        row("yarn_ramp_low", "derived", "pairs below floor(c(beta_fast = 32)) keep their frequency",
            math.floor(c(BETA_FAST)), last_kept, "pair index", exact(),
            rope + ": the last pair left unchanged; paper column: floor of the YaRN ramp bound"),
        row("yarn_ramp_high", "derived", "pairs from ceil(c(beta_slow = 1)) on are divided by s = 40",
            math.ceil(c(BETA_SLOW)), first_scaled, "pair index", exact(),
            rope + ": the first pair divided by the full factor; paper column: ceil of the YaRN ramp bound"),
    ]
