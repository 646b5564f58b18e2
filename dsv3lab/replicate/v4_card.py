"""Derived rows of DeepSeek-V4's model cards: parameters of V4-Flash and V4-Pro, and V4-Pro's cost
at a 1M-token context against V3.2's (27% of the per-token FLOPs, 10% of the KV cache).

Every lab value is the lab's own accounting on its presets (docs/v4.md): parameters counted on
the model built on the meta device (``probes.v4_cost.counts``), FLOPs per token as 2 x the
activated weights plus the core attention products a decode step multiplies
(``v4_cost.per_token_flops``, equal to torch's flop counter on lab sizes), cache bytes per token
as the engine holds them (``v4_cost.kv_bytes``, equal to ``new_cache(...).nbytes()`` on lab
sizes). The card's figures are whole percents and rounded parameter counts: the tolerance is that
rounding (``printed``). What the card counts is not published; the notes say where the lab's
accounting is known to differ.
"""

from __future__ import annotations

import functools

from dsv3lab.replicate.core import claim, printed, row

CONTEXT = 1 << 20          # "1M tokens": the V4 configs' max_position_embeddings


@functools.lru_cache(maxsize=None)
def _counts(preset: str) -> dict:
    from dsv3lab.probes.v4_cost import counts
    return counts(preset)


@claim("v4_card", "DeepSeek-V4 model cards (V4-Flash, V4-Pro)")
def v4_card(quick: bool = False) -> list[dict]:
    from dsv3lab.probes import v4_cost
    GB = 1e9
    m = "dsv3lab.probes.v4_cost.counts('{}'): the model built on the meta device"
    fl, fp = _counts("v4-flash"), _counts("v4-pro")
    flops = v4_cost.per_token_flops("v4-pro", CONTEXT)
    kv = v4_cost.against_v32("v4-pro", CONTEXT)
    schedule = "the v4-pro preset's layer schedule and index_topk are unverified (docs/v4.md#the-presets)"
    return [
        row("v4_flash_params_total", "derived", "V4-Flash: 284B total parameters", 284, fl["total_params"] / GB, "B",
            printed(0), m.format("v4-flash") + f" ({fl['total_params']:,})"),
        row("v4_flash_params_activated", "derived", "V4-Flash: 13B activated parameters", 13,
            fl["activated_params"] / GB, "B", printed(0), m.format("v4-flash") + "; embedding and head included",
            note="13.80B: the card's 13B reads as truncated"),
        row("v4_pro_params_total", "derived", "V4-Pro: 1.6T total parameters", 1.6, fp["total_params"] / 1e12, "T",
            printed(1), m.format("v4-pro") + f" ({fp['total_params']:,})"),
        row("v4_pro_params_activated", "derived", "V4-Pro: 49B activated parameters", 49, fp["activated_params"] / GB,
            "B", printed(0), m.format("v4-pro") + "; embedding and head included",
            note="49.76B: the card's 49B reads as truncated"),
        row("v4_pro_flops_vs_v32_1m", "derived", "V4-Pro at 1M tokens of context: 27% of V3.2's per-token FLOPs",
            27, 100 * flops["ratio"], "%", printed(0, "the card prints a whole percent"),
            f"v4_cost.per_token_flops('v4-pro', {CONTEXT}): (2 x activated weights, embedding excluded, + core "
            "attention of one decode token) for V4-Pro over the same for v3.2-671b (MLA over the indexer's 2048 "
            "keys + the indexer over every key)",
            note="the card does not say what it counts (whether FP4/FP8 products are weighted, the projections, "
                 "the hyper-connections); " + schedule),
        row("v4_pro_kv_vs_v32_1m", "derived", "V4-Pro at 1M tokens of context: 10% of V3.2's KV cache",
            10, 100 * kv["ratio"], "%", printed(0, "the card prints a whole percent"),
            f"v4_cost.against_v32('v4-pro', {CONTEXT}): the engine's V4 cache per token (bf16: window rows, "
            "compressed entries, CSA's indexer keys, the pools' state) over V3.2's latent (bf16) + FP8 indexer keys",
            note="the lab keeps every cached value in bf16; the release stores most of each entry in FP8 "
                 "(V4 report, secondary), which would lower the lab's figure; " + schedule),
    ]
