"""Models of the family that are not the V3 architecture: where ``dsv3lab.load`` sends them
(docs/family.md has the table of every model type; ``dsv3lab.build`` builds V4 itself).

``deepseek_v4`` has its own engine (``dsv3lab/model/v4_*.py``, ``dsv3lab/checkpoint/v4.py``).
Model types of the MLA / DeepSeekMoE family that the lab does not run are refused by
``ModelConfig.from_hf`` with the reason (``UnsupportedModelType``, ``config.UNSUPPORTED_MODEL_TYPES``),
the same error for ``load`` and for a ranked load, never loaded as something else.
"""

from __future__ import annotations

from typing import Optional

from dsv3lab.config import UNSUPPORTED_MODEL_TYPES, UnsupportedModelType, V4_PRESETS, V4Config, hf_model_type  # noqa: F401


def is_v4(cfg_or_name) -> bool:
    return isinstance(cfg_or_name, V4Config) or (isinstance(cfg_or_name, str) and cfg_or_name in V4_PRESETS)


def v4_config_of(name_or_dir) -> Optional[V4Config]:
    """The V4Config of a V4 preset name, checkpoint directory or config.json; None for anything else."""
    import os
    name = os.fspath(name_or_dir)
    if name in V4_PRESETS:
        return V4Config.preset(name)
    if (os.path.isdir(name) or name.endswith(".json")) and hf_model_type(name) == "deepseek_v4":
        return V4Config.from_hf(name)
    return None


class UnsupportedOption(ValueError):
    """A load / build option this model type does not implement; the message names the option."""


def check_v4_options(fp8: str = "dequant", attn_mode: str | None = None, max_memory: float | None = None,
                     absorb_prefill: bool | None = None, where: str = "load") -> None:
    """Options of ``load`` / ``build`` that a DeepSeek-V4 model does not implement, refused by
    name (never silently ignored): FP8 kept as stored (V4 weights are dequantized at load),
    another attention implementation, expert paging, absorbed prefill."""
    if fp8 != "dequant":
        raise UnsupportedOption(f"{where}(fp8={fp8!r}): DeepSeek-V4 checkpoints are dequantized at load (FP8 "
                                "weights and MXFP4 experts to the compute dtype); keeping them as stored is "
                                "implemented for the V3 family only (use fp8='dequant')")
    if attn_mode not in (None, "v4"):
        raise UnsupportedOption(f"{where}(attn_mode={attn_mode!r}): a DeepSeek-V4 model has one attention "
                                "implementation ('v4': sliding window plus CSA / HCA per layer_types)")
    if max_memory is not None:
        raise UnsupportedOption(f"{where}(max_memory={max_memory!r}): paging routed experts from the shards "
                                "(dsv3lab.paging) is implemented for the V3 family only")
    if absorb_prefill:
        raise UnsupportedOption(f"{where}(absorb_prefill=True): DeepSeek-V4's attention has no MLA latent to "
                                "absorb into")


def load_other(path, dtype=None, device=None, fp8: str = "dequant", attn_mode: str | None = None,
               progress: bool = False, max_memory: float | None = None, prefetch: bool = True):
    """The model for a checkpoint of a non-V3 architecture, or of the V3 architecture stored in
    another layout (fused experts); None for the V3 family's own layout. Every option of
    ``dsv3lab.load`` either applies or is refused by name (``UnsupportedOption``)."""
    import os
    if not os.path.isdir(os.fspath(path)):
        return None
    mt = hf_model_type(path)
    if mt == "deepseek_v4":
        check_v4_options(fp8, attn_mode, max_memory)
        import sys
        import time
        from dsv3lab.checkpoint.v4 import load_v4
        t0 = time.perf_counter()
        model = load_v4(path, dtype=dtype, device=device)
        model._dsv3_load["seconds"] = time.perf_counter() - t0
        if progress:
            print(f"loaded {path} (DeepSeek-V4, dequantized) in {model._dsv3_load['seconds']:.2f} s, "
                  f"{model._dsv3_load['bytes_read'] / 1e6:.1f} MB read", file=sys.stderr)
        return model
    from dsv3lab.checkpoint import load_checkpoint
    from dsv3lab.fused_experts import fused_reader
    reader = fused_reader(os.fspath(path))
    if reader is not None:          # experts saved fused (transformers' mistral4, glm_moe_dsa): per-expert views
        return load_checkpoint(os.fspath(path), dtype=dtype, device=device, fp8=fp8, attn_mode=attn_mode,
                               progress=progress, max_memory=max_memory, prefetch=prefetch, reader=reader)
    return None        # the V3 loader; ModelConfig.from_hf refuses the rest of the family by name
