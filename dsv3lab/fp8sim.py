"""FP8 error analysis: where the error of an FP8 GEMM comes from, simulated exactly in torch.

An FP8 GEMM in DeepSeek-V3 has two sources of error, and the paper's recipe (Sec. 3.3) answers each:

1. **Quantization of the inputs.** e4m3 has 3 mantissa bits: each value lands on a grid whose
   relative spacing is 2^-3 (a relative rounding error of at most 2^-4 = 6.25%) and whose range is
   only +-448. A scale maps the tensor into that range; with *one* scale per tensor an outlier sets
   the scale, and everything else is pushed toward the bottom of the range, where e4m3 runs out of
   exponent (subnormals below 2^-6, zero below 2^-10). The paper's fix is fine granularity:
   one scale per 1x128 activation tile and per 128x128 weight block, so an outlier only costs its
   own tile. ``fp8_roundtrip_error`` measures this (quantize -> dequantize) per granularity.

2. **Accumulation along K.** The products of two e4m3 values are exact, but the tensor core adds
   them into an accumulator that keeps only about 14 mantissa bits on Hopper (13 fraction bits,
   "FP22", per the ISCA paper), not fp32's 23. Once the running sum is large, each small addend
   loses its low bits. The paper reports a maximum relative error of nearly 2% at K = 4096 and
   fixes it by *promotion*: every N_C = 128 elements (4 WGMMAs) the partial sum is copied into an
   fp32 register on the CUDA cores and the limited accumulator restarts from zero, so it never
   grows past 128 terms.

What this module simulates (the modelling choices):

- ``round_mantissa(x, bits)`` rounds to ``bits`` *fraction* bits (the leading one is implicit, so
  ``bits=23`` is the identity on fp32), round-to-nearest-even by default, computed exactly with
  ``frexp``/``ldexp`` on fp64. ``mode="trunc"`` rounds toward zero instead: the hardware is
  believed to drop (not round) the bits shifted out when aligning addends, which gives a
  *biased* error that grows linearly in K rather than like sqrt(K); both are offered because the
  real datapath is not documented.
- The limited accumulator rounds the running sum after **every addition** (``group=1``). With
  ``group=g`` the products are first summed exactly in groups of g (think of a WGMMA's k=32 slice
  being reduced in a wide adder tree) and only the group sums are added into the limited
  accumulator. ``group=1`` is the pessimistic, simplest model and the default.
- Promotion (``promote_every=N_C``): the K axis is cut into chunks of N_C, each chunk is accumulated
  in the limited precision from zero, and the chunk sums are added in fp32 (rounded to fp32 after
  each addition, as the CUDA-core FMA would).
- Products are formed in fp64 (exact for e4m3 x e4m3, and for fp32 x fp32 up to fp64 rounding); the
  reference is the fp64 sum. Chunks and trials run in parallel, so the Python loop is over the
  chunk length only (K iterations without promotion, N_C with it): K = 8192 takes well under a
  second for hundreds of trials.

``fp8_fake_quant(model)`` runs a model the way the recipe does, in torch: every FP8-eligible
``Linear`` (attention projections, dense MLPs, experts, shared experts; not ``lm_head``, the router
or the MTP projection) sees its weight quantized per 128x128 block and its input per 1x128 tile
(quantize -> dequantize), so the loss difference against full precision can be measured. It does
not simulate the limited accumulator inside the model (that is what part 2 above isolates).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from dsv3lab.fp8 import E4M3, FP8_MAX, act_dequant, act_quant, weight_dequant, weight_quant

PAPER_MAX_REL_K4096 = 0.02      # "nearly 2%" at K = 4096 with ~14 accumulator bits (p.17)
PAPER_LOSS_REL = 0.0025         # FP8 vs BF16 relative training-loss error < 0.25%
N_C = 128                       # promotion interval (4 WGMMAs of k = 32)


# --------------------------------------------------------------------------- rounding

def round_mantissa(x: torch.Tensor, bits: int, mode: str = "nearest") -> torch.Tensor:
    """Round ``x`` to ``bits`` fraction bits (plus the implicit leading one), exactly.

    ``mode="nearest"``: round half to even; ``"trunc"``: toward zero. Zeros, infs and NaNs pass
    through; the exponent range is the input dtype's (no overflow/underflow modelled). The result
    has the dtype of ``x``; on fp32 input ``bits >= 23`` returns ``x`` unchanged."""
    if bits < 0:
        raise ValueError(f"bits must be >= 0, got {bits}")
    if mode not in ("nearest", "trunc"):
        raise ValueError(f"mode must be 'nearest' or 'trunc', got {mode!r}")
    native = {torch.float32: 23, torch.float64: 52, torch.float16: 10, torch.bfloat16: 7}.get(x.dtype)
    if native is not None and bits >= native:
        return x
    xd = x.double()
    m, e = torch.frexp(xd)                       # x = m * 2^e, |m| in [0.5, 1)
    s = torch.ldexp(m, torch.full_like(e, bits + 1))   # bits+1 significant bits left of the point
    r = torch.round(s) if mode == "nearest" else torch.trunc(s)   # torch.round: half to even
    y = torch.ldexp(r, e - (bits + 1))
    y = torch.where(torch.isfinite(xd), y, xd)
    return y.to(x.dtype)


def _limited_sum(p: torch.Tensor, acc_bits: int, promote_every: int | None = None, group: int = 1,
                 mode: str = "nearest") -> torch.Tensor:
    """Sum fp64 products ``p [..., K]`` over the last axis in the simulated accumulator."""
    p = p.double()
    K = p.shape[-1]
    if group > 1:
        pad = (-K) % group
        p = F.pad(p, (0, pad)).reshape(*p.shape[:-1], -1, group).sum(-1)  # exact-ish fp64 group sums
        K = p.shape[-1]
        pe = None if promote_every is None else max(1, promote_every // group)
    else:
        pe = promote_every
    if pe is None or pe >= K:
        chunks = p.unsqueeze(-2)                                  # [..., 1, K]
    else:
        pad = (-K) % pe
        chunks = F.pad(p, (0, pad)).reshape(*p.shape[:-1], -1, pe)   # [..., n_chunks, pe]
    acc = torch.zeros(chunks.shape[:-1], dtype=torch.float64, device=p.device)
    for k in range(chunks.shape[-1]):
        acc = round_mantissa(acc + chunks[..., k], acc_bits, mode)
    if chunks.shape[-2] == 1:
        return acc[..., 0]
    # promotion: chunk sums added one by one into an fp32 accumulator
    out = torch.zeros(acc.shape[:-1], dtype=torch.float32, device=p.device)
    for j in range(acc.shape[-1]):
        out = (out.double() + acc[..., j].float().double()).float()
    return out.double()


def limited_dot(a: torch.Tensor, b: torch.Tensor, acc_bits: int = 14, promote_every: int | None = None,
                group: int = 1, mode: str = "nearest") -> torch.Tensor:
    """a [M,K] @ b [N,K].T -> fp64 [M,N], each dot product accumulated in ``acc_bits`` fraction
    bits (rounded after every addition, or every ``group`` products), promoted to fp32 every
    ``promote_every`` elements when given. Memory is M*N*K fp64: meant for small M, N."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"limited_dot: need a [M,K], b [N,K]; got {tuple(a.shape)}, {tuple(b.shape)}")
    p = a.double()[:, None, :] * b.double()[None, :, :]
    return _limited_sum(p, acc_bits, promote_every, group, mode)


