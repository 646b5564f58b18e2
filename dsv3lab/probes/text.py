"""Getting a model and turning text into token ids for the instruments.

``lab_model()`` is what notebooks and widgets use: ``$DSV3LAB_MODEL``, else the repository's
``data/lab-model`` when it exists, else a freshly built ``lab`` preset (random weights, seed 0).
Without a ``tokenizer.json`` text falls back to UTF-8 bytes (ids 0..255, shown as characters), so
every instrument still runs on an untrained model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TextCodec:
    tokenizer: Optional[object] = None     # a tokenizers.Tokenizer, or None for the byte fallback
    vocab_size: int = 256

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer.encode(text).ids)
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def pieces(self, ids) -> list[str]:
        """One display string per id."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if self.tokenizer is not None:
            return [self.tokenizer.decode([i]) for i in ids]
        return [chr(i) if 32 <= i < 127 else f"<{i}>" for i in ids]


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_model_dir() -> Optional[str]:
    env = os.environ.get("DSV3LAB_MODEL")
    if env and os.path.exists(os.path.join(env, "config.json")):
        return env
    d = os.path.join(repo_root(), "data", "lab-model")
    return d if os.path.exists(os.path.join(d, "config.json")) else None


def codec_for(path: Optional[str], vocab_size: int) -> TextCodec:
    from dsv3lab.commands import load_tokenizer
    tok = load_tokenizer(path) if path else None
    return TextCodec(tok, vocab_size)


def lab_model(preset: str = "lab", dtype=torch.float32):
    """(model, codec, source): the trained lab model when present, else a built preset."""
    import dsv3lab
    path = default_model_dir()
    if path is not None:
        model = dsv3lab.load(path, dtype=dtype)
        return model.eval(), codec_for(path, model.cfg.vocab_size), path
    model = dsv3lab.build(preset, seed=0, dtype=dtype)
    return model, TextCodec(None, model.cfg.vocab_size), f"built {preset!r} preset (random weights, seed 0)"


def resolve_model(name_or_dir: str, dtype=None):
    """A checkpoint directory (``dsv3lab.load``) or a preset name (built, seed 0) -> (model, codec)."""
    import dsv3lab
    from dsv3lab.config import PRESETS
    if os.path.isdir(name_or_dir):
        model = dsv3lab.load(name_or_dir, dtype=dtype)
        return model.eval(), codec_for(name_or_dir, model.cfg.vocab_size)
    if name_or_dir in PRESETS:
        model = dsv3lab.build(name_or_dir, seed=0, dtype=dtype)
        return model, TextCodec(None, model.cfg.vocab_size)
    raise ValueError(f"{name_or_dir!r} is neither a checkpoint directory nor a preset "
                     f"({', '.join(sorted(PRESETS))})")
