"""Released-size checkpoints on this machine: load, memory, prefill, decode, paged experts.

Writes random checkpoints with the exact shapes of Moonlight-16B-A3B (FP8 e4m3 with 128x128
``weight_scale_inv``, as V3 ships) and DeepSeek-V2-Lite (bf16, as it ships; quantized to the same
FP8 format at load) in the official layout (nothing is downloaded), ``--layers N`` cutting each to
its first N layers. For each, in a fresh process (peak RSS is the process's own):
  load      ``dsv3lab.load(fp8="keep"|"quantize")``: seconds, RSS before, peak RSS (the process's
            peak reset just before the load, on Linux), bytes mapped and own;
  prefill   one forward over ``--prefill`` tokens, tokens/s;
  decode    one token against a cache of ``--context`` tokens, tokens/s, against the bandwidth
            limit measured in the same process: read bandwidth / activated bytes per token as
            held (attention, dense and shared FFNs, k routed experts per MoE layer, the gate and
            the head; one embedding row);
  paged     ``max_memory`` = the dense part (embedding and head included) + ``--page-fraction``
            of the routed experts, decode
            tokens/s, hit rate and bytes read per token, with and without prefetch;
  peer      ``--peer llama.cpp``: llama.cpp on the same checkpoint, converted to a Q8_0 GGUF by its
            own converter (kept beside the checkpoint), load, peak RSS, prefill and decode in its
            own process; with ``--rounds R`` the engines alternate (A B, B A, ...) and the summary
            gives each one's median and dsv3lab's ratio to llama.cpp.
Random weights make routing near-uniform, the worst case for an expert cache: a real model's
routing repeats more.
"""

from __future__ import annotations

import glob
import json
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch

from dsv3lab.bench import print_table, write_json_atomic
from dsv3lab.bench.record import recorded
from dsv3lab.kernels import cpu_compile

MODELS = {"moonlight": ("moonlight-16b", True), "v2-lite": ("v2-lite-16b", False)}


def add_args(p) -> None:
    p.add_argument("--models", default="moonlight,v2-lite", help="moonlight, v2-lite")
    p.add_argument("--layers", type=int, default=None, help="cut to the first N layers (default: all)")
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temp dir; reused if present)")
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--context", default="1024", help="cache length(s) for decode, comma-separated (1024,4096)")
    p.add_argument("--context-fill", choices=("prefill", "tiled"), default="prefill",
                   help="fill the decode cache by a prefill (default) or by tiling a 64-token prefill's rows "
                        "(the same work per step, without a long prefill at full size)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--page-fraction", type=float, default=0.25, help="routed experts held when paged")
    p.add_argument("--cap-of-model", type=float, default=None,
                   help="paged cap as a fraction of the whole model as held (overrides --page-fraction; "
                        "must leave room beyond the dense part)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-paged", action="store_true")
    p.add_argument("--peer", choices=("none", "llama.cpp"), default="none",
                   help="also measure llama.cpp on the same checkpoint (a Q8_0 GGUF by its own converter)")
    p.add_argument("--peer-pages", choices=("as-read", "2mb"), default="as-read",
                   help="the GGUF's page cache before each llama.cpp load: as llama.cpp's own reading leaves it "
                        "(default), or read afresh in 2 MB folios, the pages our loader asks for "
                        "(dsv3lab/checkpoint/pages.py; each row reports the share it got)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of the unpaged measurement; with --peer the engines alternate round by round")
    p.add_argument("--llama-src", default=None,
                   help="llama-cpp-python source tree with vendor/llama.cpp/convert_hf_to_gguf.py "
                        "(default $DSV3LAB_LLAMA_CPP_SRC, else build/llama_cpp_python-0.3.36)")
    p.add_argument("--tokens", action="store_true",
                   help="also generate --decode-steps greedy tokens after a 64-token prompt (held whole and "
                        "paged: the same tokens?)")


def config_of(name: str, layers: int | None):
    from dsv3lab.config import ModelConfig
    cfg = ModelConfig.preset(MODELS[name][0]).replace(num_nextn_predict_layers=0)
    if layers is not None:
        cfg = cfg.replace(num_hidden_layers=layers)
    return cfg


