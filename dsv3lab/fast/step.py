"""One decode token through the whole model in C kernel calls, when nothing is watching.

A decode step of a small model on a CPU is as much Python as arithmetic: the module tree makes
~650 ATen calls per step (views, casts, hook points, checks) around ~110 MB of weight reads.
``DecodeStep`` is the same computation as ``Transformer.forward`` for one token per sequence at
batch 1, written as a short list of kernel calls (``kernels/cpu/decode_bf16.c``, in bf16 or
their fp32 twins). Per layer, one call before the attention (``dsv3_mla_in``: RMSNorm, the q /
kv projections, c_kv and k_pe straight into the cache row, [q_nope W_UK^T ; q_pe] straight into
the query buffer), the attention over the latent cache (the C kernel or torch's flash attention,
whichever measured faster here for the cache's length), one call after it (``dsv3_mla_out``: W_UV,
o_proj, the residual, RMSNorm, the gate's product and expert choice), then the chosen experts
from the layer's table of every expert, and the residual add, in one call (``dsv3_moe_routed``; a
dense SwiGLU is a one-entry table). Each kernel
rounds where the module rounds (in bf16; fp32 rounds nowhere), so the two agree to summation
order (tests/test_cpu_decode.py compares them).

It runs only when the module path would compute exactly the same thing and nobody would miss a
hook: a bf16 or fp32 model on the CPU, absorbed or V3.2 sparse attention (the indexer's
selection, then its rows gathered, as ``SparseAttention`` decodes), batch 1, one token, no
autograd, no hook anywhere in the model (a hooked expert only when it is chosen), no parallel
layout, plain weights of the model's dtype or kept FP8 (``load(fp8="keep"|"quantize")``: e4m3
with 128 x 128 ``weight_scale_inv``, read as stored by the C calls, each block's scale applied to
its partial sums; where ``moe_fp8`` won against torch's path on this CPU). The gate's seams
(forced routing, expert masks) are the gate's own business and work here. Any of these off,
``Transformer.forward`` takes the module path, which stays the reference.

What a step needs from the module tree -- the weights, their pointers, the modules whose hooks
matter, the buffers -- is gathered once into a ``_StepOperands`` per model, and re-gathered when any of it
was replaced (a module, a Parameter, a tensor's storage: the plan checks each reference by
identity every step, ~26 us with the hook checks on the bench preset), rather than looked up through ``nn.Module``
attributes every step (gathering takes ~4 ms there). In-place changes to weights need nothing:
the kernels read the tensors where they are.
"""

from __future__ import annotations

import ctypes
import operator
import weakref

import torch

from dsv3lab.fast.sparse import gathered
from dsv3lab.kernels import cpu_calibrate, cpu_decode
from dsv3lab.model.attn_absorbed import SPLIT_MIN_ROWS, AbsorbedAttention, LatentCache, latent_attention
from dsv3lab.model.attn_sparse import SparseAttention
from dsv3lab.model.layers import MLP, HookPoint, Linear, RMSNorm, hooked, is_plain_linear, sharded
from dsv3lab.model.moe import MoE


# dsv3_mla_in / dsv3_mla_out's argument slots by name, from the C enums (cpu_decode.slots)
IN, OUT, MOE = cpu_decode.slots("IN"), cpu_decode.slots("OUT"), cpu_decode.slots("MOE")
_IN_ROW, _IN_COS, _IN_SIN, _IN_WUK, _IN_WUK_S = IN["ROW"], IN["COS"], IN["SIN"], IN["WUK"], IN["WUK_S"]  # every step
_OUT_OLAT, _OUT_OLAT_LD, _OUT_WUV, _OUT_WUV_S = OUT["OLAT"], OUT["OLAT_LD"], OUT["WUV"], OUT["WUV_S"]
_OUT_GATE_W, _OUT_BIAS = OUT["GATE_W"], OUT["BIAS"]
_MOE_NK = MOE["NK"]


def _slot_array(slots: dict[str, int], **values) -> ctypes.Array:
    """A C call's int64 argument array with the named slots filled (the rest 0)."""
    a = (ctypes.c_int64 * slots["NSLOTS"])()
    for name, v in values.items():
        a[slots[name]] = v
    return a


