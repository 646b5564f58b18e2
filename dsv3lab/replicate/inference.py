"""Serving rows: the TPOT bound of expert-parallel decoding, deployment units, EPLB.

The TPOT bound (ISCA '25 sec. 2.3.2) appears twice: once with the paper's own inputs (hidden size
rounded to 7000: a consistency check of its arithmetic) and once with the V3 config's numbers
(hidden 7168, 61 layers, top-8 + 1 shared expert: derived).
"""

from __future__ import annotations

from dsv3lab.replicate.core import claim, exact, printed, row

# ISCA '25 sec. 2.3.2: its inputs as printed.
ISCA_TPOT = dict(hidden=7000, tokens=32, experts=9, dispatch_bytes=1, combine_bytes=2, micro_batches=2,
                 layers=61)


def tpot_bound(bandwidth_gbs: float, hidden: int = 7000, tokens: int = 32, experts: int = 9,
               dispatch_bytes: int = 1, combine_bytes: int = 2, micro_batches: int = 2,
               layers: int = 61) -> dict:
    """All-to-all time of one EP step (FP8 dispatch + BF16 combine of ``tokens`` x ``experts``
    hidden vectors over ``bandwidth_gbs``), and the time per output token it bounds."""
    step_s = (dispatch_bytes + combine_bytes) * tokens * experts * hidden / (bandwidth_gbs * 1e9)
    tpot_s = step_s * micro_batches * layers
    return dict(bandwidth_gbs=bandwidth_gbs, step_us=step_s * 1e6, tpot_ms=tpot_s * 1e3, tok_per_s=1 / tpot_s)


def tpot_inputs_from_config(preset: str = "v3-671b") -> dict:
    from dsv3lab.config import ModelConfig
    cfg = ModelConfig.preset(preset)
    return dict(ISCA_TPOT, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
                experts=cfg.num_experts_per_tok + cfg.n_shared_experts)


@claim("tpot", "ISCA '25 sec. 2.3.2 (TPOT bound of EP decoding)")
def tpot(quick: bool = False) -> list[dict]:
    m = "(1 B + 2 B) x 32 tokens x 9 experts x 7000 / bandwidth, x 2 micro-batches x 61 layers"
    ib, nv = tpot_bound(50, **ISCA_TPOT), tpot_bound(900, **ISCA_TPOT)
    cfg_in = tpot_inputs_from_config()
    ib_cfg = tpot_bound(50, **cfg_in)
    return [
        row("tpot_ib_step_us", "consistency", "one EP step takes 120.96 us at 50 GB/s (H800 IB)", 120.96,
            ib["step_us"], "us", printed(2), m),
        row("tpot_ib_ms", "consistency", "TPOT bound 14.76 ms at 50 GB/s", 14.76, ib["tpot_ms"], "ms", printed(2), m),
        row("tpot_ib_tok_per_s", "consistency", "about 67 tokens/s at 50 GB/s", 67, ib["tok_per_s"], "tok/s",
            printed(0), "1 / TPOT", note="1 / 14.757 ms = 67.8: the paper truncates"),
        row("tpot_nvl72_step_us", "consistency", "6.72 us per step at 900 GB/s (GB200 NVL72)", 6.72,
            nv["step_us"], "us", printed(2), m),
        row("tpot_nvl72_ms", "consistency", "TPOT bound 0.82 ms at 900 GB/s", 0.82, nv["tpot_ms"], "ms",
            printed(2), m),
        row("tpot_nvl72_tok_per_s", "consistency", "about 1200 tokens/s at 900 GB/s", 1200, nv["tok_per_s"],
            "tok/s", printed(-2), "1 / TPOT"),
        row("tpot_ib_ms_config", "derived", "TPOT bound at 50 GB/s with the V3 config's sizes (paper: 14.76 ms)",
            14.76, ib_cfg["tpot_ms"], "ms", printed(2),
            f"the same bound with hidden {cfg_in['hidden']}, {cfg_in['layers']} layers, "
            f"{cfg_in['experts']} experts per token from ModelConfig.preset('v3-671b')",
            note="the paper rounds the hidden size 7168 down to 7000; with 7168 the bound is 2.4% longer"),
    ]


def experts_per_gpu(preset: str, gpus: int, redundant: int, nodes: int) -> int:
    """Routed-expert slots per GPU when EPLB places the config's routed experts plus ``redundant``
    copies on ``gpus`` GPUs (``dsv3lab.balance.rebalance_experts``; the load only decides which
    experts get the copies, not how many slots a GPU has)."""
    import torch
    from dsv3lab.balance import rebalance_experts
    from dsv3lab.config import ModelConfig
    cfg = ModelConfig.preset(preset)
    E = cfg.n_routed_experts
    load = torch.arange(E, 0, -1, dtype=torch.float64)[None] ** 1.2       # a skewed load, hottest first
    phy2log, _, count = rebalance_experts(load, E + redundant, cfg.n_group, nodes, gpus)
    if int(count.min()) < 1:
        raise AssertionError("EPLB left an expert without a slot")
    per_gpu = phy2log.shape[1] // gpus
    return int(max(len(phy2log[0, g * per_gpu:(g + 1) * per_gpu]) for g in range(gpus)))


@claim("deployment", "DeepSeek-V3 report sec. 3.4; Day-6 note (deployment units)")
def deployment(quick: bool = False) -> list[dict]:
    m = ("dsv3lab.balance.rebalance_experts: the v3-671b config's 256 routed experts + the redundant "
         "copies placed on the unit's GPUs; routed-expert slots per GPU per MoE layer")
    out = []
    for id_, label, gpus, nodes, red, paper in (
            ("deploy_prefill_experts_per_gpu", "prefill: 32 GPUs (4 nodes), EP32, 32 redundant experts -> "
             "8 + 1 experts per GPU", 32, 4, 32, 9),
            ("deploy_decode_experts_per_gpu", "decode: 320 GPUs (40 nodes), EP320, 64 GPUs for redundant and "
             "shared experts -> 1 expert per GPU", 320, 40, 64, 1),
            ("day6_prefill_experts_per_gpu", "Day-6 prefill: 4 nodes, EP32, 32 redundant -> 9 routed experts "
             "per GPU", 32, 4, 32, 9),
            ("day6_decode_experts_per_gpu", "Day-6 decode: 18 nodes, EP144, 32 redundant -> 2 routed experts "
             "per GPU", 144, 18, 32, 2)):
        out.append(row(id_, "derived", label, paper, experts_per_gpu("v3-671b", gpus, red, nodes),
                       "experts/GPU", exact(), m + f" ({gpus} GPUs, {nodes} nodes, {red} redundant)",
                       note="the paper's decode unit counts the shared expert among the 64 extra GPUs' "
                            "slots; here they are routed-expert copies" if "320" in label else ""))
    return out


# The EPLB README's example input (2 layers x 12 experts) and its printed layer-0 placement.
EPLB_README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                      [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
EPLB_README_LAYER0 = [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]


@claim("eplb", "EPLB README example (deepseek-ai/eplb)")
def eplb(quick: bool = False) -> list[dict]:
    import torch
    from dsv3lab.balance import rebalance_experts
    phy2log, _, _ = rebalance_experts(torch.tensor(EPLB_README_WEIGHT), 16, 4, 2, 8)
    return [row("eplb_readme_layer0_placement", "derived", "the README's layer-0 physical-to-logical map",
                EPLB_README_LAYER0, [int(x) for x in phy2log[0]], "expert ids", exact(),
                "dsv3lab.balance.rebalance_experts(weight, 16 replicas, 4 groups, 2 nodes, 8 GPUs)")]