def _fp8_random(shape, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes with |value| <= 30 (exponent field <= 11, never NaN) and a constant
    scale: quick to make at any size, and a sane weight distribution after scaling."""
    n = math.prod(shape)
    codes = torch.randint(0, 0x60, (n,), dtype=torch.uint8, generator=g)
    codes |= torch.randint(0, 2, (n,), dtype=torch.uint8, generator=g) << 7
    b = 128
    s = torch.full((math.ceil(shape[0] / b), math.ceil(shape[1] / b)), 0.02 / 8)
    return codes.view(torch.float8_e4m3fn).view(shape), s


def write_random(cfg, path: str, fp8: bool, seed: int = 0, shard_bytes: int = 1 << 30) -> str:
    """A random checkpoint of ``cfg`` in the official layout, one shard in memory at a time."""
    from safetensors.torch import save_file
    from dsv3lab.checkpoint import hf_key, is_fp32_key, is_fp8_key
    from dsv3lab.model.transformer import Transformer
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    meta = Transformer(cfg, torch.bfloat16, "meta")
    entries = [(hf_key(cfg, n), tuple(t.shape)) for n, t in list(meta.named_parameters()) + list(meta.named_buffers())
               if not n.endswith("weight_scale_inv")]
    weight_map, shard, size, total, i = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, i
        if shard:
            i += 1
            fn = f"model-{i:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fn), metadata={"format": "pt"})
            weight_map.update({k: fn for k in shard})
            shard, size = {}, 0

    for key, shape in entries:
        if key.endswith("norm.weight"):
            ts = {key: torch.ones(shape, dtype=torch.bfloat16)}
        elif is_fp32_key(key):
            ts = {key: torch.randn(shape, generator=g) * (0.01 if key.endswith("bias") else cfg.initializer_range)}
        elif fp8 and is_fp8_key(key):
            q, s = _fp8_random(shape, g)
            ts = {key: q, key + "_scale_inv": s}
        else:
            ts = {key: (torch.randn(shape, generator=g, dtype=torch.bfloat16) * cfg.initializer_range)}
        for k, t in ts.items():
            shard[k] = t
            size += t.numel() * t.element_size()
            total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    n = len(set(weight_map.values()))
    for j in range(1, n + 1):                 # the official names: model-0000j-of-0000n
        os.rename(os.path.join(tmp, f"model-{j:05d}.safetensors"), os.path.join(tmp, f"model-{j:05d}-of-{n:05d}.safetensors"))
    weight_map = {k: v.replace(".safetensors", f"-of-{n:05d}.safetensors") for k, v in weight_map.items()}
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    hf = cfg.replace(fp8_block_size=128 if fp8 else None).to_hf()
    hf["torch_dtype"] = "bfloat16"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    os.rename(tmp, path)
    return path


def read_bandwidth(repeat: int = 5) -> float:
    """Bytes/s of a plain reduction over 512 MB (what decode does with its weights: read once)."""
    x = torch.ones(128 << 20, dtype=torch.float32)
    x.sum()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(ts)


def activated_bytes(model) -> dict:
    """Bytes a decode token reads as the model holds its weights: everything but the routed
    experts and the embedding, plus k routed experts per MoE layer and one embedding row."""
    cfg = model.cfg
    seen, dense, routed = set(), 0, 0
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or (t.data_ptr(), t.numel()) in seen:
            continue
        seen.add((t.data_ptr(), t.numel()))
        b = t.numel() * t.element_size()
        if ".experts." in n:
            routed += b
        elif n.startswith("embed_tokens"):
            dense += b // t.shape[0]
        else:
            dense += b
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_expert = routed / max(moe_layers * cfg.n_routed_experts, 1)
    return dict(dense=dense, routed_total=routed, per_token=dense + moe_layers * cfg.num_experts_per_tok * per_expert)


FILL_PREFIX = 64      # --context-fill tiled: tokens prefilled for real


def _decode_rate(m, ctx: int, steps: int, x, tiled: bool = False) -> float:
    """Decode tokens/s at a cache of ``ctx`` positions. ``tiled``: the first FILL_PREFIX positions
    prefilled for real, the rest copies of their cache rows -- a step reads and attends over
    every row whatever it holds, so it does the same work, without a full-size model's long
    prefill (minutes of FP8 dequantizing on a 2-core CPU)."""
    c = m.new_cache(1, ctx + steps + 2)
    n0 = min(ctx, FILL_PREFIX) if tiled else ctx
    m(x[:, :n0], start=0, cache=c, last_only=True)
    for t in c.layers:
        if torch.is_tensor(t) and t.dim() == 3 and n0 < ctx:
            reps = -(-(ctx - n0) // n0)
            t[:, n0:ctx] = t[:, :n0].repeat(1, reps, 1)[:, :ctx - n0]
    tok = x[:, ctx:ctx + 1]
    m(tok, start=ctx, cache=c, last_only=True)
    ts = []
    for i in range(steps):
        t0 = time.perf_counter()
        m(tok, start=ctx + 1 + i, cache=c, last_only=True)
        ts.append(time.perf_counter() - t0)
    return 1 / statistics.median(ts)


def _greedy(m, x, ctx: int, steps: int) -> tuple[list[int], float]:
    """Greedy generation of ``steps`` tokens after the prompt ``x[:, :ctx]``: the tokens and the
    decode tokens/s (prefill excluded). The same tokens from two runs of one checkpoint say that
    paging (or a kernel path) changed nothing a user sees."""
    c = m.new_cache(1, ctx + steps + 2)
    logits = m(x[:, :ctx], start=0, cache=c, last_only=True)
    tok = logits[:, -1:].argmax(-1)
    out = [int(tok)]
    t0 = time.perf_counter()
    for i in range(steps - 1):
        tok = m(tok, start=ctx + i, cache=c, last_only=True)[:, -1:].argmax(-1)
        out.append(int(tok))
    return out, (steps - 1) / (time.perf_counter() - t0)


def _reset_peak_rss() -> None:
    """Linux: set the process's peak RSS (VmHWM) to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _child(q, *a):
    try:
        q.put(_measure(*a))
    except BaseException as e:          # noqa: BLE001 - the parent re-raises it
        import traceback
        q.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def _measure(path, fp8, args_d, paged) -> dict:
    """One measurement in a fresh process: load, prefill, decode (or paged decode)."""
    import dsv3lab
    from dsv3lab.checkpoint import rss_bytes
    if args_d["threads"]:
        torch.set_num_threads(args_d["threads"])
    out = {}
    from dsv3lab.kernels import cpu_calibrate
    cpu_calibrate.verdicts()             # timed now if this CPU has none stored, not inside a timed prefill
    with torch.no_grad():
        bw = read_bandwidth()
        _reset_peak_rss()                # the peaks below are this load's and what follows it
        out["rss_before_load_GB"] = rss_bytes()[0] / 1e9
        if paged is None:
            m = dsv3lab.load(path, fp8=fp8)
            s = m._dsv3_load
            out.update(load_s=s["seconds"], load_peak_rss_GB=s["peak_rss"] / 1e9, mapped_GB=s["mapped"] / 1e9,
                       own_GB=s["own"] / 1e9, held_GB=(s["mapped"] + s["own"]) / 1e9)
            act = activated_bytes(m)
            out.update(dense_GB=act["dense"] / 1e9, routed_GB=act["routed_total"] / 1e9,
                       act_GB_per_tok=act["per_token"] / 1e9, read_GBps=bw / 1e9,
                       limit_tok_s=bw / act["per_token"])
            ctxs = args_d["contexts"]
            x = torch.randint(0, m.cfg.vocab_size, (1, max(args_d["prefill"], *ctxs) + 4),
                              generator=torch.Generator().manual_seed(0))
            n = args_d["prefill"]
            m(x[:, :16], last_only=True)
            t0 = time.perf_counter()
            m(x[:, :n], last_only=True)
            out["prefill_tok_s"] = n / (time.perf_counter() - t0)
            rates = {c: _decode_rate(m, c, args_d["decode_steps"], x, args_d["tiled"]) for c in ctxs}
            out["decode_tok_s"] = rates[ctxs[0]]
            out["decode_tok_s_by_context"] = {str(c): r for c, r in rates.items()}
            out["pct_of_limit_by_context"] = {str(c): 100 * r / out["limit_tok_s"] for c, r in rates.items()}
            out["pct_of_limit"] = 100 * out["decode_tok_s"] / out["limit_tok_s"]
            from dsv3lab.fast import step_verdict
            v = step_verdict(m)              # the fused step, where it measured faster than the module path
            out["fused"] = None if v is None else v["used"]     # None: not timed (DSV3LAB_CPU_KERNELS=all)
            if v:
                out.update(fused_ms=v["fused_ms"], module_ms=v["module_ms"])
            if args_d.get("tokens"):
                out["tokens"], _ = _greedy(m, x, min(ctxs[0], 64), args_d["decode_steps"])
            out.update(_huge_page_share(glob.glob(os.path.join(path, "*.safetensors"))))
        else:
            cap, prefetch = paged
            m = dsv3lab.load(path, fp8=fp8, max_memory=cap / 1e9, prefetch=prefetch)
            x = torch.randint(0, m.cfg.vocab_size, (1, args_d["contexts"][0] + 4),
                              generator=torch.Generator().manual_seed(0))
            ctx = min(args_d["contexts"][0], 64)
            c = m.new_cache(1, ctx + args_d["decode_steps"] + 2)
            m(x[:, :ctx], start=0, cache=c, last_only=True)
            m.pager.reset_stats()
            t0 = time.perf_counter()
            for i in range(args_d["decode_steps"]):
                m(x[:, ctx + i:ctx + i + 1], start=ctx + i, cache=c, last_only=True)
            dt = time.perf_counter() - t0
            st = m.pager.stats()
            out.update(cap_GB=cap / 1e9, prefetch=prefetch, decode_tok_s=args_d["decode_steps"] / dt,
                       hit_rate=st["hit_rate"], MB_read_per_tok=st["bytes_read"] / 1e6 / args_d["decode_steps"],
                       MB_read_from_disk=st["bytes_read"] / 1e6, resident_experts=st["resident_experts"])
            if args_d.get("tokens"):
                out["tokens"], out["greedy_tok_s"] = _greedy(m, x, ctx, args_d["decode_steps"])
            m.pager.close()
        out["peak_rss_GB"] = rss_bytes()[1] / 1e9
    return out


def _measure_llamacpp(gguf: str, args_d: dict) -> dict:
    """llama.cpp on the GGUF of the same checkpoint, in a fresh process: load, peak RSS, prefill
    and decode tokens/s at each context (its cache cannot be tiled, so each context is a real
    prefill of that many tokens; the prefill of ``--prefill`` tokens is timed as one of them
    when it is one of the contexts)."""
    from dsv3lab.bench.peers import llamacpp_engine, llamacpp_extra_bufts
    from dsv3lab.checkpoint import rss_bytes
    threads = args_d["threads"] or torch.get_num_threads()
    ctxs, n, steps = args_d["contexts"], args_d["prefill"], args_d["decode_steps"]
    longest = max(n, *ctxs)
    if args_d.get("peer_pages") == "2mb":
        from dsv3lab.checkpoint.pages import read_in_2mb_pages
        read_in_2mb_pages([gguf])            # before the load: not in its time
    bw = read_bandwidth()
    _reset_peak_rss()
    out = {"rss_before_load_GB": rss_bytes()[0] / 1e9}
    t0 = time.perf_counter()
    (llm, prefill, decode_setup, decode_step, _), _ = llamacpp_engine(gguf, longest + steps + 8, threads,
                                                                      torch.bfloat16, longest)
    out.update(load_s=time.perf_counter() - t0, read_GBps=bw / 1e9, gguf_GB=os.path.getsize(gguf) / 1e9,
               extra_bufts=llamacpp_extra_bufts())
    x = torch.randint(0, llm.n_vocab(), (1, longest + 4), generator=torch.Generator().manual_seed(0))
    prefill(x[:, :16])
    rates = {}
    for c in sorted(set(ctxs) | {n}):
        t0 = time.perf_counter()
        decode_setup(c, x)
        if c == n:
            out["prefill_tok_s"] = n / (time.perf_counter() - t0)
        if c not in ctxs:
            continue
        tok = x[:, c:c + 1]
        decode_step(tok)
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            decode_step(tok)
            ts.append(time.perf_counter() - t0)
        rates[c] = 1 / statistics.median(ts)
    out.update(decode_tok_s=rates[ctxs[0]], decode_tok_s_by_context={str(c): r for c, r in rates.items()},
               peak_rss_GB=rss_bytes()[1] / 1e9, **_huge_page_share([gguf]))
    return out


def _huge_page_share(files) -> dict:
    """The share of the engine's mapped weights (resident after its decode) that 2 MB pages map
    (dsv3lab/checkpoint/pages.py: a page cache left in 4 KB folios slows either engine's decode,
    so each row says which it had)."""
    from dsv3lab.checkpoint.pages import anonymous_pages, mapped_pages
    out = {}
    pages = mapped_pages(files)
    if pages and pages["resident"]:
        out.update(mapped_resident_GB=pages["resident"] / 1e9, pct_in_2MB_pages=100 * pages["huge"] / pages["resident"])
    anon = anonymous_pages()           # weights made at load (quantized) live here
    if anon and anon["resident"]:
        out.update(anon_resident_GB=anon["resident"] / 1e9, anon_pct_in_2MB_pages=100 * anon["huge"] / anon["resident"])
    return out


def _child_llamacpp(q, *a):
    try:
        q.put(_measure_llamacpp(*a))
    except BaseException as e:          # noqa: BLE001 - the parent re-raises it
        import traceback
        q.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def _peer_gguf(path: str, vocab_size: int, llama_src: str | None) -> str:
    """The checkpoint's Q8_0 GGUF by llama.cpp's own converter, beside it (made once)."""
    from dsv3lab.bench.gguf_export import ensure_tokenizer, to_gguf
    gguf = path + ".Q8_0.gguf"
    if not os.path.exists(gguf):
        ensure_tokenizer(path, vocab_size)
        to_gguf(path, gguf, "q8_0", llama_src, log_path=gguf + ".log")
    return gguf


def _in_child(*a, target=None) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target or _child, args=(q, *a))
    p.start()
    import queue
    while True:                       # a child that dies before it can report is an error too
        try:
            out = q.get(timeout=2)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"bench child exited with code {p.exitcode} before reporting") from None
    p.join()
    if "error" in out:
        raise RuntimeError(f"bench child failed: {out['error']}\n{out['traceback']}")
    return out


