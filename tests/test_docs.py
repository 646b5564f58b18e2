"""The documentation's pointers lead somewhere: links and anchors resolve, files named exist.

Scans the project's own text (README, docs/, the package, kernels/, tests/, notebooks/, scripts/,
Makefile) for
  * markdown links to local files, and their #anchors (explicit <a id> or a heading's slug);
  * plain mentions of docs pages with an anchor (``docs/references.md#gate`` in a docstring);
  * paths of project files (``dsv3lab/model/rope.py``, ``notebooks/05_parallel.ipynb``);
and checks that nothing cites a facts sheet kept outside the repository: facts the code relies on
are written in docs/references.md, with the papers' sections and tables.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache

import pytest

from dsv3lab.paths import REPO_ROOT as ROOT

SCAN_DIRS = ("docs", "dsv3lab", "kernels", "tests", "notebooks", "scripts")
SCAN_FILES = ("README.md", "Makefile", "pyproject.toml", "data/lab-model/README.md")
SUFFIXES = (".py", ".md", ".ipynb", ".sh", ".toml")
# paths under these prefixes must exist when mentioned (not results written by runs)
PROJECT_PREFIXES = ("dsv3lab/", "kernels/", "tests/", "notebooks/", "docs/", "scripts/",
                    "data/lab-model/")
PATH_RE = re.compile(r"(?<![\w./-])((?:dsv3lab|kernels|tests|notebooks|docs|scripts|data/lab-model)"
                     r"/[\w./-]*\.(?:py|md|ipynb|sh|json|png|safetensors|jsonl))(#[\w-]+)?")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ANCHOR_ID_RE = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def _texts() -> list[tuple[str, str]]:
    """(relative path, text) of every scanned file; notebooks as their cells' joined sources."""
    paths = [f for f in SCAN_FILES if os.path.exists(os.path.join(ROOT, f))]
    for d in SCAN_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, d)):
            dirnames[:] = [x for x in dirnames if not x.startswith(".") and x != "__pycache__"]
            paths += [os.path.relpath(os.path.join(dirpath, f), ROOT)
                      for f in filenames if f.endswith(SUFFIXES)]
    out = []
    for rel in sorted(paths):
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        if rel.endswith(".ipynb"):
            nb = json.loads(text)
            text = "\n".join("".join(c.get("source", [])) for c in nb["cells"])
        out.append((rel, text))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[`*_~]|<[^>]+>", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


@lru_cache(maxsize=None)
def _anchors(rel: str) -> frozenset[str]:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        text = f.read()
    ids = set(ANCHOR_ID_RE.findall(text))
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            ids.add(_slug(line.lstrip("#")))
    return frozenset(ids)


def _check_target(src: str, target: str, problems: list[str], base: str) -> None:
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, src)
    rel = os.path.relpath(full, ROOT)
    if not os.path.exists(full):
        problems.append(f"{src}: {target} -> {rel} does not exist")
    elif anchor and rel.endswith(".md") and anchor not in _anchors(rel):
        problems.append(f"{src}: {target} -> no anchor #{anchor} in {rel}")


@pytest.fixture(scope="module")
def texts():
    return _texts()


def test_no_citations_of_an_external_facts_sheet(texts):
    word = re.compile(r"\b" + "FA" + r"CTS\b|shared/" + "reference")
    hits = [f"{rel}:{text[:m.start()].count(chr(10)) + 1}" for rel, text in texts
            for m in word.finditer(text)]
    assert not hits, "cite the paper and docs/references.md instead: " + ", ".join(hits)


def test_markdown_links_resolve(texts):
    problems: list[str] = []
    for rel, text in texts:
        if not rel.endswith((".md", ".ipynb")):
            continue
        base = os.path.dirname(os.path.join(ROOT, rel))
        for m in LINK_RE.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):          # http:, https:, mailto:
                continue
            _check_target(rel, target, problems, base)
    assert not problems, "\n".join(problems)


def test_project_paths_and_doc_anchors_exist(texts):
    problems: list[str] = []
    for rel, text in texts:
        if rel == "tests/test_docs.py":
            continue
        for m in PATH_RE.finditer(text):
            path, anchor = m.group(1), m.group(2) or ""
            if re.search(r"NAME|DIR|\*|\{|XXX", path) or path.endswith("/"):
                continue
            _check_target(rel, path + anchor, problems, ROOT)
    assert not problems, "\n".join(problems)


def test_references_anchors_are_unique():
    with open(os.path.join(ROOT, "docs", "references.md"), encoding="utf-8") as f:
        ids = ANCHOR_ID_RE.findall(f.read())
    assert len(ids) == len(set(ids)) and len(ids) > 40
    for needed in ("mla-cache", "yarn", "gate", "fp8-blocks", "mtp", "day6", "dualpipe", "kv-bytes",
                   "params", "triton-interpreter", "dsa", "eplb"):
        assert needed in ids