_DECODE_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decode_weights(impl: AbsorbedAttention, dtype) -> tuple:
    """(W_UK^T, its scales, W_UV, its scales): the layouts in which both per-head products are
    rows-times-vector (dot products along contiguous memory) for the C GEMV. With kv_b kept FP8
    (e4m3, 128 x 128 ``weight_scale_inv``), both stay e4m3 as stored: W_UV is kv_b itself (each
    head's rows [n, n + v), read in place, its scales kv_b's), W_UK^T an e4m3 copy [H, c, n] of
    each head's rows [0, n) transposed, with the scales transposed alike ([H c / 128, n / 128]:
    exact, when each head starts on a 128-row block and c is whole blocks). Otherwise W_UK^T as
    [H, c, n] and W_UV as [H, v, c] in ``dtype``, scales None. Kept per attention module until
    kv_b's weight or scales change (storage or version)."""
    mla = impl.mla
    w, s = mla.kv_b_proj.weight, mla.kv_b_proj._buffers.get("weight_scale_inv")
    key = (w.data_ptr(), w._version, w.device, mla.n_heads, dtype,
           None if s is None else (s.data_ptr(), s._version))
    held = _DECODE_WEIGHTS.get(impl)
    if held is None or held[0] != key:
        held = _DECODE_WEIGHTS[impl] = (key, _fp8_decode_weights(mla) or _dense_decode_weights(mla, dtype))
    return held[1]


def _dense_decode_weights(mla, dtype) -> tuple:
    kvb = mla.kv_b_weight().to(dtype)                                     # [H, n + v, c]
    return kvb[:, :mla.n].transpose(1, 2).contiguous(), None, kvb[:, mla.n:].contiguous(), None


