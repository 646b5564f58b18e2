"""The README's Python examples run as written, in order, in one namespace (a front page that
lies is worse than none). Blocks that point at a checkpoint the reader downloads (``/path/to/``)
are checked to parse only: no download in tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 6


def test_readme_python_examples_run(monkeypatch):
    monkeypatch.chdir(README.parent)                 # the examples use paths relative to the checkout
    ns: dict = {}
    for block in _python_blocks():
        ast.parse(block)
        if "/path/to/" in block:
            continue
        exec(compile(block, "README.md", "exec"), ns)
    assert ns["logits"].shape[:2] == (1, 6)
    assert ns["lens"].shape[0] == ns["model"].cfg.num_hidden_layers
    assert ns["q"].shape == (4, 256) and ns["scale"].shape == (4, 2)
    assert ns["dsa"].attn_mode == "sparse" and ns["big"].cfg.num_hidden_layers == 61
