"""Instruments on the engine: hook points, routing traces, expert-load metrics, KV memory.

    logits, cache = run_with_cache(model, tokens, names_filter="layers.*.mlp.gate.hook_*")
    with hooks(model, [("layers.2.hook_resid_post", fn)]): ...
    with dsv3lab.trace(model) as t: model.generate(...)
    t.routing.topk_ids            # [moe_layers, tokens, top_k]
    t.routing.expert_load()       # [moe_layers, n_routed_experts]
    metrics.max_vio(load)         # every load metric and balance loss: dsv3lab.probes.metrics
    with RoutingRecorder(model, scores=True) as rec: ...   # the latest pass, per gate (training)
"""

from dsv3lab.probes.hooks import hook_names, hook_points, hook_table, hooks, matching_names, run_with_cache
from dsv3lab.probes.trace import Routing, Trace, gather, merge, trace
from dsv3lab.probes.formats import (from_megatron, from_sglang, load_trace, save_trace, to_megatron,
                                    to_sglang)
from dsv3lab.probes import memory, metrics
from dsv3lab.probes.metrics import expert_load, max_vio
from dsv3lab.probes.gate import biases_zeroed, moe_gates
from dsv3lab.probes.recorder import RoutingRecorder
from dsv3lab.probes.routing_diff import routing_flips

__all__ = ["hook_names", "hook_points", "hook_table", "hooks", "matching_names", "run_with_cache", "Routing",
           "Trace", "gather", "merge", "trace", "from_megatron", "from_sglang", "load_trace",
           "save_trace", "to_megatron", "to_sglang", "memory", "metrics", "expert_load", "max_vio",
           "biases_zeroed", "moe_gates", "RoutingRecorder", "routing_flips"]
