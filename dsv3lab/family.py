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


def load_other(path, dtype=None, device=None):
    """The model for a checkpoint of a non-V3 architecture; None for the V3 family's."""
    import os
    if not os.path.isdir(os.fspath(path)):
        return None
    mt = hf_model_type(path)
    if mt == "deepseek_v4":
        from dsv3lab.checkpoint.v4 import load_v4
        return load_v4(path, dtype=dtype, device=device)
    from dsv3lab.checkpoint import ShardReader, load_checkpoint
    from dsv3lab.fused_experts import FusedExpertsReader, has_fused_experts
    try:
        keys = ShardReader(os.fspath(path)).keys()
    except Exception:
        return None     # the V3 loader names what is wrong with the directory
    if has_fused_experts(keys):     # experts saved fused (transformers' mistral4): per-expert views
        return load_checkpoint(os.fspath(path), dtype=dtype, device=device, reader=FusedExpertsReader(os.fspath(path)))
    return None        # the V3 loader; ModelConfig.from_hf refuses the rest of the family by name
