"""The training loop: the V3 recipe at toy scale, in the order one step runs it.

  1. Forward the main model on a window of S tokens and the MTP depths on the same hidden states
     (``losses.lm_losses``): CE(next token) + (lambda / D) * sum_k CE_k. Only when
     ``aux_alpha > 0``, add alpha times a balance loss per MoE layer: the sequence-wise
     sum_i f_i P_i averaged over the batch's sequences (V3 uses 1e-4 beside the bias), or the
     batch-wise one over all the batch's tokens (report sec. 4.5.3).
  2. Backward, clip the global grad norm to 1.0, AdamW (0.9, 0.95, weight decay 0.1 on matrices),
     linear warm-up then cosine decay of the learning rate.
     ``gemm_precision`` rounds the operands of every eligible Linear's three GEMMs (BF16, or
     FP8 the report's fine-grained way or per tensor; ``fp8_linear.py``); master weights, grads
     and AdamW stay fp32.
  3. Aux-loss-free balancing, outside autograd (``dsv3lab.balance.bias_update``): every gate counts
     the experts its top-k chose in this step's forward and moves its bias against that load;
     from ``bias_freeze_step`` on the biases stay put (the report's gamma = 0 for the last 500B
     tokens, sec. 4.2).

MaxVio of a batch is (max_i load_i - mean load) / mean load, averaged over the MoE layers.
Everything is seeded: the same ``TrainConfig`` and data give the same losses and weights, bit for
bit, on the same machine and thread count.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dsv3lab.balance.bias_update import bias_update
from dsv3lab.config import ModelConfig
from dsv3lab.train.corpus import eval_windows, sample_windows
from dsv3lab.train.evaluate import evaluate
from dsv3lab.train.log import write_jsonl
from dsv3lab.probes.gate import moe_gates
from dsv3lab.probes.metrics import batch_balance_loss, max_vio, sequence_balance_loss
from dsv3lab.probes.recorder import RoutingRecorder
from dsv3lab.train.fp8_linear import gemm_precision
from dsv3lab.train.losses import lm_losses


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3                # peak; cosine decays to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1       # matrices only; norms are not decayed
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3         # loss weight of the MTP depths, (lambda / D) * sum_k CE_k
    bias_gamma: float = 0.001       # aux-loss-free bias step; 0 turns balancing off
    bias_centred: bool = False      # False: the paper's form; True: subtract the mean step
    bias_freeze_step: Optional[int] = None   # gamma = 0 from this step on (V3: after 14.3T of 14.8T tokens)
    aux_alpha: float = 0.0          # balance loss weight (V3: 1e-4 sequence-wise); 0 = off
    aux_kind: str = "sequence"      # "sequence": f, P per sequence; "batch": over the whole batch
    gemm_precision: str = "fp32"    # Linear GEMMs: "fp32", "bf16", "fp8", "fp8_tensor" (fp8_linear.py)
    seed: int = 0
    eval_every: int = 50            # steps between validation passes (and at the last step)
    eval_batches: int = 4
    max_seconds: Optional[float] = None   # stop early (schedule unchanged) after this wall time
    threads: int = 2


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    t = min(1.0, (step - tc.warmup_steps) / span)
    lo = tc.lr * tc.min_lr_ratio
    return lo + 0.5 * (tc.lr - lo) * (1 + math.cos(math.pi * t))


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _adamw(groups, tc: TrainConfig):
    try:
        return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), fused=True)
    except (RuntimeError, TypeError):  # a torch/device without the fused kernel
        return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), foreach=True)


def _balance_loss(tc: TrainConfig, scores: torch.Tensor, topk_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """sum_i f_i P_i of one gate (alpha is applied by the caller), per sequence or per batch."""
    if tc.aux_kind == "batch":
        return batch_balance_loss(scores, topk_ids, top_k, alpha=1.0)
    return sequence_balance_loss(scores, topk_ids, tc.batch_size, top_k, alpha=1.0)


def train(cfg: ModelConfig | str, train_tokens: torch.Tensor, val_tokens: Optional[torch.Tensor] = None,
          tc: TrainConfig = TrainConfig(), model=None, progress: bool = True,
          log_path: Optional[str] = None, on_step: Optional[Callable] = None):
    """Train ``cfg`` (or continue ``model``) on a 1-D token stream. Returns (model, log): the model
    in eval mode and a list of dicts, one per step (step, loss, mtp_loss, lr, maxvio, grad_norm,
    tokens_per_s, elapsed_s, and val_loss/val_mtp_loss/val_maxvio on evaluation steps).
    ``log_path`` gets the log as JSONL, written atomically when training ends. ``on_step(step,
    row, counts)`` is called after every step with its log row and the [E] expert counts per gate
    (e.g. to keep expert-load heatmaps without putting them in the log)."""
    if tc.aux_kind not in ("sequence", "batch"):
        raise ValueError(f"TrainConfig.aux_kind must be 'sequence' or 'batch', got {tc.aux_kind!r}")
    from dsv3lab.model.build import build
    if isinstance(cfg, str):
        cfg = ModelConfig.preset(cfg)
    torch.set_num_threads(tc.threads)
    # Adam's second moments of rarely routed experts underflow into denormals, which are ~100x
    # slower on CPU; flushing them changes nothing measurable and keeps steps uniform.
    flushed = torch.set_flush_denormal(True)
    torch.manual_seed(tc.seed)
    if model is None:
        model = build(cfg, seed=tc.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = _adamw(_param_groups(model, tc.weight_decay), tc)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    length = tc.seq_len + 2
    val_w = (eval_windows(val_tokens, tc.eval_batches * tc.batch_size, length)
             if val_tokens is not None else None)
    gates = moe_gates(model)
    use_aux = tc.aux_alpha > 0
    n_depth = len(model.mtp)
    log: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, desc=f"train {cfg.name}", unit="step")
    t_start = time.perf_counter()
    try:
        with RoutingRecorder(model, scores=use_aux) as rec, gemm_precision(model, tc.gemm_precision):
            for step in range(tc.steps):
                t0 = time.perf_counter()
                lr = lr_at(step, tc)
                for g in opt.param_groups:
                    g["lr"] = lr
                window = sample_windows(train_tokens, tc.batch_size, length, gen)
                rec.reset()
                main, mtp = lm_losses(model, window)
                loss = main
                if mtp:
                    loss = loss + (tc.mtp_lambda / n_depth) * sum(mtp)
                aux = None
                if use_aux:
                    aux = sum(_balance_loss(tc, s, ids, g.cfg.num_experts_per_tok)
                              for g, s, ids in zip(rec.gates, rec.scores, rec.topk_ids) if s is not None)
                    loss = loss + tc.aux_alpha * aux
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {float(loss)} at step {step} "
                                             f"(gemm_precision {tc.gemm_precision!r}, lr {lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                counts = rec.counts()
                if tc.bias_gamma and (tc.bias_freeze_step is None or step < tc.bias_freeze_step):
                    for g, c in zip(gates, counts):
                        if g.has_bias:
                            bias_update(g, c, tc.bias_gamma, tc.bias_centred)
                dt = time.perf_counter() - t0
                row = dict(step=step, loss=float(main.detach()),
                           mtp_loss=(float(sum(mtp).detach()) / len(mtp)) if mtp else None,
                           lr=lr, maxvio=float(max_vio(torch.stack(counts)).mean()) if counts else None,
                           grad_norm=float(gnorm), tokens_per_s=window[:, :tc.seq_len].numel() / dt,
                           elapsed_s=time.perf_counter() - t_start)
                if aux is not None:
                    row["aux_loss"] = float(aux.detach())
                last = step == tc.steps - 1
                out_of_time = tc.max_seconds is not None and row["elapsed_s"] >= tc.max_seconds
                if val_w is not None and ((step + 1) % tc.eval_every == 0 or last or out_of_time):
                    row.update(evaluate(model, val_w, tc.batch_size))
                    model.train()
                log.append(row)
                if on_step is not None:
                    on_step(step, row, counts)
                if bar is not None:
                    bar.update(1)
                    post = dict(loss=f"{row['loss']:.3f}", vio=f"{row['maxvio'] or 0:.2f}")
                    if "val_loss" in row:
                        post["val"] = f"{row['val_loss']:.3f}"
                    bar.set_postfix(post)
                if out_of_time:
                    break
    finally:
        if bar is not None:
            bar.close()
        if flushed:
            torch.set_flush_denormal(False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if log_path:
        write_jsonl(log_path, log)
    return model, log
