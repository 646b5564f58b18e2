"""dsv3lab vs llama.cpp on the same checkpoint, CPU: same greedy tokens, prefill and decode tok/s.

llama.cpp is the CPU engine to beat, so this target measures dsv3lab against it on our own
checkpoint rather than on a model of its choosing: the checkpoint (the ``bench`` preset by
default, random init, saved by ``dsv3lab.save`` in the official HF layout) is converted to GGUF
by llama.cpp's own converter (``dsv3lab.bench.gguf_export``), in bf16 and f32, and both engines
run it with the same thread count in one process.

1. **Same model.** From the same prompt both engines decode greedily for ``--agree-steps``
   steps; the row gives how many leading tokens agree and the largest logit difference at the
   first step (relative to the largest logit). On the lab model (``--lab``: trained, so its
   logits and its routing are decisive) fp32 must agree on every step (the run says DISAGREE
   and exits 1 otherwise: a wrong conversion or a wrong engine). A random-init checkpoint has
   near-tie logits and near-tie expert scores, so one rounding difference can flip a routed
   expert or a token: its length is reported, not required; so is bf16's (the engines round
   differently: llama.cpp rounds activations to bf16 before its dot products).
2. **Speed.** Prefill = one forward over N tokens; decode = one token against a cache holding C
   tokens (C fixed across the timed steps). The timing of one round is ``bench engine``'s
   (same warm-up, same repeats, same step median); the rounds follow ``dsv3lab.bench.measure``:
   engines alternating round by round, the machine's matmul and copy limits measured before
   each round and after the last, median with min-max, a figure above 100% of a limit marked
   invalid. ``work`` is the FLOPs per prefill token or the bytes a decode step must read
   (activated weights without the embedding table, plus the latent cache), both from the config.

llama.cpp runs with flash attention on, ``n_batch`` = the longest prompt (one ``llama_decode``
per prefill), its default ``n_ubatch`` (512), an f16 latent cache for bf16 and an f32 one for
fp32 (the same bytes per token as dsv3lab's cache in that dtype).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import tempfile
import time

import torch

from dsv3lab.bench import gguf_export, print_table, write_json_atomic
from dsv3lab.bench.engine import (cpu_features, decode_bytes, dsv3lab_engine, machine_limits,
                                  measure_round)
from dsv3lab.bench.measure import alternating_rounds, median_limits, summarize
from dsv3lab.bench.record import recorded

ENGINES = ["dsv3lab", "llama.cpp"]
GGUF_TYPE = {"bfloat16": "bf16", "float32": "f32"}
LAB_PROMPT = "The list data type has some more methods. Here are all of the methods of list objects:"


def add_args(p) -> None:
    p.add_argument("--preset", default="bench")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a random one of --preset, seed 0)")
    p.add_argument("--lab", default="data/lab-model", help="a trained checkpoint for the agreement check ('' = skip)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--prefill", default="1024,4096")
    p.add_argument("--decode", default="1024,4096", help="contexts for decode")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="timed prefills per round after a warm-up (best kept)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, engines alternating; median reported")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines")
    p.add_argument("--agree-steps", type=int, default=32, help="greedy steps compared")
    p.add_argument("--ubatch", type=int, default=512, help="llama.cpp n_ubatch")
    p.add_argument("--llama-src", default=None,
                   help="llama-cpp-python source tree holding vendor/llama.cpp/convert_hf_to_gguf.py "
                        "(default $DSV3LAB_LLAMA_CPP_SRC, else build/llama_cpp_python-0.3.36)")
    p.add_argument("--work", default=None, help="keep checkpoints and GGUF files here (default: a temporary directory)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the checkpoints and GGUF files an earlier run left in --work (same arguments)")


def llamacpp_extra_bufts() -> bool:
    """Whether llama.cpp may place weights in its extra CPU buffer types (AMX tiles, repacked
    layouts). Not on a CPU with AMX: there llama.cpp 0.3.36 puts a quantized GGUF's 2-D weights in
    its AMX buffer, and a DeepSeek-2-architecture graph then has an op on such a weight that no
    backend takes (it aborts with ``GGML_ASSERT(*cur_backend_id != -1)`` at its first decode, on
    Moonlight's Q8_0 GGUF). Off is its command line's ``--no-repack``, what a user of llama.cpp on
    such a CPU runs it with."""
    from dsv3lab.kernels.cpu_compile import cpu_flags
    return "amx_int8" not in cpu_flags()


@contextlib.contextmanager
def _llamacpp_model_params(**fields):
    """llama-cpp-python's ``Llama`` takes no argument for some of llama.cpp's model parameters
    (``use_extra_bufts``); its constructor starts from ``llama_model_default_params()``, so that
    is given ``fields`` while the model loads."""
    import llama_cpp
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        for k, v in fields.items():
            if k not in dict(type(p)._fields_):     # a ctypes struct takes an unknown name silently
                raise RuntimeError(f"llama-cpp-python's llama_model_params has no field {k!r}")
            setattr(p, k, v)
        return p
    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def llamacpp_engine(gguf_path: str, n_ctx: int, threads: int, dtype, n_batch: int, n_ubatch: int = 512):
    """llama.cpp behind ``bench engine``'s engine interface (model, prefill, decode_setup,
    decode_step, kv_bytes), plus the last position's logits for the agreement check."""
    import llama_cpp
    from llama_cpp import Llama
    kv_type = llama_cpp.GGML_TYPE_F32 if dtype == torch.float32 else llama_cpp.GGML_TYPE_F16
    with _llamacpp_model_params(use_extra_bufts=llamacpp_extra_bufts()):
        llm = Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                    n_threads=threads, n_threads_batch=threads, flash_attn=True,
                    type_k=kv_type, type_v=kv_type, verbose=False)
    state = {}

    def prefill(x):
        llm.n_tokens = 0                    # eval() drops every cached position from n_tokens on
        llm.eval(x[0].tolist())

    def decode_setup(ctx, x):
        prefill(x[:, :ctx])
        state["pos"] = ctx

    def decode_step(tok):
        llm.n_tokens = state["pos"]         # the same context C for every timed step
        llm.eval([int(t) for t in tok.reshape(-1)])

    def kv_bytes(ctx):
        size = 4 if dtype == torch.float32 else 2
        meta = llm.metadata
        return ctx * int(meta["deepseek2.block_count"]) * int(meta["deepseek2.attention.key_length"]) * size

    def last_logits():
        import numpy as np
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())

    def greedy(prompt, steps):
        llm.n_tokens = 0
        llm.eval(list(prompt))
        first, out = last_logits(), []
        logits = first
        for _ in range(steps):
            out.append(int(logits.argmax()))
            llm.eval([out[-1]])
            logits = last_logits()
        return out, first

    return (llm, prefill, decode_setup, decode_step, kv_bytes), greedy


