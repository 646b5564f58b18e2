"""Checkpoints in the official Hugging Face layout, and building models from configs.

A checkpoint directory holds ``config.json``, ``model.safetensors.index.json`` and shards
``model-0000i-of-0000N.safetensors`` (or one ``model.safetensors``), keyed as DeepSeek-V3 ships:

  model.embed_tokens.weight, model.norm.weight, lm_head.weight
  model.layers.L.{input_layernorm, post_attention_layernorm}.weight
  model.layers.L.self_attn.{q_a_proj|q_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
                            kv_a_layernorm, kv_b_proj, o_proj}.weight
  model.layers.L.mlp.{gate,up,down}_proj.weight                           (dense layers)
  model.layers.L.mlp.gate.weight, model.layers.L.mlp.gate.e_score_correction_bias
  model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight, mlp.shared_experts.{...}.weight
  model.layers.{n+k}.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens}
                                                                          (MTP depth k, n = layers)
FP8 weights (attention projections, dense and expert FFNs) are e4m3 with a ``.weight_scale_inv``
fp32 tensor per 128x128 block. The one adapter between these keys and module names is
``hf_key``/``module_key`` below; everything else (sharded loading in ``dsv3lab.parallel``) uses it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from dsv3lab.config import ModelConfig
from dsv3lab.model.layers import Linear
from dsv3lab.model.transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, extra, misshapen or unreadable."""


_FP8_RE = re.compile(r"\.(self_attn|mlp)\.(.+\.)?[a-z_]+_proj(_with_mqa)?\.weight$")
_MTP_COPY = ("embed_tokens.weight", "shared_head.head.weight")


def is_fp8_key(hf_key: str) -> bool:
    """Whether the official checkpoint stores this tensor in FP8 (MTP's eh_proj, the gate,
    norms, embeddings and the head stay BF16/FP32)."""
    return bool(_FP8_RE.search(hf_key))


def hf_key(cfg: ModelConfig, name: str) -> str:
    """Module state-dict name -> checkpoint key."""
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
    if name.startswith("lm_head."):
        return name
    return "model." + name


def module_key(cfg: ModelConfig, key: str) -> Optional[str]:
    """Checkpoint key -> module name; None for the MTP copies of the embedding and head."""
    if key.startswith("lm_head."):
        return key
    if not key.startswith("model."):
        return "?" + key
    name = key[6:]
    m = re.match(r"layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        k = int(m.group(1)) - cfg.num_hidden_layers
        if m.group(2) in _MTP_COPY:
            return None
        return f"mtp.{k}.{m.group(2)}"
    return name


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------

def _default_dtype(device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def build(cfg: ModelConfig | str, device="cpu", dtype: torch.dtype | None = None, seed: int = 0,
          attn_mode: str = "absorbed") -> Transformer:
    """A freshly initialised model (N(0, initializer_range) weights, unit norms, zero bias).
    ``device="meta"`` allocates nothing: the 671B preset builds in seconds for counting."""
    if isinstance(cfg, str):
        cfg = ModelConfig.preset(cfg)
    dtype = dtype or _default_dtype(device)
    if torch.device(device).type == "meta":
        return Transformer(cfg, dtype, "meta").set_attn_mode(attn_mode)
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg, dtype, "meta")
    model.to_empty(device="cpu")
    std = cfg.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        for name, b in model.named_buffers():
            b.zero_()
    model.to(device)
    return model.set_attn_mode(attn_mode).eval()


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

def _index(path: str) -> dict[str, str]:
    """checkpoint key -> shard file name."""
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        try:
            with open(idx) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{idx}: not a safetensors index ({e})") from None
        for fn in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(path, fn)):
                raise CheckpointError(f"{idx} lists {fn}, which is not in {path}")
        return weight_map
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
    out = {}
    for fn in files:
        for k in _open(os.path.join(path, fn)).keys():
            out[k] = fn
    return out


def _open(file: str):
    from safetensors import safe_open
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers / truncation
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64}


