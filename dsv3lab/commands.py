"""Engine commands: ``dsv3lab info`` and ``dsv3lab generate``."""

from __future__ import annotations

import json
import os
import sys

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(s):
    if s is None:
        return None
    if s not in _DTYPES:
        raise ValueError(f"unknown dtype {s!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[s]


def resolve_config(name_or_dir: str):
    from dsv3lab.config import ModelConfig, PRESETS
    if name_or_dir in PRESETS:
        return ModelConfig.preset(name_or_dir)
    if os.path.isdir(name_or_dir) or name_or_dir.endswith(".json"):
        return ModelConfig.from_hf(name_or_dir)
    raise ValueError(f"{name_or_dir!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a checkpoint directory")


def load_tokenizer(path: str):
    """The checkpoint's ``tokenizer.json`` through the tokenizers library, or None."""
    f = os.path.join(path, "tokenizer.json")
    if not os.path.exists(f):
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(f)


def cmd_info(args) -> int:
    from dsv3lab.stats import model_stats
    cfg = resolve_config(args.name)
    s = model_stats(cfg, context=args.context)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    g = 1e9
    print(f"{cfg.name}: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), D={cfg.hidden_size}, "
          f"H={cfg.num_attention_heads}, E={cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, "
          f"{cfg.n_group} groups, {cfg.topk_group} kept) + {cfg.n_shared_experts} shared, MTP depth "
          f"{cfg.num_nextn_predict_layers}")
    print(f"  total params          {s['total_params']:>20,}  ({s['total_params'] / g:.1f}B)")
    print(f"  activated params      {s['activated_params']:>20,}  ({s['activated_params'] / g:.1f}B, incl. embedding + head)")
    print(f"  MTP params            {s['mtp_params']:>20,}  ({s['mtp_params'] / g:.2f}B unique)")
    print(f"  checkpoint params     {s['checkpoint_params']:>20,}  (incl. MTP copies of embedding/head)")
    print(f"  KV cache / token      {s['kv_cache_bytes_per_token']:>20,}  bytes (bf16 latent, absorbed MLA)")
    print(f"  KV cache / token      {s['kv_cache_bytes_per_token_naive']:>20,}  bytes (bf16, naive per-head K/V)")
    print(f"  forward FLOPs / token {s['forward_flops_per_token'] / g:>20.1f}  GFLOP at {args.context} context")
    print(f"  train FLOPs / token   {s['train_flops_per_token'] / g:>20.1f}  GFLOP (3x fwd, {s['train_seq_len']}-token sequences)")
    print(f"  softmax scale         {s['softmax_scale']:>20.7f}")
    return 0


def prompts_from_args(args, tok) -> list[list[int]]:
    """Token-id prompts from ``--prompt-ids`` or ``--prompt`` (through the checkpoint's tokenizer)."""
    if args.prompt_ids is not None:
        return [list(args.prompt_ids)]
    if not args.prompt:
        raise ValueError("give --prompt TEXT (needs tokenizer.json in the checkpoint) or --prompt-ids 1,2,3")
    if tok is None:
        raise ValueError(f"{args.dir} has no tokenizer.json: pass token ids with --prompt-ids")
    return [tok.encode(p).ids for p in args.prompt]


def cmd_generate(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dsv3lab.parallel import run_generate
        return run_generate(args)
    import dsv3lab
    model = dsv3lab.load(args.dir, dtype=parse_dtype(args.dtype), progress=True)   # tqdm on stderr
    tok = load_tokenizer(args.dir)
    prompts = prompts_from_args(args, tok)
    stop = args.stop if args.stop is not None else None
    outs = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, stop_tokens=stop,
                          speculative=args.speculative)
    for p, o in zip(prompts, outs):
        if tok is not None and args.prompt_ids is None:
            print(tok.decode(p + o))
        print("ids:", ",".join(map(str, o)))
    sys.stdout.flush()
    return 0


def _ids(s: str) -> list[int]:
    try:
        return [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {s!r}") from None


def add_generate_args(p) -> None:
    p.add_argument("dir", help="checkpoint directory (official HF layout)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", type=_ids, default=None, help="token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", type=_ids, default=None, help="stop token ids (default: eos)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: as stored)")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP module (greedy)")


def add_commands(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, KV-cache bytes, FLOPs of a preset or checkpoint")
    p.add_argument("name", metavar="NAME_OR_DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--context", type=int, default=4096, help="context for forward FLOPs per token")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="generate text or ids from a checkpoint (torchrun for many ranks)")
    add_generate_args(p)
    try:
        from dsv3lab.parallel import add_generate_args as add_parallel
        add_parallel(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_generate)
