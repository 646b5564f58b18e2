"""Load balancing: EPLB-style expert placement with redundant experts (``eplb``) and the figures
of the 02_load_balancing notebook (``figures``), and the aux-loss-free bias update used in
training (``bias_update``), with a router-only simulation of how balanced it can get per batch
size (``bias_sim``). The balance metrics and losses (MaxVio, balancedness, load per GPU,
the sequence- and batch-wise losses) have their one home in ``dsv3lab.probes.metrics``."""

from dsv3lab.balance.bias_update import bias_update
from dsv3lab.balance.eplb import (balanced_packing, balancedness, contiguous_placement, gpu_loads,
                                  rebalance_experts, replicate_experts)
from dsv3lab.balance.traced_load import docs_windows, trace_load
from dsv3lab.balance.figures import gpu_load_bars, maxvio_curves, relative_load_by_layer
from dsv3lab.probes.gate import biases_zeroed

__all__ = ["bias_update", "balanced_packing", "balancedness", "contiguous_placement", "gpu_loads",
           "rebalance_experts", "replicate_experts", "biases_zeroed",
           "docs_windows", "trace_load", "gpu_load_bars", "maxvio_curves", "relative_load_by_layer"]
