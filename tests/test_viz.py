"""Figures and widgets, headless (issue 4)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import dsv3lab  # noqa: E402
from dsv3lab.probes import memory, metrics, trace  # noqa: E402
from dsv3lab.tokenizer import TextCodec  # noqa: E402
from dsv3lab.viz import figures  # noqa: E402
from dsv3lab.viz.widgets import KVMemoryExplorer, RoutingExplorer  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return dsv3lab.build("tiny", seed=0)


def _image(fig):
    return np.asarray(fig.axes[0].images[0].get_array())


def test_figures(model):
    with trace(model) as t:
        model(torch.randint(0, 512, (2, 8)))
    r = t.routing
    ld = r.expert_load()
    fig = figures.expert_load_heatmap(ld, r.layers, n_group=4)
    assert isinstance(fig, Figure)
    img = _image(fig)
    assert img.shape == (2, 16)
    np.testing.assert_allclose(img, (ld / ld.double().mean(-1, keepdim=True)).numpy(), rtol=1e-6)
    assert "MaxVio" in fig.axes[0].get_title()
    fig = figures.routing_by_token(r.topk_ids[0][:8], r.topk_weights[0][:8], list("abcdefgh"), 16, layer=1)
    img = _image(fig)
    assert (~np.isnan(img)).sum() == 8 * 4 and fig.axes[0].get_title() == "Routing, layer 1"
    C = metrics.co_selection(r.topk_ids[0], 16)
    fig = figures.co_selection_heatmap(C, n_group=4)
    np.testing.assert_allclose(np.diag(_image(fig)), (ld[0] > 0).double().numpy())   # P(i | i) = 1 where used
    fig = figures.kv_bytes_bars(memory.kv_comparison(), annotate="printed")
    assert [p.get_width() for p in fig.axes[0].patches] == [70_272, 327_680, 516_096]
    fig = figures.kv_bytes_bars([dict(model="m", bytes_per_token=3 * 2**30)], unit="GiB")
    assert [p.get_width() for p in fig.axes[0].patches] == [3.0] and fig.axes[0].get_xlabel().endswith("(GiB)")
    with pytest.raises(ValueError, match="unit"):
        figures.kv_bytes_bars([dict(model="m", bytes_per_token=1)], unit="GB")
    fig = figures.capacity_curves({"absorbed": 70_272, "naive": 4_997_120}, [1, 10, 100], 4096)
    assert len(fig.axes[0].lines) == 2
    assert list(fig.axes[0].lines[0].get_ydata()) == [2**30 * b // 70_272 // 4096 for b in (1, 10, 100)]


def test_routing_explorer_callbacks(model):
    ex = RoutingExplorer(model, TextCodec(None, 512), text="abc", layer=1)
    box = ex.widget()                                   # builds controls + first figure, headless
    assert box.children and ex.figure.axes[0].get_title().startswith("Routing, layer 1: 3 tokens")
    before = _image(ex.figure).copy()
    ex.controls["layer"].value = 2                      # the widget callback redraws
    assert ex.figure.axes[0].get_title().startswith("Routing, layer 2")
    assert not np.array_equal(np.nan_to_num(before), np.nan_to_num(_image(ex.figure)))
    ex.controls["text"].value = "hello!"
    assert _image(ex.figure).shape == (6, 16)
    assert [t.get_text() for t in ex.figure.axes[0].get_yticklabels()] == list("hello!")
    with pytest.raises(ValueError):
        ex.update(layer=0)                              # a dense layer


def test_kv_memory_explorer_callbacks():
    ex = KVMemoryExplorer(preset="v3-671b", context=4096, batch=1)
    ex.widget()
    w1 = ex.figure.axes[0].patches[0].get_width()
    assert w1 == pytest.approx(70_272 * 4096 / 2**30)              # the axis is in GiB
    assert ex.figure.axes[0].get_xlabel().endswith("(GiB)")
    ex.controls["batch"].value = 8
    assert ex.figure.axes[0].patches[0].get_width() == pytest.approx(8 * w1)
    assert "batch 8 x 4,096" in ex.figure.axes[0].get_title()
    ex.controls["dtype"].value = "float8_e4m3fn"
    assert ex.figure.axes[0].patches[0].get_width() == pytest.approx(4 * w1)
    ex.controls["preset"].value = "v2-lite-16b"
    assert ex.figure.axes[0].patches[0].get_width() == pytest.approx(31_104 // 2 * 4096 * 8 / 2**30)
    ex.controls["context"].value = 1024
    assert ex.figure.axes[0].get_title().startswith("v2-lite-16b, float8_e4m3fn: batch 8 x 1,024")
