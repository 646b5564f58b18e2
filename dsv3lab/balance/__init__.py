"""Load balancing: EPLB-style expert placement with redundant experts (``eplb``) and the figures
of the 02_load_balancing notebook (``figures``). The aux-loss-free bias update and the
sequence-wise balance loss used in training live in ``dsv3lab.train``."""

from dsv3lab.balance.eplb import (balanced_packing, balancedness, contiguous_placement, gpu_loads,
                                  rebalance_experts, replicate_experts)
from dsv3lab.balance.experiments import (SCHEMES, balancing_ablation, biases_zeroed, docs_windows,
                                         trace_load)
from dsv3lab.balance.figures import gpu_load_bars, maxvio_curves, relative_load_by_layer

__all__ = ["balanced_packing", "balancedness", "contiguous_placement", "gpu_loads",
           "rebalance_experts", "replicate_experts", "SCHEMES", "balancing_ablation", "biases_zeroed",
           "docs_windows", "trace_load", "gpu_load_bars", "maxvio_curves", "relative_load_by_layer"]