def _samples(shape, dist: str, gen: torch.Generator) -> torch.Tensor:
    if dist == "uniform":
        x = torch.rand(shape, generator=gen, dtype=torch.float64)
    elif dist == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"dist must be 'uniform' or 'normal', got {dist!r}")
    return x


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Values on the e4m3 grid (saturating at +-448), returned as fp64."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(E4M3).double()


def accumulation_error(K: int, acc_bits: int = 14, promote_every: int | None = None, trials: int = 256,
                       seed: int = 0, dist: str = "uniform", group: int = 1, mode: str = "nearest",
                       fp8_inputs: bool = True) -> dict:
    """Relative error of ``trials`` length-K dot products in the simulated accumulator vs fp64.

    ``dist="uniform"``: a, b ~ U(0, 1) (all products positive: the sum grows like K, the case the
    paper's claim is about). ``"normal"``: N(0, 1) (the sum is a random walk; errors are reported
    relative to sum |a_i b_i| as well, because |exact| can be near 0). Inputs are put on the
    e4m3 grid first (``fp8_inputs``), so the products are exact and only the accumulator errs.

    Returns max_rel / mean_rel / median_rel (|approx - exact| / |exact|), max_rel_l1 /
    mean_rel_l1 (|approx - exact| / sum|products|), and the parameters."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _samples((trials, K), dist, gen), _samples((trials, K), dist, gen)
    if fp8_inputs:
        a, b = to_e4m3(a), to_e4m3(b)
    p = a * b
    exact = p.sum(-1)
    approx = _limited_sum(p, acc_bits, promote_every, group, mode)
    err = (approx - exact).abs()
    rel = err / exact.abs().clamp_min(1e-300)
    rel1 = err / p.abs().sum(-1).clamp_min(1e-300)
    return dict(K=K, acc_bits=acc_bits, promote_every=promote_every, group=group, mode=mode, dist=dist,
                trials=trials, max_rel=float(rel.max()), mean_rel=float(rel.mean()),
                median_rel=float(rel.median()), max_rel_l1=float(rel1.max()), mean_rel_l1=float(rel1.mean()))


def accumulation_sweep(Ks=(128, 256, 512, 1024, 2048, 4096, 8192), bits=(13, 14), promote=(None, N_C),
                       **kw) -> list[dict]:
    """``accumulation_error`` over every (K, acc_bits, promote_every) combination."""
    return [accumulation_error(K, acc_bits=nb, promote_every=pe, **kw)
            for nb in bits for pe in promote for K in Ks]


# --------------------------------------------------------------------------- quantization error

def fake_quant(x: torch.Tensor, granularity: str = "block128") -> torch.Tensor:
    """Quantize to e4m3 and back (fp32) with one scale per: ``"tensor"``; ``"channel"`` (row of a
    2-D tensor); ``"block128"`` (128x128 block, the weight recipe, via ``dsv3lab.fp8``);
    ``"tile128"`` (1x128 along the last axis, the activation recipe; the last axis is
    zero-padded to a multiple of 128, which leaves every tile's amax unchanged)."""
    x = x.float()
    if granularity == "block128":
        return weight_dequant(*weight_quant(x, 128), 128)
    if granularity == "tile128":
        K = x.shape[-1]
        pad = (-K) % 128
        xp = F.pad(x, (0, pad)) if pad else x
        return act_dequant(*act_quant(xp, 128), 128)[..., :K]
    if granularity == "tensor":
        amax = x.abs().amax()
    elif granularity == "channel":
        if x.dim() != 2:
            raise ValueError("channel granularity needs a 2-D tensor")
        amax = x.abs().amax(dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    scale = amax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3).float() * scale


def fp8_roundtrip_error(w: torch.Tensor, granularity: str = "block128") -> dict:
    """Error of ``fake_quant(w, granularity)``: rel_fro = ||w - q|| / ||w||, mean_rel (mean of
    |w - q| / |w| over non-zero entries), zero_frac (non-zero entries that became 0: underflow)."""
    w = w.float()
    q = fake_quant(w, granularity)
    d = (w - q)
    nz = w != 0
    return dict(granularity=granularity,
                rel_fro=float(d.norm() / w.norm().clamp_min(1e-30)),
                mean_rel=float((d.abs()[nz] / w.abs()[nz]).mean()) if nz.any() else 0.0,
                max_abs=float(d.abs().max()),
                zero_frac=float(((q == 0) & nz).sum() / nz.sum().clamp_min(1)))


def with_outliers(x: torch.Tensor, frac: float = 1e-3, scale: float = 100.0, seed: int = 0) -> torch.Tensor:
    """A copy of ``x`` with a fraction ``frac`` of entries multiplied by ``scale`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    n = max(1, int(round(x.numel() * frac)))
    idx = torch.randperm(x.numel(), generator=gen)[:n]
    y = x.clone().float().reshape(-1)
    y[idx] *= scale
    return y.reshape(x.shape)


def e4m3_grid(positive: bool = True) -> torch.Tensor:
    """Every finite e4m3fn value (sorted, fp32); the non-negative half by default."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    v = v[torch.isfinite(v)].unique()
    return v[v >= 0] if positive else v


# --------------------------------------------------------------------------- whole model

_NOT_FP8 = ("lm_head", "eh_proj", "shared_head", "embed", "gate.weight")


def fp8_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's FP8-eligible ``Linear`` layers (attention, dense MLPs, experts, shared experts),
    as (name, module); ``lm_head``, the router and the MTP projection stay in high precision."""
    from dsv3lab.model.layers import Linear
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, Linear) and not any(t in n for t in _NOT_FP8)
            and m.weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)]


@contextlib.contextmanager
def fp8_fake_quant(model, weights: bool = True, activations: bool = True, act_granularity: str = "tile128",
                   weight_granularity: str = "block128"):
    """Within the block the model's FP8-eligible Linears run on fake-quantized weights (128x128
    blocks) and inputs (1x128 tiles); everything is restored on exit. Yields the list of names."""
    layers = fp8_linears(model)
    saved, handles = [], []
    try:
        with torch.no_grad():
            for _, m in layers:
                if weights:
                    saved.append((m, m.weight.data))
                    m.weight.data = fake_quant(m.weight.data, weight_granularity).to(m.weight.dtype)
                if activations:
                    def pre(mod, args):
                        x = args[0]
                        return (fake_quant(x, act_granularity).to(x.dtype),) + tuple(args[1:])
                    handles.append(m.register_forward_pre_hook(pre))
        yield [n for n, _ in layers]
    finally:
        for h in handles:
            h.remove()
        for m, w in saved:
            m.weight.data = w


@torch.no_grad()
def capture_inputs(model, names, ids: torch.Tensor) -> dict:
    """Run ``model(ids)`` once and return the input activation of each named module, flattened to
    [tokens, features] (the first call's input when a module runs several times, as experts do)."""
    mods = dict(model.named_modules())
    got, handles = {}, []
    for n in names:
        def pre(mod, args, n=n):
            got.setdefault(n, args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())
        handles.append(mods[n].register_forward_pre_hook(pre))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return got


def granularity_table(tensors: dict, granularities=("tensor", "channel", "block128", "tile128")) -> list[dict]:
    """``fp8_roundtrip_error`` of every tensor at every granularity, plus the tensor's
    amax / median |x| (how outlier-heavy it is)."""
    rows = []
    for name, t in tensors.items():
        a = t.float().abs()
        crest = float(a.max() / a[a > 0].median().clamp_min(1e-30))
        for g in granularities:
            rows.append(dict(tensor=name, shape=list(t.shape), amax_over_median=crest, **fp8_roundtrip_error(t, g)))
    return rows


# --------------------------------------------------------------------------- figures

def plot_e4m3_grid(ax=None):
    """The non-negative e4m3 values on a log axis, with the relative gap to the next value."""
    import matplotlib.pyplot as plt
    g = e4m3_grid()[1:].double()
    gap = (g[1:] - g[:-1]) / g[:-1]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3))
    ax.semilogx(g[:-1], gap * 100, ".", ms=4)
    ax.axvline(2.0 ** -6, color="gray", ls=":", lw=1)
    ax.text(2.0 ** -6, ax.get_ylim()[1] * 0.9, " smallest normal 2^-6", fontsize=8, va="top")
    ax.set_xlabel("e4m3 value (positive half, 448 = max)")
    ax.set_ylabel("gap to next value (%)")
    ax.set_title(f"e4m3: {len(g) + 1} non-negative values; 12.5-25% relative spacing, worse in subnormals")
    return ax.figure


