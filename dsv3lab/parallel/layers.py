"""Tensor-parallel layers: each holds one rank's slice of a full weight and says which slice.

  ColumnParallelLinear  rows [start, stop) of W (output features); no communication
  RowParallelLinear     columns [start, stop) of W (input features); all_reduce of the partial sums
  VocabParallelEmbedding rows [start, stop) of the table; foreign ids give zeros; all_reduce
  VocabParallelHead     rows [start, stop) of the head; all_gather of the logit slices

``shard = (dim, start, stop)`` is in the coordinates of the *full* weight, so the sharded loader
reads exactly that slice from the checkpoint (``dsv3lab.parallel.loading``). A group of None (a
one-rank group or a virtual context) makes every collective the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3lab.model.layers import Linear
from dsv3lab.parallel.context import check_group


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    check_group(group, "all_reduce")
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension (rank order)."""
    check_group(group, "all_gather")
    if group is None or dist.get_world_size(group) == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (rank i contributes sizes[i] rows) along dim 0."""
    check_group(group, "all_gather")
    if group is None or len(sizes) == 1:
        return x
    m = max(sizes)
    if m == 0:
        return x.new_empty((0,) + tuple(x.shape[1:]))
    pad = x if x.shape[0] == m else torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _shard_desc(shard) -> str:
    dim, start, stop = shard
    return f"{'rows' if dim == 0 else 'cols'} [{start}, {stop})"


class ColumnParallelLinear(Linear):
    """Output features [start, stop) of a Linear; outputs stay split (no communication)."""

    def __init__(self, in_features, out_features, shard, dtype=None, device=None):
        super().__init__(in_features, out_features, dtype, device)
        self.shard = shard

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + _shard_desc(self.shard)


class RowParallelLinear(Linear):
    """Input features [start, stop) of a Linear; partial products are summed with all_reduce."""

    def __init__(self, in_features, out_features, shard, group=None, dtype=None, device=None):
        super().__init__(in_features, out_features, dtype, device)
        self.shard = shard
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.group)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + _shard_desc(self.shard) + ", all_reduce"


class VocabParallelHead(Linear):
    """Vocabulary rows [start, stop) of the output head; logits are gathered over the group."""

    def __init__(self, in_features, out_features, shard, group=None, dtype=None, device=None):
        super().__init__(in_features, out_features, dtype, device)
        self.shard = shard
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(super().forward(x), self.group)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + _shard_desc(self.shard) + ", all_gather"


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [start, stop): ids outside the slice look up zeros; all_reduce sums ranks."""

    def __init__(self, num_embeddings: int, dim: int, shard, group=None, dtype=None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.shard = shard
        self.group = group
        _, start, stop = shard
        self.weight = nn.Parameter(torch.empty(stop - start, dim, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, start, stop = self.shard
        foreign = (ids < start) | (ids >= stop)
        local = (ids - start).masked_fill(foreign, 0)
        out = F.embedding(local, self.weight).masked_fill(foreign[..., None], 0.0)
        return all_reduce(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, " + _shard_desc(self.shard) + ", all_reduce"
