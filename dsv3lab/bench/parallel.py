"""Multi-rank engine: tokens/s at world 1, 2, 4 and all-to-all bytes measured vs the planner.

For each world size W and layout (``tp``: tp = ep = W, the official split; ``dp``: tp = 1,
dp = ep = W, data-parallel attention), ``spawn`` runs W local ranks (gloo on CPU; NCCL with one
GPU per rank when there are enough GPUs). Each rank builds the preset with the same seed, keeps
its shard, runs a prefill forward of the whole batch (the dispatch counters of that forward give
the measured all-to-all bytes) and then greedy-generates ``--new-tokens`` for every prompt
(``--repeat`` times; the mean is reported). tokens/s counts generated tokens of all DP groups.

Two more rows per world size, on the ``dp`` layout: ``dp-eplb`` serves an EPLB placement with
``--redundant`` extra slots (default ep: one per rank) planned from the single-process trace
of the same prompts (``rebalance_experts``, hierarchical over one node); ``dp-fp8`` dispatches
e4m3 rows with 1x128 scales and combines in bf16. ``balance`` is mean/max pairs per rank as
the dispatchers counted them (mean over MoE layers), ``predicted`` EPLB's figure for the
placement; ``logit_err`` is the FP8 row's max |logit difference| / max |logit| against the
native-dispatch ``dp`` row of the same world.

Measured bytes: payload bytes that left any rank in the MoE dispatch + combine of the prefill,
per token per MoE layer. Predicted: ``plan.a2a_bytes_per_token`` at the run's element size
(k * D * elem * 2 * (ep-1)/ep, uniform routing; FP8 rows: D + 4*ceil(D/128) bytes out, 2*D back). On 2 shared CPU cores more ranks mostly add
communication and contention: the CPU figures show the machinery works and what it moves, not
the speed-up a GPU node gets.
"""

from __future__ import annotations

import os
import platform
import time

import torch


