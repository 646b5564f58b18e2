"""Multi-process engine: tensor, expert and data parallelism applied to the plain model from outside.

  Layout, LayoutError        the split (tp, ep, dp) and its rules (layout.py)
  ParallelContext            this rank and its process groups (context.py)
  apply_layout               shard a model in place for one rank (apply.py, layers.py, dispatch.py)
  ExpertPlacement            physical expert slots per MoE layer, EPLB's map (placement.py)
  apply_placement, ...       rebalance a running model from its observed load (rebalance.py)
  set_fp8_dispatch           e4m3 + 1x128 scales on the all-to-all, bf16 combine (dispatch.py)
  load_sharded               read only this rank's slices of a checkpoint (loading.py)
  spawn, run_generate        launch from a notebook / under torchrun (launch.py)
  plan                       per-rank memory, KV capacity and all-to-all bytes on meta (plan.py)
"""

from dsv3lab.parallel.layout import Layout, LayoutError, check_fp8_blocks
from dsv3lab.parallel.context import ParallelContext
from dsv3lab.parallel.placement import ExpertPlacement
from dsv3lab.parallel.apply import (apply_layout, comm_stats, param_bytes, parallel_state, reset_comm_stats,
                                    set_fp8_dispatch)
from dsv3lab.parallel.rebalance import apply_placement, rebalanced_placement, rank_loads, window_load
from dsv3lab.parallel.dispatch import serve
from dsv3lab.parallel.loading import load_sharded
from dsv3lab.parallel.launch import RankError, add_generate_args, generate_parallel, run_generate, spawn


def plan(*args, **kw):
    """Deployment plan (see ``dsv3lab.parallel.plan.plan``)."""
    from dsv3lab.parallel.plan import plan as _plan
    return _plan(*args, **kw)


__all__ = ["Layout", "LayoutError", "check_fp8_blocks", "ParallelContext", "apply_layout", "comm_stats",
           "param_bytes", "parallel_state", "reset_comm_stats", "serve", "ExpertPlacement", "set_fp8_dispatch",
           "apply_placement", "rebalanced_placement", "rank_loads", "window_load", "load_sharded", "RankError",
           "add_generate_args", "generate_parallel", "run_generate", "spawn", "plan"]
