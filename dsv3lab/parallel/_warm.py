"""Imported by spawn's forkserver so that every rank forks from a warm interpreter: building a
model on the meta device imports torch._dynamo lazily (seconds on a busy 2-core machine)."""

import torch

torch.nn.Embedding(2, 2, device="meta")
