"""Aux-loss-free load balancing (DeepSeek-V3 report, sec. 2.1.2): the bias update.

After each training step, outside autograd, every gate's ``e_score_correction_bias`` moves by
gamma * sign(mean_load - load_i): an overloaded expert's bias goes down, an underloaded one's goes
up. That is the paper's uncentred form (the loss-free balancing paper's too), dsv3lab's default;
``centred=True`` subtracts the mean step (torchtitan's form), which routes identically because a
common shift of all biases changes no top-k, and differs only in how the biases drift. The bias
only selects experts; the routing weights stay the unbiased sigmoid scores (``moe.Gate``).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def bias_update(gate, counts: torch.Tensor, gamma: float, centred: bool = False) -> torch.Tensor:
    """b_i += gamma * sign(mean - load_i) on ``gate.e_score_correction_bias``, in place, outside
    autograd. ``centred`` subtracts the mean step so the biases keep summing to what they did.
    Returns the step taken [E]."""
    bias = gate.e_score_correction_bias
    load = counts.to(torch.float32)
    delta = gamma * torch.sign(load.mean() - load)
    if centred:
        delta = delta - delta.mean()
    bias.add_(delta.to(bias.device, bias.dtype))
    return delta
