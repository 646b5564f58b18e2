"""dsv3lab: a research lab for DeepSeek-V3 -- the engine, instruments on it, and notebooks."""

from dsv3lab.config import ConfigError, ModelConfig
from dsv3lab.checkpoint import CheckpointError, load, save
from dsv3lab.model.build import build
from dsv3lab.model import Transformer
from dsv3lab.stats import kv_cache_bytes_per_token, model_stats
from dsv3lab.resolve import lab_model

__version__ = "0.1.0"


def trace(model, **kw):
    """``with dsv3lab.trace(model) as t:`` records routing (see ``dsv3lab.probes``)."""
    from dsv3lab.probes import trace as _trace
    return _trace(model, **kw)


def logit_lens(model, tokens, *, mtp=False, translators=None):
    """[n_layers, B, S, vocab]: final norm + head on the residual after each block (``dsv3lab.interp``)."""
    from dsv3lab.interp import logit_lens as _lens
    return _lens(model, tokens, mtp=mtp, translators=translators)


def replay(model, routing, **kw):
    """``with dsv3lab.replay(model, t.routing):`` forwards use the recorded routing (``dsv3lab.interp``)."""
    from dsv3lab.interp import replay as _replay
    return _replay(model, routing, **kw)


def ablate_experts(model, experts, mode="reroute"):
    """``with dsv3lab.ablate_experts(model, {layer: [ids]}, mode="reroute"|"zero"):`` (``dsv3lab.interp``)."""
    from dsv3lab.interp import ablate_experts as _ablate
    return _ablate(model, experts, mode=mode)


__all__ = ["ModelConfig", "ConfigError", "CheckpointError", "build", "load", "save", "Transformer",
           "kv_cache_bytes_per_token", "model_stats", "lab_model", "trace", "logit_lens", "replay",
           "ablate_experts"]
