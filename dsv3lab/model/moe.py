"""DeepSeekMoE: router (gate), routed experts grouped per expert, shared experts.

Router, for token t with hidden x (all in fp32; T tokens in batch-major order, E experts, G groups):
  u = x W_g^T                                   [T,E]   no bias
  s = sigmoid(u)   (V3)   |   softmax(u)  (V2)  [T,E]   "scores"
  s~ = s + b        b = e_score_correction_bias, used for *selection only* (noaux_tc)
  group score = sum of the group's top-2 s~ (noaux_tc; group_top2: Mistral 4's softmax router,
  no bias) | max s (V2 group_limited_greedy) | no groups at all (greedy: V2-Lite, Mistral 4 in
  one group; transformers' DeepseekV2TopkRouter ignores n_group under "greedy", so do we)
  keep the topk_group best groups, set every other expert to -inf (never 0: with negative biases
  a 0-filled masked expert can win, the bug the official code and HF 4.x once had)
  topk_ids = top-k of the masked s~;  weights = s[topk_ids]  (unbiased)
  sigmoid: weights /= sum(weights) (norm_topk_prob);  weights *= routed_scaling_factor
Output: sum_i weights_i * Expert_i(x) + Shared(x).

Dispatch groups the T*k (token, expert) pairs by expert with one argsort, runs each expert once on
its contiguous slice, and scatters back with index_add -- no per-token Python loop. Expert
parallelism (``dsv3lab.parallel``) replaces ``MoE.dispatch`` from outside; the model keeps the
plain single-process version. (The CPU decode fast path, ``dsv3lab/fast/``, runs the same
selection and experts of one token in C, reading this module from outside.)

Seams for interpretability (``dsv3lab.interp``), all off by default and tested only by an
``is None`` / ``active`` check on the fast path:
  * ``Gate.forced_routing``: a callable ``scores [T,E] -> (topk_ids [T,k], topk_weights [T,k] or
    None)`` that replaces the selection (routing replay); None weights are recomputed from the
    current scores exactly as the gate would (``Gate.weights_of``).
  * ``Gate.expert_mask``: bool [E] (or [T,E], one row per token of the call), False = the expert
    may not be selected (ablation by rerouting). Masked experts get -inf selection scores
    *before* the group step, so a group's score is the sum of its best two remaining experts (the
    best one alone when one remains; -inf, never kept, when none does) -- the router as if those
    experts had never existed. The weights still come from the unmasked scores (V2's softmax is
    not renormalised over survivors).
  * ``MoE.hook_expert_out`` [T,k,D]: each chosen expert's own output (unweighted, slot order of
    ``topk_ids``); only when something is attached does dispatch materialise it, and then the
    combine multiplies the (possibly replaced) tensor by the weights -- the same products and the
    same sum as the fast path, so observing it changes no bit of the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3lab.config import ModelConfig
from dsv3lab.model.layers import MLP, HookPoint, hooked


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32, device=device))
        self.has_bias = cfg.topk_method == "noaux_tc"
        if self.has_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None
        self.hook_logits = HookPoint("[T,E] router logits u (fp32)")
        self.hook_scores = HookPoint("[T,E] scores s: sigmoid(u) or softmax(u)")
        self.hook_biased_scores = HookPoint("[T,E] selection scores s + b")
        self.hook_group_mask = HookPoint("[T,G] bool, groups kept for each token (only fires when topk_group < n_group > 1 "
                                         "and topk_method is not 'greedy')")
        self.hook_topk_ids = HookPoint("[T,k] int64 chosen experts")
        self.hook_topk_weights = HookPoint("[T,k] fp32 routing weights")
        # interpretability seams (module docstring); None = the gate as trained
        self.forced_routing = None
        self.expert_mask = None

    def weights_of(self, scores: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Routing weights of the chosen experts [T,k] fp32: their unbiased scores, normalised
        (sigmoid, norm_topk_prob) and scaled by routed_scaling_factor."""
        cfg = self.cfg
        weights = scores.gather(1, topk_ids)
        if cfg.norm_topk_prob and topk_ids.shape[1] > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T,D] -> topk_ids [T,k] (int64), topk_weights [T,k] (fp32)."""
        cfg = self.cfg
        E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        logits = self.hook_logits(F.linear(x.float(), self.weight.float()))
        if cfg.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        scores = self.hook_scores(scores)
        if self.forced_routing is not None:
            topk_ids, weights = self.forced_routing(scores)
            topk_ids = topk_ids.to(scores.device, torch.int64)
            weights = (self.weights_of(scores, topk_ids) if weights is None
                       else weights.to(scores.device, torch.float32))
            return self.hook_topk_ids(topk_ids), self.hook_topk_weights(weights)
        choice = scores
        if self.has_bias:
            choice = scores + self.e_score_correction_bias.float()
        choice = self.hook_biased_scores(choice)
        masked = self.expert_mask is not None
        if masked:
            choice = choice.masked_fill(~self.expert_mask.to(choice.device), float("-inf"))
        if G > 1 and cfg.topk_group < G and cfg.topk_method != "greedy":
            grouped = choice.view(-1, G, E // G)
            top2 = cfg.topk_method in ("noaux_tc", "group_top2")
            if top2 and masked:
                best2 = grouped.topk(2, dim=-1).values
                group_scores = best2[..., 0] + best2[..., 1].masked_fill(best2[..., 1] == float("-inf"), 0.0)
            elif top2:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            group_mask = self.hook_group_mask(group_mask)
            expert_mask = group_mask[:, :, None].expand(-1, G, E // G).reshape(-1, E)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        topk_ids = choice.topk(k, dim=-1).indices
        return self.hook_topk_ids(topk_ids), self.hook_topk_weights(self.weights_of(scores, topk_ids))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.gate = Gate(cfg, device)
        # experts[e] is None on ranks that do not own expert e (expert parallelism)
        self.experts = nn.ModuleList([MLP(cfg.hidden_size, cfg.moe_intermediate_size, dtype, device)
                                      for _ in range(E)])
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                   dtype, device) if cfg.n_shared_experts else None)
        self.hook_expert_counts = HookPoint("[E] int64 tokens routed to each expert in this call")
        self.hook_routed_out = HookPoint("[T,D] weighted sum of routed experts")
        self.hook_shared_out = HookPoint("[T,D] shared experts' output")
        self.hook_expert_out = HookPoint("[T,k,D] each chosen expert's output, unweighted, in topk_ids slot order")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        topk_ids, topk_weights = self.gate(x)
        routed = self.hook_routed_out(self.dispatch(x, topk_ids, topk_weights))
        out = routed
        if self.shared_experts is not None:
            out = out + self.hook_shared_out(self.shared_experts(x))
        return out.view(shape)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """sum_i w_i * Expert_{id_i}(x) for every token, experts run on contiguous token groups."""
        T, k = topk_ids.shape
        E = self.cfg.n_routed_experts
        flat = topk_ids.reshape(-1)
        counts = torch.bincount(flat, minlength=E)
        self.hook_expert_counts(counts)
        order = flat.argsort(stable=True)
        token_of = order // k                                        # token index of each sorted pair
        xs = x[token_of]
        ws = topk_weights.reshape(-1)[order]
        # each expert once, on its contiguous slice (joined with cat: slice assignment would
        # make autograd clone the whole gradient once per expert in training)
        outs, lo = [], 0
        for e, hi in enumerate(counts.cumsum(0).tolist()):
            if hi > lo:
                outs.append(self.experts[e](xs[lo:hi]))
            lo = hi
        ys = torch.cat(outs) if outs else xs[:0]
        if hooked(self.hook_expert_out):
            # per-expert outputs for probes: [T,k,D] in slot order, then the same combine
            per_slot = torch.empty(T * k, x.shape[-1], dtype=ys.dtype, device=x.device)
            per_slot[order] = ys
            per_slot = self.hook_expert_out(per_slot.view(T, k, -1))
            return (per_slot.float() * topk_weights.float()[..., None]).sum(dim=1).to(x.dtype)
        # combine: undo the sort (a permutation of the T*k pairs), then sum each token's k
        # outputs in fp32 -- deterministic, and no scatter-add
        pairs = torch.empty(T * k, x.shape[-1], dtype=torch.float32, device=x.device)
        pairs[order] = ys.float() * ws[:, None]
        return pairs.view(T, k, -1).sum(dim=1).to(x.dtype)
