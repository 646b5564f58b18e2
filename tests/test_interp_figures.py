"""The interpretability figures show what the data holds: the single-expert patching map is scaled
to its own range (symmetric about 0), other hooks keep -1..1; the lens map marks cells with no
prediction (the MTP row's first positions) instead of leaving them blank."""

from types import SimpleNamespace

import pytest
import torch

from dsv3lab.interp import figures as F


def _patch(hook, scores):
    return SimpleNamespace(scores=scores, hook=hook, cols=list(range(scores.shape[1])),
                           rows=list(range(scores.shape[0])))


def test_expert_patching_scaled_to_data():
    s = torch.tensor([[0.01, -0.03], [0.02, 0.0]])
    fig = F.patching_heatmap(_patch("expert", s))
    im = fig.axes[0].images[0]
    assert im.get_clim() == pytest.approx((-0.03, 0.03))
    assert "±0.03" in fig.axes[1].get_ylabel()
    im = F.patching_heatmap(_patch("resid_pre", s), pieces=["a", "b"]).axes[0].images[0]
    assert im.get_clim() == (-1.0, 1.0)


def test_lens_marks_missing_cells():
    p = torch.rand(3, 1, 4)
    p[2, 0, 0] = float("nan")
    fig = F.lens_heatmap({"prob": p}, ["a", "b", "c", "d"], ["b0", "b1", "MTP 1"], top_pieces=[["x"] * 4] * 3)
    ax = fig.axes[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert texts[(2, 0)].get_text() == "n/a" and texts[(1, 0)].get_text() == "x"
    assert min(t.get_fontsize() for t in ax.texts) >= 8
    assert "no prediction" in ax.get_title()
    assert "no prediction" not in F.lens_heatmap({"prob": p[:2]}).axes[0].get_title()
