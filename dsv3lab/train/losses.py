"""The language-model losses of one training step: next-token CE and the MTP depths' CE.

  loss = CE(next token) + (lambda / D) * sum_k CE_k(token i+1+k)      (DeepSeek-V3 report, sec. 2.2)

The balance losses (sequence-wise and batch-wise, alpha * sum_i f_i P_i) are added by the loop
when asked for; they are defined with the other load metrics.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sequence_balance_loss(scores: torch.Tensor, topk_ids: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """V3's sequence-wise balance loss sum_i f_i P_i (without alpha), averaged over sequences.
    scores [B*T, E] the gate's sigmoid scores, topk_ids [B*T, k]; T tokens per sequence.
    f_i = E / (k T) * #{t: i in TopK_t}; P_i = mean_t s_{i,t} / sum_j s_{j,t}."""
    E = scores.shape[-1]
    s = scores.reshape(batch, -1, E)
    T = s.shape[1]
    chosen = torch.zeros(batch * T, E, device=scores.device).scatter_(1, topk_ids.reshape(batch * T, -1), 1.0)
    f = chosen.view(batch, T, E).sum(1) * (E / (top_k * T))                   # [B,E], no grad
    P = (s / s.sum(-1, keepdim=True)).mean(1)                                 # [B,E]
    return (f * P).sum(-1).mean()


def lm_losses(model, window: torch.Tensor, mtp_depth: Optional[int] = None):
    """window [B, S+2] token ids -> (next-token CE, [CE of MTP depth k for k = 1..D]).
    The main model reads positions 0..S-1; depth k predicts token i+1+k from position i."""
    S = window.shape[1] - 2
    x, nxt = window[:, :S], window[:, 1:S + 1]
    logits, h = model(x, return_hidden=True)
    main = F.cross_entropy(logits.float().flatten(0, 1), nxt.flatten())
    mtp = []
    if len(model.mtp) and (mtp_depth is None or mtp_depth > 0):
        for k, lg in enumerate(model.mtp_logits(h, nxt, depth=mtp_depth), start=1):
            tgt = window[:, 1 + k:1 + k + lg.shape[1]]
            mtp.append(F.cross_entropy(lg.float().flatten(0, 1), tgt.flatten()))
    return main, mtp
