"""The reference engine: the DeepSeek-V3 transformer, read top to bottom in ``transformer.py``, ``mla.py`` and ``moe.py``."""

from dsv3lab.model.transformer import Block, MTPLayer, Transformer
from dsv3lab.model.mla import ATTENTION, MLA, KVCache, LatentCache
from dsv3lab.model.moe import MoE, Gate
from dsv3lab.model.layers import HookPoint, Linear, RMSNorm, MLP

__all__ = ["Block", "MTPLayer", "Transformer", "MLA", "ATTENTION", "KVCache", "LatentCache", "MoE", "Gate",
           "HookPoint", "Linear", "RMSNorm", "MLP"]
