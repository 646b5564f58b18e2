"""Direct logit attribution: how much each block's attention, its shared expert and *each routed
expert* writes the target token's logit, through the final norm.

The residual out of the last block is a sum of everything written into it:

    h = Emb(t) + sum_L attn_L + sum_L ffn_L,    ffn_L = shared_L + sum_i w_i Expert_i   (MoE blocks)
    logit(y) = W_U[y] . (g * h / rms(h)),      rms(h) = sqrt(mean(h^2) + eps)

RMSNorm is not linear in h, so the attribution is **linearised at the final norm's scale**: the
actual 1/rms(h) of each position is held fixed and multiplies every component, which makes the
contributions exact shares of the logit (they sum to it up to float rounding) while saying nothing
about how a component would change the scale if it were removed (that is what ablation and
patching measure). Components read at the hook points: ``hook_embed``, ``layers.L.hook_attn_out``,
dense ``layers.L.hook_mlp_out``, ``layers.L.mlp.hook_shared_out`` and, per expert, the gate's
weights times ``layers.L.mlp.hook_expert_out`` -- the very products the MoE sums. In fp32 the
contributions sum to the logit to fp32 rounding. In bf16 the model rounds the residual stream
after every addition (and the routed sum when it casts it back), so the components, read exactly
and added in fp32, miss the actual final hidden state by those roundings: ``rounding`` holds that
remainder (``linearised - total()``, where ``linearised`` is the fp32 head of the actual final
hidden state) so that nothing is hidden; it is ~2^-8 of the components' size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dsv3lab.probes import run_with_cache


@dataclass
class Attribution:
    targets: torch.Tensor       # [B,S] token whose logit is attributed
    logit: torch.Tensor         # [B,S] the model's logit of the target
    linearised: torch.Tensor    # [B,S] fp32 W_U[y].(g*h)*scale of the actual final hidden state
    scale: torch.Tensor         # [B,S] 1/rms(h) at the final norm (held fixed)
    embed: torch.Tensor         # [B,S]
    attn: torch.Tensor          # [n_layers,B,S]
    dense_mlp: torch.Tensor     # [n_layers,B,S] dense FFN blocks (0 on MoE blocks)
    shared: torch.Tensor        # [n_layers,B,S] shared experts (0 on dense blocks)
    experts: torch.Tensor       # [n_layers,E,B,S] routed experts (0 where not chosen / dense)

    @property
    def rounding(self) -> torch.Tensor:
        """[B,S] ``linearised - total()``: the model's own roundings of the residual stream
        (fp32 noise in an fp32 model, bf16's in a bf16 one)."""
        return self.linearised - self.total()

    def magnitude(self) -> torch.Tensor:
        """[B,S] sum of |contribution| over every component (the scale the rounding compares with)."""
        return (self.embed.abs() + self.attn.abs().sum(0) + self.dense_mlp.abs().sum(0)
                + self.shared.abs().sum(0) + self.experts.abs().sum((0, 1)))

    def total(self) -> torch.Tensor:
        """[B,S] the sum of every contribution (== ``linearised`` to fp32 rounding)."""
        return (self.embed + self.attn.sum(0) + self.dense_mlp.sum(0) + self.shared.sum(0)
                + self.experts.sum((0, 1)))

    def table(self, b: int = 0, s: int = -1, top: Optional[int] = 12) -> list[dict]:
        """Components at (batch b, position s), largest |contribution| first."""
        rows = [dict(component="embed", layer=None, expert=None, value=float(self.embed[b, s]))]
        for L in range(self.attn.shape[0]):
            rows.append(dict(component="attn", layer=L, expert=None, value=float(self.attn[L, b, s])))
            if self.dense_mlp[L, b, s] != 0:
                rows.append(dict(component="dense mlp", layer=L, expert=None, value=float(self.dense_mlp[L, b, s])))
            if self.shared[L, b, s] != 0:
                rows.append(dict(component="shared", layer=L, expert=None, value=float(self.shared[L, b, s])))
            for e in self.experts[L, :, b, s].nonzero().flatten().tolist():
                rows.append(dict(component="expert", layer=L, expert=e, value=float(self.experts[L, e, b, s])))
        rows.sort(key=lambda r: -abs(r["value"]))
        rows = rows[:top] if top else rows
        if not top:      # the whole table: with the rounding row it sums to ``linearised``
            rows.append(dict(component="rounding", layer=None, expert=None, value=float(self.rounding[b, s])))
        return rows


@torch.no_grad()
def direct_logit_attribution(model, tokens: torch.Tensor, targets=None) -> Attribution:
    """Attribute the logit of ``targets`` (an id for every position, a [B,S] tensor, or None =
    the model's own top prediction at each position) to every component (module docstring)."""
    B, S = tokens.shape
    n, E = len(model.layers), model.cfg.n_routed_experts
    logits, cache = run_with_cache(model, tokens, lambda name: (
        name in ("hook_embed", "hook_final") or name.endswith(("hook_attn_out", "hook_mlp_out", "hook_shared_out",
                                                               "hook_expert_out", "gate.hook_topk_ids",
                                                               "gate.hook_topk_weights")))
        and not name.startswith("mtp."))
    if targets is None:
        targets = logits.argmax(-1)
    elif isinstance(targets, int):
        targets = torch.full((B, S), targets, dtype=torch.int64)
    targets = torch.as_tensor(targets).to(logits.device).expand(B, S)
    h = cache["hook_final"].float()
    norm = model.norm
    scale = torch.rsqrt(h.pow(2).mean(-1) + norm.eps)                            # [B,S]
    u = model.lm_head.weight.float()[targets] * norm.weight.float()               # [B,S,D]: W_U[y] * g
    def read(x):                                                                    # [B,S,D] -> [B,S]
        return (x.float().view(B, S, -1) * u).sum(-1) * scale
    dev = h.device
    attn = torch.zeros(n, B, S, device=dev)
    dense = torch.zeros(n, B, S, device=dev)
    shared = torch.zeros(n, B, S, device=dev)
    experts = torch.zeros(n, E, B, S, device=dev)
    for L, blk in enumerate(model.layers):
        attn[L] = read(cache[f"layers.{L}.hook_attn_out"])
        if not hasattr(blk.mlp, "gate"):
            dense[L] = read(cache[f"layers.{L}.hook_mlp_out"])
            continue
        pre = f"layers.{L}.mlp."
        if pre + "hook_shared_out" in cache:
            shared[L] = read(cache[pre + "hook_shared_out"])
        ids = cache[pre + "gate.hook_topk_ids"]                                     # [T,k]
        w = cache[pre + "gate.hook_topk_weights"].float()
        outs = cache[pre + "hook_expert_out"].float()                              # [T,k,D]
        per_slot = ((outs * w[..., None]) * u.view(B * S, 1, -1)).sum(-1) * scale.view(-1, 1)   # [T,k]
        flat = torch.zeros(E, B * S, device=dev)
        flat.index_put_((ids.t().reshape(-1), torch.arange(B * S, device=dev).repeat(ids.shape[1])),
                        per_slot.t().reshape(-1), accumulate=True)
        experts[L] = flat.view(E, B, S)
    return Attribution(targets=targets, logit=logits.float().gather(-1, targets[..., None]).squeeze(-1),
                       linearised=(h * u).sum(-1) * scale, scale=scale, embed=read(cache["hook_embed"]),
                       attn=attn, dense_mlp=dense, shared=shared, experts=experts)