def run(args) -> int:
    root = args.dir or os.path.join(tempfile.gettempdir(), "dsv3lab-released")
    args_d = dict(threads=args.threads, prefill=args.prefill, decode_steps=args.decode_steps,
                  contexts=[int(c) for c in str(args.context).split(",")],
                  tiled=getattr(args, "context_fill", "prefill") == "tiled", tokens=getattr(args, "tokens", False),
                  peer_pages=getattr(args, "peer_pages", "as-read"))
    rows = []
    for name in args.models.split(","):
        cfg = config_of(name, args.layers)
        fp8_stored = MODELS[name][1]
        path = os.path.join(root, f"{name}-L{cfg.num_hidden_layers}")
        t0 = time.perf_counter()
        write_random(cfg, path, fp8=fp8_stored)
        disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        mode = "keep" if fp8_stored else "quantize"
        write_s = time.perf_counter() - t0
        peer = getattr(args, "peer", "none") or "none"
        gguf = _peer_gguf(path, cfg.vocab_size, getattr(args, "llama_src", None)) if peer != "none" else None
        r = None
        for rnd in range(max(1, getattr(args, "rounds", 1) or 1)):
            order = ("dsv3lab", peer) if rnd % 2 == 0 else (peer, "dsv3lab")
            for engine in order:
                if engine == "none":
                    continue
                row = dict(model=name, layers=cfg.num_hidden_layers, engine=engine, round=rnd)
                if engine == "dsv3lab":
                    row.update(stored="fp8" if fp8_stored else "bf16", fp8=mode, disk_GB=disk / 1e9, write_s=write_s)
                    row.update(_in_child(path, mode, args_d, None))
                    r = r or row
                else:
                    row.update(stored="Q8_0 GGUF (llama.cpp's converter)", page_cache=args_d["peer_pages"])
                    row.update(_in_child(gguf, args_d, target=_child_llamacpp))
                rows.append(row)
                _save(args, rows)
        if not args.no_paged:
            cap_of_model = getattr(args, "cap_of_model", None)
            if cap_of_model:
                cap = cap_of_model * r["held_GB"] * 1e9
                if cap <= (r["held_GB"] - r["routed_GB"]) * 1e9:
                    raise SystemExit(f"--cap-of-model {cap_of_model}: {cap / 1e9:.2f} GB does not hold the dense "
                                     f"part ({r['held_GB'] - r['routed_GB']:.2f} GB)")
            else:
                cap = (r["held_GB"] - (1 - args.page_fraction) * r["routed_GB"]) * 1e9
            for prefetch in (False, True):
                p = dict(model=name, layers=cfg.num_hidden_layers, fp8=mode, mode="paged")
                p.update(_in_child(path, mode, args_d, (cap, prefetch)))
                if "tokens" in p:          # the tokens generated against the model held whole, and without prefetch
                    p["same_tokens_as_whole"] = p["tokens"] == r.get("tokens")
                    base = [q for q in rows if q.get("mode") == "paged" and q["model"] == name and not q["prefetch"]]
                    p["same_tokens_as_no_prefetch"] = p["tokens"] == base[0]["tokens"] if base else True
                rows.append(p)
                _save(args, rows)
    whole = [r for r in rows if r.get("mode") != "paged"]
    print_table([r for r in whole if r.get("engine", "dsv3lab") == "dsv3lab"],
                ["model", "layers", "round", "stored", "fp8", "disk_GB", "load_s", "rss_before_load_GB",
                 "load_peak_rss_GB", "mapped_GB", "own_GB", "prefill_tok_s", "decode_tok_s", "limit_tok_s",
                 "pct_of_limit", "read_GBps", "act_GB_per_tok", "pct_in_2MB_pages", "anon_pct_in_2MB_pages", "fused"])
    peers = [r for r in whole if r.get("engine", "dsv3lab") != "dsv3lab"]
    if peers:
        print()
        print_table(peers, ["model", "layers", "round", "engine", "gguf_GB", "load_s", "peak_rss_GB",
                            "prefill_tok_s", "decode_tok_s", "read_GBps", "pct_in_2MB_pages"])
        print()
        print_table(peer_summary(whole), ["model", "layers", "context", "dsv3lab_tok_s", "peer_tok_s",
                                          "ratio", "dsv3lab_range", "peer_range", "rounds"])
    paged = [r for r in rows if r.get("mode") == "paged"]
    if paged:
        print()
        cols = ["model", "layers", "cap_GB", "prefetch", "decode_tok_s", "hit_rate", "MB_read_per_tok",
                "MB_read_from_disk", "resident_experts", "peak_rss_GB", "greedy_tok_s", "same_tokens_as_whole",
                "same_tokens_as_no_prefetch"]
        print_table(paged, [c for c in cols if all(c in r for r in paged)])
    _save(args, rows)
    return 0


