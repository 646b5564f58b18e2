"""``kernels/`` as shipped: it installs as ``dsv3lab.kernels`` with every C source and header a
non-editable install needs to compile (and the wheel holds every dsv3lab subpackage), and it never imports the rest of dsv3lab (the model calls
down into the kernels; an import back up would be a cycle hidden by the package-dir remap)."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dsv3lab.kernels import cpu_compile

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def test_kernels_never_import_the_rest_of_dsv3lab():
    bad = {f"{p.name}: {m}" for p in KERNELS.glob("*.py") for m in _imports(p)
           if m.split(".")[0] == "dsv3lab" and not m.startswith("dsv3lab.kernels")}
    assert not bad, sorted(bad)


@pytest.mark.slow
def test_the_wheel_ships_every_c_source_and_header_and_they_compile(tmp_path):
    src = tmp_path / "src"                  # a copy: setuptools writes build/ and *.egg-info beside the sources
    for name in ("dsv3lab", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next(tmp_path.glob("dsv3lab-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("dsv3lab/kernels/cpu/")}
        assert shipped >= {p.name for p in (KERNELS / "cpu").iterdir() if p.suffix in (".c", ".h")}
        # every subpackage of dsv3lab too (pyproject lists them by hand)
        packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "dsv3lab").rglob("__init__.py")
                    if "__pycache__" not in p.parts}
        assert {f"{p}/__init__.py" for p in packages} <= names, sorted({f"{p}/__init__.py" for p in packages} - names)
        z.extractall(tmp_path / "site")
    cc = cpu_compile.compiler()
    if cc is None:
        pytest.skip("no C compiler to compile the shipped sources with")
    for src in (tmp_path / "site" / "dsv3lab" / "kernels" / "cpu").glob("*.c"):
        out = subprocess.run([cc, *cpu_compile.flags("native"), str(src), "-o", str(tmp_path / f"{src.stem}.so"), "-lm"],
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{src.name}: {out.stderr[-2000:]}"
