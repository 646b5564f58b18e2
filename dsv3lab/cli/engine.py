"""The engine's commands: ``dsv3lab info`` (a preset's or checkpoint's parameters, KV-cache bytes,
FLOPs and this CPU's C kernels) and ``dsv3lab generate`` (text or ids from a checkpoint, one
process or under torchrun)."""

from __future__ import annotations

import json
import os

from dsv3lab.cli.args import add_generate_args, add_memory_args, parse_dtype, print_generations, prompts_from_args
from dsv3lab.resolve import resolve_config
from dsv3lab.tokenizer import load_tokenizer


def cmd_info(args) -> int:
    from dsv3lab.family import v4_config_of
    from dsv3lab.stats import model_stats
    v4 = v4_config_of(args.name)
    cfg = v4 or resolve_config(args.name)
    s = model_stats(cfg, context=args.context)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    g = 1e9
    if v4 is not None:
        print_v4_info(v4, s)
        print_cpu_kernels(measure=args.kernels)
        if args.load:
            import dsv3lab
            model = dsv3lab.load(args.name, fp8=args.fp8, max_memory=args.max_memory)   # refuses what V4 lacks
            print(f"  loaded in {model._dsv3_load['seconds']:.2f} s, {model._dsv3_load['bytes_read'] / 1e6:.1f} MB read")
        return 0
    print(f"{cfg.name}: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), D={cfg.hidden_size}, "
          f"H={cfg.num_attention_heads}, E={cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, "
          f"{cfg.n_group} groups, {cfg.topk_group} kept) + {cfg.n_shared_experts} shared, MTP depth "
          f"{cfg.num_nextn_predict_layers}")
    print(f"  total params          {s['total_params']:>20,}  ({s['total_params'] / g:.1f}B)")
    print(f"  activated params      {s['activated_params']:>20,}  ({s['activated_params'] / g:.1f}B, incl. embedding + head)")
    print(f"  MTP params            {s['mtp_params']:>20,}  ({s['mtp_params'] / g:.2f}B unique)")
    print(f"  checkpoint params     {s['checkpoint_params']:>20,}  (incl. MTP copies of embedding/head)")
    mtp_kv = s["kv_cache_bytes_per_token_with_mtp"]
    with_mtp = f"; {mtp_kv:,} with the MTP layers'" if mtp_kv != s["kv_cache_bytes_per_token"] else ""
    print(f"  KV cache / token      {s['kv_cache_bytes_per_token']:>20,}  bytes (bf16 latent, absorbed MLA{with_mtp})")
    print(f"  KV cache / token      {s['kv_cache_bytes_per_token_naive']:>20,}  bytes (bf16, naive per-head K/V)")
    print(f"  forward FLOPs / token {s['forward_flops_per_token'] / g:>20.1f}  GFLOP at {args.context} context")
    print(f"  train FLOPs / token   {s['train_flops_per_token'] / g:>20.1f}  GFLOP (3x fwd, {s['train_seq_len']}-token sequences)")
    print(f"  softmax scale         {s['softmax_scale']:>20.7f}")
    print_cpu_kernels(measure=args.kernels)
    if args.load:
        import dsv3lab
        from dsv3lab.checkpoint import load_summary
        if not os.path.isdir(args.name):
            raise SystemExit(f"dsv3lab info --load needs a checkpoint directory, got {args.name!r}")
        model = dsv3lab.load(args.name, fp8=args.fp8, max_memory=args.max_memory)
        print("  " + load_summary(model._dsv3_load))
    return 0


def print_v4_info(cfg, s: dict) -> None:
    """``dsv3lab info`` of a DeepSeek-V4 config (``probes.v4_cost.v4_stats``)."""
    from collections import Counter
    g, T = 1e9, s["context"]
    kinds = ", ".join(f"{n} {k.replace('_attention', '').replace('_', ' ')}" for k, n in Counter(cfg.layer_types).items())
    print(f"{cfg.name}: DeepSeek-V4, {cfg.num_hidden_layers} layers ({kinds}), D={cfg.hidden_size}, "
          f"H={cfg.num_attention_heads} x {cfg.head_dim} (one KV head), window {cfg.sliding_window}, "
          f"E={cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.scoring_func}, "
          f"{cfg.mlp_layer_types.count('hash_moe')} hash layers) + {cfg.n_shared_experts} shared, mHC x{cfg.hc_mult}")
    print(f"  total params          {s['total_params']:>20,}  ({s['total_params'] / g:.1f}B)")
    print(f"  activated params      {s['activated_params']:>20,}  ({s['activated_params'] / g:.1f}B, incl. embedding + head)")
    print(f"  KV cache / token      {s['kv_cache_bytes_per_token']:>20,.1f}  bytes at {T} context (bf16: window + "
          f"compressed entries + indexer keys + state); {s['kv_cache_bytes_per_token_limit']:,.1f} as context grows; "
          f"{100 * s['kv_vs_v32']:.1f}% of V3.2-671B's")
    print(f"  forward FLOPs / token {s['forward_flops_per_token'] / g:>20.1f}  GFLOP at {T} context "
          f"({100 * s['forward_flops_vs_v32']:.1f}% of V3.2-671B's)")


def print_cpu_kernels(measure: bool) -> None:
    """The C decode kernels on this CPU: the tier built, and which measured faster than torch
    (kernels/cpu_calibrate.py); measured now when ``measure`` and not yet stored."""
    import torch

    from dsv3lab.kernels import cpu_compile, cpu_calibrate, cpu_decode
    where = f"-march={cpu_compile.march()} ({cpu_compile.isa_summary()}), {torch.get_num_threads()} threads"
    if not cpu_decode.available():
        print(f"  C decode kernels      not built here ({where}): the torch calls run")
        return
    rows = cpu_calibrate.verdicts() if measure else cpu_calibrate.cached()
    if not rows:
        print(f"  C decode kernels      {where}; not yet timed against torch (dsv3lab info NAME --kernels)")
        return
    used = sum(v["use"] for v in rows.values())
    print(f"  C decode kernels      {where}; {used} of {len(rows)} measured faster than torch's call and used")
    print(f"  {cpu_calibrate.form_line()}")
    if measure:
        from dsv3lab.viz.tables import text_table
        print(text_table(cpu_calibrate.table(rows)))


def cmd_generate(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dsv3lab.parallel import run_generate
        return run_generate(args)
    import dsv3lab
    model = dsv3lab.load(args.dir, dtype=parse_dtype(args.dtype), fp8=getattr(args, "fp8", "dequant"),
                         max_memory=args.max_memory,
                         progress=True)   # tqdm and the load's time and RSS on stderr
    tok = load_tokenizer(args.dir)
    prompts = prompts_from_args(args, tok)
    outs = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, stop_tokens=args.stop,
                          speculative=args.speculative)
    print_generations(prompts, outs, tok, args)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, KV-cache bytes, FLOPs of a preset or checkpoint")
    p.add_argument("name", metavar="NAME_OR_DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--context", type=int, default=4096, help="context for forward FLOPs per token")
    p.add_argument("--kernels", action="store_true",
                   help="time the C decode kernels against torch on this CPU (once; cached) and show which run")
    p.add_argument("--load", action="store_true", help="load the checkpoint too: seconds, bytes mapped, peak RSS")
    add_memory_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="generate text or ids from a checkpoint (torchrun for many ranks)")
    add_generate_args(p)
    try:
        from dsv3lab.parallel import add_generate_args as add_parallel
        add_parallel(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_generate)
