"""The balancing ablation at lab scale: the aux-loss-free bias against the sequence-wise and
batch-wise aux losses and no balancing, each swept over its one knob.

The claim. DeepSeek-V3 balances its experts with a per-expert selection bias moved against the
load after every step (report sec. 2.1.2), and finds it at least as good as an aux loss (sec.
4.5.2, Table 5; sec. 4.5.3: batch-wise aux ~ aux-free, val loss 2.253 vs 2.258 sequence-wise at
1B). The loss-free balancing paper (LFB) measures the balance: MaxVio_global 0.04 with the bias
against 0.72 with an aux loss (alpha 1e-3), 1B model, 64 routed + 2 shared experts, top-6.

The lab's model is the real engine at a CPU-trainable width with LFB's expert count: the ``tiny``
preset's MLA and widths, 1 dense + 2 MoE layers of 64 routed experts (top-6, one group, so no
group limit) and 2 shared experts, no MTP layer (it would be a third gate). Each arm is one
scheme at one setting:

  aux_free_g<gamma>    the bias update gamma * sign(mean - load) after every step, no aux loss,
                       and, as the report runs it (sec. 4.2: gamma 0.001 until 14.3T of 14.8T
                       tokens, 0 after), gamma = 0 for the last FREEZE_FRACTION of the steps
  seq_aux_a<alpha>     sequence-wise aux loss alpha * sum_i f_i P_i, no bias update
  batch_aux_a<alpha>   the same loss with f and P over the whole batch
  none                 neither

Every arm of one seed starts from the same weights and reads the same windows in the same order.
A scheme's best setting (``best_arms``) is its lowest validation MaxVio_global; the sweep table
puts each setting's validation-loss cost against no balancing (paired by seed) beside it.

Metrics per arm: validation loss; validation MaxVio_global (the load summed over every validation
window, LFB's) and MaxVio_batch (each validation batch's own load, averaged); the training
batches' MaxVio over the last 10 % of steps, and its drift from the 10 % before (about 0 once the
curve has plateaued). Series (every ``BLOCK`` steps): training MaxVio_batch and loss (block means),
MaxVio of the training load summed over the last ``WINDOW`` steps (a running MaxVio_global), the
first MoE layer's load over training (heatmap) and each MoE layer's validation load at the end.
MaxVio of every kind is the mean over the MoE layers.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from dsv3lab.experiments.training import model_config, token_streams, train_config

NAME = "balancing"
TITLE = ("aux-loss-free bias vs sequence-wise / batch-wise aux loss vs none, each swept over gamma or "
         "alpha: MaxVio and validation loss")
PAPER = ("DeepSeek-V3 report sec. 2.1.2, 4.2 (gamma 0.001, then 0 for the last 500B tokens), 4.5.2-4.5.3 "
         "(Table 5; batch-wise aux ~ aux-free, val loss 2.253 vs 2.258 sequence-wise at 1B); loss-free "
         "balancing paper: MaxVio_global 0.04 (bias, u = 0.001) vs 0.72 (aux loss, alpha 0.001) at 1B, "
         "64 routed + 2 shared experts, top-6")
SCHEMES = ("aux_free", "seq_aux", "batch_aux", "none")
FREEZE_FRACTION = 0.5 / 14.8      # the report's gamma = 0 share of the tokens (sec. 4.2)
BLOCK = 5                         # steps per stored point of the curves
WINDOW = 25                       # steps of training load summed for the running MaxVio_global
HEATMAP_BINS = 10                 # rows of the expert-load heatmap over training

# LFB's expert count at the tiny preset's width (module docstring)
MODEL = dict(n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=2,
             moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
             num_nextn_predict_layers=0)


def config(quick: bool) -> dict:
    """Full: 400 steps of 8 x 64 tokens of Python's docs and docstrings (MaxVio has plateaued
    before the end: the drift metric), all ~28K validation tokens, 4 gammas from the paper's
    1e-3 up to 30x it (the lab's learning rate is ~14x the report's, and the bias must keep up
    with the router's drift) and 3 alphas per aux loss from LFB's 1e-3 up. Quick: one setting
    per scheme (the recorded best ones: gamma 3e-3, alpha 0.1), 40 steps of 8 x 32 tokens of the
    reference manual only: too few for the bias to undo the early collapse (the replicate rows
    say so, from the drift)."""
    if quick:
        return dict(preset="tiny", model=dict(MODEL), docstrings=False, max_docs=60, val_windows=64,
                    threads=1, gammas=[3e-3], seq_alphas=[1e-1], batch_alphas=[1e-1],
                    train=dict(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=4))
    return dict(preset="tiny", model=dict(MODEL), docstrings=True, val_windows=100_000, threads=1,
                gammas=[1e-3, 3e-3, 1e-2, 3e-2], seq_alphas=[1e-3, 1e-2, 1e-1],
                batch_alphas=[1e-3, 1e-2, 1e-1],
                train=dict(steps=400, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=20))


def _num(x: float) -> str:
    """1e-3 -> '1e-3', 3e-4 -> '3e-4', 0.03 -> '3e-2' (no dot: arm names go into 'arm.metric')."""
    m, e = f"{x:.0e}".split("e")
    return f"{m}e{int(e)}"


def ARMS(cfg: dict) -> list[str]:
    return ([f"aux_free_g{_num(g)}" for g in cfg["gammas"]] + [f"seq_aux_a{_num(a)}" for a in cfg["seq_alphas"]]
            + [f"batch_aux_a{_num(a)}" for a in cfg["batch_alphas"]] + ["none"])


_ARM = re.compile(r"^(aux_free)_g(.+)$|^(seq_aux|batch_aux)_a(.+)$|^none$")


def parse_arm(arm: str) -> tuple[str, float]:
    """'aux_free_g1e-3' -> ('aux_free', 0.001); 'none' -> ('none', 0.0)."""
    m = _ARM.match(arm)
    try:
        if m and arm == "none":
            return "none", 0.0
        if m and m.group(1):
            return "aux_free", float(m.group(2))
        if m:
            return m.group(3), float(m.group(4))
    except ValueError:
        pass
    raise ValueError(f"unknown balancing arm {arm!r}: 'aux_free_g<gamma>', 'seq_aux_a<alpha>', "
                     "'batch_aux_a<alpha>' or 'none'")


def freeze_step(steps: int) -> int:
    """First step with gamma = 0: the last FREEZE_FRACTION of training (at least one step)."""
    return min(steps - 1, int(round(steps * (1 - FREEZE_FRACTION))))


def arm_settings(cfg: dict, arm: str) -> dict:
    """The TrainConfig fields an arm sets (everything else is shared)."""
    scheme, x = parse_arm(arm)
    if scheme == "aux_free":
        return dict(bias_gamma=x, bias_freeze_step=freeze_step(cfg["train"]["steps"]), aux_alpha=0.0)
    if scheme == "seq_aux":
        return dict(bias_gamma=0.0, aux_alpha=x, aux_kind="sequence")
    if scheme == "batch_aux":
        return dict(bias_gamma=0.0, aux_alpha=x, aux_kind="batch")
    return dict(bias_gamma=0.0, aux_alpha=0.0)


def scale(cfg: dict) -> str:
    mc = model_config(cfg)
    t = cfg["train"]
    return (f"{cfg['preset']} preset widths, {mc.n_routed_experts} routed + {mc.n_shared_experts} shared experts, "
            f"top-{mc.num_experts_per_tok}, {mc.n_moe_layers} MoE layers; {t['steps']} steps of "
            f"{t['batch_size']} x {t['seq_len']} tokens of Python's docs; gamma in {cfg['gammas']} "
            f"(0 for the last {t['steps'] - freeze_step(t['steps'])} steps), alpha in {cfg['seq_alphas']} "
            f"(sequence) / {cfg['batch_alphas']} (batch)")


@torch.no_grad()
def validate(model, windows: torch.Tensor, batch_size: int) -> dict:
    """Validation loss, MaxVio_batch (mean over batches), MaxVio_global and the load [L, E]."""
    from dsv3lab.probes.metrics import max_vio
    from dsv3lab.probes.recorder import RoutingRecorder
    from dsv3lab.train.losses import lm_losses
    losses, vios, total = [], [], None
    with RoutingRecorder(model) as rec:
        for i in range(0, windows.shape[0], batch_size):
            rec.reset()
            main, _ = lm_losses(model, windows[i:i + batch_size], mtp_depth=0)
            losses.append((float(main), windows[i:i + batch_size].shape[0]))
            load = torch.stack(rec.counts())
            vios.append(float(max_vio(load).mean()))
            total = load if total is None else total + load
    n = sum(w for _, w in losses)
    return dict(val_loss=sum(x * w for x, w in losses) / n, maxvio_batch=sum(vios) / len(vios),
                maxvio_global=float(max_vio(total).mean()), load=total)


def _blocks(xs, k: int) -> list[float]:
    return [round(sum(xs[i:i + k]) / len(xs[i:i + k]), 5) for i in range(0, len(xs), k)]


def run_arm(cfg: dict, arm: str, seed: int) -> dict:
    from dsv3lab.probes.metrics import max_vio
    from dsv3lab.train.corpus import eval_windows
    from dsv3lab.train.loop import train
    mc = model_config(cfg)
    steps = cfg["train"]["steps"]
    tok, train_ids, val_ids = token_streams(mc.vocab_size, cfg["docstrings"], cfg.get("max_docs"))
    tc = train_config(cfg, seed, **arm_settings(cfg, arm))
    bins = min(HEATMAP_BINS, steps)
    heat = torch.zeros(bins, mc.n_routed_experts, dtype=torch.float64)
    recent: list[torch.Tensor] = []
    window_vio: list[float] = []

    def on_step(step, row, counts):
        load = torch.stack(counts).double()                   # [moe layers, E]
        heat[step * bins // steps] += load[0]
        recent.append(load)
        if len(recent) > WINDOW:
            recent.pop(0)
        if (step + 1) % BLOCK == 0 or step == steps - 1:
            window_vio.append(round(float(max_vio(sum(recent)).mean()), 5))

    model, log = train(mc, train_ids, None, tc, progress=False, on_step=on_step)
    val = validate(model, eval_windows(val_ids, cfg["val_windows"], tc.seq_len + 2), tc.batch_size)
    vio = [r["maxvio"] for r in log]
    tenth = max(1, len(vio) // 10)
    tail, before = vio[-tenth:], vio[-2 * tenth:-tenth] or vio[-tenth:]
    share = heat / heat.sum(-1, keepdim=True).clamp_min(1) * heat.shape[-1]    # load / mean load
    vshare = val["load"].double() / val["load"].double().mean(-1, keepdim=True)
    return dict(
        metrics=dict(val_loss=val["val_loss"], maxvio_global=val["maxvio_global"], maxvio_batch=val["maxvio_batch"],
                     train_maxvio_batch=sum(tail) / len(tail),
                     train_maxvio_drift=sum(tail) / len(tail) - sum(before) / len(before)),
        series=dict(maxvio=_blocks(vio, BLOCK), maxvio_window=window_vio, loss=_blocks([r["loss"] for r in log], BLOCK),
                    load_heatmap=[[round(x, 3) for x in row] for row in share.tolist()],
                    val_load=[[round(x, 3) for x in row] for row in vshare.tolist()]))


# --- reading a result ----------------------------------------------------------------------------


def arms_of(result: dict, scheme: str) -> list[tuple[float, str]]:
    """[(setting, arm)] of one scheme in a result, by increasing setting."""
    return sorted((parse_arm(a)[1], a) for a in result["arms"] if parse_arm(a)[0] == scheme)


def _paired_loss_cost(result: dict, arm: str) -> float:
    """Mean over seeds of val_loss(arm) - val_loss(none), paired by seed."""
    a = result["metrics"][f"{arm}.val_loss"]["per_seed"]
    b = result["metrics"]["none.val_loss"]["per_seed"]
    return sum(x - y for x, y in zip(a, b)) / len(a)


def best_arms(result: dict, loss_tol: Optional[float] = None) -> dict:
    """{scheme: arm} at each scheme's best setting: its lowest mean validation MaxVio_global.
    ``loss_tol`` (nats/token) first drops the settings whose validation loss is more than that
    above the no-balancing arm's (mean of the per-seed differences; all kept when none
    qualifies). ``none`` maps to itself."""
    out = {}
    has_none = "none.val_loss" in result["metrics"]
    for scheme in SCHEMES:
        arms = [a for _, a in arms_of(result, scheme)]
        if not arms:
            continue
        ok = arms
        if loss_tol is not None and has_none:
            ok = [a for a in arms if _paired_loss_cost(result, a) <= loss_tol] or arms
        out[scheme] = min(ok, key=lambda a: result["metrics"][f"{a}.maxvio_global"]["mean"])
    return out


def sweep_rows(result: dict) -> list[dict]:
    """One row per arm: scheme, setting, mean and std over seeds of MaxVio_global, MaxVio_batch
    (validation), the val loss and its paired cost against ``none``, and whether it is the
    scheme's best."""
    best = set(best_arms(result).values())
    has_none = "none.val_loss" in result["metrics"]
    rows = []
    for scheme in SCHEMES:
        for x, arm in arms_of(result, scheme):
            m = lambda k, s="mean": result["metrics"][f"{arm}.{k}"][s]  # noqa: E731
            rows.append({"scheme": scheme, "gamma / alpha": x if scheme != "none" else None,
                         "MaxVio_global": m("maxvio_global"), "MaxVio_global ±": m("maxvio_global", "std"),
                         "MaxVio_batch": m("maxvio_batch"), "MaxVio_batch ±": m("maxvio_batch", "std"),
                         "val loss": m("val_loss"), "val loss ±": m("val_loss", "std"),
                         "loss cost vs none": _paired_loss_cost(result, arm) if has_none else None,
                         "drift": m("train_maxvio_drift"), "best": arm in best})
    return rows


