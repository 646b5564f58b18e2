"""Logit lens: read the residual stream after every block through the model's own output head.

    lens = dsv3lab.logit_lens(model, tokens)            # [n_layers, B, S, vocab]
    lens[-1] == model(tokens)                            # the last block's view is the model's logits
    stats = next_token_stats(lens, tokens)               # prob / rank of the true next token per layer

Row L is ``lm_head(norm(h_L))`` with ``h_L`` the residual out of block L (``layers.L.hook_resid_post``):
the final RMSNorm and the untied head applied early, as nostalgebraist's logit lens does. Nothing is
fitted (no tuned lens: with 6 blocks of width 256 the lab model's early rows are already readable,
and a per-layer translator would need its own training set and held-out check).

``mtp=True`` appends one row per MTP depth k, **aligned by target**: at position j the row holds the
MTP module's prediction of token j+1, made from the main hidden state at position j-1-k and the
embedding of the tokens in between (depth 0 reads h_{j-1} and Emb(t_j); DeepSeek-V3 report sec.
2.2). Every row then predicts the same token at the same position, so the MTP view compares directly
with the main model's last row; positions j < 1+k have no MTP prediction and hold NaN (documented
padding, not an error).
"""

from __future__ import annotations

import torch

from dsv3lab.probes import run_with_cache


@torch.no_grad()
def logit_lens(model, tokens: torch.Tensor, *, mtp: bool = False) -> torch.Tensor:
    """tokens [B,S] -> [n_layers (+ MTP depths), B, S, vocab] logits of each block's residual."""
    names = [f"layers.{i}.hook_resid_post" for i in range(len(model.layers))]
    logits, cache = run_with_cache(model, tokens, names)
    rows = [model.head(cache[n]) for n in names]
    if mtp and len(getattr(model, "mtp", [])):
        B, S = tokens.shape
        h = cache[names[-1]]                     # == hook_final: the hidden state MTP reads
        for k, lg in enumerate(model.mtp_logits(h[:, :-1], tokens[:, 1:])):
            row = torch.full((B, S, lg.shape[-1]), float("nan"), dtype=lg.dtype, device=lg.device)
            row[:, 1 + k:1 + k + lg.shape[1]] = lg
            rows.append(row)
    return torch.stack(rows)


@torch.no_grad()
def next_token_stats(lens: torch.Tensor, tokens: torch.Tensor, reference: int | None = None) -> dict:
    """For each lens row and position j < S-1, how it rates the true next token t_{j+1}:
    ``prob`` [R,B,S-1], ``rank`` [R,B,S-1] (0 = top), ``entropy`` [R,B,S-1] (nats), ``kl_to_final``
    [R,B,S-1] (KL(reference || row), nats), ``top`` [R,B,S-1] argmax ids. ``reference`` is the row
    the KL is taken against; None = the last row without NaN padding (the model's own logits when
    MTP rows are appended). Where a row is NaN padding every statistic is NaN (``top`` is -1)."""
    lp = lens[:, :, :-1].float().log_softmax(-1)
    pad = torch.isnan(lp[..., 0])                                        # [R,B,S-1]
    if reference is None:
        full = [r for r in range(lens.shape[0]) if not bool(pad[r].any())]
        reference = full[-1] if full else lens.shape[0] - 1
    tgt = tokens[:, 1:].to(lens.device)
    tgt_lp = lp.gather(-1, tgt[None, :, :, None].expand(lp.shape[0], -1, -1, 1)).squeeze(-1)
    rank = (lp > tgt_lp[..., None]).sum(-1).float().masked_fill(pad, float("nan"))
    safe = lp.masked_fill(pad[..., None], 0.0)
    entropy = -(safe.exp() * safe).sum(-1).masked_fill(pad, float("nan"))
    ref = lp[reference]
    kl = (ref.exp() * (ref - safe)).sum(-1).masked_fill(pad, float("nan"))
    top = safe.argmax(-1).masked_fill(pad, -1)
    return dict(prob=tgt_lp.exp(), rank=rank, entropy=entropy, kl_to_final=kl, top=top)
