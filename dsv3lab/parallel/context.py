"""Process groups for a layout: who this rank is, and the groups its collectives run in.

``ParallelContext.init(layout)`` joins (or reuses) the default torch.distributed process group
(torchrun's environment, or ``spawn``'s store) and creates the TP and EP groups; every rank must
call it in the same order, as torch.distributed requires of ``new_group``. A *virtual* context
(``ParallelContext.virtual(layout, rank)``) has a rank but no groups: the planner uses it to
place a meta model, and a one-rank world uses it to run without torch.distributed at all.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from dsv3lab.parallel.layout import Layout, LayoutError


class VirtualGroup:
    """Stands in for a process group in a virtual context: any collective on it is an error."""

    def __repr__(self):
        return "VirtualGroup()"


def check_group(group, what: str) -> None:
    if isinstance(group, VirtualGroup):
        raise RuntimeError(f"{what} needs process groups, but this model was placed with a virtual context "
                           "(planning / loading checks only); use ParallelContext.init() inside a rank")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


@dataclass
class ParallelContext:
    layout: Layout
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Any = None
    ep_group: Any = None
    world_group: Any = None
    virtual: bool = True

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def virtual_for(cls, layout: Layout, rank: int = 0, device="cpu") -> "ParallelContext":
        layout.check_world(layout.world_size)
        if not 0 <= rank < layout.world_size:
            raise LayoutError(f"rank {rank} is outside the world of {layout.world_size} ranks")
        return cls(layout=layout, rank=rank, device=torch.device(device), virtual=True,
                   tp_group=VirtualGroup() if layout.tp > 1 else None,
                   ep_group=VirtualGroup() if layout.ep > 1 else None)

    @classmethod
    def init(cls, layout: Optional[Layout] = None, backend: Optional[str] = None,
             timeout_s: float = 300.0, **layout_kw) -> "ParallelContext":
        """Join torch.distributed (from the environment torchrun sets, unless already joined)
        and build the groups. ``layout`` defaults to ``Layout.make(world, **layout_kw)``."""
        if not dist.is_initialized():
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world > 1 or "MASTER_ADDR" in os.environ:
                backend = backend or default_backend()
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        if dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        else:
            world, rank = 1, 0
        if layout is None:
            layout = Layout.make(world, **layout_kw)
        layout.check_world(world)
        if dist.is_initialized() and dist.get_backend() == "nccl":
            local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        ctx = cls(layout=layout, rank=rank, device=device, virtual=not dist.is_initialized())
        if dist.is_initialized():
            ctx.world_group = dist.group.WORLD
            ctx.tp_group = cls._groups([layout.tp_ranks(d) for d in range(layout.dp)], rank, world)
            ctx.ep_group = cls._groups([layout.ep_ranks(g) for g in range(world // layout.ep)], rank, world)
        return ctx

    @staticmethod
    def _groups(partition: list[list[int]], rank: int, world: int):
        """new_group for every block (collective: all ranks create all), return this rank's."""
        if len(partition) == 1 and len(partition[0]) == world:
            return dist.group.WORLD
        mine = None
        for ranks in partition:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = g
        return mine

    # --- coordinates -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.layout.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.layout.tp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.layout.ep

    def owned_experts(self, n_experts: int) -> range:
        return self.layout.experts_of(self.ep_rank, n_experts)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp_rank {self.tp_rank}, dp_rank {self.dp_rank}, "
                f"ep_rank {self.ep_rank} [{self.layout.describe()}]")
