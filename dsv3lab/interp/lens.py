"""Logit lens: read the residual stream after every block through the model's own output head.

    lens = dsv3lab.logit_lens(model, tokens)            # [n_layers, B, S, vocab]
    lens[-1] == model(tokens)                            # the last block's view is the model's logits
    stats = next_token_stats(lens, tokens)               # prob / rank of the true next token per layer

Row L is ``lm_head(norm(h_L))`` with ``h_L`` the residual out of block L (``layers.L.hook_resid_post``):
the final RMSNorm and the untied head applied early, as nostalgebraist's logit lens does.

``translators=`` (from ``fit_affine_lens``) gives an *affine* lens, a cheap relative of the tuned lens
(Belrose et al. 2023, who train one affine translator per layer by SGD on the KL to the final
logits): here each translator is the ridge least-squares map from h_L to the final hidden state,
fitted in closed form on a few windows, so row L is ``head(A_L h_L + c_L)``. ``lens_kl`` measures on
held-out windows whether it pays (KL of each row to the model's logits, plain against affine).

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
def logit_lens(model, tokens: torch.Tensor, *, mtp: bool = False, translators=None) -> torch.Tensor:
    """tokens [B,S] -> [n_layers (+ MTP depths), B, S, vocab] logits of each block's residual
    (through ``translators[L]`` first when given: the affine lens)."""
    names = [f"layers.{i}.hook_resid_post" for i in range(len(model.layers))]
    logits, cache = run_with_cache(model, tokens, names)
    if translators is not None and len(translators) != len(names):
        raise ValueError(f"{len(translators)} translators for {len(names)} blocks")
    rows = [model.head(cache[n] if translators is None else _translate(translators[i], cache[n]))
            for i, n in enumerate(names)]
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


def _translate(tr, h: torch.Tensor) -> torch.Tensor:
    A, c = tr
    return (h.double() @ A.to(h.device) + c.to(h.device)).to(h.dtype)


@torch.no_grad()
def fit_affine_lens(model, windows: torch.Tensor, ridge: float = 1e-3, batch_size: int = 8) -> list:
    """One translator (A [D,D], c [D], fp64) per block: the ridge least-squares solution of
    h_final ~ h_L A + c over every token of ``windows`` [N,S] (``ridge`` times the mean diagonal of
    the Gram matrix regularises A; the last block's translator is ~identity)."""
    n = len(model.layers)
    names = [f"layers.{i}.hook_resid_post" for i in range(n)]
    hs = [[] for _ in names]
    for i in range(0, windows.shape[0], batch_size):
        _, cache = run_with_cache(model, windows[i:i + batch_size].to(model.device), names)
        for j, nm in enumerate(names):
            hs[j].append(cache[nm].reshape(-1, cache[nm].shape[-1]).double().cpu())
    X = [torch.cat(h) for h in hs]
    Y = X[-1]
    out = []
    for x in X:
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)         # [T, D+1]
        G = xa.T @ xa
        reg = ridge * G.diagonal()[:-1].mean() * torch.eye(G.shape[0], dtype=G.dtype)
        reg[-1, -1] = 0.0                                                        # the offset is free
        W = torch.linalg.solve(G + reg, xa.T @ Y)                                # [D+1, D]
        out.append((W[:-1], W[-1]))
    return out


@torch.no_grad()
def lens_kl(model, windows: torch.Tensor, translators=None, batch_size: int = 8) -> torch.Tensor:
    """[n_layers] mean KL(model logits || lens row) in nats over every position of ``windows``."""
    tot = None
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i:i + batch_size].to(model.device)
        lp = logit_lens(model, w, translators=translators).float().log_softmax(-1)
        ref = lp[-1] if translators is None else model(w).float().log_softmax(-1)
        kl = (ref.exp() * (ref - lp)).sum(-1).sum((1, 2))
        tot = kl if tot is None else tot + kl
    return (tot / (windows.shape[0] * windows.shape[1])).cpu()
