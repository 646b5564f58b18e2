"""``dsv3lab plan``: per-rank memory, KV-cache capacity and all-to-all bytes of a deployment."""

from __future__ import annotations

import json


def cmd_plan(args) -> int:
    from dsv3lab.parallel.plan import format_plan, plan
    from dsv3lab.resolve import resolve_config
    cfg = resolve_config(args.preset)
    p = plan(cfg, args.gpus, args.gpu_mem_gb, tp=args.tp, ep=args.ep, dp=args.dp, context=args.context,
             weights=args.weights, redundant_experts=args.redundant_experts, mtp=not args.no_mtp,
             mem_util=args.mem_util, reserve_gb=args.reserve_gb)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="per-rank weights, KV-cache capacity and all-to-all bytes of a parallel layout")
    p.add_argument("preset", metavar="PRESET_OR_DIR")
    p.add_argument("--gpus", type=int, required=True, help="ranks (world size = tp * dp)")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU in GB (1e9 bytes)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per attention group (default gpus/dp)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (default gpus)")
    p.add_argument("--dp", type=int, default=None, help="attention data-parallel groups (default 1)")
    p.add_argument("--context", type=int, default=4096, help="tokens per request for the concurrency count")
    p.add_argument("--weights", choices=("fp8", "bf16"), default="fp8", help="weight format (default fp8)")
    p.add_argument("--redundant-experts", type=int, default=0, help="extra expert replicas per MoE layer (EPLB)")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP module")
    p.add_argument("--mem-util", type=float, default=0.9, help="fraction of GPU memory usable (default 0.9)")
    p.add_argument("--reserve-gb", type=float, default=0.0, help="GB per GPU kept for activations/workspace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
