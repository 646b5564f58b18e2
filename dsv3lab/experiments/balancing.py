"""Load balancing at lab scale: aux-loss-free bias vs sequence-wise vs batch-wise aux loss vs none.

The report's claim (sec. 2.1.2; ablations sec. 4.5.2, Table 5, and sec. 4.5.3): balancing through a
per-expert selection bias, moved against the load after every step, keeps experts balanced
without the gradient interference of an auxiliary loss, so the model is at least as good; and a
batch-wise aux loss (balance over the batch, not each sequence) is as good as the bias. The
loss-free balancing paper (Wang et al. 2024) measures it as MaxVio = (max load - mean) / mean:
MaxVio_global 0.04 with the bias against 0.72 with an aux loss (1B model).

Arms (same model, data, steps, windows and initial weights per seed; only balancing differs):
  aux_free    bias update gamma * sign(mean - load) after each step, no aux loss
  seq_aux     sequence-wise aux loss alpha * sum_i f_i P_i, f and P per sequence, no bias update
  batch_aux   the same loss with f and P over the whole batch, no bias update
  none        neither

Metrics per arm: validation loss and accuracy; validation MaxVio per batch (each validation
batch's load, then the mean) and global (the load summed over all validation batches);
training MaxVio per batch averaged over the last 20 % of steps. Series: training MaxVio and
loss per step, and the expert load of the first MoE layer over training (a heatmap).
"""

from __future__ import annotations

import torch

from dsv3lab.experiments.training import model_config, run_training, tail_mean

NAME = "balancing"
TITLE = "aux-loss-free bias vs sequence-wise / batch-wise aux loss vs none: MaxVio and validation loss"
PAPER = ("DeepSeek-V3 report sec. 2.1.2 and 4.5.2-4.5.3 (Table 5: aux-free matches or beats the "
         "aux-loss baseline; batch-wise aux ~ aux-free, val loss 2.253 vs 2.258 sequence-wise at 1B); "
         "loss-free balancing paper: MaxVio_global 0.04 (bias) vs 0.72 (aux loss) at 1B")
ARMS = ("aux_free", "seq_aux", "batch_aux", "none")

HEATMAP_BINS = 20       # rows of the expert-load heatmap over training


def config(quick: bool) -> dict:
    """The paper's gamma = 1e-3 and alpha = 1e-4 are sized for ~1e5 steps of large batches; at a
    few hundred steps they do nothing visible, so both are scaled up (and stated)."""
    if quick:
        return dict(preset="tiny", docstrings=False, max_docs=40, val_windows=2, threads=1,
                    gamma=0.01, alpha=0.03,
                    train=dict(steps=4, batch_size=2, seq_len=16, lr=3e-3, warmup_steps=1))
    return dict(preset="tiny", docstrings=True, val_windows=32, threads=1, gamma=0.01, alpha=0.03,
                train=dict(steps=150, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=15))


def scale(cfg: dict) -> str:
    mc = model_config(cfg)
    t = cfg["train"]
    return (f"{cfg['preset']} preset ({mc.n_routed_experts} routed experts, top-{mc.num_experts_per_tok}, "
            f"{mc.n_moe_layers} MoE layers + MTP), {t['steps']} steps of {t['batch_size']} x {t['seq_len']} "
            f"tokens of Python's docs; gamma {cfg['gamma']}, alpha {cfg['alpha']}; "
            f"validation {cfg['val_windows']} windows")


def arm_settings(cfg: dict, arm: str) -> dict:
    """The TrainConfig fields an arm sets (everything else is shared)."""
    if arm == "aux_free":
        return dict(bias_gamma=cfg["gamma"], aux_alpha=0.0)
    if arm == "seq_aux":
        return dict(bias_gamma=0.0, aux_alpha=cfg["alpha"], aux_kind="sequence")
    if arm == "batch_aux":
        return dict(bias_gamma=0.0, aux_alpha=cfg["alpha"], aux_kind="batch")
    if arm == "none":
        return dict(bias_gamma=0.0, aux_alpha=0.0)
    raise ValueError(f"unknown balancing arm {arm!r}; arms: {ARMS}")


def run_arm(cfg: dict, arm: str, seed: int) -> dict:
    steps = cfg["train"]["steps"]
    bins = min(HEATMAP_BINS, steps)
    heat = None

    def on_step(step, row, counts):
        nonlocal heat
        if heat is None:
            heat = torch.zeros(bins, counts[0].numel(), dtype=torch.float64)
        heat[step * bins // steps] += counts[0].double()

    out = run_training(cfg, seed, on_step=on_step, **arm_settings(cfg, arm))
    log, val = out["log"], out["val"]
    vio = [r["maxvio"] for r in log]
    share = heat / heat.sum(-1, keepdim=True).clamp_min(1) * heat.shape[-1]    # load / mean load
    return dict(
        metrics=dict(val_loss=val["val_loss"], val_acc=val["val_acc"], maxvio_batch=val["val_maxvio"],
                     maxvio_global=val["val_maxvio_global"], train_maxvio_batch=tail_mean(vio)),
        series=dict(maxvio=vio, loss=[r["loss"] for r in log],
                    load_heatmap=[[round(x, 4) for x in row] for row in share.tolist()]))


def figures(result: dict) -> dict:
    from dsv3lab.experiments.plots import balancing_heatmaps, seed_band_curves
    mc = model_config(result["config"])
    return {"MaxVio during training": seed_band_curves(
                result, "maxvio", ylabel="MaxVio of the training batch (mean over MoE layers)",
                ceiling=mc.n_routed_experts / mc.num_experts_per_tok - 1),
            "training loss": seed_band_curves(result, "loss", ylabel="next-token CE (nats/token)"),
            "expert load over training": balancing_heatmaps(result)}
