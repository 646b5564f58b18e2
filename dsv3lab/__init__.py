"""dsv3lab: a research lab for DeepSeek-V3 -- the engine, instruments on it, and notebooks."""

from dsv3lab.config import ConfigError, ModelConfig
from dsv3lab.checkpoint import CheckpointError, build, load, save
from dsv3lab.model import Transformer
from dsv3lab.stats import kv_cache_bytes_per_token, model_stats
from dsv3lab.resolve import lab_model

__version__ = "0.1.0"


def trace(model, **kw):
    """``with dsv3lab.trace(model) as t:`` records routing (see ``dsv3lab.probes``)."""
    from dsv3lab.probes import trace as _trace
    return _trace(model, **kw)


__all__ = ["ModelConfig", "ConfigError", "CheckpointError", "build", "load", "save", "Transformer",
           "kv_cache_bytes_per_token", "model_stats", "lab_model", "trace"]
