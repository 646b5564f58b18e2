"""A dsv3lab checkpoint as GGUF, written by llama.cpp's own converter (for ``bench peers``).

We do not write GGUF ourselves: a converter of our own would test our reading of llama.cpp's
format, not llama.cpp on our model. ``convert_hf_to_gguf.py`` ships in the llama-cpp-python
source distribution under ``vendor/llama.cpp/`` together with the matching ``gguf-py``; it
reads the official HF layout that ``dsv3lab.save`` writes (DeepseekV3ForCausalLM: it splits
``kv_b_proj`` into the absorbed ``k_b``/``v_b`` halves, stacks the experts, drops the MTP layer)
and runs here as a subprocess, unchanged.

Two things it needs that a random checkpoint lacks:

- **A tokenizer.** The converter copies the vocabulary into the file, so the checkpoint
  directory needs a ``tokenizer.json`` whose ids fit ``vocab_size`` (ids it lacks become unused
  ``[PAD]`` entries). ``ensure_tokenizer`` copies the lab model's byte-level BPE when it fits and
  otherwise trains one of exactly ``vocab_size`` on Python's reference manual
  (``dsv3lab.train.corpus.train_tokenizer``).
- **The name of the pre-tokenizer.** llama.cpp identifies a BPE pre-tokenizer by hashing the
  ids its tokenizer gives one fixed string, against a table of released models; a tokenizer
  trained here is in no table, and the converter stops. Ours splits text with GPT-2's regex
  (``ByteLevel(use_regex=True)``), which llama.cpp calls ``gpt-2``, so the runner below tells the
  converter that name only when its own table has no answer (the converter's code is not
  edited; a tokenizer it recognises is named by the converter itself).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dsv3lab.atomic import atomic_write, write_bytes_atomic
from dsv3lab.paths import repo_root

# The converter, unchanged, with one fallback: the pre-tokenizer's name when its hash table has
# no entry (argv: script, name or "-", then the converter's own arguments).
_RUNNER = r"""
import os, runpy, sys
from pathlib import Path
script, pre = sys.argv[1], sys.argv[2]
here = Path(script).resolve().parent
sys.path[:0] = [str(here)] + ([] if "NO_LOCAL_GGUF" in os.environ else [str(here / "gguf-py")])
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        if pre == "-":
            raise
        base.logger.warning(f"pre-tokenizer not in llama.cpp's table; declared by dsv3lab: {pre!r}")
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""

INSTALL_HINT = ("llama.cpp's converter was not found. Get the llama-cpp-python source distribution "
                "(docs/performance.md#llamacpp): pip download --no-deps --no-binary :all: "
                "llama-cpp-python==0.3.36 -d build/ && tar xzf build/llama_cpp_python-0.3.36.tar.gz "
                "-C build/, then pass --llama-src build/llama_cpp_python-0.3.36 or set DSV3LAB_LLAMA_CPP_SRC")

DEFAULT_SRC = os.path.join("build", "llama_cpp_python-0.3.36")
LAB_TOKENIZER = os.path.join(repo_root(), "data", "lab-model", "tokenizer.json")


def find_converter(src: str | None = None) -> Path:
    """``convert_hf_to_gguf.py`` from ``src`` (the llama-cpp-python source tree, its
    ``vendor/llama.cpp``, or the script itself), else ``$DSV3LAB_LLAMA_CPP_SRC``, else
    ``build/llama_cpp_python-0.3.36``. A clear error says where it looked."""
    tried = []
    for base in [src, os.environ.get("DSV3LAB_LLAMA_CPP_SRC"), DEFAULT_SRC]:
        if not base:
            continue
        p = Path(base)
        for cand in (p, p / "convert_hf_to_gguf.py", p / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"):
            if cand.is_file() and cand.name == "convert_hf_to_gguf.py":
                return cand.resolve()
        tried.append(str(p))
        if src:                                  # an explicit path that is wrong is an error
            break
    raise FileNotFoundError(f"convert_hf_to_gguf.py not found in {', '.join(tried) or 'nothing'}. {INSTALL_HINT}")


def pre_tokenizer_name(tokenizer_json: str) -> str | None:
    """llama.cpp's name for the pre-tokenizer in ``tokenizer_json``: ``gpt-2`` for a byte-level
    split with GPT-2's regex (what ``train_tokenizer`` makes), None for anything else (left to
    the converter's own table)."""
    with open(tokenizer_json, encoding="utf-8") as f:
        pre = json.load(f).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def ensure_tokenizer(ckpt_dir: str, vocab_size: int) -> str:
    """A ``tokenizer.json`` in ``ckpt_dir`` whose ids are all below ``vocab_size``: kept if one
    is there and fits, else the lab model's if it fits, else one trained to ``vocab_size``."""
    from tokenizers import Tokenizer
    path = os.path.join(ckpt_dir, "tokenizer.json")
    if os.path.isfile(path):
        n = Tokenizer.from_file(path).get_vocab_size()
        if n > vocab_size:
            raise ValueError(f"{path}: tokenizer has {n} ids, more than the config's vocab_size {vocab_size}")
        return path
    lab = os.path.abspath(LAB_TOKENIZER)
    if os.path.isfile(lab) and Tokenizer.from_file(lab).get_vocab_size() <= vocab_size:
        return atomic_write(path, lambda tmp: shutil.copyfile(lab, tmp))
    from pydoc_data.topics import topics
    from dsv3lab.train.corpus import train_tokenizer
    tok = train_tokenizer(sorted(topics.values()), vocab_size)
    return write_bytes_atomic(path, tok.to_str().encode())


def to_gguf(ckpt_dir: str, out_path: str, outtype: str = "bf16", llama_src: str | None = None,
            log_path: str | None = None) -> str:
    """Convert ``ckpt_dir`` (official HF layout with a tokenizer.json) to ``out_path`` with
    llama.cpp's converter (``outtype``: f32, bf16, f16, q8_0), atomically; on failure the error
    carries the end of the converter's log (all of it in ``log_path``)."""
    script = find_converter(llama_src)
    tok = os.path.join(ckpt_dir, "tokenizer.json")
    if not os.path.isfile(tok):
        raise FileNotFoundError(f"{tok}: the converter needs the checkpoint's tokenizer (ensure_tokenizer)")
    pre = pre_tokenizer_name(tok) or "-"
    log = []

    def convert(tmp):
        cmd = [sys.executable, "-c", _RUNNER, str(script), pre, os.path.abspath(ckpt_dir),
               "--outfile", tmp, "--outtype", outtype]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log.append(proc.stdout + proc.stderr)
        if log_path:
            write_bytes_atomic(log_path, log[0].encode())
        if proc.returncode != 0:
            tail = "\n".join(log[0].strip().splitlines()[-15:])
            raise RuntimeError(f"llama.cpp's converter failed on {ckpt_dir} (exit {proc.returncode}):\n{tail}")

    return atomic_write(out_path, convert)
