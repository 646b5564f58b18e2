"""Validation: next-token and MTP cross-entropy and MaxVio on fixed windows, the context-free
baseline every model must beat (the unigram cross-entropy), and how well the MTP module drafts
(teacher-forced agreement with the main model; acceptance in speculative decoding)."""

from __future__ import annotations

import torch

from dsv3lab.probes.metrics import max_vio
from dsv3lab.probes.recorder import RoutingRecorder
from dsv3lab.train.losses import lm_losses


def unigram_cross_entropy(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int) -> float:
    """Nats per token of the best context-free model (add-one smoothed train frequencies) on the
    validation stream: the loss a model that learned nothing about context would reach."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val_tokens].mean())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Over fixed windows [N, S+2], in batches of ``batch_size`` (each batch one forward):
    ``val_loss`` next-token CE, ``val_acc`` its top-1 accuracy, ``val_mtp_loss`` (MTP CE, mean over
    depths), ``val_maxvio`` (MaxVio of each batch, mean over batches and MoE layers: the loss-free
    balancing paper's MaxVio_batch) and ``val_maxvio_global`` (MaxVio of the load summed over all
    batches, mean over layers: its MaxVio_global). Batches are weighted equally."""
    was_training = model.training
    model.eval()
    losses, accs, mtps, vios, total = [], [], [], [], None
    with RoutingRecorder(model) as rec:
        for i in range(0, windows.shape[0], batch_size):
            rec.reset()
            stats: dict = {}
            main, mtp = lm_losses(model, windows[i:i + batch_size], stats=stats)
            losses.append(float(main))
            accs.append(stats["accuracy"])
            if mtp:
                mtps.append(float(sum(mtp)) / len(mtp))
            counts = rec.counts()
            if counts:
                load = torch.stack(counts)                      # [gates, E]
                vios.append(float(max_vio(load).mean()))
                total = load if total is None else total + load
    model.train(was_training)
    out = dict(val_loss=sum(losses) / len(losses), val_acc=sum(accs) / len(accs))
    if mtps:
        out["val_mtp_loss"] = sum(mtps) / len(mtps)
    if vios:
        out["val_maxvio"] = sum(vios) / len(vios)
        out["val_maxvio_global"] = float(max_vio(total).mean())
    return out


@torch.no_grad()
def teacher_forced_agreement(model, windows: torch.Tensor) -> float:
    """Fraction of positions i where argmax MTP(h_i, t_{i+1}) == argmax main(t_<=i+1): the draft
    for token i+2 is what the main model itself would predict there."""
    agree = total = 0
    for w in windows.split(8):
        x = w[:, :-1]
        logits, h = model(x, return_hidden=True)
        (mtp,) = model.mtp_logits(h[:, :-1], x[:, 1:], depth=1)
        main_next = logits[:, 1:].argmax(-1)            # main model's prediction of t_{i+2}
        agree += int((mtp.argmax(-1) == main_next).sum())
        total += main_next.numel()
    return agree / total


def speculative_stats(model, val_ids: torch.Tensor, n: int, prompt_len: int, new_tokens: int) -> dict:
    """Acceptance rate and tokens per step of greedy MTP speculative decoding, pooled over ``n``
    prompts cut from the held-out stream at evenly spaced offsets."""
    from dsv3lab.generate import generate_speculative
    stride = max(prompt_len, (val_ids.numel() - prompt_len) // max(1, n))
    steps = accepted = produced = 0
    for j in range(n):
        prompt = val_ids[j * stride:j * stride + prompt_len].tolist()
        out, st = generate_speculative(model, prompt, max_new_tokens=new_tokens, stop_tokens=[],
                                       return_stats=True)
        steps += st["steps"]
        accepted += st["accepted"]
        produced += len(out) - 1                        # the first token comes from the prefill
    return dict(acceptance_rate=accepted / steps, tokens_per_step=produced / steps)
