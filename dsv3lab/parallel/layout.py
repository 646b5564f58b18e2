"""The parallel layout: one object saying how W ranks split the model, checked before any work.

Ranks are numbered ``rank = dp_rank * tp + tp_rank``:

  tp  tensor-parallel ranks per attention group. Inside a group, MLA heads, the dense FFN, the
      shared experts and the vocabulary (embedding rows, head rows) are split; every rank of the
      group holds the same tokens and the same (replicated) latent cache.
  dp  attention data-parallel groups (world = tp * dp). Each group runs its own requests; groups
      meet only inside the MoE layers, where the expert-parallel dispatch mixes their tokens.
  ep  expert-parallel ranks. Consecutive blocks of ``ep`` ranks form an EP group; inside one,
      EP rank j = rank % ep owns the contiguous experts [j*E/ep, (j+1)*E/ep) and holds no other
      routed expert. ``ep`` must divide the world; with ep < world the W/ep EP groups each hold a
      full copy of the routed experts (ep = 1: every rank holds every expert).

Rules (``Layout.validate(cfg)``), each error naming the field and the value:
  tp, ep, dp >= 1; world_size == tp * dp; world_size % ep == 0
  num_attention_heads % tp == 0          heads are split over the TP group
  vocab_size % tp == 0                   embedding / head rows are split over the TP group
  intermediate_size % tp == 0            dense FFN (column then row parallel), when dense layers exist
  n_shared_experts * moe_intermediate_size % tp == 0   shared experts, likewise
  n_routed_experts % ep == 0             each EP rank owns the same number of experts

The MoE tokens of a TP group are split over its ranks (each rank routes T/tp of them: sequence
parallel inside the MoE), so the EP dispatch never sends a token twice from one TP group.
FP8 checkpoints kept in FP8 (``fp8="keep"``) need every split to fall on a 128 boundary of the
weight (so that the weight_scale_inv blocks split with it); ``check_fp8_blocks`` tells which do
not. Dequantizing while loading (the CPU default) works for any split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dsv3lab.config import ModelConfig


class LayoutError(ValueError):
    """A parallel layout does not fit the model or the world of processes."""


MOE_COMM = ("alltoall", "allreduce")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    dp: int = 1
    moe_comm: str = "alltoall"        # "alltoall" (routed tokens only) or "allreduce" (baseline)
    fp8_dispatch: bool = False        # all-to-all rows as e4m3 + 1x128 fp32 scales, combine in bf16

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @classmethod
    def make(cls, world_size: int, tp: Optional[int] = None, ep: Optional[int] = None,
             dp: Optional[int] = None, moe_comm: str = "alltoall", fp8_dispatch: bool = False) -> "Layout":
        """Fill in what is not given: tp = world/dp (or world), dp = world/tp, ep = world.
        The default for W ranks is the official demo's split (tp = ep = W, dp = 1) with
        all-to-all dispatch."""
        W = int(world_size)
        if W < 1:
            raise LayoutError(f"Layout.world_size: must be >= 1, got {W}")
        for name, v in (("tp", tp), ("ep", ep), ("dp", dp)):
            if v is not None and (int(v) != v or v < 1):
                raise LayoutError(f"Layout.{name}: must be an integer >= 1, got {v!r}")
        if tp is None and dp is None:
            tp, dp = W, 1
        elif tp is None:
            if W % dp:
                raise LayoutError(f"Layout.dp={dp}: does not divide world_size={W}")
            tp = W // dp
        elif dp is None:
            if W % tp:
                raise LayoutError(f"Layout.tp={tp}: does not divide world_size={W}")
            dp = W // tp
        if ep is None:
            ep = W
        lay = cls(tp=int(tp), ep=int(ep), dp=int(dp), moe_comm=moe_comm, fp8_dispatch=bool(fp8_dispatch))
        lay.check_world(W)
        return lay

    # --- checks ----------------------------------------------------------------------------
    def check_world(self, world_size: int) -> "Layout":
        for name in ("tp", "ep", "dp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LayoutError(f"Layout.{name}: must be an integer >= 1, got {v!r}")
        if self.moe_comm not in MOE_COMM:
            raise LayoutError(f"Layout.moe_comm: must be one of {MOE_COMM}, got {self.moe_comm!r}")
        if self.fp8_dispatch and self.moe_comm != "alltoall":
            raise LayoutError("Layout.fp8_dispatch: FP8 dispatch quantizes the all-to-all payload, so it "
                              f"needs moe_comm='alltoall', not {self.moe_comm!r}")
        if self.tp * self.dp != world_size:
            raise LayoutError(f"Layout: tp={self.tp} x dp={self.dp} = {self.tp * self.dp} ranks, "
                              f"but the world has world_size={world_size}")
        if world_size % self.ep:
            raise LayoutError(f"Layout.ep={self.ep}: does not divide world_size={world_size} "
                              "(EP groups are consecutive blocks of ep ranks)")
        return self

    def validate(self, cfg: ModelConfig, world_size: Optional[int] = None,
                 redundant_experts: int = 0) -> "Layout":
        """Raise LayoutError unless this layout can split ``cfg``; returns self."""
        self.check_world(self.world_size if world_size is None else world_size)
        tp, ep = self.tp, self.ep

        def need(ok, field, msg):
            if not ok:
                raise LayoutError(f"Layout.{field}: {msg} ({cfg.name})")

        need(cfg.num_attention_heads % tp == 0, "tp",
             f"num_attention_heads={cfg.num_attention_heads} is not divisible by tp={tp}")
        need(cfg.vocab_size % tp == 0, "tp", f"vocab_size={cfg.vocab_size} is not divisible by tp={tp}")
        if cfg.first_k_dense_replace > 0:
            need(cfg.intermediate_size % tp == 0, "tp",
                 f"intermediate_size={cfg.intermediate_size} is not divisible by tp={tp}")
        if cfg.has_moe:
            shared = cfg.n_shared_experts * cfg.moe_intermediate_size
            if shared:
                need(shared % tp == 0, "tp", f"shared expert width n_shared_experts*moe_intermediate_size"
                     f"={shared} is not divisible by tp={tp}")
            n = cfg.n_routed_experts + redundant_experts
            what = (f"n_routed_experts={cfg.n_routed_experts}" if not redundant_experts else
                    f"n_routed_experts + redundant_experts = {cfg.n_routed_experts}+{redundant_experts}")
            need(n % ep == 0, "ep", f"{what} is not divisible by ep={ep}")
        return self

    # --- rank arithmetic ---------------------------------------------------------------------
    def coords(self, rank: int) -> dict:
        return dict(rank=rank, tp_rank=rank % self.tp, dp_rank=rank // self.tp,
                    ep_rank=rank % self.ep, ep_group=rank // self.ep)

    def tp_ranks(self, dp_rank: int) -> list[int]:
        return list(range(dp_rank * self.tp, (dp_rank + 1) * self.tp))

    def ep_ranks(self, ep_group: int) -> list[int]:
        return list(range(ep_group * self.ep, (ep_group + 1) * self.ep))

    def experts_of(self, ep_rank: int, n_experts: int) -> range:
        per = n_experts // self.ep
        return range(ep_rank * per, (ep_rank + 1) * per)

    def describe(self) -> str:
        fp8 = ", FP8 dispatch" if self.fp8_dispatch else ""
        return f"tp={self.tp} dp={self.dp} ep={self.ep} ({self.world_size} ranks, MoE {self.moe_comm}{fp8})"


def check_fp8_blocks(cfg: ModelConfig, layout: Layout, block: int = 128) -> list[str]:
    """Tensors whose per-rank split does not fall on a ``block`` boundary (FP8 kept as FP8 needs
    none). Routed experts are never split, so only the TP-split matrices can appear."""
    tp = layout.tp
    bad = []
    H = cfg.num_attention_heads
    checks = [("q_b_proj/q_proj rows", H * cfg.qk_head_dim // tp),
              ("kv_b_proj rows", H * (cfg.qk_nope_head_dim + cfg.v_head_dim) // tp),
              ("o_proj columns", H * cfg.v_head_dim // tp)]
    if cfg.first_k_dense_replace:
        checks.append(("dense FFN width", cfg.intermediate_size // tp))
    if cfg.n_shared_experts:
        checks.append(("shared expert width", cfg.n_shared_experts * cfg.moe_intermediate_size // tp))
    for name, per_rank in checks:
        if tp > 1 and per_rank % block:
            bad.append(f"{name}: {per_rank} per rank is not a multiple of {block}")
    return bad
