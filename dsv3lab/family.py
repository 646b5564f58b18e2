"""Models of the family that are not the V3 architecture: where ``dsv3lab.load`` and
``dsv3lab.build`` send them (docs/family.md has the table of every model type).

``deepseek_v4`` has its own engine (``dsv3lab/model/v4_*.py``, ``dsv3lab/checkpoint_v4.py``).
Model types of the MLA / DeepSeekMoE family that the lab does not run are refused here with the
reason, by name (``UnsupportedModelType``), never loaded as something else.
"""

from __future__ import annotations

from typing import Optional

from dsv3lab.config import ConfigError, V4_PRESETS, V4Config, hf_model_type


class UnsupportedModelType(ConfigError):
    """A checkpoint of the family whose architecture the lab does not run (the message says why)."""


# model_type -> why the lab does not load it (docs/family.md)
UNSUPPORTED = {
    "deepseek_v41": "DeepSeek-V4.1's Engram n-gram tables, shared compressors and two-level top-k are not "
                    "implemented (and not in transformers 5.24)",
    "kimi_linear": "Kimi Linear's KDA linear-attention layers (gated delta rule) are not implemented; "
                   "only its MLA layers would load",
    "longcat_flash": "LongCat-Flash's zero-computation experts and its two-attention block (shortcut MoE) "
                     "are not implemented",
}


def is_v4(cfg_or_name) -> bool:
    return isinstance(cfg_or_name, V4Config) or (isinstance(cfg_or_name, str) and cfg_or_name in V4_PRESETS)


def build_other(cfg, device="cpu", dtype=None, seed: int = 0):
    """The model for a V4 config or preset name; None for a V3-architecture one."""
    if not is_v4(cfg):
        return None
    from dsv3lab.checkpoint_v4 import build_v4
    return build_v4(cfg, device=device, dtype=dtype, seed=seed)


def load_other(path, dtype=None, device=None):
    """The model for a checkpoint of a non-V3 architecture; None for the V3 family's."""
    import os
    if not os.path.isdir(os.fspath(path)):
        return None
    mt = hf_model_type(path)
    if mt == "deepseek_v4":
        from dsv3lab.checkpoint_v4 import load_v4
        return load_v4(path, dtype=dtype, device=device)
    if mt in UNSUPPORTED:
        raise UnsupportedModelType(f"{path}: model_type {mt!r} is not supported: {UNSUPPORTED[mt]}")
    return None
