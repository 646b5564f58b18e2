"""A checkpoint's tokenizer, and the text codec the instruments use with or without one.

``load_tokenizer(dir)`` reads ``dir/tokenizer.json`` through the tokenizers library (None when the
checkpoint has none). ``TextCodec`` wraps it for the instruments; without a tokenizer it falls
back to UTF-8 bytes (ids 0..255, shown as characters), so every instrument still runs on an
untrained model. (Training a tokenizer is part of the training recipe, not of this file.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


def load_tokenizer(path: str):
    """The checkpoint's ``tokenizer.json`` through the tokenizers library, or None."""
    f = os.path.join(path, "tokenizer.json")
    if not os.path.exists(f):
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(f)


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


def codec_for(path: Optional[str], vocab_size: int) -> TextCodec:
    """The codec of checkpoint ``path`` (its tokenizer.json, else bytes); bytes for None."""
    return TextCodec(load_tokenizer(path) if path else None, vocab_size)
