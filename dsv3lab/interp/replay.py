"""Routing replay: run the model on recorded expert choices, whatever its gates would pick now.

    with dsv3lab.trace(model) as t:
        base = model(tokens)
    with torch.no_grad():
        gate.e_score_correction_bias += noise               # or FP8, or new weights
    with dsv3lab.replay(model, t.routing):
        again = model(tokens)                               # == base: same experts, same weights

The use is separating *routing* effects from *expert* effects: change a model (its biases, its
precision, its weights), replay the old routing, and whatever still changes is not the router's
doing. Megatron-Core's ``RouterReplay`` does this for training and vLLM / SGLang export routed
experts per token for RL routing replay ("R3"); here it is one ``with`` block over any forward,
``generate`` included.

How: every MoE gate gets a ``forced_routing`` callable (``dsv3lab.model.moe``) that hands out the
recorded rows in order. The record's tokens are consumed per layer exactly as the trace stored
them: one forward pass after another, T = B*S rows each (batch-major). So the calls under replay
must be the calls that were traced (the same prompts, chunking and decode steps); where the record
knows the token ids, each call's ids are checked and a mismatch raises ``ReplayError`` instead of
silently routing the wrong tokens. Running past the end of the record raises too. MTP depths are
replayed from the record's ``mtp.K`` streams when present and left to their gates otherwise.

Weights: the recorded ``topk_weights`` by default (the forward is then the traced one up to the
experts' own arithmetic); ``recompute_weights=True`` takes the current gate's scores of the
recorded experts (normalised and scaled as the gate does) -- needed for layouts that carry ids only
(vLLM, SGLang, Megatron; their weights are NaN) and what RL replay does.
"""

from __future__ import annotations

import contextlib
import os

import torch

from dsv3lab.probes import Routing, Trace, load_trace


class ReplayError(RuntimeError):
    """The forward under replay does not match the recorded routing (tokens, count or shape)."""


def as_record(routing, model=None) -> dict:
    """A record dict from a ``Routing`` / ``Trace`` / record dict / trace path, or a per-token
    [tokens, layers, top_k] array (vLLM layout; needs ``model``)."""
    if isinstance(routing, Routing):
        if routing.prefix:
            raise ValueError("replay takes a whole record (t.routing), not one MTP stream")
        return routing.record
    if isinstance(routing, Trace):
        return routing.record()
    if isinstance(routing, dict) and "tensors" in routing and "meta" in routing:
        return routing
    if isinstance(routing, (str, os.PathLike)):
        return load_trace(str(routing))
    if model is not None and hasattr(routing, "shape") and len(routing.shape) == 3:
        from dsv3lab.interp.routing_layouts import from_per_token
        return from_per_token(routing, model)
    raise TypeError(f"cannot replay routing given as {type(routing).__name__}: pass t.routing, a "
                    "record, a trace path or a [tokens, layers, top_k] array")


class _Stream:
    """The recorded rows of one stream, handed out per layer in order."""

    def __init__(self, name: str, ids, weights, token_ids, layers: list[int]):
        self.name, self.ids, self.weights, self.token_ids = name, ids, weights, token_ids
        self.layers = layers
        self.cursor = {l: 0 for l in layers}

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[1])