def _fp8_decode_weights(mla) -> tuple | None:
    H, n, v, c = mla.n_heads, mla.n, mla.v, mla.c
    lin = mla.kv_b_proj
    w, s = lin.weight, lin._buffers.get("weight_scale_inv")
    B = cpu_decode.FP8_BLOCK
    if (type(lin) is not Linear or w.dtype != torch.float8_e4m3fn or s is None or s.dtype != torch.float32
            or not (w.is_contiguous() and s.is_contiguous()) or w.device.type != "cpu"
            or tuple(w.shape) != (H * (n + v), c) or tuple(s.shape) != (-(-H * (n + v) // B), -(-c // B))
            or (n + v) % B or c % B or n % 4):
        return None
    w_uk_t = w.view(torch.uint8).view(H, n + v, c)[:, :n].transpose(1, 2).contiguous()     # [H, c, n] bytes
    heads = s.view(H, (n + v) // B, c // B)[:, :-(-n // B)]                                # [H, n / B, c / B]
    s_uk_t = heads.transpose(1, 2).contiguous().view(H * c // B, -(-n // B))
    return w_uk_t, s_uk_t, w, s


class _Fallback(Exception):
    """Something in the model needs the module path (raised before the step returns)."""


class _Stale(Exception):
    """A reference the plan took has changed: build the plan again and rerun the step."""


class _Refs:
    """References taken from a model: (dict, key, object) triples and tensors with the storage
    they had. ``hold()`` checks them all with C-level loops (map over dict.get, operator.is_ and
    data_ptr: ~0.1 us a reference, where a Python loop costs several times that)."""

    def __init__(self):
        self.dicts, self.keys, self.objs, self.tensors, self.ptrs = [], [], [], [], []

    def add(self, d: dict, key, obj, tensor: torch.Tensor | None = None) -> None:
        self.dicts.append(d)
        self.keys.append(key)
        self.objs.append(obj)
        if tensor is not None:
            self.tensors.append(tensor)
            self.ptrs.append(tensor.data_ptr())

    def hold(self) -> bool:
        return (all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.objs))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs)


class _StepOperands:
    """What the fused step reads from one model, gathered once (see the module docstring).

    ``refs`` (``_Refs``) holds every module, Parameter and attribute the plan took: the plan is
    current while each ``dict[key] is object`` and each tensor still has that storage.
    ``hook_dicts`` are the forward (pre-)hook dicts of the modules and hook points whose hooks
    send a step to the module path (checked by one ``any()``). Built for a model the step cannot run (an FP8 weight, a naive layer, ...), the
    plan is ``fit = False`` and stays so until a reference changes."""

    def __init__(self, model):
        self.refs = _Refs()
        self.watch: list = []
        self.hook_dicts: list = []
        self.fit = False
        self.fp8 = False                 # any weight kept FP8 (e4m3 read as stored by the C calls)
        self.dtype = model.embed_tokens.weight.dtype
        try:
            self._gather(model)
            self.hook_dicts = self._hook_dicts(self.watch)
            self.fit = True
        except _Fallback:
            pass

    # --- taking references ---------------------------------------------------------------
    def _mod(self, parent, name: str):
        child = parent._modules.get(name)
        self.refs.add(parent._modules, name, child)
        if child is None:
            raise _Fallback
        return child

    def _attr(self, parent, name: str):
        v = parent.__dict__.get(name)
        self.refs.add(parent.__dict__, name, v)
        return v

    def _param(self, mod, name: str = "weight", fp8: bool = False) -> torch.Tensor:
        """A Parameter of the model's dtype (or e4m3 with ``fp8``), contiguous on the CPU."""
        p = mod._parameters.get(name)
        self.refs.add(mod._parameters, name, p, p)
        if (p is None or not (p.dtype == self.dtype or fp8 and p.dtype == torch.float8_e4m3fn)
                or not p.is_contiguous() or p.device.type != "cpu"):
            raise _Fallback
        return p

    def _tensor(self, d: dict, name: str) -> torch.Tensor | None:
        """A parameter or buffer taken as a reference; None unless contiguous fp32 on the CPU."""
        t = d.get(name)
        self.refs.add(d, name, t, t)
        if t is None or t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            return None
        return t

    def _linear(self, parent, name: str, fp8: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A plain Linear's weight and, for a weight kept FP8 (``load(fp8="keep")``: e4m3 with
        128 x 128 ``weight_scale_inv``), its scales (contiguous fp32 on the full grid), which the
        C calls read as stored; (weight, None) for a weight of the model's dtype."""
        lin = self._mod(parent, name)
        self.watch.append(lin)
        if fp8 and type(lin) is Linear and lin.weight.dtype == torch.float8_e4m3fn:
            w = self._param(lin, fp8=True)
            self.fp8 = True
            return w, self._scales(lin, w)
        if not is_plain_linear(lin, self.dtype):
            raise _Fallback
        return self._param(lin), None

    def _scales(self, lin, w: torch.Tensor) -> torch.Tensor:
        """An e4m3 weight's ``weight_scale_inv``, taken as a reference; _Fallback unless it is
        contiguous fp32 [ceil(N/128), ceil(K/128)] on the CPU (a sharded window's scales are not)."""
        s = self._tensor(lin._buffers, "weight_scale_inv")
        N, K = w.shape
        if s is None or tuple(s.shape) != (-(-N // cpu_decode.FP8_BLOCK), -(-K // cpu_decode.FP8_BLOCK)):
            raise _Fallback
        return s

    def _norm(self, parent, name: str) -> tuple[torch.Tensor, float]:
        mod = self._mod(parent, name)
        if type(mod) is not RMSNorm:
            raise _Fallback
        self.watch.append(mod)
        return self._param(mod), float(self._attr(mod, "eps"))        # eps a reference too

    def _watch(self, *mods) -> None:
        """Watch ``mods`` and the HookPoints that are their direct children (taken as references
        too: a hook point replaced by another is a changed model)."""
        for mod in mods:
            self.watch.append(mod)
            for name, child in mod._modules.items():
                if isinstance(child, HookPoint):
                    self.refs.add(mod._modules, name, child)
                    self.watch.append(child)

    def current(self) -> bool:
        """Whether every reference the plan took still holds."""
        return self.refs.hold()

    def check_slot(self, slot: dict) -> None:
        """An expert of the plan about to run: _Stale if it was replaced or changed, _Fallback if
        something is hooked on it."""
        if not slot["refs"].hold():
            raise _Stale
        if any(slot["hook_dicts"]):
            raise _Fallback

    @staticmethod
    def _hook_dicts(mods) -> list:
        """The forward and forward-pre hook dicts of ``mods``: torch registers and removes hooks
        in these dicts in place, so holding the dicts is holding the modules' hook state."""
        return [d for mod in mods for d in (mod._forward_hooks, mod._forward_pre_hooks)]

    # --- the model --------------------------------------------------------------------------
    def _gather(self, m) -> None:
        cfg = m.cfg
        dt = self.dtype
        if dt not in cpu_decode.KERNEL_DTYPES:
            raise _Fallback
        # what the C calls do not compute: Mistral Small 4's position-dependent query scaling
        if getattr(cfg, "attn_scale_beta", 0.0):
            raise _Fallback
        emb = self._mod(m, "embed_tokens")
        self._watch(m, emb)
        self.embed = self._param(emb)
        self.final_norm = self._norm(m, "norm")
        self.lm_head = self._linear(m, "lm_head", fp8=False)[0]
        layers = self._mod(m, "layers")
        self.layers = [self._layer(self._mod(layers, str(i)), cfg) for i in range(len(layers))]
        D, H = cfg.hidden_size, cfg.num_attention_heads
        n, r, c, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        # buffers the layers share, one after the other (each is consumed within its layer)
        e = lambda *shape: torch.empty(shape, dtype=dt)                    # noqa: E731
        self.h, self.h2, self.a = e(1, D), e(1, D), e(1, D)
        self.qa = e(1, cfg.q_lora_rank or 1)
        self.qa_n = e(1, cfg.q_lora_rank or 1)
        self.q = e(1, H * (n + r))
        self.kv = e(1, c + r)
        self.q_cat = e(1, 1, H, c + r)
        self.o = e(1, H * v)
        self.o_lat = e(1, 1, H, c)                                       # the C attention's output,
        self.q32 = torch.empty(H, c + r)                                 # its query (fp32: exact for bf16)
        self.att_work = torch.empty(0)                                   # and its scratch (sized per thread count)
        self.hf = e(1, D)
        self.x = e(1, D)                                                    # the residual stream
        self.moe_h = e(max([ly["moe_width"] for ly in self.layers] + [1]))
        self.moe_y = torch.empty(D, dtype=torch.float32)
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.scores, self.x32 = torch.empty(max(E, 1)), torch.empty(D)     # the gate's, fp32
        self.ids, self.weights = torch.empty(max(k, 1), dtype=torch.int64), torch.empty(max(k, 1))
        for ly in self.layers:
            self._layer_args(ly, cfg)

    def _layer_args(self, ly: dict, cfg) -> None:
        """The two per-layer calls' slot arrays (dsv3_mla_in / dsv3_mla_out in the C source),
        every pointer that does not change between steps filled in here."""
        D, H = cfg.hidden_size, cfg.num_attention_heads
        n, r, c, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        ptr = lambda t: 0 if t is None else t.data_ptr()                  # noqa: E731
        qlr = cfg.q_lora_rank or 0
        q_a, q_b = ly.get("q_a", (None, None)), ly["q_b"] if qlr else ly["q"]     # (weight, FP8 scales or None)
        ly["in_args"] = _slot_array(
            IN, X=ptr(self.x), NORM_W=ptr(ly["in_norm"][0]), H=ptr(self.h), QA_W=ptr(q_a[0]), QA=ptr(self.qa),
            QA_NORM_W=ptr(ly["q_a_norm"][0]) if qlr else 0, QA_N=ptr(self.qa_n),
            QB_W=ptr(q_b[0]), Q=ptr(self.q), KVA_W=ptr(ly["kv_a"][0]), KV=ptr(self.kv),
            KV_NORM_W=ptr(ly["kv_norm"][0]), QCAT=ptr(self.q_cat), D=D, QLR=qlr, H_HEADS=H, NOPE=n, ROPE=r, C=c,
            QA_S=ptr(q_a[1]), QB_S=ptr(q_b[1]), KVA_S=ptr(ly["kv_a"][1]), Q32=ptr(self.q32))
        ly["in_eps"] = (ctypes.c_float * 3)(ly["in_norm"][1], ly["q_a_norm"][1] if qlr else 0.0, ly["kv_norm"][1])
        ly["out_args"] = _slot_array(
            OUT, O=ptr(self.o), OPROJ_W=ptr(ly["o_proj"][0]), OPROJ_S=ptr(ly["o_proj"][1]), A=ptr(self.a), X=ptr(self.x),
            NORM_W=ptr(ly["post_norm"][0]), H2=ptr(self.h2), SCORES=ptr(self.scores), X32=ptr(self.x32),
            IDS=ptr(self.ids), WEIGHTS=ptr(self.weights), D=D, H_HEADS=H, V=v, C=c, E=cfg.n_routed_experts,
            # "greedy" routes over all experts whatever n_group (model/moe.py): one group for the C
            GROUPS=cfg.n_group if cfg.topk_method != "greedy" else 1,
            TOPK_GROUP=cfg.topk_group if cfg.topk_method != "greedy" else 1, K=cfg.num_experts_per_tok,
            NORM_TOPK=int(cfg.norm_topk_prob), SOFTMAX=int(cfg.scoring_func == "softmax"), NOPE=n)
        ly["gate_ptrs"] = (0, 0)
        if ly["ffn"] == "moe":
            gw, bias = ly["gate_weight"], ly["gate_bias"]
            if gw is not None and (bias is not None or not ly["gate"].has_bias):
                ly["gate_ptrs"] = (gw.data_ptr(), ptr(bias))
        ly["out_f"] = (ctypes.c_float * 2)(ly["post_norm"][1], cfg.routed_scaling_factor)
        # the FFN after the C gate's choice (a dense FFN: one table entry, no choice): dsv3_moe_routed
        experts = ly["routed"] + [ly["shared"]] if ly["ffn"] == "moe" else [ly["dense"]]
        table = {key: (ctypes.c_int64 * len(experts))(*[s[key] if s else 0 for s in experts])
                 for key in ("g", "u", "d", "gs", "us", "ds")}
        table["inter"] = (ctypes.c_int * len(experts))(*[s["inter"] if s else 0 for s in experts])
        moe = ly["ffn"] == "moe"
        ly["moe_table"] = table                                         # kept alive with the slot array
        ly["moe_args"] = _slot_array(
            MOE, X=ptr(self.h2), K=D, NK=cfg.num_experts_per_tok if moe else 0, IDS=ptr(self.ids),
            WEIGHTS=ptr(self.weights), **{key.upper(): ctypes.addressof(arr) for key, arr in table.items()},
            SHARED=(len(experts) - 1 if ly["shared"] else -1) if moe else 0, H=ptr(self.moe_h), Y=ptr(self.moe_y),
            RESID=ptr(self.x))

    def _layer(self, blk, cfg) -> dict:
        ly = {"blk": blk}
        self._watch(blk)
        attn = self._mod(blk, "self_attn")
        impl = self._attr(attn, "impl")
        if type(impl) not in (AbsorbedAttention, SparseAttention):
            raise _Fallback
        self._watch(attn)
        ly.update(attn=attn, impl=impl, sparse=type(impl) is SparseAttention, layer=blk.layer)
        if ly["sparse"]:
            self._watch(self._mod(attn, "indexer"))
        ly["in_norm"] = self._norm(blk, "input_layernorm")
        ly["post_norm"] = self._norm(blk, "post_attention_layernorm")
        if cfg.q_lora_rank:
            ly["q_a"] = self._linear(attn, "q_a_proj")
            ly["q_a_norm"] = self._norm(attn, "q_a_layernorm")
            ly["q_b"] = self._linear(attn, "q_b_proj")
        else:
            ly["q"] = self._linear(attn, "q_proj")
        ly["kv_a"] = self._linear(attn, "kv_a_proj_with_mqa")
        ly["kv_norm"] = self._norm(attn, "kv_a_layernorm")
        self._linear(attn, "kv_b_proj")              # read through impl.decode_weights, watched here
        ly["o_proj"] = self._linear(attn, "o_proj")
        mlp = self._mod(blk, "mlp")
        if type(mlp) is MoE:
            gate = self._mod(mlp, "gate")
            self._watch(mlp, gate)
            experts = self._mod(mlp, "experts")
            routed = [self._expert(experts, str(e)) for e in range(len(experts))]
            shared = self._expert(mlp, "shared_experts") if mlp.shared_experts is not None else None
            ly.update(ffn="moe", mlp=mlp, gate=gate, routed=routed, shared=shared)
            # the gate's product and choice run in C inside dsv3_mla_out when its weight (and
            # bias) are contiguous fp32 on the CPU, as Gate builds them; else the gate module runs
            gw = self._tensor(gate._parameters, "weight")
            bias = self._tensor(gate._buffers, "e_score_correction_bias")
            ly["gate_bias"] = bias if bias is not None and bias.numel() == cfg.n_routed_experts else None
            # the C choice (dsv3_route) scores a group by its two best biased scores with a bias,
            # its best one without: the gate module's rule unless the groups do not restrict
            grouped = cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.topk_method != "greedy"
            same_rule = not grouped or (cfg.topk_method in ("noaux_tc", "group_top2")) == (bias is not None)
            ly["gate_weight"] = gw if (gw is not None and gw.shape == (cfg.n_routed_experts, cfg.hidden_size)
                                       and same_rule) else None
            k = cfg.num_experts_per_tok
            widths = sorted(x["inter"] for x in routed)
            ly["moe_width"] = sum(widths[-k:]) + (shared["inter"] if shared else 0)
        elif type(mlp) is MLP:
            dense = self._expert(blk, "mlp")
            ly.update(ffn="dense", dense=dense, moe_width=dense["inter"])
        else:
            raise _Fallback
        return ly

    def _expert(self, parent, name: str) -> dict:
        """One SwiGLU (a routed expert, the shared one or a dense FFN): its weights' pointers,
        its own references and the modules whose hooks matter, both checked when it runs (a
        step runs a few of a layer's experts: checking all of them every step would cost more
        than the rest of the plan)."""
        outer = self.refs
        self.refs = _Refs()
        try:
            mlp = self._mod(parent, name)
            if type(mlp) is not MLP:
                raise _Fallback
            ws = {}
            for key, lin_name in (("g", "gate_proj"), ("u", "up_proj"), ("d", "down_proj")):
                lin = self._mod(mlp, lin_name)
                if type(lin) is Linear and lin.weight.dtype == torch.float8_e4m3fn:     # kept FP8: read as stored
                    w = self._param(lin, fp8=True)
                    ws[key + "s"] = self._scales(lin, w).data_ptr()
                    self.fp8 = True
                elif is_plain_linear(lin, self.dtype):
                    w = self._param(lin)
                    ws[key + "s"] = 0
                else:
                    raise _Fallback
                ws[key] = w.data_ptr()
                ws[key + "_mod"] = lin
            ws["inter"] = mlp.gate_proj.weight.shape[0]
            ws["hook_dicts"] = self._hook_dicts((mlp, ws["g_mod"], ws["u_mod"], ws["d_mod"]))
            ws["refs"] = self.refs
        finally:
            self.refs = outer
        return ws


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plan(model) -> _StepOperands:
    plan = _PLANS.get(model)
    if plan is None or not plan.current():
        plan = _PLANS[model] = _StepOperands(model)
    return plan


class DecodeStep:
    """``DecodeStep(model).run(tokens, start, cache)``: logits, or None for the module path.

    The plan (``_StepOperands``) is checked at the start of every step, hooks and seams as the step goes;
    a step that meets a hook half way returns None and the module path recomputes it from the
    start (it rewrites the same cache rows)."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg

    def run(self, tokens: torch.Tensor, start: int, cache) -> torch.Tensor | None:
        """Logits [1, 1, V] of token ``tokens`` [1, 1] at position ``start``, or None."""
        for _ in range(2):
            try:
                return self._run(tokens, start, cache)
            except _Fallback:
                return None
            except _Stale:
                _PLANS.pop(self.model, None)         # rebuilt by the second try
        return None

    def _run(self, tokens: torch.Tensor, start: int, cache) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        if hooked() or sharded(m):
            raise _Fallback
        plan = _plan(m)
        if not plan.fit:
            raise _Fallback
        if any(plan.hook_dicts):
            raise _Fallback
        dt = plan.dtype
        if plan.fp8 and not cpu_calibrate.wins("moe_fp8", dt):     # e4m3 in C measured slower than torch here
            raise _Fallback
        m.check_tokens(tokens, start)
        gemv_c, norm_c = (cpu_decode.kernel(name, dt) for name in ("dsv3_gemv", "dsv3_rmsnorm"))
        lib = cpu_decode.library()
        f32 = int(dt == torch.float32)
        nt = torch.get_num_threads()
        c, D = cfg.kv_lora_rank, cfg.hidden_size
        cache.check(1, start + 1)
        cos, sin = m.rope.get(start, start + 1, m.device)
        cs, sn = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        cs_p, sn_p = cs.data_ptr(), sn.data_ptr()

        # the plan checked every weight's shape, dtype and layout when it was built, so these
        # call the C functions directly (the checked wrappers are kernels/cpu_decode.py's)
        def gemv(w, xin, out):                       # out [1, N] = xin [1, K] @ w [N, K]^T
            gemv_c(w.data_ptr(), w.shape[1], 0, xin.data_ptr(), 0, 0, out.data_ptr(), 0, 0, 1, 1, w.shape[0],
                   w.shape[1], nt)
            return out

        def norm(wn, xin, out):
            norm_c(xin.data_ptr(), 0, wn[0].data_ptr(), wn[1], out.data_ptr(), 0, 1, xin.shape[-1])
            return out

        # the C latent attention where it measured faster than torch's flash attention here, for
        # the cache's length: below SPLIT_MIN_ROWS rows a thread torch's pass runs on one thread
        # (model/attn_absorbed.py), from there on all of them (cpu_calibrate's two verdicts). Called
        # directly, as the other C calls are: the plan sized every buffer.
        H, Dq = cfg.num_attention_heads, c + cfg.qk_rope_head_dim
        c_attn = {short: H % 4 == 0 and cpu_calibrate.wins("latent_attention" + ("_short" if short else ""), dt)
                  for short in (True, False)}
        split_rows = SPLIT_MIN_ROWS * nt
        o_lat_buf, q32 = plan.o_lat, plan.q32
        if any(c_attn.values()) and plan.att_work.numel() < cpu_decode.attention_work(H, Dq, c, nt):
            plan.att_work = torch.empty(cpu_decode.attention_work(H, Dq, c, nt))
        bf16 = int(dt == torch.bfloat16)
        q32_p, o_lat_p, work_p = q32.data_ptr(), o_lat_buf.data_ptr(), plan.att_work.data_ptr()
        x, h, h2, qa_n, q_cat = plan.x, plan.h, plan.h2, plan.qa_n, plan.q_cat
        x.copy_(plan.embed[tokens.reshape(-1)[0]].view(1, D))                 # the residual stream
        for ly in plan.layers:
            attn, impl = ly["attn"], ly["impl"]
            if attn.absorb_prefill or ly["sparse"] and not impl.fast_decode_ok():
                raise _Fallback
            kv = cache.layers[ly["layer"]]                                 # [B, T, c + r]
            if kv.dtype != dt or kv.stride(2) != 1:
                raise _Fallback
            w_uk_t, s_uk_t, w_uv, s_uv = decode_weights(impl, dt)
            a_in = ly["in_args"]
            a_in[_IN_ROW] = kv.data_ptr() + start * kv.stride(1) * kv.element_size()        # row [0, start]
            a_in[_IN_COS], a_in[_IN_SIN], a_in[_IN_WUK] = cs_p, sn_p, w_uk_t.data_ptr()
            a_in[_IN_WUK_S] = 0 if s_uk_t is None else s_uk_t.data_ptr()
            # norm, q and kv projections, c_kv and k_pe into the cache row, [q_nope W_UK^T ; q_pe]
            # (and its fp32 copy, the C attention's query)
            lib.dsv3_mla_in(f32, a_in, ly["in_eps"], nt)
            rows = start + 1
            if not ly["sparse"] and c_attn[rows < split_rows]:             # every row of batch 0, in C
                lib.dsv3_latent_attn(bf16, kv.data_ptr(), kv.stride(1), None, rows, q32_p, H, Dq, c, attn.scale,
                                     o_lat_p, c, work_p, nt)
                o_lat = o_lat_buf
            else:
                latent = kv[:1, :rows]
                if ly["sparse"]:                 # V3.2: the indexer's top-k rows, gathered (attn_sparse.py)
                    latent = gathered(impl, h.view(1, 1, D), qa_n.view(1, 1, -1) if cfg.q_lora_rank else None,
                                      cos, sin, start, cache, ly["layer"], latent)
                if c_attn[latent.shape[1] < split_rows] and latent.stride(-1) == 1:
                    q32.copy_(q_cat.view(H, Dq))
                    lib.dsv3_latent_attn(bf16, latent.data_ptr(), latent.stride(1), None, latent.shape[1], q32_p, H,
                                         Dq, c, attn.scale, o_lat_p, c, work_p, nt)
                    o_lat = o_lat_buf
                else:
                    o_lat = latent_attention(q_cat, latent, attn.scale, c, latent.shape[1] - 1)
                if o_lat.stride(-1) != 1:
                    o_lat = o_lat.contiguous()                             # [1,1,H,c], rows stride(2) apart
            a_out = ly["out_args"]
            a_out[_OUT_OLAT], a_out[_OUT_OLAT_LD], a_out[_OUT_WUV] = o_lat.data_ptr(), o_lat.stride(2), w_uv.data_ptr()
            a_out[_OUT_WUV_S] = 0 if s_uv is None else s_uv.data_ptr()
            gate_in_c = False
            if ly["ffn"] == "moe":
                mlp, gate = ly["mlp"], ly["gate"]
                if sharded(mlp):                                           # expert parallelism installed
                    raise _Fallback
                # forced routing and expert masks are the gate module's (its torch path)
                gate_in_c = gate.__dict__.get("forced_routing") is None and gate.__dict__.get("expert_mask") is None
            a_out[_OUT_GATE_W], a_out[_OUT_BIAS] = ly["gate_ptrs"] if gate_in_c else (0, 0)
            gate_in_c = gate_in_c and a_out[_OUT_GATE_W] != 0
            # W_UV, o_proj, the residual, the post-attention norm (and the gate's choice)
            lib.dsv3_mla_out(f32, a_out, ly["out_f"], nt)
            if ly["ffn"] == "moe":
                nk = cfg.num_experts_per_tok
                if not gate_in_c:
                    ids_t, w_t = gate(h2)
                    nk = ids_t.shape[-1]                  # a forced routing may choose fewer experts
                    if ids_t.shape[0] != 1 or nk > cfg.num_experts_per_tok:       # more than the plan's buffers
                        raise _Fallback
                    plan.ids[:nk].copy_(ids_t[0])
                    plan.weights[:nk].copy_(w_t[0])
                ly["moe_args"][_MOE_NK] = nk
                routed = ly["routed"]
                for e in plan.ids[:nk].tolist():
                    if not 0 <= e < len(routed):          # a forced routing's own ids: the module's to judge
                        raise _Fallback
                    plan.check_slot(routed[e])
                if ly["shared"] is not None:
                    plan.check_slot(ly["shared"])
            else:
                plan.check_slot(ly["dense"])
            # the chosen experts (or the dense FFN) from the layer's table, then the residual add
            lib.dsv3_moe_routed(f32, ly["moe_args"], nt)
        norm(plan.final_norm, x, plan.hf)
        logits = gemv(plan.lm_head, plan.hf, torch.empty(1, cfg.vocab_size, dtype=dt))
        return logits.view(1, 1, -1)


# per model: (threads, the fused step measured faster, its seconds, the module path's seconds)
_STEP_VERDICTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
STEP_ROUNDS = 3
DECISIVE = 10        # a module-path warm-up this many times the fused one's decides without rounds


def try_decode(model, tokens: torch.Tensor, start: int, cache) -> torch.Tensor | None:
    """Logits of the fused step, or None when the module path must run (see the module docstring).

    The fused step as a whole runs only where it measured faster than the module path: the first
    time a model decodes here (per thread count), both run the same step ``STEP_ROUNDS`` times,
    alternating, and the medians decide (``step_verdict``). A step rewrites its own cache rows,
    so repeating it changes nothing. ``DSV3LAB_CPU_KERNELS=all`` skips the timing (tests)."""
    if (tokens.shape != (1, 1) or cache is None or model.dtype not in cpu_decode.KERNEL_DTYPES
            or model.device.type != "cpu"
            or torch.is_grad_enabled() and any(p.requires_grad for p in model.lm_head.parameters())):
        return None
    if not cpu_decode.enabled():           # the backend, a dispatch mode watching, the library
        return None
    if not isinstance(cache, LatentCache):
        return None
    step = DecodeStep(model)
    if cpu_calibrate.mode() == "measured":
        v = _STEP_VERDICTS.get(model)
        if v is None or v[0] != torch.get_num_threads():
            timed = _time_step(step, tokens, start, cache)
            if timed is None:
                return None                # the fused step cannot run this model (now): no verdict
            v = _STEP_VERDICTS[model] = (torch.get_num_threads(), *timed)
        if not v[1]:
            return None
    return step.run(tokens, start, cache)


def _time_step(step: "DecodeStep", tokens, start: int, cache) -> tuple[bool, float, float] | None:
    """(fused faster, fused seconds, module seconds): medians of ``STEP_ROUNDS`` alternating runs of
    the same step, after one warm-up of each (the plan, the buffers, torch's own first calls) --
    unless the module path's warm-up took ``DECISIVE`` times the fused one's, warm-up included:
    then those two decide. On a released-size model kept FP8 the module path dequantizes every
    weight it touches each step (~12 s a Moonlight step on a 2-core AVX2 EPYC against ~0.2 s
    fused), and its rounds would hold up the first token for a minute."""
    import time

    from dsv3lab.kernels import backend
    model = step.model
    cpu_calibrate.verdicts()             # the kernels' own timing (once per library) outside the warm-up

    def module():
        with backend.use_backend("torch"):          # Transformer.forward then takes its own path
            model(tokens, start=start, cache=cache)
    t0 = time.perf_counter()
    if step.run(tokens, start, cache) is None:
        return None
    t1 = time.perf_counter()
    module()
    f0, m0 = t1 - t0, time.perf_counter() - t1
    if m0 > DECISIVE * f0:
        return True, f0, m0
    times = {"fused": [], "module": []}
    for r in range(STEP_ROUNDS):
        for arm in (("fused", "module") if r % 2 == 0 else ("module", "fused")):
            t0 = time.perf_counter()
            step.run(tokens, start, cache) if arm == "fused" else module()
            times[arm].append(time.perf_counter() - t0)
    f, m = sorted(times["fused"])[STEP_ROUNDS // 2], sorted(times["module"])[STEP_ROUNDS // 2]
    return f < m, f, m


def step_verdict(model) -> dict | None:
    """What the fused step measured on ``model`` (None if it has not decoded here yet):
    {"threads", "used", "fused_ms", "module_ms"}."""
    v = _STEP_VERDICTS.get(model)
    return None if v is None else dict(threads=v[0], used=v[1], fused_ms=v[2] * 1e3, module_ms=v[3] * 1e3)