class ShardReader:
    """Lazy reads from a sharded checkpoint; each file opened once (memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        self.weight_map = _index(path)
        self._handles = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def handle(self, key: str):
        fn = self.weight_map[key]
        if fn not in self._handles:
            self._handles[fn] = _open(os.path.join(self.path, fn))
        return self._handles[fn], fn

    def shape(self, key: str) -> tuple[int, ...]:
        h, _ = self.handle(key)
        return tuple(h.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype, from the header (nothing is read)."""
        h, _ = self.handle(key)
        name = h.get_slice(key).get_dtype()
        if name not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return _ST_DTYPES[name]

    def get(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor, or only a row/column slice of it (read from disk: nothing else is)."""
        h, fn = self.handle(key)
        try:
            if rows is None and cols is None:
                return h.get_tensor(key)
            sl = h.get_slice(key)
            if len(sl.get_shape()) == 1:
                return sl[rows or slice(None)]
            return sl[rows or slice(None), cols or slice(None)]
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, fn)}: cannot read tensor {key!r} "
                                  f"({type(e).__name__}: {e}); the file may be truncated") from None


def read_config(path: str) -> ModelConfig:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    return ModelConfig.from_hf(path)


def resolve(path: str, cfg: ModelConfig, reader: ShardReader, dtype):
    """What the checkpoint itself decides: MTP dropped when its layer is absent (as transformers
    and the official converter save V3), and the compute dtype defaulting to the embedding's."""
    keys = set(reader.keys())
    n = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{n}.") for k in keys):
        warnings.warn(f"{path}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} "
                      f"but the checkpoint holds no layer {n}; loading without MTP")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if dtype is None:
        k = "model.embed_tokens.weight"
        dtype = reader.dtype(k) if k in keys else torch.bfloat16
    return cfg, dtype


def place(mod: nn.Module, attr: str, t: torch.Tensor) -> None:
    """Put a loaded tensor in place of a meta parameter or buffer (no copy, no grad)."""
    if attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)


def load(path: str, dtype: torch.dtype | None = None, device=None, fp8: str = "dequant",
         attn_mode: str = "absorbed", progress: bool = False) -> Transformer:
    """Load a checkpoint directory in the official HF layout.

    dtype: compute dtype for every non-fp32 tensor (default: the dtype stored for the embedding).
    fp8: "dequant" turns FP8 weights into ``dtype`` once here (CPU default); "keep" leaves them
    e4m3 with their ``weight_scale_inv`` for the FP8 GEMM kernels.
    """
    path = os.fspath(path)
    cfg = read_config(path)
    reader = ShardReader(path)
    keys = set(reader.keys())
    cfg, dtype = resolve(path, cfg, reader, dtype)
    device = device or "cpu"
    model = Transformer(cfg, dtype, "meta")
    expected = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        expected[hf_key(cfg, name)] = (name, t)
    # bookkeeping: missing / extra keys first, before any tensor is read
    scale_keys = {k for k in keys if k.endswith(".weight_scale_inv")}
    copies = {k for k in keys if module_key(cfg, k) is None}
    extra = sorted(keys - set(expected) - scale_keys - copies)
    missing = sorted(set(expected) - keys)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                              f"{missing[:5]}")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s) in the checkpoint, e.g. {extra[:5]}")
    orphan = sorted(k for k in scale_keys if k[:-len("_scale_inv")] not in keys)
    if orphan:
        raise CheckpointError(f"{path}: weight_scale_inv without its weight: {orphan[:5]}")

    items = sorted(expected.items())
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc=f"load {os.path.basename(path.rstrip('/'))}", unit="tensor")
    bs = cfg.fp8_block_size or 128
    for key, (name, meta_t) in items:
        want = tuple(meta_t.shape)
        got = reader.shape(key)
        if got != want:
            raise CheckpointError(f"{path}/{reader.weight_map[key]}: tensor {key!r} has shape {list(got)}, "
                                  f"the config needs {list(want)}")
        t = reader.get(key)
        mod_name, attr = name.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        target = meta_t.dtype if meta_t.dtype == torch.float32 and (
            "gate" in mod_name.split(".")[-1:] or attr == "e_score_correction_bias") else dtype
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            sk = key + "_scale_inv"
            if sk not in keys:
                raise CheckpointError(f"{path}: FP8 tensor {key!r} has no {sk!r}")
            s = reader.get(sk).float()
            want_s = (math.ceil(want[0] / bs), math.ceil(want[1] / bs))
            if tuple(s.shape) != want_s:
                raise CheckpointError(f"{path}/{reader.weight_map[sk]}: tensor {sk!r} has shape "
                                      f"{list(s.shape)}, a {list(want)} weight needs {list(want_s)}")
            if fp8 == "keep" and isinstance(mod, Linear):
                mod.weight = nn.Parameter(t.to(device), requires_grad=False)
                mod.weight_scale_inv = s.to(device)
                continue
            from dsv3lab.fp8 import weight_dequant
            t = weight_dequant(t, s, bs, target)
        place(mod, attr, t.to(device=device, dtype=target))
    return model.set_attn_mode(attn_mode).eval()


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------

