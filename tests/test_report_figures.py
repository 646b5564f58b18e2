"""dsv3lab.viz.report_figures: README figures cut from executed notebooks, under a size cap."""

import base64
import io
import json

import pytest

from dsv3lab.viz.report_figures import Figure, extract


def _png(seed=0, size=(6, 4)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=size, dpi=100)
    ax.imshow(np.random.default_rng(seed).random((64, 64)), cmap="viridis")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def test_extract_picks_by_source_and_shrinks(tmp_path):
    big, small = _png(0, (10, 8)), _png(1)
    nb = {"cells": [
        {"cell_type": "code", "source": ["x = 1\n", "draw_other()"],
         "outputs": [{"output_type": "display_data", "data": {"image/png": base64.b64encode(small).decode()}}]},
        {"cell_type": "code", "source": "display(draw_heatmap(ld))",
         "outputs": [{"output_type": "stream", "text": "hello"},
                     {"output_type": "display_data", "data": {"image/png": base64.b64encode(small).decode()}},
                     {"output_type": "display_data", "data": {"image/png": base64.b64encode(big).decode()}}]},
    ]}
    (tmp_path / "nb.ipynb").write_text(json.dumps(nb))
    cap = len(small) + 1
    assert len(big) > cap
    figs = [Figure("nb", "draw_heatmap(", 1, "heat.png", "the big one"),
            Figure("nb", "draw_other()", 0, "other.png", "the small one"),
            Figure("nb", "never_called(", 0, "gone.png", "missing"),
            Figure("absent", "x", 0, "absent.png", "missing notebook")]
    written, problems = extract(str(tmp_path), str(tmp_path / "out"), figs, max_bytes=cap)
    sizes = {p.split("/")[-1]: n for p, n, _ in written}
    assert set(sizes) == {"heat.png", "other.png"}
    assert sizes["heat.png"] <= cap < len(big)                       # shrunk below the cap
    assert (tmp_path / "out" / "other.png").read_bytes() == small   # small ones copied as they are
    from PIL import Image
    assert Image.open(tmp_path / "out" / "heat.png").size[0] >= 200
    assert len(problems) == 2 and "never_called(" in problems[0] and "absent.ipynb is missing" in problems[1]


def test_too_few_outputs_is_named(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": "f()", "outputs": []}]}
    (tmp_path / "nb.ipynb").write_text(json.dumps(nb))
    _, problems = extract(str(tmp_path), str(tmp_path / "o"), [Figure("nb", "f()", 0, "f.png", "")])
    assert problems == ["f.png: the 'f()' cell of nb has 0 PNG output(s), figure 0 asked for"]
