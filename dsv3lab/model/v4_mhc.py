"""Manifold-constrained hyper-connections (mHC), DeepSeek-V4's replacement of the residual stream.

V4 carries ``n = hc_mult`` residual streams X [B,S,n,D] instead of one. Around each sub-layer
(attention, then the MoE) a ``HyperConnection`` reads all streams and makes three things from
them with one small projection (``fn`` [(2+n)n, nD], ``base``, one ``scale`` per output):

  x~    = unit_rms(flatten(X))                                   [B,S,nD]   fp32
  pre   = sigmoid(s0 * x~ fn_pre^T  + b_pre) + eps               [B,S,n]    how to collapse
  post  = 2 sigmoid(s1 * x~ fn_post^T + b_post)                  [B,S,n]    how to expand
  comb  = Sinkhorn(softmax(s2 * x~ fn_comb^T + b_comb) + eps)    [B,S,n,n]  how to mix
  in    = sum_j pre_j X_j                                        [B,S,D]    the sub-layer's input
  X'    = post (x) f(in) + comb^T X                              [B,S,n,D]

Sinkhorn-Knopp (``hc_sinkhorn_iters`` t: first the columns, then t-1 times rows and columns)
projects comb onto (nearly) doubly stochastic matrices: every stream's mass is redistributed,
none is created, so the residual path stays non-expansive however deep the stack (the "manifold
constraint"; an unconstrained matrix is the original hyper-connection, which blows up). The
mixing is ``comb^T X``: X'_k = sum_j comb[j, k] X_j, the matrix is not symmetric.

The model starts with n copies of the embedding and ends with a ``HyperHead``: one more ``pre``
(sigmoid + eps, no Sinkhorn) that collapses the streams before the final norm.

Hook points (shapes beside them) expose each block's pre/post/comb and the streams themselves
(``V4Block.hook_resid_*`` in v4_transformer.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3lab.model.layers import HookPoint
from dsv3lab.model.v4_layers import rms_unit


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Alternate column and row normalisation of positive [..., n, n] (columns first, as V4)."""
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """One mHC site (``attn_hc`` or ``ffn_hc`` of a block); weights fp32 whatever the model dtype."""

    def __init__(self, cfg, device=None):
        super().__init__()
        n, D = cfg.hc_mult, cfg.hidden_size
        self.n, self.iters, self.eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * D, dtype=torch.float32, device=device))
        self.base = nn.Parameter(torch.empty((2 + n) * n, dtype=torch.float32, device=device))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32, device=device))
        self.hook_pre = HookPoint("[B,S,n] collapse weights (sigmoid + eps)")
        self.hook_post = HookPoint("[B,S,n] expand weights (2 sigmoid)")
        self.hook_comb = HookPoint("[B,S,n,n] mixing matrix after Sinkhorn (X' = comb^T X + ...)")

    def forward(self, streams: torch.Tensor):
        """streams [B,S,n,D] -> post [B,S,n], comb [B,S,n,n] (fp32), collapsed input [B,S,D]."""
        B, S, n, _ = streams.shape
        mix = F.linear(rms_unit(streams.reshape(B, S, -1).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s = self.scale.float()
        pre = self.hook_pre(torch.sigmoid(pre_w * s[0] + pre_b) + self.eps)
        post = self.hook_post(2 * torch.sigmoid(post_w * s[1] + post_b))
        comb = torch.softmax(comb_w.view(B, S, n, n) * s[2] + comb_b.view(n, n), dim=-1) + self.eps
        comb = self.hook_comb(sinkhorn(comb, self.iters, self.eps))
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
        """X' = post (x) out + comb^T X, in the streams' dtype."""
        dt = streams.dtype
        return post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """The last collapse, before the final norm: sum_j (sigmoid(s x~ hc_fn_j^T + b_j) + eps) X_j."""

    def __init__(self, cfg, device=None):
        super().__init__()
        n, D = cfg.hc_mult, cfg.hidden_size
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * D, dtype=torch.float32, device=device))
        self.hc_base = nn.Parameter(torch.empty(n, dtype=torch.float32, device=device))
        self.hc_scale = nn.Parameter(torch.empty(1, dtype=torch.float32, device=device))
        self.hook_pre = HookPoint("[B,S,n] the head's collapse weights")

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        flat = rms_unit(streams.flatten(2).float(), self.norm_eps)
        pre = self.hook_pre(torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float()
                                          + self.hc_base.float()) + self.eps)
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
