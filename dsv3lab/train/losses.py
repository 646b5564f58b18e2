"""The language-model losses of one training step: next-token CE and the MTP depths' CE.

  loss = CE(next token) + (lambda / D) * sum_k CE_k(token i+1+k)      (DeepSeek-V3 report, sec. 2.2)

The balance losses (sequence-wise and batch-wise, alpha * sum_i f_i P_i) are added by the loop
when asked for; they are defined with the other load metrics (``dsv3lab.probes.metrics``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def lm_losses(model, window: torch.Tensor, mtp_depth: Optional[int] = None, stats: Optional[dict] = None):
    """window [B, S+2] token ids -> (next-token CE, [CE of MTP depth k for k = 1..D]).
    The main model reads positions 0..S-1; depth k predicts token i+1+k from position i.
    ``stats`` (a dict) receives the next-token top-1 accuracy (``accuracy``) and, per depth,
    ``mtp_accuracy`` [..]: the fraction of positions where the argmax is the true token."""
    S = window.shape[1] - 2
    x, nxt = window[:, :S], window[:, 1:S + 1]
    logits, h = model(x, return_hidden=True)
    main = F.cross_entropy(logits.float().flatten(0, 1), nxt.flatten())
    if stats is not None:
        stats["accuracy"] = float((logits.argmax(-1) == nxt).double().mean())
        stats["mtp_accuracy"] = []
    mtp = []
    if len(model.mtp) and (mtp_depth is None or mtp_depth > 0):
        for k, lg in enumerate(model.mtp_logits(h, nxt, depth=mtp_depth), start=1):
            tgt = window[:, 1 + k:1 + k + lg.shape[1]]
            mtp.append(F.cross_entropy(lg.float().flatten(0, 1), tgt.flatten()))
            if stats is not None:
                stats["mtp_accuracy"].append(float((lg.argmax(-1) == tgt).double().mean()))
    return main, mtp
