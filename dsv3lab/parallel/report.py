"""Tables and figures of a multi-rank run (``rank_run``'s result): what the notebook shows."""

from __future__ import annotations

import torch


def compare(out: dict, ref: dict) -> dict:
    """How a parallel run differs from the single-process reference."""
    lg, rl = out["logits"], ref["logits"]
    same_routing = set(out["topk_ids"]) == set(ref["topk_ids"]) and all(
        torch.equal(out["topk_ids"][k], v) for k, v in ref["topk_ids"].items())
    return dict(max_rel_logit_diff=float((lg - rl).abs().max() / rl.abs().max()), routing_equal=same_routing,
                generated_equal=out.get("generated") == ref.get("generated"))


def rank_table(out: dict, checkpoint_bytes: int | None = None) -> list[dict]:
    """One row per rank: coordinates, experts owned, bytes held / read, RSS."""
    rows = []
    for r in out["ranks"]:
        c = r["coords"]
        e = r["experts"]
        row = dict(rank=r["rank"], tp_rank=c["tp_rank"], dp_rank=c["dp_rank"], ep_rank=c["ep_rank"],
                   experts=f"{e[0]}..{e[-1]}" if e else "-", params_MB=r["param_bytes"] / 1e6)
        if r.get("bytes_read") is not None:
            row["read_MB"] = r["bytes_read"] / 1e6
            if checkpoint_bytes:
                row["read_share"] = r["bytes_read"] / checkpoint_bytes
        row["rss_MB"] = r["rss"] / 1e6
        row["tokens_in"] = r["tokens_in"]
        rows.append(row)
    return rows


def plot_dispatch(out: dict, which: str = "forward_comm", title: str | None = None):
    """Grouped bars: (token, expert) pairs each rank sent (left) and received (right) per MoE
    layer, split into pairs that stayed on the rank and pairs that crossed to another rank."""
    import matplotlib.pyplot as plt
    ranks = out["ranks"]
    layers = [c["layer"] for c in ranks[0][which] if c["calls"]]
    n = len(ranks)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    width = 0.8 / n
    for ax, key, label in ((axes[0], "pairs_sent", "sent"), (axes[1], "pairs_recv", "received")):
        for i, r in enumerate(ranks):
            stats = [c for c in r[which] if c["calls"]]
            ep_rank = r["coords"]["ep_rank"]
            local = [c[key][ep_rank] for c in stats]
            remote = [sum(c[key]) - c[key][ep_rank] for c in stats]
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(layers))]
            b = ax.bar(xs, remote, width, label=f"rank {r['rank']} (other ranks)")
            ax.bar(xs, local, width, bottom=remote, color=b.patches[0].get_facecolor(), alpha=0.35,
                   label=f"rank {r['rank']} (own experts)")
        ax.set_xticks(range(len(layers)), [f"layer {l}" for l in layers])
        ax.set_title(f"(token, expert) pairs {label}")
    axes[0].set_ylabel("pairs")
    h, l = axes[0].get_legend_handles_labels()
    fig.legend(h, l, fontsize=7, ncol=min(2 * n, 4), loc="lower center", frameon=False)
    fig.suptitle(title or f"expert-parallel dispatch: {out.get('layout', '')}")
    fig.tight_layout(rect=(0, 0.06 * (1 + (2 * n - 1) // 4), 1, 1))
    return fig


def plot_rank_load(res: dict, title: str | None = None):
    """``rebalance_run``'s result: pairs each rank's experts computed per MoE layer, measured by
    the dispatchers before (contiguous placement) and after the live re-placement (bars), with
    EPLB's prediction for each (dots), and the balancedness (mean/max) of every layer."""
    import matplotlib.pyplot as plt
    layers = res["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, when in zip(axes, ("before", "after")):
        measured = res[f"measured_{when}"].double()            # [layers, ranks]
        predicted = res[f"predicted_{when}"]                   # [layers, ep]
        L, R = measured.shape
        width = 0.8 / L
        for i, layer in enumerate(layers):
            xs = [r + (i - (L - 1) / 2) * width for r in range(R)]
            b = ax.bar(xs, measured[i].tolist(), width, label=f"layer {layer}")
            if predicted.shape[1] == R:
                ax.plot(xs, predicted[i].tolist(), "o", ms=3, color="black")
        bal = res[f"balancedness_measured_{when}"]
        what = "contiguous experts" if when == "before" else f"EPLB, {res['placement'].redundant(res['load'].shape[1])} redundant"
        ax.set_title(f"{what}: balancedness {bal.mean():.3f} (min {bal.min():.3f})", fontsize=10)
        ax.set_xticks(range(R), [f"rank {r}" for r in range(R)])
    axes[0].set_ylabel("(token, expert) pairs computed")
    axes[0].plot([], [], "o", ms=3, color="black", label="EPLB predicted")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title or f"per-rank expert load, measured by the dispatchers ({res.get('layout', '')})")
    fig.tight_layout()
    return fig
