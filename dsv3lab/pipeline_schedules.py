"""Pipeline schedules as events: 1F1B, ZB1P and DualPipe, timed per device (report sec. 3.2.1, Table 2).

A schedule here is, for every device, the ORDER in which it runs its compute chunks; the times
come from simulation, not from a formula. Each chunk starts as soon as its device is free and the
chunks it depends on have finished:

  F  (forward of micro-batch j on stage s)        needs F(j) on stage s-1
  B  (backward for inputs, "dgrad")               needs B(j) on stage s+1 (the last stage: its own F(j))
  W  (backward for weights, "wgrad")              needs B(j) on the same stage
  BW (a full backward, B and W in one chunk)      needs what B needs

Durations are the table's symbols: F for a forward chunk, B for a FULL backward chunk (so a split
input-only backward takes B - W and its weight part W), and F&B for a forward chunk of one
micro-batch overlapped with a full backward chunk of another (DualPipe's main step). Communication
takes no time (DualPipe hides it under computation; the table's formulas leave it out too).

What comes out, per device:
  bubble      idle time inside the iteration, i.e. makespan - (the device's own busy time)
  params      stages' worth of parameters the device holds (1 for 1F1B/ZB1P, 2 for DualPipe)
  activation  the peak number of micro-batch activations alive on the device, in units of one
              stage's activation for one micro-batch: alive from the start of F until its input
              backward (B, or BW) ends. What a split backward keeps for its later W (the layer
              inputs and output grads needed for wgrad) is a smaller residue, counted apart as
              ``pending_w`` (the peak number of W chunks waiting).

The schedules (each device's order, written from the published descriptions, not copied):

* 1F1B (PipeDream-flush): stage s runs PP-1-s warm-up forwards, then alternates one forward and
  one full backward, then drains the backwards.
* ZB1P (ZB-H1, Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): the backward is split into B
  and W; at slot x stage s runs F(x), B(x-(PP-1-s)), W(x-(PP-1)) (those that exist), so W trails
  the forward by PP-1 slots on every stage and fills what would have been the cool-down bubble,
  with no more forwards in flight than 1F1B.
* DualPipe (DeepSeek-V3 report sec. 3.2.1; the public deepseek-ai/DualPipe schedule): micro-batches
  enter from both ends; device d holds stage d of the "down" pipeline and stage PP-1-d of the "up"
  one (hence 2x parameters). With h = min(d, PP-1-d), half = PP/2 and n = micro-batches per
  direction, each device runs eight phases in terms of its near-start direction "0" (down for the
  first half of the devices, up for the second) and its far direction "1":
    1. 2(half-h-1) forwards of 0
    2. h+1 pairs: forward of 0, forward of 1
    3. half-h-1 times: split backward of 1, its W, forward of 1
    4. n-PP+h+1 times: [forward 0 & backward 1] overlapped, [forward 1 & backward 0] overlapped
       (the two middle devices run their very first pair un-overlapped, forward then backward)
    5. half-h-1 times: full backward of 1, [forward 1 & backward 0] overlapped
    6. h+1 pairs: backward of 1, backward of 0 (from the pair h+1 // 2 on, split: W deferred)
    7. half-h-1 times: a deferred W, then a split backward of 0
    8. the remaining deferred W's, first in first out.

``simulate(name, pp, micro_batches, F, B, W, FB)`` returns a :class:`Timeline`;
``table2_formula(name, ...)`` is the paper's formula, kept only to compare against.

A library of its own: the experiment ``dsv3lab.experiments.pipeline`` re-measures Table 2 with
it, ``dsv3lab.experiments.pipeline_plots`` draws its timelines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SCHEDULES = ("1f1b", "zb1p", "dualpipe")

# One chunk of work on one stage: (pass, direction, stage, micro-batch). pass is F, B, W or BW;
# direction 0 is the ordinary pipeline (stage 0 on device 0), 1 is DualPipe's reverse one.
Part = tuple


@dataclass
class Task:
    """What a device runs in one go: one part, or (DualPipe) a forward and a backward overlapped."""
    parts: tuple
    duration: float
    start: float = 0.0
    end: float = 0.0


@dataclass
class Timeline:
    """A simulated schedule: tasks per device with start/end times, and what the table reports."""
    name: str
    pp: int
    micro_batches: int
    durations: dict
    tasks: list                      # per device, list[Task] in execution order
    makespan: float = 0.0
    busy: list = field(default_factory=list)
    bubble: list = field(default_factory=list)
    params: list = field(default_factory=list)
    activation: list = field(default_factory=list)
    pending_w: list = field(default_factory=list)

    def summary(self) -> dict:
        """The table's three columns from the simulation: bubble and activation are the worst
        device's, params the most any device holds."""
        return dict(schedule=self.name, pp=self.pp, micro_batches=self.micro_batches, **self.durations,
                    makespan=self.makespan, bubble=max(self.bubble), bubble_per_device=list(self.bubble),
                    params=max(self.params), activation=max(self.activation),
                    activation_per_device=list(self.activation), pending_w=max(self.pending_w))


