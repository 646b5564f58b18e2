"""Expert-parallel dispatch and combine: what replaces ``MoE.dispatch`` on every rank.

Every rank of a TP group holds the same T tokens and runs the (replicated) gate on all of them, so
routing decisions are the single-process ones. The T tokens are then split over the TP ranks (rank
i takes the i-th contiguous chunk), each rank sends *its* chunk's routed tokens to the experts'
owners in its EP group, and the outputs are gathered back over the TP group.

Experts live in physical *slots* (``placement.py``): P >= E per layer, EP rank j owning slots
[j*P/ep, (j+1)*P/ep); without redundancy P = E and slot e is expert e. Each (token, expert) pair
is first given one slot of its expert (``ReplicaMap.choose``: round-robin over the replicas per
sender), then everything below is per slot. Two transports:

alltoall (default) -- only the routed (token, expert) pairs travel:
  1. header:   all_to_all of [active, layer, pairs for each of the receiver's slots] (int64)
  2. dispatch: all_to_all_single of the pairs' hidden states, grouped by owner then slot
     (FP8 dispatch: each row as D e4m3 bytes + ceil(D/128) fp32 scales, one uint8 message)
  3. each owner runs each of its slots once on every row routed to it (from all senders)
  4. combine:  all_to_all_single of the expert outputs back to the senders (bf16 under FP8
     dispatch), who weight and sum each token's k outputs in fp32, in (token, k) order, as
     the single-process dispatch does
  Bytes per token per MoE layer on the wire: k * D * elem * 2 * (ep-1)/ep under uniform routing
  (one copy per (token, expert) pair; pairs whose expert is local never leave the rank).

allreduce (the official demo's baseline) -- every rank of the EP group sees every token:
  all_gather of the chunks (skipped when the EP group is the TP group: the tokens are already
  there), each rank adds its own experts' weighted outputs, all_reduce, keep the own rows.

Ranks out of work (a data-parallel group that has finished its requests) must keep serving the
experts they own until every rank of the EP group is done: ``serve(model)`` answers dispatches
with zero tokens of its own and returns when a header shows no active rank. The header carries
the MoE layer index, so a rank that runs a different layer than its peers fails loudly instead
of mixing experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dsv3lab.fp8 import act_dequant, act_quant
from dsv3lab.parallel.context import check_group
from dsv3lab.parallel.layers import all_gather_rows, all_reduce
from dsv3lab.parallel.layout import LayoutError
from dsv3lab.parallel.placement import ReplicaMap

_HEAD = 2  # header columns before the per-expert counts: active flag, MoE layer index


def chunk_sizes(T: int, n: int) -> list[int]:
    """Sizes of torch.tensor_split(range(T), n): the first T % n chunks get one more."""
    return [T // n + (1 if i < T % n else 0) for i in range(n)]


@dataclass
class LayerComm:
    """Per-MoE-layer counters of one rank (accumulated over calls; ``reset`` clears them)."""
    layer: int
    ep: int
    calls: int = 0
    tokens: int = 0                  # tokens this rank routed (its TP chunk)
    pairs_sent: list = field(default_factory=list)   # [ep] (token, expert) pairs sent to each EP rank
    pairs_recv: list = field(default_factory=list)   # [ep] pairs received from each EP rank
    bytes_sent: int = 0              # payload bytes that left this rank (dispatch + combine)
    bytes_recv: int = 0              # payload bytes that arrived from other ranks
    header_bytes: int = 0
    dispatch_bytes: int = 0          # of bytes_sent: token rows out to experts (FP8 + scales, or native)
    combine_bytes: int = 0           # of bytes_sent: expert outputs back to their senders
    n_slots: int = 0                 # this rank's physical expert slots in this layer
    slot_rows: list = field(default_factory=list)    # [n_slots] pairs each slot computed (all senders)
    slot_experts: list = field(default_factory=list)  # [n_slots] logical expert held by each slot

    def __post_init__(self):
        self.reset()

    def reset(self):
        self.calls = self.tokens = self.bytes_sent = self.bytes_recv = self.header_bytes = 0
        self.dispatch_bytes = self.combine_bytes = 0
        self.pairs_sent = [0] * self.ep
        self.pairs_recv = [0] * self.ep
        self.slot_rows = [0] * self.n_slots

    def as_dict(self) -> dict:
        return dict(layer=self.layer, calls=self.calls, tokens=self.tokens, pairs_sent=list(self.pairs_sent),
                    pairs_recv=list(self.pairs_recv), bytes_sent=self.bytes_sent, bytes_recv=self.bytes_recv,
                    header_bytes=self.header_bytes, dispatch_bytes=self.dispatch_bytes,
                    combine_bytes=self.combine_bytes, slot_rows=list(self.slot_rows),
                    slot_experts=list(self.slot_experts), rows_computed=sum(self.slot_rows))


class ExpertParallelDispatch:
    """Callable installed as ``moe.dispatch``: same signature and result as ``MoE.dispatch``.

    ``replicas``: this layer's ``ReplicaMap`` (physical slots over the EP group; the contiguous
    map when not given). ``fp8``: quantize the dispatched rows to e4m3 with 1x128 scales and
    return expert outputs in bf16 (``set_fp8``)."""

    def __init__(self, moe, ctx, layer: int, replicas: ReplicaMap | None = None, fp8: bool = False):
        self.moe = moe
        self.ctx = ctx
        self.layer = layer
        cfg = moe.cfg
        self.E = cfg.n_routed_experts
        self.k = cfg.num_experts_per_tok
        self.mode = ctx.layout.moe_comm
        # the EP group is the TP group: every rank of it already holds every token
        self.same_tokens = ctx.ep == ctx.tp
        self.comm = LayerComm(layer, ctx.ep)
        self.header_slots = 0
        self.set_replicas(replicas if replicas is not None else ReplicaMap(torch.arange(self.E), self.E, ctx.ep))
        self.fp8 = False
        self.set_fp8(fp8)

    def set_replicas(self, replicas: ReplicaMap) -> None:
        """Use ``replicas`` from the next call on (the modules it needs must be in place)."""
        self.replicas = replicas
        self.P = replicas.P
        self.slots = replicas.slots_of(self.ctx.ep_rank)
        self.S_local = len(self.slots)
        self.slot_expert = replicas.slot_experts(self.ctx.ep_rank)
        self.header_slots = self.S_local       # apply_layout widens it to the model's widest layer
        self.comm.n_slots = self.S_local
        self.comm.slot_experts = list(self.slot_expert)
        self.comm.slot_rows = [0] * self.S_local

    def set_fp8(self, on: bool) -> None:
        if on and self.mode != "alltoall":
            raise LayoutError("FP8 dispatch quantizes the all-to-all payload: it needs moe_comm='alltoall', "
                              f"not {self.mode!r}")
        self.fp8 = bool(on)

    # --- entry from MoE.forward --------------------------------------------------------------
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(topk_ids.reshape(-1), minlength=self.E)
        self.moe.hook_expert_counts(counts)
        ctx = self.ctx
        check_group(ctx.ep_group, "expert dispatch")
        self.comm.calls += 1
        if self.mode == "allreduce" and self.same_tokens:
            self.comm.tokens += x.shape[0]
            return self._allreduce_replicated(x, topk_ids, topk_weights)
        sizes = chunk_sizes(x.shape[0], ctx.tp)
        lo = sum(sizes[:ctx.tp_rank])
        hi = lo + sizes[ctx.tp_rank]
        xs, ids, ws = x[lo:hi], topk_ids[lo:hi], topk_weights[lo:hi]
        self.comm.tokens += xs.shape[0]
        if self.mode == "alltoall":
            y = self._alltoall(xs, ids, ws)
        else:
            y = self._allreduce_gathered(xs, ids, ws, active=True)
        return all_gather_rows(y, sizes, ctx.tp_group)

    # --- experts ------------------------------------------------------------------------------
    def _run_local(self, rows: torch.Tensor, local_slot: torch.Tensor) -> torch.Tensor:
        """Rows [N,D] with this rank's slot index [N] -> expert outputs [N,D] (each slot once;
        two slots of one expert call the same module separately, as two replicas would)."""
        out = torch.empty_like(rows)
        if rows.shape[0] == 0:
            return out
        order = local_slot.argsort(stable=True)
        counts = torch.bincount(local_slot, minlength=self.S_local).tolist()
        xs = rows[order]
        ys = torch.empty_like(xs)
        lo = 0
        for j, n in enumerate(counts):
            if n:
                ys[lo:lo + n] = self.moe.experts[self.slot_expert[j]](xs[lo:lo + n])
                self.comm.slot_rows[j] += n
            lo += n
        out[order] = ys
        return out

    def _choose(self, ids: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Physical slots [sum(sizes)*k] of the pairs of ``ids`` [T,k], whose rows come from
        senders 0, 1, ... in chunks of ``sizes`` (the replica choice depends on the sender)."""
        if not self.replicas.replicated:
            return self.replicas.choose(ids.reshape(-1), 0)
        out, lo = [], 0
        for j, n in enumerate(sizes):
            out.append(self.replicas.choose(ids[lo:lo + n].reshape(-1), j))
            lo += n
        return torch.cat(out) if out else ids.reshape(-1)

    # --- all-to-all ----------------------------------------------------------------------------
    def _header(self, counts_s: torch.Tensor, active: bool) -> torch.Tensor:
        ep, S = self.ctx.ep, self.S_local
        h = torch.zeros(ep, _HEAD + self.header_slots, dtype=torch.int64, device=counts_s.device)
        h[:, 0] = int(active)
        h[:, 1] = self.layer if active else -1
        h[:, _HEAD:_HEAD + S] = counts_s.view(ep, S)
        return h

    def _exchange_header(self, header: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(header)
        dist.all_to_all_single(recv.view(-1), header.view(-1), group=self.ctx.ep_group)
        self.comm.header_bytes += header.numel() * header.element_size() * (self.ctx.ep - 1) // self.ctx.ep
        return recv

    def _check_step(self, recv: torch.Tensor) -> None:
        active = recv[:, 0] > 0
        other = recv[active, 1]
        if other.numel() and bool((other != self.layer).any()):
            srcs = [int(s) for s in torch.nonzero(active & (recv[:, 1] != self.layer)).flatten()]
            raise RuntimeError(f"expert-parallel ranks out of step: rank {self.ctx.rank} is at MoE layer "
                               f"{self.layer}, EP rank(s) {srcs} at layer(s) {sorted(set(other.tolist()))}")

    def _alltoall(self, xs, ids, ws) -> torch.Tensor:
        ctx = self.ctx
        ep, S = ctx.ep, self.S_local
        slot = self.replicas.choose(ids.reshape(-1), ctx.ep_rank)
        counts_s = torch.bincount(slot, minlength=self.P)
        order = slot.argsort(stable=True)                    # grouped by slot, hence by owner
        token_of = order // self.k
        if ep == 1:
            send = xs[token_of]
            if self.fp8:        # the same arithmetic as a trip over the wire, for every layout
                send = self._unpack(self._pack(send), send.dtype)
            back = self._run_local(send, slot[order] - self.slots.start)
            if self.fp8:
                back = back.to(torch.bfloat16).to(send.dtype)
        else:
            recv_h = self._exchange_header(self._header(counts_s, True))
            self._check_step(recv_h)
            back = self._payload(xs[token_of], counts_s.view(ep, S).sum(1).tolist(), recv_h)
        return self._combine(back, order, ws)

    @staticmethod
    def _combine(back: torch.Tensor, order: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        """Expert outputs of the pairs in ``order`` -> per-token weighted sums: put the pairs back
        in (token, k) order and add each token's k outputs in fp32 (deterministic, as the
        single-process MoE does)."""
        T, k = ws.shape
        pairs = torch.empty(T * k, back.shape[-1], dtype=torch.float32, device=back.device)
        pairs[order] = back.float() * ws.reshape(-1)[order][:, None].float()
        return pairs.view(T, k, back.shape[-1]).sum(dim=1).to(back.dtype)

    # FP8 wire format of one dispatched row: D e4m3 bytes, then ceil(D/128) fp32 scales as bytes
    def _pack(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 0:          # (a zero-row tensor has no strides a dtype view accepts)
            return torch.empty(0, fp8_row_bytes(rows.shape[1]), dtype=torch.uint8, device=rows.device)
        q, s = quantize_rows(rows)
        return torch.cat([q.view(torch.uint8), s.contiguous().view(torch.uint8).view(rows.shape[0], 4 * s.shape[1])], dim=1)

    def _unpack(self, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        D = self.moe.cfg.hidden_size
        if buf.shape[0] == 0:
            return torch.empty(0, D, dtype=dtype, device=buf.device)
        q = buf[:, :D].contiguous().view(torch.float8_e4m3fn)
        s = buf[:, D:].contiguous().view(torch.float32).view(buf.shape[0], -(-D // FP8_TILE))
        return dequantize_rows(q, s, dtype)

    def _payload(self, send: torch.Tensor, send_splits: list[int], recv_h: torch.Tensor) -> torch.Tensor:
        """Dispatch ``send`` (rows grouped by destination), run the local experts on what arrives,
        and return the expert outputs for ``send``'s rows (combine)."""
        ctx = self.ctx
        recv_counts = recv_h[:, _HEAD:_HEAD + self.S_local]     # [src, local slot]
        recv_splits = recv_counts.sum(1).tolist()
        D, dtype = send.shape[-1], send.dtype
        wire = self._pack(send) if self.fp8 else send.contiguous()
        got = wire.new_empty(sum(recv_splits), wire.shape[1])
        dist.all_to_all_single(got, wire, recv_splits, send_splits, group=ctx.ep_group)
        rows = self._unpack(got, dtype) if self.fp8 else got
        local_slot = torch.repeat_interleave(
            torch.arange(self.S_local, device=got.device).repeat(ctx.ep), recv_counts.reshape(-1))
        y = self._run_local(rows, local_slot)
        if self.fp8:
            y = y.to(torch.bfloat16)                            # combine in bf16
        back = y.new_empty(send.shape[0], D)
        dist.all_to_all_single(back, y.contiguous(), send_splits, recv_splits, group=ctx.ep_group)
        back = back.to(dtype)
        me = ctx.ep_rank
        c = self.comm
        for j in range(ctx.ep):
            c.pairs_sent[j] += send_splits[j]
            c.pairs_recv[j] += recv_splits[j]
        remote_out = sum(send_splits) - send_splits[me]
        remote_in = sum(recv_splits) - recv_splits[me]
        row_out = wire.shape[1] * wire.element_size()            # bytes of one dispatched row
        row_back = D * y.element_size()                          # bytes of one combined row
        # dispatch rows out + their results back in (and the mirror for what we serve)
        c.dispatch_bytes += remote_out * row_out
        c.combine_bytes += remote_in * row_back
        c.bytes_sent += remote_out * row_out + remote_in * row_back
        c.bytes_recv += remote_in * row_out + remote_out * row_back
        return back

    def serve_once(self, recv_h: torch.Tensor, like: torch.Tensor) -> None:
        """An idle rank's share of one dispatch (no tokens of its own)."""
        self._payload(like.new_empty(0, like.shape[-1]), [0] * self.ctx.ep, recv_h)

    # --- all-reduce baseline -------------------------------------------------------------------
    def _weighted_local(self, x, ids, ws, sizes: list[int]) -> torch.Tensor:
        """sum over this rank's *slots* of w * Expert(x) for every token (zeros elsewhere); the
        rows of ``x`` come from senders in chunks of ``sizes`` (for the replica choice)."""
        T = x.shape[0]
        pairs = torch.zeros(T * self.k, x.shape[-1], dtype=torch.float32, device=x.device)
        slot = self._choose(ids, sizes)
        mine = (slot >= self.slots.start) & (slot < self.slots.stop)
        pair = torch.nonzero(mine).flatten()
        if pair.numel():
            y = self._run_local(x[pair // self.k], slot[pair] - self.slots.start)
            pairs[pair] = y.float() * ws.reshape(-1)[pair][:, None].float()
        return pairs.view(T, self.k, x.shape[-1]).sum(dim=1).to(x.dtype)

    def _allreduce_replicated(self, x, ids, ws) -> torch.Tensor:
        # the token chunks a TP (= EP) rank would dispatch under all-to-all are its "sends"
        out = self._weighted_local(x, ids, ws, chunk_sizes(x.shape[0], self.ctx.tp))
        n = self.ctx.ep
        self.comm.bytes_sent += out.numel() * out.element_size() * 2 * (n - 1) // n  # ring all-reduce
        self.comm.bytes_recv += out.numel() * out.element_size() * 2 * (n - 1) // n
        return all_reduce(out, self.ctx.ep_group)

    def _allreduce_gathered(self, xs, ids, ws, active: bool) -> torch.Tensor:
        ctx = self.ctx
        if ctx.ep == 1:
            return self._weighted_local(xs, ids, ws, [xs.shape[0]])
        head = torch.tensor([int(active), self.layer if active else -1, xs.shape[0]], dtype=torch.int64,
                            device=xs.device)
        heads = [torch.empty_like(head) for _ in range(ctx.ep)]
        dist.all_gather(heads, head, group=ctx.ep_group)
        heads = torch.stack(heads)
        if active:
            self._check_step(heads)
        return self._allreduce_payload(xs, ids, ws, heads)

    def _allreduce_payload(self, xs, ids, ws, heads) -> torch.Tensor:
        ctx = self.ctx
        sizes = heads[:, 2].tolist()
        X = all_gather_rows(xs, sizes, ctx.ep_group)
        I = all_gather_rows(ids, sizes, ctx.ep_group)
        W = all_gather_rows(ws, sizes, ctx.ep_group)
        out = all_reduce(self._weighted_local(X, I, W, sizes), ctx.ep_group)
        n, esz = ctx.ep, xs.element_size()
        total = sum(sizes) * xs.shape[-1] * esz
        self.comm.bytes_sent += (total - xs.numel() * esz) + total * 2 * (n - 1) // n
        self.comm.bytes_recv += (total - xs.numel() * esz) + total * 2 * (n - 1) // n
        lo = sum(sizes[:ctx.ep_rank])
        return out[lo:lo + xs.shape[0]]


# --------------------------------------------------------------------------------------------
# FP8 dispatch rows: 1x128 e4m3 tiles (dsv3lab.fp8.act_quant), a shorter last tile zero-padded
# --------------------------------------------------------------------------------------------

FP8_TILE = 128


def quantize_rows(x: torch.Tensor, tile: int = FP8_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N,D] -> (e4m3 [N,D], fp32 scales [N, ceil(D/tile)]): the report's activation recipe
    (one scale per 1x128 tile, amax -> 448). A last tile shorter than 128 (D % 128, toy widths)
    is quantized as if zero-padded, which leaves its amax, hence its scale, unchanged."""
    N, D = x.shape
    pad = (-D) % tile
    xp = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x
    q, s = act_quant(xp, tile)
    return (q[:, :D].contiguous() if pad else q), s


def dequantize_rows(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, tile: int = FP8_TILE) -> torch.Tensor:
    N, D = q.shape
    pad = (-D) % tile
    qp = torch.cat([q.view(torch.uint8), q.new_zeros(N, pad).view(torch.uint8)], 1).view(q.dtype) if pad else q
    return act_dequant(qp, s, tile)[:, :D].to(dtype)


def fp8_row_bytes(D: int, tile: int = FP8_TILE) -> int:
    """Bytes of one FP8-dispatched row: D e4m3 values and ceil(D/tile) fp32 scales."""
    return D + 4 * (-(-D // tile))


# --------------------------------------------------------------------------------------------
# serving experts from a rank with no work of its own
# --------------------------------------------------------------------------------------------

def serve(model, max_steps: int | None = None) -> int:
    """Answer the EP group's dispatches with no tokens of our own until no rank is active.
    Every rank must call this after its last forward (it returns at once when the whole EP group
    is done). Returns the number of dispatches served."""
    state = getattr(model, "_dsv3_parallel", None)
    if state is None or not state.dispatchers:
        return 0
    ctx = state.ctx
    if ctx.ep == 1 or (state.layout.moe_comm == "allreduce" and ctx.ep == ctx.tp):
        return 0
    disp = next(iter(state.dispatchers.values()))
    like = torch.empty(0, model.cfg.hidden_size, dtype=model.dtype, device=model.device)
    served = 0
    while max_steps is None or served < max_steps:
        if state.layout.moe_comm == "alltoall":
            recv = disp._exchange_header(disp._header(
                torch.zeros(disp.P, dtype=torch.int64, device=like.device), False))
            active = recv[:, 0] > 0
            if not bool(active.any()):
                return served
            layer = int(recv[active][0, 1])
            target = state.dispatchers[layer]
            target.serve_once(recv, like)
        else:
            head = torch.tensor([0, -1, 0], dtype=torch.int64, device=like.device)
            heads = [torch.empty_like(head) for _ in range(ctx.ep)]
            dist.all_gather(heads, head, group=ctx.ep_group)
            heads = torch.stack(heads)
            active = heads[:, 0] > 0
            if not bool(active.any()):
                return served
            layer = int(heads[active][0, 1])
            target = state.dispatchers[layer]
            target._allreduce_payload(like, torch.empty(0, target.k, dtype=torch.int64, device=like.device),
                                      torch.empty(0, target.k, dtype=torch.float32, device=like.device), heads)
        served += 1
    return served