def plot_accumulation(rows: list[dict], key: str = "max_rel", paper: float = PAPER_MAX_REL_K4096, ax=None,
                      extra: dict | None = None):
    """``key`` vs K for every (acc_bits, promote_every) in ``rows`` (from ``accumulation_sweep``),
    with the paper's point at K = 4096 and ours (14 bits, no promotion) marked; ``extra`` adds
    labelled single points {label: (K, value)}."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.5))
    series = {}
    for r in rows:
        series.setdefault((r["acc_bits"], r["promote_every"]), []).append((r["K"], r[key]))
    for (nb, pe), pts in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        pts.sort()
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-" if pe is None else "s--",
                  label=f"{nb} bits, " + ("no promotion" if pe is None else f"promote every {pe}"))
    ax.plot([4096], [paper], "r*", ms=14, label=f"paper: 'nearly {paper:.0%}' at K=4096")
    ours = [r for r in rows if r["K"] == 4096 and r["acc_bits"] == 14 and r["promote_every"] is None]
    if ours:
        v = ours[0][key]
        ax.annotate(f"ours (14 bits, RNE): {v:.2%}", (4096, v), xytext=(300, v * 3),
                    arrowprops=dict(arrowstyle="->", lw=0.8), fontsize=8)
    for label, (k, v) in (extra or {}).items():
        ax.plot([k], [v], "kx", ms=9)
        ax.annotate(label, (k, v), xytext=(-8, -3), textcoords="offset points", fontsize=8, ha="right")
    ax.set_xlabel("K (inner dimension)")
    ax.set_ylabel(key.replace("_", " ") + " of a dot product")
    ax.set_title("Limited-precision accumulation vs K (a, b ~ U(0,1) on the e4m3 grid)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


def plot_scale_grids(grids: dict, ncols: int = 4):
    """Heatmaps of ``weight_scale_inv`` grids {name: [rows/128, cols/128]}, one block per cell."""
    import matplotlib.pyplot as plt
    n = len(grids)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, grids.items()):
        im = ax.imshow(s.float().numpy(), cmap="viridis", aspect="auto")
        for (i, j), v in zip(((i, j) for i in range(s.shape[0]) for j in range(s.shape[1])), s.flatten().tolist()):
            if s.numel() <= 24:
                ax.text(j, i, f"{v:.1e}", ha="center", va="center", fontsize=6, color="w")
        ax.set_title(f"{name}\n{list(s.shape)}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("weight_scale_inv: one fp32 per 128x128 block (= block amax / 448)")
    fig.tight_layout()
    return fig


def checkpoint_scales(path: str, prefix: str = "model.layers.0.") -> dict:
    """{weight name: (e4m3 weight, fp32 weight_scale_inv)} for the FP8 tensors of a checkpoint
    directory in the official layout whose names start with ``prefix`` (read lazily)."""
    import json
    import os
    from safetensors import safe_open
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        wmap = json.load(f)["weight_map"]
    out = {}
    for key, shard in sorted(wmap.items()):
        if key.startswith(prefix) and key.endswith(".weight_scale_inv"):
            w = key[: -len("_scale_inv")]
            with safe_open(os.path.join(path, wmap[w]), "pt") as fw, safe_open(os.path.join(path, shard), "pt") as fs:
                out[w] = (fw.get_tensor(w), fs.get_tensor(key))
    return out
