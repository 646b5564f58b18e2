"""Validation: next-token and MTP cross-entropy and MaxVio on fixed windows, and the context-free
baseline every model must beat (the unigram cross-entropy)."""

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
