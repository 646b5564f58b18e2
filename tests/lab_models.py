"""Small models the tests share: built here once, so every test file means the same thing by them."""

import torch

import dsv3lab


def tiny_with_biases(seed: int = 0):
    """The ``tiny`` preset with random aux-loss-free gate biases (N(0, 0.1)) in every MoE layer and
    MTP depth: a freshly built model's zero biases would leave the bias paths untested."""
    m = dsv3lab.build("tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)     # not the global generator: what ran before (a kernel
    with torch.no_grad():                      # calibration's random inputs) must not change the model
        for layer in list(m.layers) + list(m.mtp):
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1, generator=g)
    return m
