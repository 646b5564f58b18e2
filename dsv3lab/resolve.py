"""From a name to a config or a model: a preset name, a checkpoint directory, or the lab's default.

  resolve_config("v3-671b" | DIR | DIR/config.json)   -> ModelConfig (nothing loaded)
  resolve_model("tiny" | DIR, dtype=None)             -> (model, codec): loaded, or built with seed 0
  default_model_dir()                                 -> $DSV3LAB_MODEL, else data/lab-model, else None
  lab_model(preset="lab")                             -> (model, codec, source)

``lab_model()`` is what notebooks, widgets and the replication rows use: the directory
``default_model_dir()`` names when there is one (``make lab`` sets ``DSV3LAB_MODEL``), else a freshly
built ``lab`` preset (random weights, seed 0) so every notebook still runs on a fresh checkout.
A directory counts only when it holds a ``config.json``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from dsv3lab.checkpoint import load
from dsv3lab.config import PRESETS, ModelConfig
from dsv3lab.paths import repo_root
from dsv3lab.model.build import build
from dsv3lab.tokenizer import TextCodec, codec_for

ENV_VAR = "DSV3LAB_MODEL"


def _is_checkpoint(path: Optional[str]) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, "config.json"))


def default_model_dir() -> Optional[str]:
    """``$DSV3LAB_MODEL`` when it names a checkpoint, else the repository's ``data/lab-model``
    when it has been trained, else None."""
    env = os.environ.get(ENV_VAR)
    if _is_checkpoint(env):
        return env
    d = os.path.join(repo_root(), "data", "lab-model")
    return d if _is_checkpoint(d) else None


def resolve_config(name_or_dir: str) -> ModelConfig:
    """A preset name, a checkpoint directory or its config.json -> ModelConfig."""
    if name_or_dir in PRESETS:
        return ModelConfig.preset(name_or_dir)
    if os.path.isdir(name_or_dir) or name_or_dir.endswith(".json"):
        return ModelConfig.from_hf(name_or_dir)
    raise ValueError(f"{name_or_dir!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a checkpoint directory")


def resolve_model(name_or_dir: str, dtype=None, seed: int = 0):
    """A checkpoint directory (``dsv3lab.load``, eval mode) or a preset name (built with ``seed``)
    -> (model, codec)."""
    if os.path.isdir(str(name_or_dir)):
        model = load(name_or_dir, dtype=dtype)
        return model.eval(), codec_for(name_or_dir, model.cfg.vocab_size)
    if name_or_dir in PRESETS:
        model = build(name_or_dir, seed=seed, dtype=dtype)
        return model, TextCodec(None, model.cfg.vocab_size)
    raise ValueError(f"{name_or_dir!r} is neither a checkpoint directory nor a preset "
                     f"({', '.join(sorted(PRESETS))})")


def lab_model(preset: str = "lab", dtype=torch.float32):
    """(model, codec, source): the lab's default model in eval mode (``default_model_dir()``),
    else a built ``preset`` with random weights (seed 0); ``source`` says which it is."""
    path = default_model_dir()
    model, codec = resolve_model(path or preset, dtype=dtype)
    return model.eval(), codec, path or f"built {preset!r} preset (random weights, seed 0)"
