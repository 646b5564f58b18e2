"""Text that ships with Python, as token streams: the corpus, its split, the tokenizer, windows.

The only text guaranteed offline is Python's own: the reference manual (``pydoc_data.topics``)
and the standard library (docstrings read with ``ast``, and optionally the source itself).
Nothing is imported from the standard library's modules, so no module runs.

  python_docs_corpus   documents in a fixed order (the text depends on the Python version);
                       ``python_docs_with_origin`` says which topic or module each came from
  stdlib_sources       the standard library's source files, as documents of code
  split_documents      seeded split by whole document, so no text is in both halves
  train_tokenizer      a byte-level BPE like the released model's; BOS = 0, EOS = 1
  encode_documents     one int64 stream, EOS after each document
  sample_windows / eval_windows   random training windows / fixed validation windows
"""

from __future__ import annotations

import ast
import os
import random
from typing import Iterable, Optional, Sequence

import torch

BOS = "<｜begin▁of▁sentence｜>"   # DeepSeek-V3's special-token spellings, ids 0 and 1 here
EOS = "<｜end▁of▁sentence｜>"


_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
              "__pycache__", "ensurepip", "tkinter", "pydoc_data", "encodings"}


def reflow(text: str) -> str:
    """Join the hard-wrapped lines of prose paragraphs (the manual wraps at ~70 columns, which
    would make "\\n" the commonest token). Paragraphs with an indented line (code, grammar,
    tables) or a heading rule keep their lines."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        rule = any(ln and set(ln.strip()) <= set("*=-~^") for ln in lines)
        if len(lines) > 1 and not rule and not any(ln[:1].isspace() for ln in lines):
            para = " ".join(ln.strip() for ln in lines)
        out.append(para)
    return "\n\n".join(out)


def _stdlib_files() -> list[tuple[str, str]]:
    """(path relative to the standard library, absolute path) of its .py files, in a fixed
    order, without tests, GUI demos, vendored packages and the manual's own data."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("config-"))
        for fn in sorted(files):
            if fn.endswith(".py"):
                full = os.path.join(d, fn)
                out.append((os.path.relpath(full, root), full))
    return out


def python_docs_with_origin(docstrings: bool = True, min_docstring_chars: int = 200) -> list[tuple[str, str]]:
    """``python_docs_corpus`` as (origin, text) pairs: origin is ``"topic:<key>"`` for a topic of
    the reference manual, else the module's path relative to the standard library (to hold out
    whole modules)."""
    from pydoc_data.topics import topics
    docs = [(f"topic:{k}", reflow(topics[k].strip())) for k in sorted(topics) if topics[k].strip()]
    if not docstrings:
        return docs
    for rel, full in _stdlib_files():
        try:
            with open(full, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                s = ast.get_docstring(node)
                if s and len(s) >= min_docstring_chars:
                    docs.append((rel, reflow(s)))
    return docs


def python_docs_corpus(docstrings: bool = True, min_docstring_chars: int = 200) -> list[str]:
    """Documents from Python's own text, in a fixed order: every topic of the reference manual
    (``pydoc_data.topics``), then the module/class/function docstrings of the standard library
    read with ``ast`` (nothing is imported, so no module runs). Short docstrings are dropped: they
    are mostly signatures. Prose paragraphs are unwrapped (``reflow``). The text depends on the
    Python version (the model card records it)."""
    return [text for _, text in python_docs_with_origin(docstrings, min_docstring_chars)]


def stdlib_sources(max_chars_per_file: Optional[int] = 24_000) -> list[tuple[str, str]]:
    """(module path, source text) of the standard library's .py files that parse, in a fixed
    order; each cut at ``max_chars_per_file`` (at a line end) so a few huge modules do not make
    up most of the code."""
    out = []
    for rel, full in _stdlib_files():
        try:
            with open(full, encoding="utf-8") as f:
                src = f.read()
            ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        if max_chars_per_file is not None and len(src) > max_chars_per_file:
            src = src[:src.rfind("\n", 0, max_chars_per_file) + 1]
        if src.strip():
            out.append((rel, src))
    return out


def split_documents(docs: Sequence[str], val_fraction: float = 0.05, seed: int = 0):
    """(train_docs, val_docs): a seeded shuffle of whole documents, so no text is in both."""
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(len(docs) * val_fraction)) if len(docs) > 1 else 0
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (BOS, EOS)):
    """A byte-level BPE ``tokenizers.Tokenizer`` (as the released model uses): every byte is a
    base token, so any text encodes and decodes back exactly. The special tokens get ids
    0, 1, ... in order (BOS = 0, EOS = 1, as ``ModelConfig`` expects)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, torch.get_num_threads())))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def encode_documents(tok, docs: Sequence[str], eos_id: int = 1) -> torch.Tensor:
    """One int64 stream: each document's ids followed by EOS."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs)):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(tokens: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length`` tokens from a 1-D stream -> [batch, length]."""
    if tokens.numel() <= length:
        raise ValueError(f"the token stream ({tokens.numel()} tokens) is shorter than one window "
                         f"of {length}; use a shorter seq_len or more text")
    starts = torch.randint(0, tokens.numel() - length, (batch,), generator=gen)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """Up to ``n`` consecutive non-overlapping windows from the start of the stream."""
    n = min(n, tokens.numel() // length)
    if n == 0:
        raise ValueError(f"the validation stream ({tokens.numel()} tokens) is shorter than one window")
    return tokens[:n * length].view(n, length)
