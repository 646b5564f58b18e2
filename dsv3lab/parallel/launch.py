"""Launching ranks: ``spawn`` from a notebook, ``run_generate`` under torchrun.

spawn(fn, world_size=N, *args, **kw) starts N local processes (start method "spawn": nothing of
the caller's state is inherited, so ``fn`` must be importable, e.g. defined in a module). The
caller owns the TCP store the ranks rendezvous at (port chosen by the OS, so parallel callers never
collide); each rank joins torch.distributed (gloo on CPU, NCCL when there are enough GPUs), runs
``fn(rank, world_size, *args, **kw)`` and sends back rank 0's return value.

Faults: the caller watches the ranks. The first rank to raise, or to die without answering
(killed, segfault, os._exit), ends the run: its name is written to the store (ranks that fail
afterwards because a peer vanished add it to their own error), every other rank is terminated
(then killed after a grace period), and ``RankError`` is raised in the caller, naming the rank and
carrying its traceback. A run that exceeds ``timeout`` seconds is ended the same way.

Under torchrun (``torchrun --nproc-per-node N -m dsv3lab generate DIR ...``) torchrun's agent
plays the caller's part: when one worker exits non-zero it stops the others and reports which
rank failed; collectives waiting on a vanished peer fail within ``--dist-timeout`` seconds.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import signal
import sys
import time
import traceback
from typing import Callable

import torch

_FAIL_KEY = "dsv3lab/failed"


class RankError(RuntimeError):
    """A rank of a spawned run failed; ``rank`` says which, ``remote_traceback`` says how."""

    def __init__(self, rank: int, message: str, remote_traceback: str = ""):
        self.rank = rank
        self.remote_traceback = remote_traceback
        super().__init__(f"rank {rank} failed: {message}"
                         + (f"\n--- rank {rank} traceback ---\n{remote_traceback}" if remote_traceback else ""))


def _signal_name(code: int) -> str:
    try:
        return f"killed by {signal.Signals(-code).name}"
    except (ValueError, TypeError):
        return f"exit code {code}"


def _worker(rank, world, host, port, fn, args, kw, q, backend, pg_timeout):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR=host, MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import torch.distributed as dist
    store = None
    try:
        store = dist.TCPStore(host, port, world, is_master=False,
                              timeout=datetime.timedelta(seconds=pg_timeout))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world, *args, **kw)
        payload = pickle.dumps(result if rank == 0 else None)
        q.put((rank, "ok", payload, ""))
    except BaseException as e:  # noqa: BLE001 -- reported to the caller, then this process exits
        tb = traceback.format_exc()
        note = ""
        if store is not None:
            # did a peer fail first? The caller names it in the store (give it a moment)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    if store.check([_FAIL_KEY]):
                        note = store.get(_FAIL_KEY).decode()
                        break
                except Exception:
                    break
                time.sleep(0.1)
        msg = f"{type(e).__name__}: {e}" + (f" [after {note}]" if note else "")
        try:
            q.put((rank, "error", msg, tb))
        except Exception:
            pass
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def _mp_context(start_method: str | None):
    """forkserver where available (torch is imported once, in the server; every later rank is a
    cheap fork of it), else spawn. Neither inherits the caller's threads or CUDA state."""
    import multiprocessing
    import torch.multiprocessing as mp
    if start_method is None:
        start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed", "dsv3lab", "dsv3lab.parallel", "dsv3lab.parallel._warm"])
    return ctx


def spawn(fn: Callable, world_size: int = 2, *args, backend: str | None = None, timeout: float = 600.0,
          pg_timeout: float = 120.0, start_method: str | None = None, **kw):
    """Run ``fn(rank, world_size, *args, **kw)`` on ``world_size`` local processes; return rank
    0's result. Raises RankError naming the first rank that failed (its traceback included)."""
    import torch.distributed as dist
    if world_size < 1:
        raise ValueError(f"spawn: world_size must be >= 1, got {world_size}")
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    interactive = getattr(fn, "__module__", None) == "__main__" and not main_file
    if getattr(fn, "__module__", None) is None or interactive or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(f"spawn: {fn!r} must be importable (a module-level function in a module), "
                         "because every rank is a fresh process that imports it")
    if backend is None:
        backend = "nccl" if (torch.cuda.is_available() and torch.cuda.device_count() >= world_size) else "gloo"
    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=pg_timeout))
    ctx = _mp_context(start_method)
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world_size, host, store.port, fn, args, kw, q, backend, pg_timeout),
                         daemon=True, name=f"dsv3lab-rank{r}") for r in range(world_size)]
    for p in procs:
        p.start()
    done, result, failure = set(), None, None
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size and failure is None:
            def take(wait: float) -> bool:
                """One report off the queue into done/result/failure; False if none came."""
                nonlocal result, failure
                try:
                    rank, status, payload, tb = q.get(timeout=wait)
                except queue_mod.Empty:
                    return False
                if status == "ok":
                    done.add(rank)
                    if rank == 0:
                        result = pickle.loads(payload)
                else:
                    failure = (rank, payload, tb)
                return True

            if take(0.2):
                continue
            for r, p in enumerate(procs):
                if r not in done and not p.is_alive():
                    # it may have answered just before exiting: look once more
                    if not take(0.5):
                        failure = (r, f"process died ({_signal_name(p.exitcode)}) without reporting", "")
                    break
            if failure is None and time.monotonic() > deadline:
                failure = (-1, f"timed out after {timeout:.0f} s with ranks {sorted(set(range(world_size)) - done)} "
                               "still running", "")
        if failure is not None:
            r, msg, tb = failure
            try:
                store.set(_FAIL_KEY, f"rank {r} failed: {msg}")
            except Exception:
                pass
    finally:
        _stop(procs, grace=2.0 if failure is not None else 10.0)
    if failure is not None:
        r, msg, tb = failure
        if r < 0:
            raise TimeoutError(f"spawn: {msg}")
        raise RankError(r, msg, tb)
    return result


