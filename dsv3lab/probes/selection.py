"""What the V3.2 indexer selects: selection traces, and the recall of the dense attention mass.

    with dsv3lab.trace(model) as t:            # a model with an indexer (model_type deepseek_v32)
        model(tokens)
    t.selection.topk_indices   # [layers, queries, index_topk] int32 key positions; -1 = empty slot
    t.selection.positions      # [queries] absolute position of each query; .seq, .step likewise

    r = selection_recall(model, tokens, ks=(16, 64, 256))
    r["recall"]                # [layers, heads, len(ks)]  share of dense MLA's attention mass that
                               #                          the indexer's top-k keys carry
    r["oracle"], r["recent"]   # [layers, len(ks)] the best any shared k-set could do, and the k
                               #                  most recent keys (a sliding window)

A selection trace is the routing trace's counterpart for DSA: one row per query token and layer,
recorded from ``self_attn.indexer.hook_topk_indices`` ([B,S,k]); rows are padded to index_topk
(early queries see fewer keys). Memory is bounded like routing traces: ``max_tokens`` keeps the
first N query tokens of the run and counts the rest in ``dropped_tokens``.

Recall (per layer and head, averaged over the queries that see more than k keys, where there is
something to choose): sum over the selected keys t of p_h[s, t], with p_h MLA's dense softmax of
head h for query s over every visible key (``indexer.hook_dense_probs``), in the same forward as the
selection; the residual stream is the model's own (sparse) one. The selection for each k is the
top-k of the indexer's scores with the engine's tie rule (``indexer.select_topk``). The oracle is
the top-k of sum_h p_h (one key set shared by all heads, as DSA's is); "recent" is the window
[s - k + 1, s]. The V3.2 report (sec. 2.1) trains the indexer to match sum_h p_h with a KL loss.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dsv3lab.model.indexer import Indexer, select_topk


def indexers(model) -> list[tuple[int, Indexer]]:
    """(layer index, indexer) of the main blocks that have one."""
    return [(blk.layer, blk.self_attn.indexer) for blk in model.layers if hasattr(blk.self_attn, "indexer")]


class SelectionTrace:
    """Records every query's selected key positions per layer while active (``with`` block)."""

    def __init__(self, model, max_tokens: Optional[int] = None):
        self.model = model
        self.layers = [i for i, _ in indexers(model)]
        if not self.layers:
            raise ValueError("model has no V3.2 indexer (index_topk = 0): nothing to trace")
        self.k = model.cfg.index_topk
        self.max_tokens = max_tokens
        self.dropped_tokens = 0
        self._rows: list[dict] = []          # one per committed pass
        self._pending: dict[int, torch.Tensor] = {}
        self._ctx = None
        self._passes = 0
        self._kept = 0
        self._handles = []

    def _on_indexer(self, module, args, kwargs):
        if module is self._first:
            x = args[0]
            start = args[4] if len(args) > 4 else kwargs.get("start", 0)
            self._ctx = (x.shape[0], x.shape[1], int(start), self._passes)
            self._passes += 1
            self._pending = {}

    def _on_topk(self, layer: int):
        def hook(module, args, out):
            if self._ctx is None:
                return None
            B, S, start, step = self._ctx
            idx = out.detach().to("cpu", torch.int32)
            if idx.shape[-1] < self.k:
                idx = torch.nn.functional.pad(idx, (0, self.k - idx.shape[-1]), value=-1)
            self._pending[layer] = idx.reshape(B * S, self.k)
            if len(self._pending) == len(self.layers):
                self._commit(B, S, start, step)
            return None
        return hook

    def _commit(self, B, S, start, step):
        n = B * S
        keep = n if self.max_tokens is None else max(0, min(n, self.max_tokens - self._kept))
        self.dropped_tokens += n - keep
        if keep:
            pos = torch.arange(start, start + S).repeat(B)
            seq = torch.arange(B).repeat_interleave(S)
            self._rows.append(dict(topk=torch.stack([self._pending[L][:keep] for L in self.layers]),
                                   positions=pos[:keep], seq=seq[:keep],
                                   step=torch.full((keep,), step, dtype=torch.long)))
            self._kept += keep
        self._pending, self._ctx = {}, None

    def __enter__(self) -> "SelectionTrace":
        named = indexers(self.model)
        self._first = named[0][1]
        self._handles.append(self._first.register_forward_pre_hook(self._on_indexer, with_kwargs=True))
        for layer, ix in named:
            self._handles.append(ix.hook_topk_indices.register_forward_hook(self._on_topk(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _cat(self, key, empty):
        if not self._rows:
            return empty
        return torch.cat([r[key] for r in self._rows], dim=1 if key == "topk" else 0)

    @property
    def topk_indices(self) -> torch.Tensor:
        """[layers, queries, index_topk] int32 selected key positions (-1 = empty slot)."""
        return self._cat("topk", torch.zeros(len(self.layers), 0, self.k, dtype=torch.int32))

    @property
    def positions(self) -> torch.Tensor:
        return self._cat("positions", torch.zeros(0, dtype=torch.long))

    @property
    def seq(self) -> torch.Tensor:
        return self._cat("seq", torch.zeros(0, dtype=torch.long))

    @property
    def step(self) -> torch.Tensor:
        return self._cat("step", torch.zeros(0, dtype=torch.long))

    def distance_histogram(self, bins: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                           min_position: int = 0) -> torch.Tensor:
        """[layers, len(bins)+1] share of selected keys at distance s - t in [0, b0), [b0, b1), ...
        (how far back each layer's selection reaches), over queries at positions >= min_position
        (``index_topk`` leaves out the queries that keep every key)."""
        rows = self.positions >= min_position
        idx = self.topk_indices.long()[:, rows]
        dist = self.positions[rows][None, :, None] - idx
        valid = idx >= 0
        edges = torch.tensor(list(bins))
        which = torch.bucketize(dist, edges, right=True)
        out = torch.zeros(idx.shape[0], len(bins) + 1)
        for L in range(idx.shape[0]):
            out[L] = torch.bincount(which[L][valid[L]], minlength=len(bins) + 1).float()
        return out / out.sum(-1, keepdim=True).clamp_min(1)

    def record(self) -> dict:
        """A plain {"tensors", "meta"} record (the routing trace's format)."""
        return dict(tensors=dict(topk_indices=self.topk_indices, positions=self.positions, seq=self.seq,
                                 step=self.step),
                    meta=dict(layers=self.layers, index_topk=self.k, max_tokens=self.max_tokens,
                              dropped_tokens=self.dropped_tokens))


def trace_selection(model, max_tokens: Optional[int] = None) -> SelectionTrace:
    """``with trace_selection(model) as sel:`` records the indexer's selections (see module doc)."""
    return SelectionTrace(model, max_tokens)


@torch.no_grad()
def selection_recall(model, tokens: torch.Tensor, ks: Sequence[int] = (16, 64, 256),
                     min_keys: Optional[int] = None) -> dict:
    """Share of dense MLA's attention mass on the indexer's top-k keys, per layer and head, for
    each k in ``ks``; plus the shared-set oracle and the recent-k window (see module doc).
    Queries that see at most k keys are left out of k's average (everything is selected there)."""
    named = indexers(model)
    if not named:
        raise ValueError("model has no V3.2 indexer (index_topk = 0)")
    if model.attn_mode != "sparse":
        raise ValueError(f"selection_recall runs the model's sparse attention; it is in {model.attn_mode!r}")
    got = {}
    hooks = []
    for layer, ix in named:
        hooks.append(ix.hook_scores.register_forward_hook(
            lambda m, i, o, L=layer: got.__setitem__((L, "scores"), o.detach())))
        hooks.append(ix.hook_dense_probs.register_forward_hook(
            lambda m, i, o, L=layer: got.__setitem__((L, "probs"), o.detach())))
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    H = got[(named[0][0], "probs")].shape[1]
    ks = list(ks)
    recall = torch.zeros(len(named), H, len(ks))
    oracle = torch.zeros(len(named), len(ks))
    recent = torch.zeros(len(named), len(ks))
    S = tokens.shape[1]
    pos = torch.arange(S)
    for li, (layer, _) in enumerate(named):
        sc, p = got[(layer, "scores")].float(), got[(layer, "probs")].float()       # [B,S,T], [B,H,S,T]
        for ki, k in enumerate(ks):
            rows = pos + 1 > max(k, min_keys or 0)                                    # queries with a choice
            if not bool(rows.any()):
                recall[li, :, ki] = oracle[li, ki] = recent[li, ki] = float("nan")
                continue
            sel = select_topk(sc, k)                                                 # [B,S,k]
            keep = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, sel.clamp_min(0), sel >= 0)
            mass = (p * keep[:, None]).sum(-1)                                       # [B,H,S]
            recall[li, :, ki] = mass[:, :, rows].mean(dim=(0, 2))
            shared = p.sum(1)                                                        # [B,S,T]
            top = shared.topk(min(k, shared.shape[-1]), dim=-1).indices
            best = torch.zeros_like(keep).scatter_(-1, top, True)
            oracle[li, ki] = (p * best[:, None]).sum(-1)[:, :, rows].mean()
            window = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - k)  # [S,T]
            recent[li, ki] = (p * window).sum(-1)[:, :, rows].mean()
    return dict(ks=ks, layers=[L for L, _ in named], recall=recall, oracle=oracle, recent=recent)