def add_args(p) -> None:
    p.add_argument("--preset", default="lab", help="model preset or checkpoint directory (default lab)")
    p.add_argument("--worlds", default="1,2,4", help="world sizes (default 1,2,4)")
    p.add_argument("--layouts", default="tp,dp,dp-eplb,dp-fp8",
                   help="tp (tp=ep=W), dp (dp=ep=W), dp-eplb (dp with redundant experts), dp-fp8 (dp, FP8 dispatch)")
    p.add_argument("--redundant", type=int, default=None, help="redundant experts for dp-eplb (default: ep)")
    p.add_argument("--moe-comm", default="alltoall", choices=("alltoall", "allreduce"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--backend", default=None, help="gloo | nccl (default: nccl when enough GPUs)")


def _layout(kind: str, W: int, comm: str) -> dict:
    if kind == "tp":
        return dict(tp=W, ep=W, dp=1, moe_comm=comm)
    if kind in ("dp", "dp-eplb"):
        return dict(tp=1, ep=W, dp=W, moe_comm=comm)
    if kind == "dp-fp8":
        return dict(tp=1, ep=W, dp=W, moe_comm="alltoall", fp8_dispatch=True)
    raise ValueError(f"--layouts: unknown layout {kind!r} (tp, dp, dp-eplb or dp-fp8)")


def _balance(ranks) -> float:
    """mean over MoE layers of mean/max pairs computed per rank (the dispatchers' counts)."""
    per = torch.tensor([[c["rows_computed"] for c in r["forward_comm"] if c["calls"]] for r in ranks],
                       dtype=torch.float64)                                  # [ranks, layers]
    if per.numel() == 0 or per.sum() == 0:
        return float("nan")
    return float((per.mean(0) / per.amax(0).clamp_min(1e-12)).mean())


def run(args) -> int:
    from dsv3lab.bench import print_table, write_json_atomic
    from dsv3lab.bench.record import recorded
    from dsv3lab.config import ModelConfig
    from dsv3lab.parallel import Layout, spawn
    from dsv3lab.parallel.plan import a2a_bytes_per_token
    from dsv3lab.balance.eplb import rebalance_experts
    from dsv3lab.parallel.placement import ExpertPlacement
    from dsv3lab.parallel.runs import rank_run, single_run
    from dsv3lab.probes.metrics import balancedness, load_per_rank_replicated
    cfg = ModelConfig.from_hf(args.preset) if os.path.isdir(args.preset) else ModelConfig.preset(args.preset)
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
    rows, native_logits = [], {}
    load = None
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
            placement, predicted_balance = None, float("nan")
            if kind == "dp-eplb":
                if load is None:             # the routing of these prompts, traced in one process
                    ref = single_run(args.preset, tokens, seed=0, dtype=dtype)
                    load = torch.stack([torch.bincount(i.reshape(-1), minlength=cfg.n_routed_experts)
                                        for i in ref["topk_ids"].values()])
                    layers = [int(k.split(".")[1]) for k in ref["topk_ids"]]
                R = W if args.redundant is None else args.redundant
                phy2log, _, _ = rebalance_experts(load, cfg.n_routed_experts + R, cfg.n_group, 1, W)
                placement = ExpertPlacement.from_eplb(phy2log, layers)
                predicted_balance = float(balancedness(load_per_rank_replicated(load, phy2log, W)).mean())
            t0 = time.perf_counter()
            out = spawn(rank_run, W, args.preset, lay, tokens, max_new_tokens=args.new_tokens, seed=0,
                        dtype=dtype, repeat=args.repeat, backend=backend, placement=placement)
            wall = time.perf_counter() - t0
            ranks = out["ranks"]
            n_layers = sum(1 for c in ranks[0]["forward_comm"] if c["calls"])
            sent = sum(c["bytes_sent"] for r in ranks for c in r["forward_comm"])
            measured = sent / (tokens.numel() * max(n_layers, 1))
            if lay.get("fp8_dispatch"):
                from dsv3lab.parallel.dispatch import fp8_row_bytes
                k, D, ep = cfg.num_experts_per_tok, cfg.hidden_size, lay["ep"]
                predicted = k * (fp8_row_bytes(D) + 2 * D) * (ep - 1) / ep
            else:
                predicted = a2a_bytes_per_token(cfg, lay["ep"], esz, esz) if lay["moe_comm"] == "alltoall" else float("nan")
            logit_err = float("nan")
            if kind == "dp":
                native_logits[W] = out["logits"]
            elif kind == "dp-fp8" and W in native_logits:
                ref_l = native_logits[W]
                logit_err = float((out["logits"] - ref_l).abs().max() / ref_l.abs().max())
            t_gen = ranks[0]["t_generate"]
            rows.append(dict(
                layout=kind, world=W, tp=lay["tp"], dp=lay["dp"], ep=lay["ep"], backend=backend,
                tok_per_s=args.batch * args.new_tokens / t_gen if t_gen else float("nan"),
                prefill_ms=ranks[0]["t_forward"] * 1e3,
                a2a_B_per_tok_layer=measured, predicted_B=predicted,
                ratio=measured / predicted if predicted and predicted == predicted else float("nan"),
                max_param_MB=max(r["param_bytes"] for r in ranks) / 1e6,
                balance=_balance(ranks), predicted_balance=predicted_balance, logit_err=logit_err,
                slots_per_rank=len(next(iter(ranks[0]["slots"].values()), [])),
                wall_s=wall))
    cols = ["layout", "world", "tp", "dp", "ep", "backend", "tok_per_s", "prefill_ms", "a2a_B_per_tok_layer",
            "predicted_B", "ratio", "max_param_MB", "slots_per_rank", "balance", "predicted_balance", "logit_err"]
    print(f"{cfg.name}: batch {args.batch} x {args.prompt_len} prompt, {args.new_tokens} new tokens, "
          f"{dtype}, MoE {args.moe_comm}")
    print_table(rows, cols)
    res = dict(target="parallel", preset=cfg.name, batch=args.batch, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, repeat=args.repeat, moe_comm=args.moe_comm, dtype=str(dtype),
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                            gpus=ngpu), rows=rows)
    path = write_json_atomic(args.out or os.path.join("results", "bench-parallel.json"), recorded(res))
    print(f"wrote {path}")
    return 0
