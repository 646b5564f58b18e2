"""Saving a model in the official layout, atomically (``dsv3lab.atomic.atomic_directory``):
shards of at most ``max_shard_bytes``, the index, ``config.json``, FP8 as the releases store it
when asked; files of an existing directory that are not checkpoint files are carried over.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Callable, Iterable

import torch

from dsv3lab.atomic import atomic_directory
from dsv3lab.checkpoint.keys import MTP_COPIES, hf_key, is_fp32_key, is_fp8_key
from dsv3lab.checkpoint.reader import FP8_DTYPES, CheckpointError
from dsv3lab.model.transformer import Transformer


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
        if t.dtype in FP8_DTYPES:
            s = sd[name + "_scale_inv"]
            out.append((key, (lambda t=t: t), t.numel()))
            out.append((key + "_scale_inv", (lambda s=s: s.float()), s.numel() * 4))
        elif fp8 and is_fp8_key(key):
            from dsv3lab.fp8 import weight_quant
            q_s = {}

            def q(t=t, q_s=q_s):
                if "q" not in q_s:
                    q_s["q"], q_s["s"] = weight_quant(t, bs, scale_fmt=cfg.scale_fmt)
                return q_s["q"]

            def s(t=t, q_s=q_s):
                q(t, q_s)
                return q_s.pop("s")

            out.append((key, q, t.numel()))
            out.append((key + "_scale_inv", s, math.ceil(t.shape[0] / bs) * math.ceil(t.shape[1] / bs) * 4))
        else:
            dt = torch.bfloat16 if fp8 and t.dtype == torch.float32 and not is_fp32_key(key) else t.dtype
            out.append((key, (lambda t=t, dt=dt: t.to(dt)), t.numel() * torch.tensor([], dtype=dt).element_size()))
    n = cfg.num_hidden_layers
    for k in range(len(model.mtp)):
        for suffix, src in zip(MTP_COPIES, (model.embed_tokens.weight, model.lm_head.weight)):
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

    def write(tmp: str) -> None:
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
        carry_over(path, tmp)

    return atomic_directory(path, write)


def carry_over(path: str, tmp: str) -> None:
    """Copy what an existing checkpoint directory ``path`` holds besides the checkpoint itself
    (tokenizer.json, logs) into ``tmp``, the directory about to replace it, unless ``tmp``
    already has an entry of that name."""
    if not os.path.isdir(path):
        return
    for fn in os.listdir(path):
        if fn.endswith(".safetensors") or fn in ("model.safetensors.index.json", "config.json") \
                or os.path.exists(os.path.join(tmp, fn)):
            continue
        src = os.path.join(path, fn)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, fn))
