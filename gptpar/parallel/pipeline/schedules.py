"""Pipeline schedules as data: a pure function returns each rank's ordered list of compute actions; one
executor (:mod:`.engine`) runs any of them, and :func:`simulate` runs them without processes.

Actions: ``F`` forward, ``B`` full backward, ``I`` backward for the input only, ``W`` backward for the
weights only (``I`` + ``W`` = ``B``; zero-bubble schedules separate them). Each names a microbatch and a
model chunk (``chunk`` is the rank's local chunk index; with ``v`` chunks per rank, chunk ``c`` of rank
``r`` is virtual stage ``c * p + r``). Sends and receives follow from the actions: the executor
receives a forward's input from the previous virtual stage and a backward's output gradient from the
next, and posts every receive before the compute that precedes it.

Bubble fractions (unit costs, ``T_B = 2 T_F``): GPipe and 1F1B ``(p-1)/(m+p-1)``; interleaved 1F1B
``(p-1)/(v m + p - 1)``; ZB-H1 lower still (weight gradients fill the warm-up/cool-down bubbles).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptpar.errors import GptparConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


@dataclass(frozen=True)
class Action:
    kind: str  # "F", "B", "I", "W"
    mb: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


def _check(p: int, m: int, v: int) -> None:
    if p < 1 or m < 1 or v < 1:
        raise GptparConfigError(f"pipeline needs p >= 1, m >= 1, v >= 1; got p={p}, m={m}, v={v}")


def gpipe(p: int, m: int) -> list[list[Action]]:
    """All forwards, then all backwards (activations of all m microbatches are held at once)."""
    _check(p, m, 1)
    return [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(p)]


def one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """1F1B (PipeDream-flush): ``p-r-1`` warm-up forwards, then alternate, then drain. At most ``p-r``
    microbatches are in flight on rank r."""
    _check(p, m, 1)
    out = []
    for r in range(p):
        warm = min(p - r - 1, m)
        acts = [Action("F", i) for i in range(warm)]
        f, b = warm, 0
        while b < m:
            if f < m:
                acts.append(Action("F", f))
                f += 1
            acts.append(Action("B", b))
            b += 1
        out.append(acts)
    return out


def interleaved(p: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B with ``v`` model chunks per rank; needs ``m % p == 0``."""
    _check(p, m, v)
    if v == 1:
        return one_f_one_b(p, m)
    if m % p:
        raise GptparConfigError(f"interleaved schedule needs micro-batches m={m} divisible by pp={p}")
    total = m * v

    def fwd(k: int) -> Action:
        return Action("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def bwd(k: int) -> Action:
        return Action("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    out = []
    for r in range(p):
        warm = min((p - r - 1) * 2 + (v - 1) * p, total)
        acts = [fwd(k) for k in range(warm)]
        f, b = warm, 0
        while b < total:
            if f < total:
                acts.append(fwd(f))
                f += 1
            acts.append(bwd(b))
            b += 1
        out.append(acts)
    return out


def zb_h1(p: int, m: int) -> list[list[Action]]:
    """Zero-bubble ZB-H1 (Qi et al. 2023): backward split into ``I`` and ``W``; ``W`` s are deferred into
    the bubbles. Built by list-scheduling with unit costs (F = I = W = 1): a rank runs ``I`` when its output
    gradient is ready, else ``F`` while fewer than ``p-r`` microbatches are in flight (1F1B's memory), else
    a pending ``W``. Same activation memory as 1F1B."""
    _check(p, m, 1)
    done: dict[tuple[str, int, int], int] = {}  # (kind, mb, rank) -> finish time
    nf, ni = [0] * p, [0] * p
    pending_w: list[list[int]] = [[] for _ in range(p)]
    acts: list[list[Action]] = [[] for _ in range(p)]
    t = 0
    while any(len(a) < 3 * m for a in acts):
        starts = []
        for r in range(p):
            f_ready = nf[r] < m and (r == 0 or done.get(("F", nf[r], r - 1), 1 << 30) <= t)
            i_ready = ni[r] < nf[r] and (r == p - 1 or done.get(("I", ni[r], r + 1), 1 << 30) <= t)
            if i_ready:
                starts.append((r, "I", ni[r]))
                ni[r] += 1
            elif f_ready and nf[r] - len([a for a in acts[r] if a.kind == "W"]) < p - r:
                starts.append((r, "F", nf[r]))
                nf[r] += 1
            elif pending_w[r]:
                starts.append((r, "W", pending_w[r].pop(0)))
        for r, kind, mb in starts:
            acts[r].append(Action(kind, mb))
            done[(kind, mb, r)] = t + 1
            if kind == "I":
                pending_w[r].append(mb)
        t += 1
        if t > 10 * (m + p) * 3:
            raise RuntimeError("zb_h1 list scheduling did not converge")  # a bug, not a user error
    return acts


def build(name: str, p: int, m: int, v: int = 1) -> list[list[Action]]:
    """The schedule ``name`` (one of :data:`SCHEDULES`) for ``p`` stages, ``m`` microbatches, ``v`` chunks."""
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved(p, m, v)
    if name == "zb-h1":
        return zb_h1(p, m)
    raise GptparConfigError(f"schedule {name!r} is unknown; expected one of {SCHEDULES}")


# ---------------------------------------------------------------------------------------------- simulation
@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    start: dict  # (rank, index) -> start time
    peak_in_flight: list[int]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the ranks' time: ``1 - sum(busy) / (p * makespan)``."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(actions: list[list[Action]], v: int = 1, cost: dict | None = None) -> SimResult:
    """Run the schedule on an ideal machine (zero communication time): every action starts as soon as its
    rank is free and its inputs exist. Raises ``RuntimeError`` on deadlock (no rank can make progress) or
    on an invalid schedule (an action whose dependency never runs)."""
    cost = cost or {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
    p = len(actions)
    nvs = p * v

    def vstage(r: int, c: int) -> int:
        return c * p + r

    finish: dict[tuple[str, int, int], float] = {}  # (kind, mb, virtual stage) -> time
    pos = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    start = {}
    live = [0] * p
    peak = [0] * p
    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(actions[r]):
                a = actions[r][pos[r]]
                vs = vstage(r, a.chunk)
                if a.kind == "F":
                    deps = [("F", a.mb, vs - 1)] if vs > 0 else []
                elif a.kind in ("B", "I"):  # needs its forward and the next stage's input gradient ("G")
                    deps = [("F", a.mb, vs)] + ([("G", a.mb, vs + 1)] if vs < nvs - 1 else [])
                elif a.kind == "W":
                    deps = [("G", a.mb, vs)]
                else:
                    raise RuntimeError(f"unknown action {a!r}")
                if any(d not in finish for d in deps):
                    break
                t0 = max([clock[r]] + [finish[d] for d in deps])
                start[(r, pos[r])] = t0
                clock[r] = t0 + cost[a.kind]
                busy[r] += cost[a.kind]
                finish[(a.kind, a.mb, vs)] = clock[r]
                if a.kind in ("B", "I"):
                    finish[("G", a.mb, vs)] = clock[r]
                if a.kind == "F":
                    live[r] += 1
                    peak[r] = max(peak[r], live[r])
                elif a.kind in ("B", "W"):
                    live[r] -= 1
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: actions[r][pos[r]] for r in range(p) if pos[r] < len(actions[r])}
            raise RuntimeError(f"schedule deadlocks: ranks wait forever at {stuck}")
    return SimResult(makespan=max(clock), busy=busy, start=start, peak_in_flight=peak)


def validate(actions: list[list[Action]], m: int, v: int = 1) -> None:
    """Every microbatch gets exactly one forward and one backward (B, or I then W) per virtual stage,
    forward before backward on each rank; raises ``AssertionError`` naming the first violation."""
    for r, acts in enumerate(actions):
        seen: dict[tuple[str, int, int], int] = {}
        for i, a in enumerate(acts):
            key = (a.kind, a.mb, a.chunk)
            assert key not in seen, f"rank {r}: {a!r} appears twice"
            seen[key] = i
        for c in range(v):
            for mb in range(m):
                assert ("F", mb, c) in seen, f"rank {r}: no forward of microbatch {mb} chunk {c}"
                if ("B", mb, c) in seen:
                    assert seen[("F", mb, c)] < seen[("B", mb, c)], f"rank {r}: B{mb}.{c} before its F"
                else:
                    assert ("I", mb, c) in seen and ("W", mb, c) in seen, f"rank {r}: no backward of {mb}.{c}"
                    assert seen[("F", mb, c)] < seen[("I", mb, c)] < seen[("W", mb, c)], (
                        f"rank {r}: {mb}.{c} out of order"
                    )
