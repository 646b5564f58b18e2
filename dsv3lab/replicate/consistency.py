"""Consistency rows: the papers' own printed inputs, combined, against their own printed results.

None of these is a result of the lab: they check that the report's (and the Day-6 note's) numbers
agree with each other, so they sit apart in the table (kind ``consistency``). The printed inputs
are the module constants below, one place, so a test can perturb an input and see the row move.
Where the inputs themselves are rounded (token counts to 1B), the tolerance is that rounding
carried through the formula, computed here, not picked to fit.
"""

from __future__ import annotations

from dsv3lab.replicate.core import absolute, claim, exact, printed, row, upper

# Report Table 1 and sec. 1: H800 GPU-hours (thousands) and the rental price.
TRAINING = dict(pretrain_kgpuh=2664, context_kgpuh=119, post_kgpuh=5, usd_per_gpuh=2.0,
                kgpuh_per_trillion=180, trillion_tokens=14.8, gpus=2048)
# Report sec. 4.2: the learning-rate schedule in trillions of tokens.
LR_SEGMENTS_T = dict(flat=10.0, cosine=4.3, constant_2_2e_5=0.333, constant_7_3e_6=0.167)
# Day-6 note (24 h from 2025-02-27 12:00 UTC+8, V3 and R1 together).
DAY6 = dict(avg_nodes=226.75, gpus_per_node=8, usd_per_gpuh=2.0, input_btok=608, cache_hit_btok=342,
            output_btok=168, usd_per_mtok_hit=0.14, usd_per_mtok_miss=0.55, usd_per_mtok_out=2.19,
            printed_cost_usd=87072, printed_revenue_usd=562027)
# Report sec. 2.1.2 / 3.2.2: interconnect bandwidths and the node limit of routing.
LINKS = dict(nvlink_gbs=160, ib_gbs=50, max_nodes=4)


@claim("cost", "DeepSeek-V3 report Table 1 (training cost)")
def cost(quick: bool = False) -> list[dict]:
    t = TRAINING
    total = t["pretrain_kgpuh"] + t["context_kgpuh"] + t["post_kgpuh"]
    usd = lambda kgpuh: kgpuh * 1000 * t["usd_per_gpuh"]  # noqa: E731
    return [
        row("training_gpu_hours_total", "consistency", "2788K H800 GPU-hours in all", 2788, total, "K GPU-h",
            exact("integers of thousands"), "2664K pre-training + 119K context extension + 5K post-training"),
        row("training_cost_usd", "consistency", "$5.576M at $2 per GPU-hour", 5.576e6, usd(total), "USD",
            printed(-3, "printed as $5.576M: to the thousand dollars"), "2788K GPU-h x $2"),
        row("training_cost_pretrain_usd", "consistency", "pre-training $5.328M", 5.328e6, usd(t["pretrain_kgpuh"]),
            "USD", printed(-3, "printed as $5.328M"), "2664K GPU-h x $2"),
        row("training_cost_context_usd", "consistency", "context extension $0.238M", 0.238e6,
            usd(t["context_kgpuh"]), "USD", printed(-3, "printed as $0.238M"), "119K GPU-h x $2"),
        row("training_cost_post_usd", "consistency", "post-training $0.01M", 0.01e6, usd(t["post_kgpuh"]), "USD",
            printed(-4, "printed as $0.01M: to the ten thousand dollars"), "5K GPU-h x $2"),
        row("pretrain_gpu_hours_from_rate", "consistency", "180K GPU-hours per trillion tokens x 14.8T = 2664K",
            2664, t["kgpuh_per_trillion"] * t["trillion_tokens"], "K GPU-h", printed(0), "180K x 14.8"),
        row("days_per_trillion_tokens", "consistency", "one trillion tokens takes 3.7 days on 2048 H800s", 3.7,
            t["kgpuh_per_trillion"] * 1000 / t["gpus"] / 24, "days", printed(1), "180K GPU-h / 2048 GPUs / 24 h"),
        row("pretrain_days", "consistency", "pre-training finished in under two months", 60,
            t["pretrain_kgpuh"] * 1000 / t["gpus"] / 24, "days", upper(why="'under two months': at most 60 days"),
            "2664K GPU-h / 2048 GPUs / 24 h (every GPU-hour as wall time on 2048 GPUs)"),
    ]