def _dsv3lab_greedy(model, prompt, steps):
    with torch.no_grad():
        first = model(torch.tensor([prompt]), last_only=True)[0, -1].float()
        out = model.generate([prompt], max_new_tokens=steps, stop_tokens=())[0]
    return out, first


def _agreement(name, ck, ggufs, dtype_names, prompt, steps, threads) -> list[dict]:
    import dsv3lab
    rows = []
    for dname in dtype_names:
        dtype = getattr(torch, dname)
        ours, a = _dsv3lab_greedy(dsv3lab.load(ck, dtype=dtype), prompt, steps)
        gc.collect()
        (llm, *_), greedy = llamacpp_engine(ggufs[dname], len(prompt) + steps + 8, threads, dtype,
                                            n_batch=len(prompt) + steps + 8)
        theirs, b = greedy(prompt, steps)
        del llm, greedy
        gc.collect()
        n = next((i for i, (u, v) in enumerate(zip(ours, theirs)) if u != v), min(len(ours), len(theirs)))
        rel = float((a - b).abs().max() / a.abs().max())
        rows.append(dict(model=name, dtype=dname, prompt_tokens=len(prompt), steps=steps, agree=n,
                         first_step_logit_rel_err=rel, dsv3lab_tokens=ours, llamacpp_tokens=theirs,
                         same=n == steps))
    return rows


