"""Load balancing: EPLB-style expert placement with redundant experts (``eplb``) and the figures
of the 02_load_balancing notebook (``figures``). The aux-loss-free bias update and the
sequence-wise balance loss used in training live in ``dsv3lab.train``."""

from dsv3lab.balance.eplb import (balanced_packing, balancedness, contiguous_placement, gpu_loads,
                                  rebalance_experts, replicate_experts)

__all__ = ["balanced_packing", "balancedness", "contiguous_placement", "gpu_loads",
           "rebalance_experts", "replicate_experts"]
