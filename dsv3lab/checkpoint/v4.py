"""DeepSeek-V4 checkpoints: the one key adapter, load (official or transformers-written layout,
FP8 / UE8M0 / MXFP4 dequantized) and save (the official layout).

Module names (``V4Transformer.state_dict()``) follow transformers' ``DeepseekV4ForCausalLM``.
Checkpoints come in two layouts, both read here; ``module_name`` maps either onto the modules:

  official (DeepSeek's release)          transformers-written (save_pretrained, 5.24)   module
  embed.weight                           model.embed_tokens.weight                      embed_tokens.weight
  head.weight                            head.weight                                    lm_head.weight
  norm.weight                            model.norm.weight                              norm.weight
  hc_head_{fn,base,scale}                model.hc_head.hc_{fn,base,scale}               hc_head.hc_*
  layers.N.attn_norm / ffn_norm          model.layers.N.attn_norm / ffn_norm            input_/post_attention_layernorm
  layers.N.hc_attn_{fn,base,scale}       (same, under model.)                           layers.N.attn_hc.{fn,base,scale}
  layers.N.attn.{wq_a,q_norm,wq_b}       ..                                             self_attn.{q_a_proj,q_a_norm,q_b_proj}
  layers.N.attn.{wkv,kv_norm|norm}       ..                                             self_attn.{kv_proj,kv_norm}
  layers.N.attn.{wo_a,wo_b,attn_sink}    ..                                             self_attn.{o_a_proj,o_b_proj,sinks}
  layers.N.attn.compressor.{wkv,wgate,ape,norm}                                         self_attn.compressor.{kv_proj,gate_proj,position_bias,kv_norm}
  layers.N.attn.indexer.{wq_b,weights_proj}                                             self_attn.compressor.indexer.{q_b_proj,weights_proj}
  layers.N.attn.indexer.compressor.{wkv,wgate,ape,norm}                                 self_attn.compressor.indexer.{kv_proj,..}
  layers.N.ffn.gate.{weight,bias,tid2eid}                                               mlp.gate.{weight,e_score_correction_bias,tid2eid}
  layers.N.ffn.{experts.E,shared_experts}.{w1,w2,w3}                                    mlp.*.{gate_proj,down_proj,up_proj}
  mtp.K.<every layers.N leaf above>      (none: transformers drops MTP)                 mtp.K.<the same modules>
  mtp.K.{e_proj,h_proj}(.scale), mtp.K.{enorm,hnorm,norm}.weight                        mtp.K.<the same>
  mtp.K.hc_head_{fn,base,scale}                                                         mtp.K.hc_head.hc_*

The MTP blocks (the release's ``mtp.K.*``) load whole or not at all: a checkpoint with no
``mtp.*`` tensor (every transformers-written one) gives a model without MTP blocks
(``num_nextn_predict_layers`` 0), one with some but not all of them a named error.

Quantized weights (V4 release: docs/v4.md#checkpoints): FP8 e4m3 with one scale per 128x128
block (``<w>.scale`` in the official layout, ``<w>_scale_inv`` in transformers'), UE8M0 scales
(powers of two, stored fp32 or as bare exponents ``float8_e8m0fnu``), and MXFP4 routed experts
(``expert_dtype: fp4``): e2m1 values packed two per byte, one UE8M0 scale per 32 values
(``mxfp4.py``). Both are dequantized to the compute dtype on load.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from dsv3lab.atomic import atomic_directory
from dsv3lab.checkpoint.loading import check_finite, check_scales, own_copy, place
from dsv3lab.checkpoint.reader import CheckpointError, ShardReader
from dsv3lab.checkpoint.saving import carry_over
from dsv3lab.config import ConfigError, V4Config

_LEAF = [  # (official, module) within a layer; applied to what follows "layers.N."
    (r"attn_norm\.", "input_layernorm."), (r"ffn_norm\.", "post_attention_layernorm."),
    (r"hc_attn_(fn|base|scale)$", r"attn_hc.\1"), (r"hc_ffn_(fn|base|scale)$", r"ffn_hc.\1"),
    (r"attn\.indexer\.compressor\.", "self_attn.compressor.indexer."),
    (r"attn\.indexer\.wq_b\.", "self_attn.compressor.indexer.q_b_proj."),
    (r"attn\.indexer\.weights_proj\.", "self_attn.compressor.indexer.weights_proj."),
    (r"attn\.attn_sink$", "self_attn.sinks"),
    (r"attn\.wq_a\.", "self_attn.q_a_proj."), (r"attn\.q_norm\.", "self_attn.q_a_norm."),
    (r"attn\.wq_b\.", "self_attn.q_b_proj."), (r"attn\.wkv\.", "self_attn.kv_proj."),
    (r"attn\.(kv_)?norm\.", "self_attn.kv_norm."), (r"attn\.wo_a\.", "self_attn.o_a_proj."),
    (r"attn\.wo_b\.", "self_attn.o_b_proj."), (r"attn\.compressor\.", "self_attn.compressor."),
    (r"ffn\.gate\.bias$", "mlp.gate.e_score_correction_bias"), (r"ffn\.", "mlp."),
    (r"hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),          # an MTP block's own hyper head
]
_POOL = {"wkv.": "kv_proj.", "wgate.": "gate_proj.", "ape": "position_bias", "norm.": "kv_norm."}
_W = {"w1.": "gate_proj.", "w2.": "down_proj.", "w3.": "up_proj."}
_ROOT = {"embed.weight": "embed_tokens.weight", "embed_tokens.weight": "embed_tokens.weight",
         "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight", "norm.weight": "norm.weight",
         "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale",
         "hc_head.hc_fn": "hc_head.hc_fn", "hc_head.hc_base": "hc_head.hc_base", "hc_head.hc_scale": "hc_head.hc_scale"}
# scale companions of quantized weights, by layout
SCALE_SUFFIXES = ("_scale_inv", ".scale")


def module_name(key: str) -> str:
    """Checkpoint key (either layout) -> module state-dict name ("?key" for a key of neither)."""
    k = key[len("model."):] if key.startswith("model.") else key
    if k in _ROOT:
        return _ROOT[k]
    m = re.match(r"(layers|mtp)\.(\d+)\.(.*)$", k)
    if not m:
        return "?" + key
    rest = m.group(3)
    for pat, rep in _LEAF:
        new, n = re.subn("^" + pat, rep, rest)
        if n:
            rest = new
            break
    # the pools' leaves (wkv, wgate, ape, norm) and the experts' w1/w2/w3
    parts = rest.split("compressor.", 1)
    if len(parts) == 2 and "self_attn." in parts[0]:
        tail = parts[1]
        pre = "indexer." if tail.startswith("indexer.") else ""
        tail = tail[len(pre):]
        for a, b in _POOL.items():
            if tail.startswith(a):
                tail = b + tail[len(a):]
                break
        rest = parts[0] + "compressor." + pre + tail
    rest = re.sub(r"(experts\.\d+\.|shared_experts\.)(w[123]\.)", lambda mm: mm.group(1) + _W[mm.group(2)], rest)
    return f"{m.group(1)}.{m.group(2)}.{rest}"


_INV_LEAF = [  # module -> official, within a layer
    ("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "ffn_norm."),
    ("attn_hc.", "hc_attn_"), ("ffn_hc.", "hc_ffn_"), ("self_attn.sinks", "attn.attn_sink"),
    ("self_attn.compressor.indexer.q_b_proj.", "attn.indexer.wq_b."),
    ("self_attn.compressor.indexer.weights_proj.", "attn.indexer.weights_proj."),
    ("self_attn.compressor.indexer.", "attn.indexer.compressor."),
    ("self_attn.compressor.", "attn.compressor."),
    ("self_attn.q_a_proj.", "attn.wq_a."), ("self_attn.q_a_norm.", "attn.q_norm."),
    ("self_attn.q_b_proj.", "attn.wq_b."), ("self_attn.kv_proj.", "attn.wkv."),
    ("self_attn.kv_norm.", "attn.kv_norm."), ("self_attn.o_a_proj.", "attn.wo_a."),
    ("self_attn.o_b_proj.", "attn.wo_b."), ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.", "ffn."), ("hc_head.hc_", "hc_head_"),
]


def official_key(name: str) -> str:
    """Module state-dict name -> key of the official layout (what ``save_v4`` writes)."""
    inv_root = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "norm.weight": "norm.weight",
                "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
    if name in inv_root:
        return inv_root[name]
    m = re.match(r"(layers|mtp)\.(\d+)\.(.*)$", name)
    rest = m.group(3)
    for a, b in _INV_LEAF:
        if rest.startswith(a):
            rest = b + rest[len(a):]
            break
    if "compressor." in rest:
        head, tail = rest.rsplit("compressor.", 1)
        for a, b in {"kv_proj.": "wkv.", "gate_proj.": "wgate.", "position_bias": "ape", "kv_norm.": "norm."}.items():
            if tail.startswith(a):
                tail = b + tail[len(a):]
                break
        rest = head + "compressor." + tail
    rest = re.sub(r"(experts\.\d+\.|shared_experts\.)(gate_proj|down_proj|up_proj)\.",
                  lambda mm: mm.group(1) + {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[mm.group(2)] + ".",
                  rest)
    return f"{m.group(1)}.{m.group(2)}.{rest}"


def is_fp32_name(name: str) -> bool:
    """Tensors V4 keeps in fp32 whatever the model dtype (transformers' _keep_in_fp32_modules_strict
    plus the router): norms, mHC weights, sinks, position biases, the gate and its bias."""
    return bool(re.search(r"(norm\.weight|_hc\.(fn|base|scale)|hc_head\.hc_\w+|\.sinks|position_bias"
                          r"|mlp\.gate\.(weight|e_score_correction_bias))$", name))


def is_fp8_name(name: str) -> bool:
    """Weights the release stores in FP8 (e4m3, 128x128 blocks): attention projections, the
    indexer's wq_b, shared and routed experts (routed ones FP4 under ``expert_dtype: fp4``), an
    MTP block's e_proj and h_proj.
    The compressors' and the indexer's pools and weights_proj stay BF16 (transformers' note)."""
    return bool(re.search(r"self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj|compressor\.indexer\.q_b_proj)"
                          r"\.weight$|mlp\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj\.weight$"
                          r"|^mtp\.\d+\.[eh]_proj\.weight$", name)) \
        and ".compressor.kv_proj" not in name


def is_expert_name(name: str) -> bool:
    return bool(re.search(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$", name))


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

def _scale_key(keys: set, key: str) -> Optional[str]:
    for suf in SCALE_SUFFIXES:
        sk = (key[:-len(".weight")] + suf) if suf == ".scale" and key.endswith(".weight") else key + suf
        if sk in keys:
            return sk
    return None


def _read(reader, key: str) -> torch.Tensor:
    """A tensor of the checkpoint; packed FP4 bytes (U8/I8, which the V3 reader does not take)
    straight from safetensors."""
    h, _ = reader.handle(key)
    if reader._slice(key).get_dtype() in ("U8", "I8"):
        return h.get_tensor(key)
    return reader.get(key)


def load_v4(path: str, dtype: torch.dtype | None = None, device=None, cfg: V4Config | None = None):
    """Load a ``deepseek_v4`` checkpoint directory (either layout); quantized weights dequantized."""
    from dsv3lab.fp8 import weight_dequant
    from dsv3lab.model.v4_transformer import V4Transformer
    from dsv3lab.mxfp4 import is_packed_fp4, mxfp4_dequant
    path = os.fspath(path)
    try:
        cfg = cfg or V4Config.from_hf(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    reader = ShardReader(path)
    keys = set(reader.keys())
    if dtype is None:
        k = next((k for k in ("embed.weight", "model.embed_tokens.weight") if k in keys), None)
        dtype = reader.dtype(k) if k else torch.bfloat16
    scale_keys = {k for k in keys if k.endswith(SCALE_SUFFIXES)}
    has_mtp = any(module_name(k).startswith("mtp.") for k in keys - scale_keys)
    if cfg.num_nextn_predict_layers and not has_mtp:
        # no MTP tensor at all (transformers writes none): a model without MTP blocks, so that
        # cfg says what was built; speculative decoding and mtp_logits then refuse by name
        cfg = cfg.replace(num_nextn_predict_layers=0, mtp_layer_types=())
    model = V4Transformer(cfg, dtype, "meta")
    want = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    found: dict[str, str] = {}
    unknown = []
    for k in sorted(keys - scale_keys):
        n = module_name(k)
        if n not in want:
            unknown.append(k)
        elif n in found:
            raise CheckpointError(f"{path}: tensors {found[n]!r} and {k!r} both map to {n!r}")
        else:
            found[n] = k
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} tensor(s) the config does not explain, e.g. {unknown[:5]}")
    missing = sorted(set(want) - set(found))
    if missing:
        if all(n.startswith("mtp.") for n in missing):      # some mtp.* tensors but not all
            raise CheckpointError(f"{path}: the MTP block is incomplete, {len(missing)} tensor(s) missing: " + ", ".join(
                f"{official_key(n)} {list(want[n].shape)}" for n in missing[:5]))
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")
    block = cfg.fp8_block_size or 128
    for n, k in sorted(found.items()):
        t = _read(reader, k)
        check_finite(reader, k, t)
        mod_name, attr = n.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        target = torch.float32 if want[n].dtype == torch.float32 else want[n].dtype
        if not want[n].is_floating_point():
            target = want[n].dtype
        sk = _scale_key(keys, k)
        shape = tuple(want[n].shape)
        if sk is not None:
            s = _read(reader, sk)
            if s.dtype != torch.float32:
                s = s.float()
            if is_packed_fp4(t, shape):
                t = mxfp4_dequant(t, s, shape, torch.float32)
            else:
                check_scales(reader, sk, s, cfg.scale_fmt)
                t = weight_dequant(t, s, block, torch.float32)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{reader.file(k)}: tensor {k!r} has shape {list(t.shape)}, the config needs "
                                  f"{list(shape)} (for {n})")
        place(mod, attr, own_copy(t, device or "cpu", target))
    model._dsv3_load = dict(path=path, bytes_read=reader.bytes_read, tensors_read=reader.tensors_read)
    model.unused_mtp = []          # every mtp.* tensor loaded above, or the load failed by name
    return model.eval()


def save_v4(model, path: str, fp8: bool = False, fp4_experts: bool = False) -> str:
    """Write a V4 model in the official layout (one shard): FP8 e4m3 + 128x128 ``.scale`` for the
    release's FP8 weights when ``fp8``, routed experts MXFP4 when ``fp4_experts`` (scales UE8M0).
    Atomic, as ``save``: the directory is swapped in whole and keeps its other files."""
    from safetensors.torch import save_file
    from dsv3lab.fp8 import weight_quant
    from dsv3lab.mxfp4 import mxfp4_quant
    cfg = model.cfg
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("weight_scale_inv"):
            continue
        key = official_key(name)
        t = t.detach()
        if fp4_experts and is_expert_name(name):
            q, s = mxfp4_quant(t.float())
            out[key], out[key[:-len(".weight")] + ".scale"] = q, s
        elif fp8 and is_fp8_name(name):
            q, s = weight_quant(t.float(), cfg.fp8_block_size or 128, scale_fmt=cfg.scale_fmt)
            out[key], out[key[:-len(".weight")] + ".scale"] = q, s
        elif (fp8 or fp4_experts) and t.dtype == torch.float32 and not is_fp32_name(name):
            out[key] = t.to(torch.bfloat16)
        else:
            out[key] = t
    hf = cfg.replace(fp8_block_size=(cfg.fp8_block_size or 128) if (fp8 or fp4_experts) else None,
                     expert_dtype="fp4" if fp4_experts else None).to_hf()

    def write(tmp: str) -> None:
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        carry_over(path, tmp)

    return atomic_directory(path, write)
