"""Multi-token prediction at lab scale: the same model trained with and without the MTP loss.

The report's claims: the MTP objective (sec. 2.2; depth D = 1, loss weight lambda) improves the
main model at equal training tokens (sec. 4.5.1, Table 4: e.g. Pile-test BPB 0.729 -> 0.729 at the
small scale, benchmark gains elsewhere); at inference the MTP module drafts the second token,
accepted 85-90 % of the time, 1.8x tokens per second (sec. 5.4.3).

Arms (same main model, data, windows, steps and initial main-model weights per seed):
  no_mtp   num_nextn_predict_layers = 0: next-token loss only
  mtp      depth-1 MTP module, loss CE + lambda * CE_mtp

Metrics: next-token validation loss and top-1 accuracy (both arms); for ``mtp`` also the MTP
module's validation loss and accuracy, and speculative decoding on held-out prompts (greedy, the
MTP module as the one-token draft, ``dsv3lab.generate.generate_speculative``): acceptance rate of
the draft and tokens per forward step. ``teacher_forced_agreement`` is the same acceptance on
the held-out text itself: how often the MTP argmax at position i equals the main model's argmax at
position i+1 (what a draft needs to be accepted), free of where greedy decoding wanders.
"""

from __future__ import annotations

from dsv3lab.experiments.training import run_training, tail_mean
from dsv3lab.train.evaluate import speculative_stats, teacher_forced_agreement

NAME = "mtp"
TITLE = "MTP loss on vs off at equal tokens: next-token validation loss/accuracy, draft acceptance"
PAPER = ("DeepSeek-V3 report sec. 2.2 and 4.5.1 (Table 4: MTP improves most benchmarks at equal "
         "tokens, Pile BPB 0.729 vs 0.729 small / 0.658 vs 0.657 large); sec. 5.4.3: second-token "
         "acceptance 85-90 %, 1.8x TPS")
ARMS = ("no_mtp", "mtp")


def config(quick: bool) -> dict:
    if quick:
        return dict(preset="tiny", docstrings=False, max_docs=40, val_windows=2, threads=1,
                    mtp_lambda=0.3, spec_prompts=2, spec_prompt_len=16, spec_new_tokens=12,
                    train=dict(steps=4, batch_size=2, seq_len=16, lr=3e-3, warmup_steps=1, bias_gamma=0.01))
    return dict(preset="tiny", docstrings=True, val_windows=32, threads=1, mtp_lambda=0.3,
                spec_prompts=16, spec_prompt_len=32, spec_new_tokens=64,
                train=dict(steps=150, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=15, bias_gamma=0.01))


def scale(cfg: dict) -> str:
    t = cfg["train"]
    return (f"{cfg['preset']} preset, MTP depth 1 vs none, lambda {cfg['mtp_lambda']}, {t['steps']} steps of "
            f"{t['batch_size']} x {t['seq_len']} tokens of Python's docs; speculative decoding on "
            f"{cfg['spec_prompts']} held-out prompts of {cfg['spec_prompt_len']} tokens, "
            f"{cfg['spec_new_tokens']} new tokens each")


def run_arm(cfg: dict, arm: str, seed: int) -> dict:
    if arm == "no_mtp":
        out = run_training(cfg, seed, model_overrides=dict(num_nextn_predict_layers=0), mtp_lambda=0.0)
    elif arm == "mtp":
        out = run_training(cfg, seed, mtp_lambda=cfg["mtp_lambda"])
    else:
        raise ValueError(f"unknown MTP arm {arm!r}; arms: {ARMS}")
    val, log = out["val"], out["log"]
    metrics = dict(val_loss=val["val_loss"], val_acc=val["val_acc"],
                   train_loss=tail_mean([r["loss"] for r in log]))
    series = dict(loss=[r["loss"] for r in log])
    if arm == "mtp":
        model = out["model"]
        metrics.update(val_mtp_loss=val["val_mtp_loss"],
                       teacher_forced_agreement=teacher_forced_agreement(model, out["val_windows"]),
                       **speculative_stats(model, out["val_ids"], cfg["spec_prompts"], cfg["spec_prompt_len"],
                                           cfg["spec_new_tokens"]))
        series["mtp_loss"] = [r["mtp_loss"] for r in log]
    return dict(metrics=metrics, series=series)


def derive(cfg: dict, seed: int, by_arm: dict) -> dict:
    """The ablation's number: next-token validation loss with MTP minus without (negative = MTP
    helps the main model)."""
    d = by_arm["mtp"]["metrics"]["val_loss"] - by_arm["no_mtp"]["metrics"]["val_loss"]
    a = by_arm["mtp"]["metrics"]["val_acc"] - by_arm["no_mtp"]["metrics"]["val_acc"]
    return dict(metrics=dict(val_loss_delta=d, val_acc_delta=a))


def figures(result: dict) -> dict:
    from dsv3lab.experiments.plots import seed_band_curves
    return {"training loss, with and without MTP": seed_band_curves(
        result, "loss", ylabel="next-token CE (nats/token)")}