def _prepare(args, work):
    """({"bench": dir, "lab": dir}, {model: {dtype: gguf path}}, {file: conversion seconds}):
    checkpoints in bf16 with a tokenizer, converted by llama.cpp's converter."""
    import dsv3lab
    from tqdm import tqdm

    def kept(path):
        return args.reuse and os.path.exists(path)

    if args.dir:
        bench = args.dir
    elif kept(os.path.join(work, args.preset, "config.json")):
        bench = os.path.join(work, args.preset)
    else:
        cfg = dsv3lab.ModelConfig.preset(args.preset).replace(num_nextn_predict_layers=0)
        bench = dsv3lab.save(dsv3lab.build(cfg, seed=0, dtype=torch.bfloat16), os.path.join(work, args.preset))
    cks = {"bench": bench}
    if args.lab and kept(os.path.join(work, "lab", "tokenizer.json")):
        cks["lab"] = os.path.join(work, "lab")
    elif args.lab:
        tok = os.path.join(args.lab, "tokenizer.json")
        if not os.path.isfile(tok):
            raise FileNotFoundError(f"{tok}: --lab needs a checkpoint with its tokenizer")
        with open(tok, encoding="utf-8") as f:   # stored FP8 → bf16, so both engines read the same weights
            cks["lab"] = dsv3lab.save(dsv3lab.load(args.lab, dtype=torch.bfloat16), os.path.join(work, "lab"),
                                      extra_files={"tokenizer.json": f.read()})
    ggufs, seconds = {}, {}
    todo = [(m, d) for m in cks for d in args.dtypes.split(",")]
    for m, dname in tqdm(todo, desc="GGUF (llama.cpp's converter)"):
        if not os.path.isfile(os.path.join(cks[m], "tokenizer.json")):
            if cks[m] == args.dir:             # never write into the user's checkpoint
                raise FileNotFoundError(f"{args.dir}: no tokenizer.json (llama.cpp's converter needs one)")
        gguf_export.ensure_tokenizer(cks[m], dsv3lab.ModelConfig.from_hf(cks[m]).vocab_size)
        t0 = time.perf_counter()
        out = os.path.join(work, f"{m}-{GGUF_TYPE[dname]}.gguf")
        if kept(out):
            ggufs.setdefault(m, {})[dname] = out
            continue
        ggufs.setdefault(m, {})[dname] = gguf_export.to_gguf(cks[m], out, GGUF_TYPE[dname], args.llama_src,
                                                            log_path=out + ".log")
        seconds[f"{m}-{GGUF_TYPE[dname]}"] = time.perf_counter() - t0
    return cks, ggufs, seconds


def _prompt(name, ck, cfg, n=32):
    if name == "lab":
        from tokenizers import Tokenizer
        return Tokenizer.from_file(os.path.join(ck, "tokenizer.json")).encode(LAB_PROMPT).ids
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist()


WIDE = ["dtype", "what", "work", "dsv3lab", "dsv3lab_range", "llama.cpp", "llama.cpp_range", "ratio",
        "dsv3lab_pct", "llama.cpp_pct", "valid"]


def _wide(rows):
    """The printed table: one line per (dtype, figure), the two engines side by side; ``ratio``
    = dsv3lab / llama.cpp, ``*_pct`` = percent of the machine limit (``work`` x tokens/s)."""
    by = {(r["dtype"], r["what"], r["engine"]): r for r in rows}
    out = []
    for (dname, what, eng), r in by.items():
        p = by.get((dname, what, ENGINES[1]))
        if eng != ENGINES[0] or p is None:
            continue
        work = r["work"]
        out.append({"dtype": dname, "what": what,
                    "work": f"{work / 1e6:.1f} MB" if r["limit"] == "copy_bytes_per_s" else f"{work / 1e9:.2f} GFLOP",
                    "dsv3lab": r["value"], "dsv3lab_range": f"{r['lo']:,.3g}-{r['hi']:,.3g}",
                    "llama.cpp": p["value"], "llama.cpp_range": f"{p['lo']:,.3g}-{p['hi']:,.3g}",
                    "ratio": r["value"] / p["value"], "dsv3lab_pct": r["pct_of_limit"],
                    "llama.cpp_pct": p["pct_of_limit"], "valid": r["valid"] and p["valid"]})
    return out