def train_window_tail(result: dict, arm: str, points: int = 8) -> list[float]:
    """Per seed: the running MaxVio_global of the training stream (the load of the last WINDOW
    batches) averaged over its last ``points`` points (the last points * BLOCK steps): how even
    the load was on the data the router was balanced on, where validation measures held-out
    documents."""
    return [sum(c[-points:]) / len(c[-points:]) for c in result["series"][f"{arm}.maxvio_window"]["per_seed"]]


def uniform_floor(tokens: int, n_experts: int, top_k: int, draws: int = 200, seed: int = 0) -> float:
    """Mean MaxVio of ``tokens`` tokens that each pick ``top_k`` distinct experts uniformly at
    random: the MaxVio a perfectly balanced router still shows on that many tokens (sampling
    noise alone). LFB's 0.04 needs ~(2.5 / 0.04)^2 * E / k tokens to be visible at all."""
    g = torch.Generator().manual_seed(seed)
    from dsv3lab.probes.metrics import max_vio
    out = []
    for _ in range(draws):
        ids = torch.rand(tokens, n_experts, generator=g).topk(top_k, dim=-1).indices
        out.append(float(max_vio(torch.bincount(ids.flatten(), minlength=n_experts).double())))
    return sum(out) / len(out)


def floors(result: dict) -> dict:
    """The uniform-routing MaxVio of one training batch, of the running window and of the whole
    validation set of ``result``'s config."""
    cfg = result["config"]
    mc = model_config(cfg)
    t = cfg["train"]
    batch = t["batch_size"] * t["seq_len"]
    _, _, val_ids = token_streams(mc.vocab_size, cfg["docstrings"], cfg.get("max_docs"))
    n_val = min(cfg["val_windows"], val_ids.numel() // (t["seq_len"] + 2)) * t["seq_len"]
    E, k = mc.n_routed_experts, mc.num_experts_per_tok
    return dict(batch=uniform_floor(batch, E, k), window=uniform_floor(batch * WINDOW, E, k, draws=50),
                val=uniform_floor(n_val, E, k, draws=50), val_tokens=n_val)


def figures(result: dict) -> dict:
    from dsv3lab.experiments import balancing_plots as P
    fl = floors(result)
    return {"sweep": P.sweep(result, floor=fl["val"]),
            "MaxVio during training": P.curves(result, "maxvio", floor=fl["batch"],
                                               ylabel=f"MaxVio_batch of the training batch (mean of {BLOCK} steps)"),
            "running MaxVio_global during training": P.curves(
                result, "maxvio_window", floor=fl["window"],
                ylabel=f"MaxVio of the load of the last {WINDOW} training batches"),
            "training loss": P.curves(result, "loss", ylabel="next-token CE (nats/token)", log=False),
            "expert load over training": P.heatmaps(result, "load_heatmap"),
            "validation load at the end": P.heatmaps(result, "val_load")}
