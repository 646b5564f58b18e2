"""Checkpoints whose routed experts are stored fused, as transformers 5 saves the models it has no
conversion map for (``mistral4``): one ``mlp.experts.gate_up_proj`` [E, 2I, D] (gate rows, then up
rows) and one ``mlp.experts.down_proj`` [E, D, I] per layer, instead of the official per-expert
``mlp.experts.E.{gate,up,down}_proj.weight``.

``FusedExpertsReader`` is the V3 loader's ``ShardReader`` with the per-expert names added as views
of the fused tensors (and the fused names hidden), so the one loader, its checks and its adapter
read such a checkpoint unchanged.
"""

from __future__ import annotations

import re

import torch

from dsv3lab.checkpoint import CheckpointError, ShardReader

_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def has_fused_experts(keys) -> bool:
    return any(_FUSED.match(k) for k in keys)


def fused_reader(path: str) -> "FusedExpertsReader | None":
    """The reader a checkpoint with fused experts needs (transformers' mistral4, glm_moe_dsa), or
    None for any other directory -- an unreadable one included: the loader names what is wrong."""
    try:
        fused = has_fused_experts(ShardReader(path).keys())
    except Exception:
        return None
    return FusedExpertsReader(path) if fused else None


class FusedExpertsReader(ShardReader):
    def __init__(self, path: str):
        super().__init__(path)
        self.virtual: dict[str, tuple[str, int, str]] = {}     # per-expert key -> (fused key, expert, part)
        for k in list(self.weight_map):
            m = _FUSED.match(k)
            if not m:
                continue
            shape = super().shape(k)
            if len(shape) != 3:
                raise CheckpointError(f"{self.file(k)}: fused expert tensor {k!r} must be 3-D, got {list(shape)}")
            parts = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
            for e in range(shape[0]):
                for part in parts:
                    self.virtual[f"{m.group(1)}.{e}.{part}.weight"] = (k, e, part)
        self.fused = {k for k, _, _ in self.virtual.values()}
        for v, (k, _, _) in self.virtual.items():
            self.weight_map[v] = self.weight_map[k]

    def keys(self) -> list[str]:
        return [k for k in self.weight_map if k not in self.fused]

    def mapping(self, key: str):
        """Per-expert views are read by ``get`` (copies); the shard mapping knows only stored tensors."""
        if key in self.virtual:
            return _Unmapped()
        return super().mapping(key)

    def _rows(self, key: str):
        k, e, part = self.virtual[key]
        E, R, C = super().shape(k)
        if part == "down_proj":
            return k, e, slice(0, R), (R, C)
        half = R // 2
        return k, e, slice(0, half) if part == "gate_proj" else slice(half, R), (half, C)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.virtual:
            return self._rows(key)[3]
        return super().shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return super().dtype(self.virtual[key][0] if key in self.virtual else key)

    def _slice(self, key: str):
        return super()._slice(self.virtual[key][0] if key in self.virtual else key)

    def get(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        if key not in self.virtual:
            return super().get(key, rows, cols)
        k, e, r, _ = self._rows(key)
        h, _ = self.handle(k)
        t = h.get_slice(k)[e:e + 1, r, :][0]
        if rows is not None or cols is not None:
            t = t[rows or slice(None), cols or slice(None)]
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read += 1
        return t.contiguous()


class _Unmapped:
    """The mapping of a per-expert view: nothing mapped, nothing to release."""

    def tensor(self, key, dtype=None):
        return None

    def release(self, key):
        pass