def run(args) -> int:
    try:
        import llama_cpp
    except ImportError as e:
        raise SystemExit(f"bench peers needs llama-cpp-python ({e}); install line in docs/performance.md#llamacpp") from e
    import dsv3lab
    from dsv3lab.stats import model_stats
    gguf_export.find_converter(args.llama_src)           # fail before any work
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    system = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    print(f"bench peers: {args.threads} threads for both engines; CPU features: {cpu_features()}")
    print(f"  llama.cpp {getattr(llama_cpp, '__version__', '?')}: {system}")
    work = args.work or tempfile.mkdtemp(prefix="dsv3lab-peers-")
    os.makedirs(work, exist_ok=True)
    try:
        cks, ggufs, conv_s = _prepare(args, work)
        dtype_names = args.dtypes.split(",")
        agree = []
        for name, ck in cks.items():
            cfg = dsv3lab.ModelConfig.from_hf(ck)
            agree += _agreement(name, ck, ggufs[name], dtype_names, _prompt(name, ck, cfg),
                                args.agree_steps, args.threads)

        ck = cks["bench"]
        cfg = dsv3lab.ModelConfig.from_hf(ck)
        stats = model_stats(cfg)
        prefill_lens = [int(s) for s in args.prefill.split(",") if s]
        decode_ctx = [int(s) for s in args.decode.split(",") if s]
        longest = max(prefill_lens + decode_ctx) + 1
        x = torch.randint(0, cfg.vocab_size, (1, longest), generator=torch.Generator().manual_seed(0))
        rows, limits = [], {}
        from tqdm import tqdm
        bar = tqdm(total=len(dtype_names) * max(1, args.rounds) * len(ENGINES), desc="rounds x engines")
        for dname in dtype_names:
            dtype = getattr(torch, dname)
            engines = {"dsv3lab": dsv3lab_engine(ck, dtype),
                       "llama.cpp": llamacpp_engine(ggufs["bench"][dname], longest + 64, args.threads, dtype,
                                                    n_batch=longest, n_ubatch=args.ubatch)[0]}

            def measure(e, r):
                with torch.no_grad():
                    return measure_round(engines[e], cfg, stats, x, args, dtype, prefill_lens, decode_ctx)

            per_engine, lims = alternating_rounds(ENGINES, args.rounds, measure, lambda: machine_limits(dtype), bar)
            limits[dname] = median_limits(lims)
            got = summarize(per_engine, limits[dname], dtype=dname)
            for e in ENGINES:                                 # what the engines keep per token
                got.append(dict(dtype=dname, engine=e, what="kv cache", value=float(engines[e][4](256) // 256),
                                lo=float("nan"), hi=float("nan"), unit="B/token", rounds=1,
                                pct_of_limit=float("nan"), valid=True))
            rows += got
            del engines
            gc.collect()
        bar.close()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    by = {(r["dtype"], r["engine"], r["what"]): r for r in rows}
    for r in rows:
        peer = by.get((r["dtype"], "llama.cpp", r["what"]))
        r["vs_llamacpp"] = r["value"] / peer["value"] if peer and peer["value"] else float("nan")

    name = args.preset if args.dir is None else os.path.basename(os.path.abspath(args.dir))
    print(f"\ndsv3lab bench peers: {name} vs llama.cpp (GGUF by its converter), {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, CPU features: {cpu_features()}; "
          f"median of {args.rounds} rounds, engines alternating")
    print("same model (greedy tokens from the same prompt):")
    print_table([{k: a[k] for k in ("model", "dtype", "prompt_tokens", "agree", "steps", "first_step_logit_rel_err")}
                 for a in agree])
    for k, v in limits.items():
        f = [m["matmul_flops"] / 1e12 for m in v["rounds"]]
        b = [m["copy_bytes_per_s"] / 1e9 for m in v["rounds"]]
        print(f"  {k}: matmul {v['matmul_flops'] / 1e12:.2f} TFLOP/s ({min(f):.2f}-{max(f):.2f}), copy "
              f"{v['copy_bytes_per_s'] / 1e9:.1f} GB/s ({min(b):.1f}-{max(b):.1f}), {len(v['rounds'])} measurements")
    text = print_table(_wide([r for r in rows if r["unit"] == "tok/s"]), WIDE)
    kv = {(r["dtype"], r["engine"]): r["value"] for r in rows if r["what"] == "kv cache"}
    for dname in dtype_names:
        print(f"  {dname} cache per token: dsv3lab {kv[(dname, 'dsv3lab')]:,.0f} B, llama.cpp "
              f"{kv[(dname, 'llama.cpp')]:,.0f} B; decode work = activated weights "
              f"{decode_bytes(stats, cfg, 0, getattr(torch, dname)) / 1e6:.1f} MB + cache")
    bad = [r for r in rows if not r["valid"]]
    if bad:
        print(f"INVALID: {len(bad)} figure(s) above 100% of a machine limit measured in this run "
              "(the machine's speed changed during the run); rerun on a quieter machine")
    wrong = [a for a in agree if a["dtype"] == "float32" and a["model"] == "lab" and not a["same"]]
    if wrong:
        print(f"DISAGREE: fp32 greedy tokens differ ({', '.join(a['model'] + ' at step ' + str(a['agree']) for a in wrong)})")
    elapsed = time.perf_counter() - t_start
    print(f"took {elapsed:.0f} s (conversions {sum(conv_s.values()):.0f} s)")
    out = args.out or os.path.join("results", "bench-peers.json")
    write_json_atomic(out, recorded(dict(preset=name, threads=args.threads, rounds=args.rounds, cpu_features=cpu_features(),
                                llamacpp_version=getattr(llama_cpp, "__version__", None), llamacpp_system=system,
                                agreement=agree, limits=limits, rows=rows, conversion_s=conv_s,
                                elapsed_s=elapsed, table=text)))
    print(f"wrote {out}")
    return 1 if wrong else 0
