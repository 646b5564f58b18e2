"""DeepSeek-V4's MoE: a router without groups (sqrtsoftplus, sigmoid or softmax), hash-routed
layers, and SwiGLU experts clamped at ``swiglu_limit``.

Router, tokens T, experts E (fp32 throughout):
  u = x W_g^T;  s = sqrt(softplus(u)) | sigmoid(u) | softmax(u)          [T,E]
  learned ("moe"):    topk_ids = top-k of (s + e_score_correction_bias)   no expert groups
  hash ("hash_moe"):  topk_ids = tid2eid[token id]   a frozen table [vocab, k]: the choice
                      depends on the token only, never on the context (V4's first layers)
  weights = s[topk_ids] / sum(s[topk_ids]) * routed_scaling_factor   (always renormalised)
Output: sum_i weights_i * Expert_i(x) + Shared(x); experts (shared one too) clamp gate <= L and
|up| <= L before SiLU(gate) * up. Dispatch is DeepSeekMoE's (``MoE.dispatch``): the hook points
of ``moe.py`` (``hook_expert_counts``, ``hook_routed_out``, ``hook_shared_out``,
``hook_expert_out``) and the gate's (``hook_logits`` .. ``hook_topk_weights``) have the same
names and shapes here, so traces, replay and ablation read V4 layers as they read V3's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3lab.model.layers import HookPoint
from dsv3lab.model.moe import MoE
from dsv3lab.model.v4_layers import ClampedMLP


def score(logits: torch.Tensor, func: str) -> torch.Tensor:
    if func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if func == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1)


class V4Gate(nn.Module):
    def __init__(self, cfg, hashed: bool, device=None):
        super().__init__()
        self.cfg, self.hashed = cfg, hashed
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32, device=device))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, k, dtype=torch.int64, device=device))
            self.e_score_correction_bias = None
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32, device=device))
        self.hook_logits = HookPoint("[T,E] router logits u (fp32)")
        self.hook_scores = HookPoint("[T,E] scores s: sqrtsoftplus / sigmoid / softmax of u")
        self.hook_biased_scores = HookPoint("[T,E] selection scores s + b (learned layers only)")
        self.hook_topk_ids = HookPoint("[T,k] int64 chosen experts (hash layers: tid2eid[token])")
        self.hook_topk_weights = HookPoint("[T,k] fp32 routing weights")
        self.forced_routing = None      # the interpretability seams of moe.Gate
        self.expert_mask = None

    def weights_of(self, scores: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        w = scores.gather(1, topk_ids)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * self.cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T,D], token_ids [T] -> topk_ids [T,k] int64, weights [T,k] fp32."""
        logits = self.hook_logits(F.linear(x.float(), self.weight.float()))
        scores = self.hook_scores(score(logits, self.cfg.scoring_func))
        if self.forced_routing is not None:
            ids, w = self.forced_routing(scores)
            ids = ids.to(scores.device, torch.int64)
            w = self.weights_of(scores, ids) if w is None else w.to(scores.device, torch.float32)
            return self.hook_topk_ids(ids), self.hook_topk_weights(w)
        if self.hashed:
            if token_ids is None:
                raise ValueError("a hash-routed V4 layer needs the token ids (tid2eid[token])")
            if self.expert_mask is not None:
                raise ValueError("reroute ablation on a hash-routed layer: its experts come from the token "
                                 "table (tid2eid), not from a choice; ablate it with mode='zero'")
            ids = self.tid2eid[token_ids.reshape(-1)].long()
        else:
            choice = self.hook_biased_scores(scores + self.e_score_correction_bias.float())
            if self.expert_mask is not None:
                choice = choice.masked_fill(~self.expert_mask.to(choice.device), float("-inf"))
            ids = choice.topk(self.cfg.num_experts_per_tok, dim=-1).indices
        return self.hook_topk_ids(ids), self.hook_topk_weights(self.weights_of(scores, ids))


class V4MoE(MoE):
    """Routed experts + one shared expert, every layer; ``dispatch`` is DeepSeekMoE's."""

    def __init__(self, cfg, layer: int, dtype=None, device=None):
        nn.Module.__init__(self)
        self.cfg = cfg
        # MTP blocks (layer >= num_hidden_layers) route by a learned gate, never by hash
        hashed = layer < cfg.num_hidden_layers and cfg.mlp_layer_types[layer] == "hash_moe"
        self.gate = V4Gate(cfg, hashed, device)
        L, D, I = cfg.swiglu_limit, cfg.hidden_size, cfg.moe_intermediate_size
        self.experts = nn.ModuleList([ClampedMLP(D, I, L, dtype, device) for _ in range(cfg.n_routed_experts)])
        self.shared_experts = ClampedMLP(D, I, L, dtype, device) if cfg.n_shared_experts else None
        self.hook_expert_counts = HookPoint("[E] int64 tokens routed to each expert in this call")
        self.hook_routed_out = HookPoint("[T,D] weighted sum of routed experts")
        self.hook_shared_out = HookPoint("[T,D] shared expert's output")
        self.hook_expert_out = HookPoint("[T,k,D] each chosen expert's output, unweighted, in topk_ids slot order")

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, w = self.gate(x, token_ids)
        out = self.hook_routed_out(self.dispatch(x, ids, w))
        if self.shared_experts is not None:
            out = out + self.hook_shared_out(self.shared_experts(x))
        return out.view(shape)
