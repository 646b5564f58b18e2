"""Multi-rank engine: tokens/s at world 1, 2, 4 and all-to-all bytes measured vs the planner.

For each world size W and layout (``tp``: tp = ep = W, the official split; ``dp``: tp = 1,
dp = ep = W, data-parallel attention), ``spawn`` runs W local ranks (gloo on CPU; NCCL with one
GPU per rank when there are enough GPUs). Each rank builds the preset with the same seed, keeps
its shard, runs a prefill forward of the whole batch (the dispatch counters of that forward give
the measured all-to-all bytes) and then greedy-generates ``--new-tokens`` for every prompt
(``--repeat`` times; the mean is reported). tokens/s counts generated tokens of all DP groups.

Measured bytes: payload bytes that left any rank in the MoE dispatch + combine of the prefill,
per token per MoE layer. Predicted: ``plan.a2a_bytes_per_token`` at the run's element size
(k * D * elem * 2 * (ep-1)/ep, uniform routing). On 2 shared CPU cores more ranks mostly add
communication and contention: the CPU figures show the machinery works and what it moves, not
the speed-up a GPU node gets.
"""

from __future__ import annotations

import os
import platform
import time

import torch


def add_args(p) -> None:
    p.add_argument("--preset", default="lab", help="model preset (default lab)")
    p.add_argument("--worlds", default="1,2,4", help="world sizes (default 1,2,4)")
    p.add_argument("--layouts", default="tp,dp", help="tp (tp=ep=W) and/or dp (dp=ep=W)")
    p.add_argument("--moe-comm", default="alltoall", choices=("alltoall", "allreduce"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--backend", default=None, help="gloo | nccl (default: nccl when enough GPUs)")


def _layout(kind: str, W: int, comm: str) -> dict:
    if kind == "tp":
        return dict(tp=W, ep=W, dp=1, moe_comm=comm)
    if kind == "dp":
        return dict(tp=1, ep=W, dp=W, moe_comm=comm)
    raise ValueError(f"--layouts: unknown layout {kind!r} (tp or dp)")


def run(args) -> int:
    from dsv3lab.bench import print_table, write_json_atomic
    from dsv3lab.config import ModelConfig
    from dsv3lab.parallel import Layout, spawn
    from dsv3lab.parallel.plan import a2a_bytes_per_token
    from dsv3lab.parallel.runs import rank_run
    cfg = ModelConfig.preset(args.preset)
    worlds = [int(w) for w in str(args.worlds).split(",") if w.strip()]
    backend = args.backend
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend is None:
        backend = "nccl" if ngpu else "gloo"
    if backend == "nccl":
        worlds = [w for w in worlds if w <= ngpu] or [1]
    dtype = torch.float32 if backend == "gloo" else torch.bfloat16
    esz = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    rows = []
    for kind in [k.strip() for k in args.layouts.split(",") if k.strip()]:
        for W in worlds:
            if kind != "tp" and W == 1 and any(r["world"] == 1 for r in rows):
                continue                      # one rank is one rank whatever the layout
            lay = _layout(kind, W, args.moe_comm)
            try:
                Layout(**lay).validate(cfg, W)
            except ValueError as e:
                print(f"skip {kind} W={W}: {e}")
                continue
            t0 = time.perf_counter()
            out = spawn(rank_run, W, args.preset, lay, tokens, max_new_tokens=args.new_tokens, seed=0,
                        dtype=dtype, repeat=args.repeat, backend=backend)
            wall = time.perf_counter() - t0
            ranks = out["ranks"]
            n_layers = sum(1 for c in ranks[0]["forward_comm"] if c["calls"])
            sent = sum(c["bytes_sent"] for r in ranks for c in r["forward_comm"])
            measured = sent / (tokens.numel() * max(n_layers, 1))
            predicted = a2a_bytes_per_token(cfg, lay["ep"], esz, esz) if args.moe_comm == "alltoall" else float("nan")
            t_gen = ranks[0]["t_generate"]
            rows.append(dict(
                layout=kind, world=W, tp=lay["tp"], dp=lay["dp"], ep=lay["ep"], backend=backend,
                tok_per_s=args.batch * args.new_tokens / t_gen if t_gen else float("nan"),
                prefill_ms=ranks[0]["t_forward"] * 1e3,
                a2a_B_per_tok_layer=measured, predicted_B=predicted,
                ratio=measured / predicted if predicted and predicted == predicted else float("nan"),
                max_param_MB=max(r["param_bytes"] for r in ranks) / 1e6,
                wall_s=wall))
    cols = ["layout", "world", "tp", "dp", "ep", "backend", "tok_per_s", "prefill_ms", "a2a_B_per_tok_layer",
            "predicted_B", "ratio", "max_param_MB"]
    print(f"{cfg.name}: batch {args.batch} x {args.prompt_len} prompt, {args.new_tokens} new tokens, "
          f"{dtype}, MoE {args.moe_comm}")
    print_table(rows, cols)
    res = dict(target="parallel", preset=cfg.name, batch=args.batch, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, repeat=args.repeat, moe_comm=args.moe_comm, dtype=str(dtype),
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                            gpus=ngpu), rows=rows)
    path = write_json_atomic(args.out or os.path.join("results", "bench-parallel.json"), res)
    print(f"wrote {path}")
    return 0
