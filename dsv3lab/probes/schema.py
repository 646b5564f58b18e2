"""The routing-trace record: its names, its streams and its empty tensors.

A record is a plain dict ``{"tensors": {name: Tensor}, "meta": {...}}``. The main stream's
tensors sit under bare names, MTP depth K's under ``mtp.K.<name>``:

  token keys  [N]       token_ids, positions, seq (batch row in its step), step (forward pass
                        id), rank (where the token was traced; added by ``merge``)
  layer keys  [L,N,...] topk_ids [L,N,k] int64, topk_weights [L,N,k] fp32, and on request
                        scores [L,N,E] fp32 and group_mask [L,N,G] bool

Token keys concatenate along dim 0, layer keys along dim 1 (``cat_dim``). The recorder
(``trace.py``) and the file formats (``formats.py``) both build on this module and on nothing
of each other's schema, so neither imports the other to learn what a record is.
"""

from __future__ import annotations

import torch

FORMAT = "dsv3lab-trace"
VERSION = 1
TOKEN_KEYS = ("token_ids", "positions", "seq", "step", "rank")
LAYER_KEYS = ("topk_ids", "topk_weights", "scores", "group_mask")


def stream_prefixes(record: dict) -> list[str]:
    """'' for the main stream, then 'mtp.K.' for every MTP depth present."""
    return [""] + [f"mtp.{k}." for k in record["meta"].get("mtp_depths", [])]


def cat_dim(key: str) -> int:
    """The token axis of a record tensor named ``key`` (bare, without its stream prefix)."""
    return 0 if key in TOKEN_KEYS else 1


def empty_stream_tensors(n_layers: int, top_k: int, n_experts: int, n_group: int,
                         scores: bool = False, groups: bool = False, prefix: str = "") -> dict:
    """Zero-token tensors of one stream (what a stream that never ran holds)."""
    out = {key: torch.empty(0, dtype=torch.int64) for key in ("token_ids", "positions", "seq", "step")}
    out["topk_ids"] = torch.empty(n_layers, 0, top_k, dtype=torch.int64)
    out["topk_weights"] = torch.empty(n_layers, 0, top_k, dtype=torch.float32)
    if scores:
        out["scores"] = torch.empty(n_layers, 0, n_experts, dtype=torch.float32)
    if groups:
        out["group_mask"] = torch.empty(n_layers, 0, n_group, dtype=torch.bool)
    return {prefix + k: v for k, v in out.items()}
