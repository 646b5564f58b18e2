"""Training logs (one JSON line per step, written atomically) and the training-curve figure."""

from __future__ import annotations

import json
from typing import Iterable, Sequence

from dsv3lab.atomic import write_bytes_atomic


def jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines atomically: a reader sees the old file or the whole new one."""
    write_bytes_atomic(path, jsonl_text(rows).encode())


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def smooth(xs: list[float], k: int) -> list[float]:
    """Trailing moving average over ``k`` steps (shorter at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_training_log(log: Sequence[dict], title: str = ""):
    """Loss (train, MTP, validation) and batch MaxVio against step -> matplotlib Figure."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    steps = [r["step"] for r in log]
    k = max(1, len(log) // 40)
    ax.plot(steps, [r["loss"] for r in log], color="C0", alpha=0.25, lw=0.8)
    ax.plot(steps, smooth([r["loss"] for r in log], k), color="C0", label="train (next token)")
    if log and log[0].get("mtp_loss") is not None:
        ax.plot(steps, smooth([r["mtp_loss"] for r in log], k), color="C1", label="train MTP (token +2)")
    ev = [r for r in log if "val_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color="C2", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    vio = [r["maxvio"] for r in log if r.get("maxvio") is not None]
    if vio:
        bx.plot(steps[:len(vio)], vio, color="C3", alpha=0.25, lw=0.8)
        bx.plot(steps[:len(vio)], smooth(vio, k), color="C3", label="train batch")
        evv = [r for r in ev if "val_maxvio" in r]
        if evv:
            bx.plot([r["step"] for r in evv], [r["val_maxvio"] for r in evv], "o-", color="C2",
                    label="validation")
        bx.legend()
    bx.set_xlabel("step")
    bx.set_ylabel("MaxVio (mean over MoE layers)")
    bx.set_title("expert load imbalance")
    bx.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
