"""``dsv3lab trace DIR --text ... --out FILE``: record routing of a prompt (and its generation)."""

from __future__ import annotations

import json

import torch

from dsv3lab.cli.args import parse_dtype, token_ids


def add_commands(sub) -> None:
    p = sub.add_parser("trace", help="record per-token expert routing of a prompt to a file")
    p.add_argument("dir", help="checkpoint directory (official HF layout) or a preset name (random weights)")
    p.add_argument("--text", action="append", help="prompt text (repeat for a batch); needs tokenizer.json, "
                   "else UTF-8 bytes are used as ids")
    p.add_argument("--prompt-ids", type=token_ids, action="append", default=None, help="token ids, e.g. 1,2,3 (repeatable)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--format", choices=["dsv3lab", "sglang", "megatron"], default="dsv3lab",
                   help="dsv3lab: .safetensors + JSON; sglang: .pt per_pass dump (stat with --sglang-mode stat); "
                        "megatron: routing-trace JSONL")
    p.add_argument("--sglang-mode", choices=["per_pass", "stat"], default="per_pass")
    p.add_argument("--max-new-tokens", type=int, default=0, help="also trace this many generated tokens")
    p.add_argument("--scores", action="store_true", help="also record raw scores [E] per token")
    p.add_argument("--groups", action="store_true", help="also record the group mask per token")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget of the trace")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: as stored)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dsv3lab.probes import formats, metrics
    from dsv3lab.probes.trace import trace
    from dsv3lab.resolve import resolve_model
    model, codec = resolve_model(args.dir, dtype=parse_dtype(args.dtype))
    if args.prompt_ids:
        prompts = args.prompt_ids
    elif args.text:
        prompts = [codec.encode(t) for t in args.text]
    else:
        raise ValueError("give --text TEXT or --prompt-ids 1,2,3")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    with torch.no_grad(), trace(model, scores=args.scores, groups=args.groups, max_tokens=args.max_tokens) as t:
        if args.max_new_tokens > 0:
            model.generate(prompts, max_new_tokens=args.max_new_tokens)
        else:
            lengths = {len(p) for p in prompts}
            if len(lengths) == 1:
                model(torch.tensor(prompts))
            else:                           # ragged prompts without generation: one pass each
                for p in prompts:
                    model(torch.tensor([p]))
    rec = t.record()
    if args.format == "dsv3lab":
        formats.save_trace(rec, args.out)
    elif args.format == "sglang":
        formats.to_sglang(rec, args.out, mode=args.sglang_mode)
    else:
        formats.to_megatron(rec, args.out)
    r = t.routing
    mv = metrics.max_vio(r.expert_load())
    print(json.dumps(dict(out=args.out, format=args.format, tokens=r.n_tokens, moe_layers=r.layers,
                          top_k=r.top_k, steps=len(rec["meta"]["steps"]),
                          dropped_tokens=rec["meta"]["dropped_tokens"],
                          mtp_depths=rec["meta"]["mtp_depths"],
                          max_vio_per_layer=[round(float(x), 4) for x in mv])))
    return 0
