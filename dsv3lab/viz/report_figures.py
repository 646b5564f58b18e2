"""The README's figures, cut from executed notebooks (``make report``).

``make report`` executes every notebook into ``results/report/executed/``; this picks a few of
their PNG outputs, named in ``FIGURES`` by notebook and by a snippet of the cell's source (cell
numbers move, calls don't), and writes them to ``docs/figures/`` below ``MAX_BYTES`` each
(palette-quantized, then scaled down if still too big), so the front page shows the lab before
anyone installs it::

    python -m dsv3lab.viz.report_figures results/report/executed docs/figures

A figure whose cell is not found is reported and the command exits non-zero (the others are
still written): a README pointing at a stale image should not pass unnoticed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from dataclasses import dataclass

from dsv3lab.atomic import write_bytes_atomic

MAX_BYTES = 150_000


@dataclass(frozen=True)
class Figure:
    notebook: str        # file stem in notebooks/
    snippet: str         # text in the source of the cell that draws it
    index: int           # which of that cell's PNG outputs (widget outputs excluded)
    name: str            # file written in docs/figures/
    shows: str           # one line for the README


FIGURES = [
    Figure("01_architecture", "expert_load_heatmap(", 0, "expert_load.png",
           "expert load per MoE layer over a short trace of the lab model (MaxVio in the title)"),
    Figure("01_architecture", "figures.routing_by_token(", 0, "routing_by_token.png",
           "which routed experts each token chose, weights in colour; white lines separate expert groups"),
    Figure("01_architecture", "figures.kv_bytes_bars(memory.kv_comparison()", 0, "kv_cache_per_token.png",
           "KV cache bytes per token: DeepSeek-V3's latent cache against GQA models (ISCA '25 Table 1)"),
    Figure("02_load_balancing", 'title="expert load / mean, per MoE layer"', 0, "load_balance_bias.png",
           "expert load / mean per MoE layer of the lab model: its trained aux-loss-free biases, then the "
           "same model with the biases zeroed (MaxVio per layer in the legends)"),
    Figure("03_fp8_error_analysis", "S.plot_accumulation(", 0, "fp8_accumulation.png",
           "max relative error of an FP8 dot product against K for 13- and 14-bit accumulators, without "
           "and with promotion to FP32 every 128 elements"),
    Figure("04_benchmark_replication", 'R.recorded_figures("pipeline")', 0, "pipeline_schedules.png",
           "1F1B, ZB1P and DualPipe on 8 devices and 20 micro-batches, as simulated (bubble and peak "
           "activations in the titles)"),
    Figure("07_interpretability", "F.lens_heatmap(", 0, "logit_lens.png",
           "logit lens on one sentence: p(true next token) after each block and at MTP depth 0, the top "
           "guess written in each cell"),
]


def cell_pngs(nb: dict, snippet: str) -> list[bytes]:
    """PNG outputs of the first code cell whose source contains ``snippet``."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if snippet in src:
            out = []
            for o in cell.get("outputs", []):
                png = o.get("data", {}).get("image/png")
                if png:
                    out.append(base64.b64decode("".join(png) if isinstance(png, list) else png))
            return out
    raise KeyError(snippet)


def shrink_png(data: bytes, max_bytes: int = MAX_BYTES) -> bytes:
    """``data`` if small enough, else palette-quantized (256 colours), then scaled down by 15 %
    steps until it fits."""
    if len(data) <= max_bytes:
        return data
    from PIL import Image
    im = Image.open(io.BytesIO(data)).convert("RGB")
    while True:
        buf = io.BytesIO()
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or im.width < 200:
            return buf.getvalue()
        im = im.resize((int(im.width * 0.85), int(im.height * 0.85)), Image.LANCZOS)


def extract(executed_dir: str, out_dir: str, figures=FIGURES, max_bytes: int = MAX_BYTES):
    """Write each figure; returns (written [(path, bytes, shows)], problems [str])."""
    written, problems, books = [], [], {}
    for f in figures:
        path = os.path.join(executed_dir, f.notebook + ".ipynb")
        if f.notebook not in books:
            if not os.path.exists(path):
                problems.append(f"{f.name}: {path} is missing (did the notebook run?)")
                continue
            with open(path, encoding="utf-8") as fh:
                books[f.notebook] = json.load(fh)
        try:
            pngs = cell_pngs(books[f.notebook], f.snippet)
        except KeyError:
            problems.append(f"{f.name}: no code cell in {f.notebook} contains {f.snippet!r}")
            continue
        if len(pngs) <= f.index:
            problems.append(f"{f.name}: the {f.snippet!r} cell of {f.notebook} has {len(pngs)} PNG output(s), "
                            f"figure {f.index} asked for")
            continue
        data = shrink_png(pngs[f.index], max_bytes)
        out = write_bytes_atomic(os.path.join(out_dir, f.name), data)
        written.append((out, len(data), f.shows))
    return written, problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m dsv3lab.viz.report_figures EXECUTED_NOTEBOOKS_DIR OUT_DIR", file=sys.stderr)
        return 2
    os.makedirs(argv[1], exist_ok=True)
    written, problems = extract(argv[0], argv[1])
    for path, n, shows in written:
        print(f"report figure {path} ({n / 1000:.0f} KB): {shows}")
    for p in problems:
        print(f"report figure MISSING {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
