"""Every notebook in notebooks/ executes top to bottom (nbclient), as `make report` would."""

import glob
import os

import pytest

from dsv3lab.paths import REPO_ROOT as ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert any(os.path.basename(p).startswith("00_") for p in NOTEBOOKS)


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    lab = os.path.join(ROOT, "data", "lab-model")
    if os.path.exists(os.path.join(lab, "config.json")):
        monkeypatch.setenv("DSV3LAB_MODEL", lab)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{os.path.basename(path)} is committed with outputs"
    # generous start-up: under a loaded CI box a kernel has taken over a minute to answer
    client = nbclient.NotebookClient(nb, timeout=300, startup_timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()