def _stop(procs, grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)


# --------------------------------------------------------------------------------------------
# torchrun entry for `dsv3lab generate`
# --------------------------------------------------------------------------------------------

def add_generate_args(p) -> None:
    """Layout flags of ``dsv3lab generate`` (used when WORLD_SIZE > 1)."""
    g = p.add_argument_group("parallel (torchrun)")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per attention group (default: world / dp)")
    g.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (default: world)")
    g.add_argument("--dp", type=int, default=None, help="attention data-parallel groups (default: 1)")
    g.add_argument("--moe-comm", choices=("alltoall", "allreduce"), default="alltoall",
                   help="expert dispatch: all-to-all of routed tokens (default) or all-reduce baseline")
    g.add_argument("--fp8-dispatch", action="store_true",
                   help="all-to-all rows as e4m3 with 1x128 scales, expert outputs back in bf16")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a collective waits for a peer before failing (default 300)")
    g.add_argument("--fp8", choices=("dequant", "keep", "quantize"), default="dequant",
                   help="FP8 weights: dequantize on load (default), keep e4m3 with their scales, or keep "
                        "and quantize the bf16 weights the official releases store in FP8 (V2-Lite, Moonlight)")


def _dp_split(items: list, dp: int) -> list[list]:
    from dsv3lab.parallel.dispatch import chunk_sizes
    out, lo = [], 0
    for n in chunk_sizes(len(items), dp):
        out.append(items[lo:lo + n])
        lo += n
    return out


def generate_parallel(model, prompts: list[list[int]], **gen_kw) -> list[list[int]]:
    """Every rank calls this with the *same* prompts; data-parallel group d generates its share
    (contiguous chunk d of the prompts), then serves its experts until every group is done.
    Returns all prompts' outputs, in order, on every rank. ``speculative=True`` drafts with the
    MTP module under the same layout (its block is sharded like the others); groups that accept
    different numbers of drafts run different numbers of steps, and the one done first serves."""
    import torch.distributed as dist
    from dsv3lab.generate import generate
    from dsv3lab.parallel.dispatch import serve
    st = getattr(model, "_dsv3_parallel", None)
    if st is None:
        return generate(model, prompts, **gen_kw)
    ctx = st.ctx
    mine = _dp_split(list(prompts), ctx.layout.dp)[ctx.dp_rank]
    outs = generate(model, mine, **gen_kw) if mine else []
    serve(model)
    if ctx.virtual or ctx.world_size == 1:
        return outs
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, (ctx.dp_rank, ctx.tp_rank, outs))
    by_group = {d: o for d, t, o in gathered if t == 0}
    return [o for d in range(ctx.layout.dp) for o in by_group[d]]


def run_generate(args) -> int:
    """``dsv3lab generate`` under torchrun: load this rank's shard, generate, print on rank 0."""
    import torch.distributed as dist
    from dsv3lab.parallel.context import ParallelContext
    from dsv3lab.parallel.layout import Layout
    from dsv3lab.parallel.loading import load_sharded
    from dsv3lab.checkpoint import read_config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    from dsv3lab.cli.args import parse_dtype, print_generations, prompts_from_args
    from dsv3lab.tokenizer import load_tokenizer
    try:
        # everything checkable is checked before joining the world: layout against the config
        layout = Layout.make(world, tp=getattr(args, "tp", None), ep=getattr(args, "ep", None),
                             dp=getattr(args, "dp", None), moe_comm=getattr(args, "moe_comm", "alltoall"),
                             fp8_dispatch=getattr(args, "fp8_dispatch", False))
        cfg = read_config(args.dir)
        layout.validate(cfg, world)
        tok = load_tokenizer(args.dir)
        prompts = prompts_from_args(args, tok)
        ctx = ParallelContext.init(layout, timeout_s=getattr(args, "dist_timeout", 300.0))
        model = load_sharded(args.dir, ctx, dtype=parse_dtype(args.dtype), fp8=getattr(args, "fp8", "dequant"))
        outs = generate_parallel(model, prompts, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                 stop_tokens=getattr(args, "stop", None),
                                 speculative=getattr(args, "speculative", False))
        if rank == 0:
            print(f"# {layout.describe()}", file=sys.stderr)
            print_generations(prompts, outs, tok, args)
        if dist.is_initialized():
            dist.barrier()
            # Leave without running gloo's C++ teardown: under load it has (rarely) aborted with
            # "terminate called without an active exception" after every rank was done, which
            # torchrun reports as a failed run. Everything is flushed and every rank is past the
            # barrier, so nothing is lost by skipping the destructors.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
    except BaseException as e:
        print(f"dsv3lab generate: rank {rank}/{world}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
