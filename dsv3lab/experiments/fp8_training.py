"""FP8 training at lab scale: the loss of fine-grained FP8 GEMMs against BF16 and FP32.

The report's claim (sec. 3.3, and Appendix B.1): training with the fine-grained FP8 recipe --
1x128 activation tiles, 128x128 weight blocks, e4m3 everywhere, FP32 accumulation by promotion,
all three GEMMs of every Linear (Fprop, Dgrad, Wgrad) in FP8, master weights and optimizer in
higher precision -- stays within 0.25 % relative loss error of BF16 training (about 16B and 230B
MoE models, ~1T tokens). Coarser scaling is where FP8 fails: one outlier sets the scale of the
whole tensor and pushes the rest towards underflow.

Arms (same data, windows, steps and initial weights per seed; master weights, gradients and AdamW
in fp32 in every arm; only the operands of the eligible Linears' GEMMs differ,
``dsv3lab.train.fp8_linear``):
  fp32        plain fp32 GEMMs (the reference of references)
  bf16        operands rounded to BF16, fp32 accumulation, BF16 outputs (the report's baseline)
  fp8         the fine-grained recipe, simulated: quantize-dequantize, fp32 matmul
  fp8_tensor  e4m3 with one scale per tensor for activations, weights and gradients

Metrics per arm: validation loss; final training loss (mean of the last 20 % of steps). Derived
per seed, against the bf16 arm of the same seed: the relative validation-loss error
|L - L_bf16| / L_bf16 and the same on the training loss of the last 20 % of steps (each step's
loss, same windows, then the mean). Series: the relative error per step of the smoothed training
loss (window 10 steps), for the figure.
"""

from __future__ import annotations

from dsv3lab.experiments.training import model_config, run_training, tail_mean
from dsv3lab.train.log import smooth

NAME = "fp8_training"
TITLE = "fine-grained FP8 vs per-tensor FP8 vs BF16 vs FP32 GEMMs in training: relative loss error"
PAPER = ("DeepSeek-V3 report sec. 3.3 and App. B.1: fine-grained FP8 training within 0.25 % relative "
         "loss error of BF16 (16B and 230B MoE, ~1T tokens)")
ARMS = ("fp32", "bf16", "fp8", "fp8_tensor")
SMOOTH = 10


def config(quick: bool) -> dict:
    if quick:
        return dict(preset="tiny", docstrings=False, max_docs=40, val_windows=2, threads=1,
                    train=dict(steps=4, batch_size=2, seq_len=16, lr=3e-3, warmup_steps=1, bias_gamma=0.01))
    # The lab preset's width (hidden 256): a 1x128 tile is half a row and a 128x128 block a quarter
    # of a 256x256 weight, so fine-grained and per-tensor scaling really differ (at hidden 64 both
    # are one scale per row / per weight). 100 steps x 4 x 128 tokens is what 4 arms x 3 seeds fit
    # in ~45 min on one core with the GEMMs simulated.
    return dict(preset="lab", docstrings=True, val_windows=32, threads=1,
                train=dict(steps=100, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=10, bias_gamma=0.01))


def scale(cfg: dict) -> str:
    mc = model_config(cfg)
    t = cfg["train"]
    h, tokens = mc.hidden_size, t["batch_size"] * t["seq_len"]
    if h <= 128:
        tiles = "a 1x128 tile is a whole row, a 128x128 block a whole small weight"
    else:
        tiles = (f"a 1x128 activation tile is 1/{h // 128} of a row of K = {h}, a 128x128 block "
                 f"1/{(h // 128) ** 2} of a {h}x{h} weight; the experts' down_proj has K = "
                 f"{mc.moe_intermediate_size}, one tile per row")
    per_expert = tokens * mc.num_experts_per_tok / max(1, mc.n_routed_experts)
    return (f"{cfg['preset']} preset (hidden {h}, {mc.num_hidden_layers} layers, {mc.n_routed_experts} "
            f"routed experts, vocab {mc.vocab_size}: {tiles}), {t['steps']} steps of {t['batch_size']} x "
            f"{t['seq_len']} = {tokens} tokens (Wgrad's 128x1 tiles: {max(1, tokens // 128)} per dense "
            f"Linear, ~{per_expert:.0f} tokens per expert, under one tile); FP8 GEMMs simulated on CPU "
            "(e4m3 quantize-dequantize + fp32 matmul; the tensor cores' limited accumulation is not)")


def run_arm(cfg: dict, arm: str, seed: int) -> dict:
    if arm not in ARMS:
        raise ValueError(f"unknown FP8 arm {arm!r}; arms: {ARMS}")
    out = run_training(cfg, seed, gemm_precision=arm)
    loss = [r["loss"] for r in out["log"]]
    return dict(metrics=dict(val_loss=out["val"]["val_loss"], train_loss=tail_mean(loss)),
                series=dict(loss=loss))


def derive(cfg: dict, seed: int, by_arm: dict) -> dict:
    ref = by_arm["bf16"]
    ref_loss = smooth(ref["series"]["loss"], SMOOTH)
    metrics, series = {}, {}
    for arm in ("fp32", "fp8", "fp8_tensor"):
        r = by_arm[arm]
        metrics[f"{arm}.rel_val_loss_err_vs_bf16"] = (
            abs(r["metrics"]["val_loss"] - ref["metrics"]["val_loss"]) / ref["metrics"]["val_loss"])
        per_step = [abs(a - b) / b for a, b in zip(r["series"]["loss"], ref["series"]["loss"])]
        metrics[f"{arm}.rel_train_loss_err_vs_bf16"] = tail_mean(per_step)
        series[f"{arm}.rel_loss_err_vs_bf16"] = [
            abs(a - b) / b for a, b in zip(smooth(r["series"]["loss"], SMOOTH), ref_loss)]
    return dict(metrics=metrics, series=series)


def figures(result: dict) -> dict:
    from dsv3lab.experiments.plots import seed_band_curves
    return {"relative loss error vs BF16": seed_band_curves(
                result, "rel_loss_err_vs_bf16", arms=("fp32", "fp8", "fp8_tensor"), percent=True,
                ylabel=f"|L - L_bf16| / L_bf16 (training loss, {SMOOTH}-step mean)", hline=0.0025,
                hline_label="report: < 0.25 %"),
            "training loss": seed_band_curves(result, "loss", ylabel="next-token CE (nats/token)")}