@claim("schedule", "DeepSeek-V3 report sec. 4.2 (hyper-parameters)")
def schedule(quick: bool = False) -> list[dict]:
    s = LR_SEGMENTS_T
    return [
        row("lr_schedule_tokens_total", "consistency", "the LR schedule's segments cover the 14.8T training tokens",
            14.8, sum(s.values()), "T tokens", printed(1), "10T flat + 4.3T cosine + 333B + 167B"),
        row("bias_update_tokens", "consistency", "bias update speed 0.001 for the first 14.3T tokens "
            "= the flat and cosine phases", 14.3, s["flat"] + s["cosine"], "T tokens", printed(1), "10T + 4.3T"),
    ]


@claim("routing", "DeepSeek-V3 report sec. 3.2.2 (node-limited routing)")
def routing(quick: bool = False) -> list[dict]:
    ratio = LINKS["nvlink_gbs"] / LINKS["ib_gbs"]
    return [row("ep_experts_per_token_same_ib_cost", "consistency",
                "routing to at most 4 nodes lets a token reach up to 13 experts at the IB cost (3.2 per node)",
                13, LINKS["max_nodes"] * ratio, "experts", printed(0),
                "4 nodes x (NVLink 160 / IB 50 GB/s = 3.2 experts reachable per node)")]


def _day6() -> dict:
    d = DAY6
    gpuh = d["avg_nodes"] * d["gpus_per_node"] * 24
    miss = d["input_btok"] - d["cache_hit_btok"]
    per_b = 1e3                                            # 1B tokens = 1e3 million tokens
    revenue = per_b * (d["cache_hit_btok"] * d["usd_per_mtok_hit"] + miss * d["usd_per_mtok_miss"]
                       + d["output_btok"] * d["usd_per_mtok_out"])
    # The token counts are printed to 1B: carry +-0.5B on each through the revenue formula.
    half = 0.5 * per_b
    rev_tol = half * (abs(d["usd_per_mtok_hit"] - d["usd_per_mtok_miss"]) + d["usd_per_mtok_miss"]
                      + d["usd_per_mtok_out"])
    return dict(cost=gpuh * d["usd_per_gpuh"], hit_share=d["cache_hit_btok"] / d["input_btok"],
                revenue=revenue, revenue_tol=rev_tol)


@claim("day6", "DeepSeek open-infra Day-6 note (inference system, one day of service)")
def day6(quick: bool = False) -> list[dict]:
    x = _day6()
    d = DAY6
    margin = (d["printed_revenue_usd"] - d["printed_cost_usd"]) / d["printed_cost_usd"]
    return [
        row("day6_cost_per_day_usd", "consistency", "$87,072 per day for the average of 226.75 nodes at $2/GPU-h",
            87072, x["cost"], "USD/day", printed(0), "226.75 nodes x 8 H800 x 24 h x $2"),
        row("day6_cache_hit_share", "consistency", "342B of the 608B input tokens (56.3%) hit the KV cache on disk",
            0.563, x["hit_share"], "fraction", printed(3), "342 / 608"),
        row("day6_revenue_usd", "consistency", "theoretical revenue $562,027 per day at R1's prices", 562027,
            x["revenue"], "USD/day",
            absolute(x["revenue_tol"], "the token counts are printed to 1B: +-0.5B on each, carried through "
                                       "the prices, is the most the result can move"),
            "hits x $0.14 + misses x $0.55 + output x $2.19 per million tokens",
            note="the exact revenue needs the unrounded token counts; the note does not give them"),
        row("day6_profit_margin", "consistency", "cost profit margin 545%", 5.45, margin, "fraction",
            printed(2, "printed as 545%: to the percent"), "($562,027 - $87,072) / $87,072, the note's own revenue and cost"),
    ]