# --- the per-device orders ------------------------------------------------------------------


def order_1f1b(pp: int, m: int) -> list[list[list[Part]]]:
    orders = []
    for s in range(pp):
        warm = min(pp - 1 - s, m)
        ops = [[("F", 0, s, j)] for j in range(warm)]
        for j in range(m - warm):
            ops += [[("F", 0, s, warm + j)], [("BW", 0, s, j)]]
        ops += [[("BW", 0, s, j)] for j in range(m - warm, m)]
        orders.append(ops)
    return orders


def order_zb1p(pp: int, m: int) -> list[list[list[Part]]]:
    orders = []
    for s in range(pp):
        ops = []
        for x in range(m + pp - 1):
            f, b, w = x, x - (pp - 1 - s), x - (pp - 1)
            if 0 <= f < m:
                ops.append([("F", 0, s, f)])
            if 0 <= b < m:
                ops.append([("B", 0, s, b)])
            if 0 <= w < m:
                ops.append([("W", 0, s, w)])
        orders.append(ops)
    return orders


def order_dualpipe(pp: int, m: int) -> list[list[list[Part]]]:
    if pp % 2 or m % 2:
        raise ValueError(f"DualPipe needs an even number of stages and of micro-batches, got pp={pp}, m={m}")
    n = m // 2                                  # micro-batches per direction
    if n < pp:
        raise ValueError(f"DualPipe needs at least 2*pp micro-batches (pp={pp}), got {m}")
    half = pp // 2
    orders = []
    for d in range(pp):
        h = min(d, pp - 1 - d)
        second = d >= half
        near, far = (1, 0) if second else (0, 1)  # near: the direction in which d is among the first half-stages
        stage = {0: d, 1: pp - 1 - d}             # the stage device d holds in each direction
        nxt = {"F": {0: 0, 1: 0}, "B": {0: 0, 1: 0}}
        deferred: list[Part] = []                 # split backwards' W chunks, first in first out
        ops: list[list[Part]] = []

        def f(phase):
            dr = near if phase == 0 else far
            j = nxt["F"][dr]
            nxt["F"][dr] += 1
            return ("F", dr, stage[dr], j)

        def b(phase, split):
            dr = near if phase == 0 else far
            j = nxt["B"][dr]
            nxt["B"][dr] += 1
            if split:
                deferred.append(("W", dr, stage[dr], j))
                return ("B", dr, stage[dr], j)
            return ("BW", dr, stage[dr], j)

        for _ in range(2 * (half - h - 1)):                       # 1
            ops.append([f(0)])
        for _ in range(h + 1):                                    # 2
            ops.append([f(0)])
            ops.append([f(1)])
        for _ in range(half - h - 1):                             # 3
            ops.append([b(1, True)])
            ops.append([deferred.pop(0)])
            ops.append([f(1)])
        for i in range(n - pp + h + 1):                           # 4
            if i == 0 and h == half - 1:                          # middle devices: not overlapped
                ops.append([f(0)])
                ops.append([b(1, False)])
            else:
                ops.append([f(0), b(1, False)])
            ops.append([f(1), b(0, False)])
        for _ in range(half - h - 1):                             # 5
            ops.append([b(1, False)])
            ops.append([f(1), b(0, False)])
        split = False                                             # 6
        for i in range(h + 1):
            if i == (h + 1) // 2 and h % 2 == 1:
                split = True
            ops.append([b(1, split)])
            if i == (h + 1) // 2 and h % 2 == 0:
                split = True
            ops.append([b(0, split)])
        for _ in range(half - h - 1):                             # 7
            ops.append([deferred.pop(0)])
            ops.append([b(0, True)])
        while deferred:                                           # 8
            ops.append([deferred.pop(0)])
        if nxt["F"] != {0: n, 1: n} or nxt["B"] != {0: n, 1: n}:
            raise AssertionError(f"DualPipe order for device {d} is incomplete: {nxt}")
        orders.append(ops)
    return orders


ORDERS = {"1f1b": order_1f1b, "zb1p": order_zb1p, "dualpipe": order_dualpipe}
PARAMS = {"1f1b": 1, "zb1p": 1, "dualpipe": 2}     # stages held per device, by construction


# --- the simulation -------------------------------------------------------------------------


def _dependencies(part: Part, pp: int) -> list[Part]:
    # Stages are numbered along each direction's own flow (stage 0 takes the micro-batch in), so
    # the dependencies read the same in both directions; only the device holding a stage differs.
    kind, dr, s, j = part
    if kind == "F":
        return [] if s == 0 else [("F", dr, s - 1, j)]
    if kind in ("B", "BW"):
        return [("F", dr, s, j)] if s == pp - 1 else [("B", dr, s + 1, j), ("F", dr, s, j)]
    if kind == "W":
        return [("B", dr, s, j)]
    raise ValueError(f"unknown pass {kind!r}")


