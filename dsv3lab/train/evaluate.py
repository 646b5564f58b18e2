"""Validation: next-token and MTP cross-entropy and MaxVio on fixed windows, and the context-free
baseline every model must beat (the unigram cross-entropy)."""

from __future__ import annotations

import torch

from dsv3lab.train.losses import lm_losses
from dsv3lab.train.routing import RoutingRecorder, max_violation


def unigram_cross_entropy(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int) -> float:
    """Nats per token of the best context-free model (add-one smoothed train frequencies) on the
    validation stream: the loss a model that learned nothing about context would reach."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val_tokens].mean())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Mean next-token CE, MTP CE and MaxVio (mean over MoE layers) over fixed windows [N, S+2]."""
    was_training = model.training
    model.eval()
    losses, mtps, vios = [], [], []
    with RoutingRecorder(model) as rec:
        for i in range(0, windows.shape[0], batch_size):
            rec.reset()
            main, mtp = lm_losses(model, windows[i:i + batch_size])
            losses.append(float(main))
            if mtp:
                mtps.append(float(sum(mtp)) / len(mtp))
            counts = rec.counts()
            if counts:
                vios.append(sum(max_violation(c) for c in counts) / len(counts))
    model.train(was_training)
    out = dict(val_loss=sum(losses) / len(losses))
    if mtps:
        out["val_mtp_loss"] = sum(mtps) / len(mtps)
    if vios:
        out["val_maxvio"] = sum(vios) / len(vios)
    return out
