"""Figures (pure functions returning matplotlib Figures) and ipywidgets explorers."""

from dsv3lab.viz.figures import (capacity_curves, co_selection_heatmap, expert_load_heatmap, kv_bytes_bars,
                                 routing_by_token)

__all__ = ["capacity_curves", "co_selection_heatmap", "expert_load_heatmap", "kv_bytes_bars",
           "routing_by_token"]