def _tensors_to_save(model: Transformer, fp8: bool) -> Iterable[tuple[str, Callable[[], torch.Tensor], int]]:
    """(checkpoint key, thunk producing the tensor, bytes) in a stable order."""
    cfg = model.cfg
    bs = cfg.fp8_block_size or 128
    sd = model.state_dict()
    out = []
    for name, t in sd.items():
        if name.endswith(".weight_scale_inv"):
            continue
        key = hf_key(cfg, name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = sd[name + "_scale_inv"]
            out.append((key, (lambda t=t: t), t.numel()))
            out.append((key + "_scale_inv", (lambda s=s: s.float()), s.numel() * 4))
        elif fp8 and is_fp8_key(key):
            from dsv3lab.fp8 import weight_quant
            q_s = {}

            def q(t=t, q_s=q_s):
                if "q" not in q_s:
                    q_s["q"], q_s["s"] = weight_quant(t, bs)
                return q_s["q"]

            def s(t=t, q_s=q_s):
                q(t, q_s)
                return q_s.pop("s")

            out.append((key, q, t.numel()))
            out.append((key + "_scale_inv", s, math.ceil(t.shape[0] / bs) * math.ceil(t.shape[1] / bs) * 4))
        else:
            dt = torch.bfloat16 if fp8 and t.dtype == torch.float32 and not (
                ".mlp.gate." in key) else t.dtype
            out.append((key, (lambda t=t, dt=dt: t.to(dt)), t.numel() * torch.tensor([], dtype=dt).element_size()))
    n = cfg.num_hidden_layers
    for k in range(len(model.mtp)):
        for suffix, src in zip(_MTP_COPY, (model.embed_tokens.weight, model.lm_head.weight)):
            dt = torch.bfloat16 if fp8 and src.dtype == torch.float32 else src.dtype
            out.append((f"model.layers.{n + k}.{suffix}", (lambda src=src, dt=dt: src.detach().to(dt).clone()),
                        src.numel() * src.element_size()))
    return out


def save(model: Transformer, path: str, fp8: bool = False, max_shard_bytes: int = 4 << 30,
         progress: bool = False, extra_files: dict[str, str] | None = None) -> str:
    """Write ``model`` to ``path`` in the official layout, atomically: everything goes to a
    temporary directory beside ``path`` which then replaces it, so an interrupted save leaves the
    previous checkpoint intact. Files in an existing ``path`` that are not checkpoint files
    (tokenizer.json, logs) are carried over. ``fp8=True`` stores the FP8-eligible weights as e4m3
    with 128x128 ``weight_scale_inv`` (the released format) and the rest in BF16/FP32."""
    from safetensors.torch import save_file
    path = os.path.abspath(os.fspath(path))
    if any(p.is_meta for p in model.parameters()):
        raise CheckpointError("cannot save a model on the meta device (it has no weights)")
    cfg = model.cfg
    entries = _tensors_to_save(model, fp8)
    shards, cur, size = [], [], 0
    for e in entries:
        if cur and size + e[2] > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e[2]
    if cur:
        shards.append(cur)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        weight_map, total = {}, 0
        it = enumerate(shards)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=len(shards), desc=f"save {os.path.basename(path)}", unit="shard")
        for i, shard in it:
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for key, thunk, nbytes in shard:
                tensors[key] = thunk().contiguous().cpu()
                weight_map[key] = fn
                total += tensors[key].numel() * tensors[key].element_size()
            save_file(tensors, os.path.join(tmp, fn), metadata={"format": "pt"})
            del tensors
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        hf = cfg.replace(fp8_block_size=cfg.fp8_block_size or 128).to_hf() if fp8 else \
            cfg.replace(fp8_block_size=None).to_hf()
        if any(p.dtype == torch.float8_e4m3fn for p in model.parameters()):
            hf = cfg.replace(fp8_block_size=cfg.fp8_block_size or 128).to_hf()
        hf["torch_dtype"] = "bfloat16" if fp8 else str(model.dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        if os.path.isdir(path):
            for fn in os.listdir(path):
                if fn.endswith(".safetensors") or fn in ("model.safetensors.index.json", "config.json") \
                        or os.path.exists(os.path.join(tmp, fn)):
                    continue
                src = os.path.join(path, fn)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, fn))
        # mkdtemp makes the directory 0700 (and safetensors writes 0600): give the finished
        # checkpoint ordinary permissions under the user's umask before it becomes visible
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for fn in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, fn)):
                os.chmod(os.path.join(tmp, fn), 0o666 & ~umask)
        # swap: old -> backup, tmp -> path, drop backup
        backup = None
        if os.path.exists(path):
            backup = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.rmdir(backup)
            os.rename(path, backup)
        os.rename(tmp, path)
        if backup:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
