"""The CPU decode fast path: one token through the model in C kernel calls, read from outside.

``dsv3lab/model/`` is the reference model and holds no fast-path branch. This package reads a
built model from outside -- its weights, caches and hook state, gathered once into a plan -- and
runs a one-token decode step of it as a short list of C calls (``kernels/cpu/``), where that
computes exactly what the module path would and nobody would miss a hook:

  step.py     ``decode(model, tokens, start, cache)``: the fused step (``DecodeStep``) and its
              plan; None sends the step back to the module path
  sparse.py   V3.2's indexer selection and row gather in C, for the fused step

Each kernel that stands in for one torch call (the latent attention, V3.2's selection and
gather) runs only where it measured faster than that call on this CPU (``kernels/cpu_calibrate.py``);
the fused step as a whole runs only where it measured faster than the module path on the model
at hand (timed on its first decode step, ``step_verdict``). ``Transformer.forward`` calls ``decode`` for one-token steps with a cache (its one
seam), so ``model(token, start=t, cache=cache)`` and ``model.generate`` take it without asking.
docs/kernels.md#cpu-decode has the design and its measurements.
"""

from dsv3lab.fast.step import DecodeStep, step_verdict, try_decode as decode

__all__ = ["DecodeStep", "decode", "step_verdict"]
