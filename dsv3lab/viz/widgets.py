"""ipywidgets on the instruments. Each explorer keeps its logic in ``update(**values)``, which
returns the new Figure (also ``.figure``) and is what the widget callbacks call -- so tests drive
the same code headless, without a browser. ``.widget()`` builds the controls and an Output area.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dsv3lab.probes import memory
from dsv3lab.viz import figures

DTYPES = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn, "float32": torch.float32}


class _Explorer:
    figure = None

    def _set(self, fig):
        self.figure = fig
        return fig

    def _build(self, controls: dict):
        import ipywidgets as W
        from IPython.display import display
        out = W.Output()

        def redraw(_=None):
            fig = self.update(**{k: c.value for k, c in controls.items()})
            out.clear_output(wait=True)
            with out:
                display(fig)
        for c in controls.values():
            c.observe(redraw, names="value")
        redraw()
        self.controls, self.output = controls, out
        return W.VBox([W.HBox(list(controls.values())), out])


class RoutingExplorer(_Explorer):
    """Pick a MoE layer and a text; shows which experts each token chose, with their weights."""

    def __init__(self, model, codec, text: str = "The quick brown fox jumps over the lazy dog.",
                 layer: Optional[int] = None):
        self.model, self.codec = model, codec
        self.layers = [b.layer for b in model.layers if hasattr(b.mlp, "gate")]
        self.layer = layer if layer is not None else self.layers[0]
        self.text = text
        self._cache_key, self._routing = None, None

    def routing(self, text: str):
        if self._cache_key != text:
            from dsv3lab.probes import trace
            ids = self.codec.encode(text) or [0]
            with torch.no_grad(), trace(self.model) as t:
                self.model(torch.tensor([ids]))
            self._cache_key, self._routing, self._ids = text, t.routing, ids
        return self._routing

    def update(self, layer: Optional[int] = None, text: Optional[str] = None):
        self.layer = self.layer if layer is None else int(layer)
        self.text = self.text if text is None else text
        if self.layer not in self.layers:
            raise ValueError(f"layer {self.layer} is not a MoE layer; choose from {self.layers}")
        r = self.routing(self.text)
        i = self.layers.index(self.layer)
        cfg = self.model.cfg
        return self._set(figures.routing_by_token(
            r.topk_ids[i], r.topk_weights[i], self.codec.pieces(self._ids), cfg.n_routed_experts,
            layer=self.layer, n_group=cfg.n_group,
            title=f"Routing, layer {self.layer}: {len(self._ids)} tokens, top-{cfg.num_experts_per_tok}"))

    def widget(self):
        import ipywidgets as W
        return self._build(dict(layer=W.Dropdown(options=self.layers, value=self.layer, description="layer"),
                                text=W.Text(value=self.text, description="text", continuous_update=False)))


class KVMemoryExplorer(_Explorer):
    """Pick a preset, dtype, context and batch; shows the KV cache a batch needs per layout."""

    def __init__(self, presets: Sequence[str] = ("v3-671b", "v2-236b", "v2-lite-16b", "lab"),
                 preset: str = "v3-671b", dtype: str = "bfloat16", context: int = 4096, batch: int = 8):
        self.presets = list(presets)
        self.preset, self.dtype, self.context, self.batch = preset, dtype, context, batch
        self.rows: list[dict] = []

    def update(self, preset: Optional[str] = None, dtype: Optional[str] = None,
               context: Optional[int] = None, batch: Optional[int] = None):
        self.preset = preset or self.preset
        self.dtype = dtype or self.dtype
        self.context = int(context or self.context)
        self.batch = int(batch or self.batch)
        rows = memory.layout_table(self.preset, DTYPES[self.dtype])
        n = self.context * self.batch
        for r in rows:
            r["batch_bytes"] = r["bytes_per_token"] * n
            r["GiB"] = f"{r['batch_bytes'] / 2**30:,.2f} GiB"
        self.rows = rows
        absorbed = rows[0]["batch_bytes"] / 2**30
        return self._set(figures.kv_bytes_bars(
            rows, label="layout", value="batch_bytes", unit="GiB",
            title=f"{self.preset}, {self.dtype}: batch {self.batch} x {self.context:,} tokens "
                  f"= {absorbed:,.2f} GiB latent cache"))

    def widget(self):
        import ipywidgets as W
        return self._build(dict(
            preset=W.Dropdown(options=self.presets, value=self.preset, description="preset"),
            dtype=W.Dropdown(options=list(DTYPES), value=self.dtype, description="dtype"),
            context=W.IntSlider(value=self.context, min=512, max=131072, step=512, description="context"),
            batch=W.IntSlider(value=self.batch, min=1, max=256, description="batch")))