def peer_summary(rows: list[dict]) -> list[dict]:
    """Per model and context: each engine's median decode tokens/s over the rounds (with its
    min-max), and dsv3lab's ratio to the peer's median (prefill as context "prefill")."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r.get("engine", "dsv3lab") == "dsv3lab"]
        theirs = [r for r in rows if r["model"] == model and r.get("engine", "dsv3lab") != "dsv3lab"]
        if not mine or not theirs:
            continue
        keys = [k for k in mine[0]["decode_tok_s_by_context"] if k in theirs[0]["decode_tok_s_by_context"]]
        for key in keys + ["prefill"]:
            def vals(rs):
                return [r["prefill_tok_s"] if key == "prefill" else r["decode_tok_s_by_context"][key]
                        for r in rs if (key == "prefill" and "prefill_tok_s" in r) or
                        (key != "prefill" and key in r["decode_tok_s_by_context"])]
            a, b = vals(mine), vals(theirs)
            if not a or not b:
                continue
            out.append(dict(model=model, layers=mine[0]["layers"], context=key, dsv3lab_tok_s=statistics.median(a),
                            peer_tok_s=statistics.median(b), ratio=statistics.median(a) / statistics.median(b),
                            dsv3lab_range=f"{min(a):.3g}-{max(a):.3g}", peer_range=f"{min(b):.3g}-{max(b):.3g}",
                            rounds=min(len(a), len(b))))
    return out


def _save(args, rows) -> None:
    """The rows so far (written after each measurement: a long run keeps what it measured)."""
    out = args.out or os.path.join("results", "bench-released.json")
    write_json_atomic(out, recorded(dict(machine=dict(cpu=f"{cpu_compile.cpu_model()} ({cpu_compile.isa_summary()})", cores=os.cpu_count(),
                                             threads=args.threads or torch.get_num_threads()),
                                args={k: v for k, v in vars(args).items() if k != "func"}, rows=rows)))