def _device_of(part: Part, pp: int) -> int:
    _, dr, s, _ = part
    return s if dr == 0 else pp - 1 - s


def simulate(name: str, pp: int, micro_batches: int, F: float = 1.0, B: float = 2.0, W: float = 1.0,
             FB: Optional[float] = None) -> Timeline:
    """Time ``name``'s per-device orders for ``pp`` stages and ``micro_batches`` micro-batches (for
    DualPipe: in all, half entering from each end). ``B`` is a full backward, ``W`` its weight part,
    ``FB`` an overlapped forward + full backward (default F + B: no overlap gain)."""
    if name not in ORDERS:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if pp < 1 or micro_batches < 1:
        raise ValueError(f"pp and micro_batches must be >= 1, got pp={pp}, micro_batches={micro_batches}")
    FB = F + B if FB is None else FB
    for k, v in dict(F=F, B=B, W=W, FB=FB).items():
        if not v >= 0:
            raise ValueError(f"duration {k} must be >= 0, got {v}")
    if W > B:
        raise ValueError(f"W (weight part of the backward, {W}) cannot exceed the full backward B ({B})")
    single = {"F": F, "B": B - W, "W": W, "BW": B}
    orders = ORDERS[name](pp, micro_batches)
    tasks = [[Task(tuple(parts), FB if len(parts) == 2 else single[parts[0][0]]) for parts in dev]
             for dev in orders]
    for d, dev in enumerate(tasks):                  # every part on the device that holds its stage
        for t in dev:
            for p in t.parts:
                if _device_of(p, pp) != d:
                    raise AssertionError(f"{p} scheduled on device {d}")

    done: dict = {}                                 # part -> end time; B ends also count for BW
    free = [0.0] * pp
    nxt = [0] * pp
    left = sum(len(dev) for dev in tasks)
    while left:
        progressed = False
        for d in range(pp):
            while nxt[d] < len(tasks[d]):
                t = tasks[d][nxt[d]]
                deps = [q for p in t.parts for q in _dependencies(p, pp)]
                if any(q not in done for q in deps):
                    break
                t.start = max([free[d]] + [done[q] for q in deps])
                t.end = free[d] = t.start + t.duration
                for kind, dr, s, j in t.parts:
                    done[(kind, dr, s, j)] = t.end
                    if kind == "BW":                  # a full backward also provides B's gradient
                        done[("B", dr, s, j)] = t.end
                nxt[d] += 1
                left -= 1
                progressed = True
        if not progressed:
            stuck = {d: tasks[d][nxt[d]].parts for d in range(pp) if nxt[d] < len(tasks[d])}
            raise RuntimeError(f"{name} schedule deadlocked (pp={pp}, m={micro_batches}); waiting: {stuck}")

    tl = Timeline(name, pp, micro_batches, dict(F=F, B=B, W=W, FB=FB), tasks)
    tl.makespan = max(free)
    tl.busy = [sum(t.duration for t in dev) for dev in tasks]
    tl.bubble = [tl.makespan - b for b in tl.busy]
    tl.params = [PARAMS[name]] * pp
    tl.activation, tl.pending_w = [], []
    for dev in tasks:
        events = []                                   # (time, +1/-1): F starts, B/BW ends
        w_events = []
        for t in dev:
            for kind, *_ in t.parts:
                if kind == "F":
                    events.append((t.start, 1))
                elif kind in ("B", "BW"):
                    events.append((t.end, -1))
                if kind == "B":
                    w_events.append((t.end, 1))
                elif kind == "W":
                    w_events.append((t.start, -1))
        tl.activation.append(_peak(events))
        tl.pending_w.append(_peak(w_events))
    return tl


def _peak(events) -> int:
    """Peak running sum; at equal times releases come first (a chunk freed as the next starts)."""
    level = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        level += delta
        peak = max(peak, level)
    return peak


def table2_formula(name: str, pp: int, F: float = 1.0, B: float = 2.0, W: float = 1.0,
                   FB: Optional[float] = None) -> dict:
    """The paper's Table 2 row for ``name`` (bubble, params, activation), evaluated; used only to
    compare the simulation against."""
    FB = F + B if FB is None else FB
    if name == "1f1b":
        return dict(bubble=(pp - 1) * (F + B), params=1, activation=pp)
    if name == "zb1p":
        return dict(bubble=(pp - 1) * (F + B - 2 * W), params=1, activation=pp)
    if name == "dualpipe":
        return dict(bubble=(pp / 2 - 1) * (FB + B - 3 * W), params=2, activation=pp + 1)
    raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
