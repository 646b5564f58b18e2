"""How balanced the bias update can get, as a function of the batch it counts: a router-only
simulation, no language model.

The bias update (``bias_update``) moves each expert's bias by gamma * sign(mean - load) after
every batch. Its only signal is the sign of a count. An expert whose expected load is within the
batch's sampling noise of the mean gets a sign that is mostly noise, so its bias random-walks
with step gamma, and the walk itself unbalances the router. With B tokens per batch and top-k of
E experts an expert expects n = B k / E tokens, with noise sqrt(n (1 - k/E)): 48 +- 7 (15 %) at
the lab's 512-token batches, 15 % of the load that the bias cannot see past. LFB's and V3's
batches are millions of tokens, where the same noise is a fraction of a percent.

``simulate`` isolates that effect. Each expert has a fixed preference (the skew a trained router
has: ``skew`` standard deviations of logit), each token adds its own logit noise, and the gate
is V3's: sigmoid scores, top-k of score + bias (``dsv3lab.model.moe.Gate`` without groups). The
bias is updated on batches of ``batch_tokens`` tokens for ``steps`` steps, then frozen, and
MaxVio is measured on ``eval_tokens`` fresh tokens. The router does not drift here (a trained
one does, which is why gamma cannot simply be made tiny), so this is a lower bound on what the
update leaves at a given batch size, not a model of training.
"""

from __future__ import annotations

import torch

from dsv3lab.probes.metrics import max_vio


def _route(pref_E: torch.Tensor, bias_E: torch.Tensor, n: int, top_k: int, noise: float,
           gen: torch.Generator) -> torch.Tensor:
    """[E] tokens per expert for ``n`` fresh tokens."""
    u = pref_E + noise * torch.randn(n, pref_E.numel(), generator=gen)
    ids = (u.sigmoid() + bias_E).topk(top_k, dim=-1).indices
    return torch.bincount(ids.flatten(), minlength=pref_E.numel())


def simulate(batch_tokens: int, gamma: float, steps: int = 300, n_experts: int = 64, top_k: int = 6,
             skew: float = 1.0, noise: float = 1.0, eval_tokens: int = 65536, seed: int = 0) -> dict:
    """Bias update on a fixed skewed router (module docstring). Returns {"maxvio_global": MaxVio of
    the eval tokens with the final bias, "maxvio_zero_bias": the same with the bias at 0,
    "floor": MaxVio of uniform random top-k on as many tokens, "maxvio_batch": the mean MaxVio of
    the last 10 % of training batches}."""
    gen = torch.Generator().manual_seed(seed)
    pref = skew * torch.randn(n_experts, generator=gen)
    bias = torch.zeros(n_experts)
    tail = []
    for step in range(steps):
        load = _route(pref, bias, batch_tokens, top_k, noise, gen).float()
        if step >= steps - max(1, steps // 10):
            tail.append(float(max_vio(load)))
        bias += gamma * torch.sign(load.mean() - load)
    final = float(max_vio(_route(pref, bias, eval_tokens, top_k, noise, gen)))
    zero = float(max_vio(_route(pref, torch.zeros(n_experts), eval_tokens, top_k, noise, gen)))
    uniform = torch.rand(eval_tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices
    floor = float(max_vio(torch.bincount(uniform.flatten(), minlength=n_experts)))
    return dict(maxvio_global=final, maxvio_zero_bias=zero, floor=floor, maxvio_batch=sum(tail) / len(tail))


def batch_size_sweep(batch_tokens=(512, 4096, 32768), gammas=(1e-3, 3e-3, 1e-2), steps: int = 300,
                     seeds=(0, 1, 2), **kw) -> list[dict]:
    """For each batch size, every gamma over ``seeds``: rows {"batch_tokens", "gamma",
    "maxvio_global" (mean over seeds), "maxvio_batch", "maxvio_zero_bias", "floor"}."""
    rows = []
    for b in batch_tokens:
        for g in gammas:
            runs = [simulate(b, g, steps=steps, seed=s, **kw) for s in seeds]
            rows.append({"batch_tokens": b, "gamma": g,
                         **{k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}})
    return rows


def best_per_batch(rows: list[dict]) -> dict:
    """{batch_tokens: the row with the lowest maxvio_global over gamma}."""
    out: dict = {}
    for r in rows:
        if r["batch_tokens"] not in out or r["maxvio_global"] < out[r["batch_tokens"]]["maxvio_global"]:
            out[r["batch_tokens"]] = r
    return out
