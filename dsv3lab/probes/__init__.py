"""Instruments on the engine: hook points, routing traces, expert-load metrics, KV memory.

    logits, cache = run_with_cache(model, tokens, names_filter="layers.*.mlp.gate.hook_*")
    with hooks(model, [("layers.2.hook_resid_post", fn)]): ...
    with dsv3lab.trace(model) as t: model.generate(...)
    t.routing.topk_ids            # [moe_layers, tokens, top_k]
    t.routing.expert_load()       # [moe_layers, n_routed_experts]
"""

from dsv3lab.probes.hooks import hook_names, hook_points, hook_table, hooks, resolve, run_with_cache
from dsv3lab.probes.trace import Routing, Trace, gather, merge, trace
from dsv3lab.probes.formats import (from_megatron, from_sglang, load_trace, save_trace, to_megatron,
                                    to_sglang)
from dsv3lab.probes import load, memory
from dsv3lab.probes.load import expert_load, max_vio

__all__ = ["hook_names", "hook_points", "hook_table", "hooks", "resolve", "run_with_cache", "Routing",
           "Trace", "gather", "merge", "trace", "from_megatron", "from_sglang", "load_trace",
           "save_trace", "to_megatron", "to_sglang", "load", "memory", "expert_load", "max_vio"]
