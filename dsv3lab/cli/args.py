"""Arguments and output shared by the commands (``dsv3lab generate`` in one process and under
torchrun, ``dsv3lab trace``): dtype names, token-id lists, prompts, printing generations.

It sits below every command module (it imports none of them), so the one-process command
(``cli/engine.py``) and the torchrun entry (``parallel/launch.py``) share it without importing
each other.
"""

from __future__ import annotations

import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(s):
    """``--dtype`` value -> torch dtype (None stays None: the checkpoint's own)."""
    if s is None:
        return None
    if s not in DTYPES:
        raise ValueError(f"unknown dtype {s!r}; choose from {sorted(DTYPES)}")
    return DTYPES[s]


def token_ids(s: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3] (argparse ``type=`` for ``--prompt-ids`` and ``--stop``)."""
    try:
        return [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {s!r}") from None


def add_generate_args(p) -> None:
    """The flags of ``dsv3lab generate`` (the parallel layout flags are added by ``dsv3lab.parallel``)."""
    p.add_argument("dir", help="checkpoint directory (official HF layout)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", type=token_ids, default=None, help="token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", type=token_ids, default=None, help="stop token ids (default: eos)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: as stored)")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP module (greedy)")
    add_memory_args(p, fp8=False)    # --fp8 comes with the parallel flags (dsv3lab.parallel.launch)


def add_memory_args(p, fp8: bool = True) -> None:
    """How weights are held: ``--fp8`` as ``dsv3lab.load``'s ``fp8``, ``--max-memory`` its ``max_memory``."""
    if fp8:
        p.add_argument("--fp8", default="dequant", choices=("dequant", "keep", "quantize"),
                       help="dequant: FP8 weights to the compute dtype (copied); keep: as stored, memory-mapped; "
                            "quantize: keep, and bf16 releases quantized to FP8 at load")
    p.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="page routed experts from the shards, holding at most GB of weights (with --fp8 keep|quantize)")


def prompts_from_args(args, tok) -> list[list[int]]:
    """Token-id prompts from ``--prompt-ids`` or ``--prompt`` (through the checkpoint's tokenizer)."""
    if args.prompt_ids is not None:
        return [list(args.prompt_ids)]
    if not args.prompt:
        raise ValueError("give --prompt TEXT (needs tokenizer.json in the checkpoint) or --prompt-ids 1,2,3")
    if tok is None:
        raise ValueError(f"{args.dir} has no tokenizer.json: pass token ids with --prompt-ids")
    return [tok.encode(p).ids for p in args.prompt]


def print_generations(prompts, outs, tok, args) -> None:
    """Each prompt's text and continuation (when it came as text), then the generated ids."""
    for p, o in zip(prompts, outs):
        if tok is not None and args.prompt_ids is None:
            print(tok.decode(p + o))
        print("ids:", ",".join(map(str, o)))
    sys.stdout.flush()