class Replay:
    """The ``with dsv3lab.replay(model, routing)`` object (see the module docstring)."""

    def __init__(self, model, routing, recompute_weights: bool = False, check_tokens: bool = True):
        self.model = model
        self.record = as_record(routing, model)
        self.recompute_weights, self.check_tokens = recompute_weights, check_tokens
        cfg, meta, t = model.cfg, self.record["meta"], self.record["tensors"]
        if int(meta["n_routed_experts"]) != cfg.n_routed_experts or int(meta["top_k"]) != cfg.num_experts_per_tok:
            raise ValueError(f"recorded routing is for {meta['n_routed_experts']} experts, top-{meta['top_k']}; "
                             f"the model has {cfg.n_routed_experts}, top-{cfg.num_experts_per_tok}")
        self.gates: list[tuple[_Stream, int, object]] = []
        moe = {blk.layer: blk.mlp.gate for blk in model.layers if hasattr(blk.mlp, "gate")}
        main = self._stream("", list(meta["layers"]))
        for l in main.layers:
            if l not in moe:
                raise ValueError(f"recorded routing has layer {l}, which is not an MoE block of this model "
                                 f"(MoE blocks: {sorted(moe)})")
            self.gates.append((main, l, moe[l]))
        missing = sorted(set(moe) - set(main.layers))
        if missing:
            raise ValueError(f"recorded routing lacks MoE layers {missing} of this model")
        self.streams = [main]
        for d in meta.get("mtp_depths", []):
            if d < len(getattr(model, "mtp", [])):
                s = self._stream(f"mtp.{d}.", list(meta["mtp"][str(d)]["layers"]))
                self.streams.append(s)
                self.gates.append((s, s.layers[0], model.mtp[d].mlp.gate))
        self._saved, self._handles, self._seen = [], [], None

    def _stream(self, prefix: str, layers: list[int]) -> _Stream:
        t = self.record["tensors"]
        ids, w = t[prefix + "topk_ids"], t[prefix + "topk_weights"]
        if not self.recompute_weights and w.numel() and bool(torch.isnan(w).any()):
            src = self.record["meta"].get("source", "this record")
            raise ValueError(f"{src} carries no routing weights (NaN topk_weights); "
                             "pass recompute_weights=True to take them from the current gate's scores")
        tok = t.get(prefix + "token_ids")
        return _Stream(prefix, ids, w, tok, layers)

    def _forcer(self, stream: _Stream, layer: int):
        li = stream.layers.index(layer)

        def forced(scores: torch.Tensor):
            T = scores.shape[0]
            lo = stream.cursor[layer]
            hi = lo + T
            if hi > stream.n_tokens:
                raise ReplayError(f"replay: layer {layer} needs recorded rows [{lo}, {hi}) but the record "
                                  f"holds {stream.n_tokens} tokens{' (' + stream.name + ')' if stream.name else ''}")
            if self.check_tokens and stream.token_ids is not None and self._seen is not None:
                want = stream.token_ids[lo:hi]
                seen = self._seen.reshape(-1).to("cpu", torch.int64)
                known = want >= 0
                if seen.numel() == T and bool(known.any()) and not torch.equal(seen[known], want[known]):
                    bad = int((seen != want).logical_and(known).nonzero()[0])
                    raise ReplayError(f"replay: layer {layer}, recorded row {lo + bad} is token "
                                      f"{int(want[bad])} but the model is running token {int(seen[bad])}: "
                                      "the forwards under replay must be the traced ones, in order")
            stream.cursor[layer] = hi
            ids = stream.ids[li, lo:hi].to(scores.device)
            w = None if self.recompute_weights else stream.weights[li, lo:hi].to(scores.device)
            return ids, w
        return forced

    def _on_embed(self, module, args):
        self._seen = args[0].detach()

    def __enter__(self) -> "Replay":
        for stream, layer, gate in self.gates:
            if gate.forced_routing is not None:
                raise RuntimeError(f"layer {layer}'s gate is already forced (nested replay?)")
            self._saved.append(gate)
            gate.forced_routing = self._forcer(stream, layer)
        self._handles.append(self.model.embed_tokens.register_forward_pre_hook(self._on_embed))
        return self

    def __exit__(self, *exc):
        for gate in self._saved:
            gate.forced_routing = None
        for h in self._handles:
            h.remove()
        self._saved, self._handles = [], []
        return False

    @property
    def consumed(self) -> dict:
        """Recorded rows used so far, per stream and layer."""
        return {s.name or "main": dict(s.cursor) for s in self.streams}

    @property
    def exhausted(self) -> bool:
        """Whether every recorded row of every stream has been used."""
        return all(c == s.n_tokens for s in self.streams for c in s.cursor.values())


def replay(model, routing, recompute_weights: bool = False, check_tokens: bool = True) -> Replay:
    """``with dsv3lab.replay(model, routing):`` forwards route as recorded (module docstring).
    ``routing``: ``t.routing``, a trace, a record, a trace file, or per-token ids [N, layers, k]."""
    return Replay(model, routing, recompute_weights=recompute_weights, check_tokens=check_tokens)


@contextlib.contextmanager
def perturbed_biases(model, scale: float = 0.05, seed: int = 0):
    """Within the block every gate's ``e_score_correction_bias`` has seeded N(0, scale^2) noise
    added (a routing change that leaves the experts alone); restored on exit."""
    g = torch.Generator().manual_seed(seed)
    saved = []
    gates = [blk.mlp.gate for blk in list(model.layers) + list(getattr(model, "mtp", []))
             if hasattr(blk.mlp, "gate") and blk.mlp.gate.e_score_correction_bias is not None]
    try:
        with torch.no_grad():
            for gate in gates:
                b = gate.e_score_correction_bias
                saved.append((gate, b.clone()))
                b.add_(torch.randn(b.shape, generator=g).to(b.device, b.dtype) * scale)
        yield model
    finally:
        with torch.no_grad():
            for gate, b in saved:
                gate.e_score_correction_bias.copy_(b)


@torch.no_grad()
def routing_or_experts(model, windows: torch.Tensor, change, batch_size: int = 8) -> dict:
    """Split the loss change a model change causes into its routing part and the rest.

    ``change`` is a zero-argument callable returning a context manager that changes the model
    (``lambda: fp8_fake_quant(model)``, ``lambda: perturbed_biases(model)``, ...). Three losses
    over windows [N, S] (next-token CE, nats): ``base`` (unchanged), ``changed`` (changed, routing
    free) and ``changed_replayed`` (changed, replaying the unchanged model's routing and weights).
    ``expert_effect`` = changed_replayed - base is what the change does with the routing held
    fixed; ``routing_effect`` = changed - changed_replayed is what the re-routing adds on top.
    ``routing_changed`` is the fraction of (layer, token) top-k *sets* that differ, per MoE layer."""
    from dsv3lab.interp.windows import next_token_loss
    from dsv3lab.probes import trace
    with trace(model, mtp=False) as t0:
        base = next_token_loss(model, windows, batch_size)
    with change():
        with trace(model, mtp=False) as t1:
            changed = next_token_loss(model, windows, batch_size)
        with replay(model, t0.routing):
            replayed = next_token_loss(model, windows, batch_size)
    a = t0.routing.topk_ids.sort(-1).values
    b = t1.routing.topk_ids.sort(-1).values
    differ = (a != b).any(-1).float().mean(-1)
    return dict(base=base, changed=changed, changed_replayed=replayed, expert_effect=replayed - base,
                routing_effect=changed - replayed, routing_changed=differ, layers=t0.routing.layers)
