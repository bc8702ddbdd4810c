"""Pipeline schedules as data: a pure function returns each rank's ordered list of compute actions; one
executor (:mod:`.engine`) runs any of them, and :func:`simulate` runs them without processes.

Actions: ``F`` forward, ``B`` full backward, ``I`` backward for the input only, ``W`` backward for the
weights only (``I`` + ``W`` = ``B``; zero-bubble schedules separate them). Each names a microbatch and a
model chunk (``chunk`` is the rank's local chunk index; with ``v`` chunks per rank, chunk ``c`` of rank
``r`` is virtual stage ``c * p + r``). Sends and receives follow from the actions: the executor
receives a forward's input from the previous virtual stage and a backward's output gradient from the
next, and posts every receive before the compute that precedes it.

Placement: GPipe, 1F1B and ZB-H1 run one chunk per rank; interleaved ``v`` chunks in a loop (chunk ``c``
of rank ``r`` is virtual stage ``c * p + r``); ZB-V and DualPipeV two chunks in a V (chunk 0 of rank
``r`` is stage ``r``, chunk 1 is stage ``2p - 1 - r``: the first rank holds the first and the last
stage, and the last rank passes its chunk 0's output to its own chunk 1 without a transfer).

Bubble fractions (unit costs, ``T_B = 2 T_F``): GPipe and 1F1B ``(p-1)/(m+p-1)``; interleaved 1F1B
``(p-1)/(v m + p - 1)``; ZB-H1 lower still (weight gradients fill the warm-up/cool-down bubbles); ZB-V
close to zero once ``m >= 2p`` (with ``T_F = T_I = T_W``); DualPipeV pairs one microbatch's forward on
one chunk with another's backward on the other, so their P2P transfers are in flight together.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptpar.errors import GptparConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv", "dualpipev")
V_SCHEDULES = ("zbv", "dualpipev")  # two chunks per rank, V placement


def placement(schedule: str) -> str:
    """How ``schedule`` places chunks on ranks: ``"v"`` (ZB-V, DualPipeV) or ``"loop"`` (the others)."""
    return "v" if schedule in V_SCHEDULES else "loop"


def chunks_per_rank(schedule: str, v: int = 1) -> int:
    """Model chunks each rank holds under ``schedule``: ``v`` for interleaved, 2 for the V schedules, else 1."""
    return v if schedule == "interleaved" else 2 if schedule in V_SCHEDULES else 1


def virtual_stage(rank: int, chunk: int, p: int, style: str = "loop") -> int:
    """The virtual stage that ``chunk`` of pipeline ``rank`` runs (``p`` ranks; ``style`` of :func:`placement`)."""
    if style == "v":
        return rank if chunk == 0 else 2 * p - 1 - rank
    return chunk * p + rank


def stage_rank(vs: int, p: int, style: str = "loop") -> int:
    """The pipeline rank holding virtual stage ``vs``."""
    if style == "v":
        return vs if vs < p else 2 * p - 1 - vs
    return vs % p


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
    nf, ni, nw = [0] * p, [0] * p, [0] * p
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
            elif f_ready and nf[r] - nw[r] < p - r:
                starts.append((r, "F", nf[r]))
                nf[r] += 1
            elif pending_w[r]:
                starts.append((r, "W", pending_w[r].pop(0)))
        for r, kind, mb in starts:
            acts[r].append(Action(kind, mb))
            done[(kind, mb, r)] = t + 1
            if kind == "I":
                pending_w[r].append(mb)
            elif kind == "W":
                nw[r] += 1
        t += 1
        if t > 10 * (m + p) * 3:
            raise RuntimeError("zb_h1 list scheduling did not converge")  # a bug, not a user error
    return acts


def zbv(p: int, m: int) -> list[list[Action]]:
    """ZB-V (Qi et al. 2023, section 6): two chunks per rank in a V, backward split into ``I`` and ``W``.
    Warm-up: ``2(p-r)-1`` chunk-0 forwards, then ``r`` pairs of chunk-1/chunk-0 forwards, then ``p-r``
    chunk-1 ``F I W`` (the bottom of the V turns each microbatch around at once); steady state
    ``F0 I0 W0 F1 I1 W1``; cool-down the remaining ``I`` s with ``W`` s filling the bubbles. Built for
    ``max(m, 2p-1)`` microbatches, those past ``m`` then dropped (as torch's ``ScheduleZBVZeroBubble``).
    At most ``2p`` chunk-microbatches' activations held on a rank (1F1B's ``p`` full-stage ones)."""
    _check(p, m, 1)
    n = max(2 * p - 1, m)
    out = []
    for r in range(p):
        acts: list[Action] = []
        cnt = {"F0": 0, "F1": 0, "I0": 0, "I1": 0, "W0": 0, "W1": 0}

        def add(kind, c, acts=acts, cnt=cnt):
            key = f"{kind}{c}"
            acts.append(Action(kind, cnt[key], c))
            cnt[key] += 1

        for _ in range(2 * (p - r) - 1):
            add("F", 0)
        for _ in range(r):
            add("F", 1)
            add("F", 0)
        for _ in range(p - r):
            add("F", 1)
            add("I", 1)
            add("W", 1)
        while cnt["F1"] < cnt["F0"] or cnt["F0"] < n:
            if cnt["F0"] < n:
                add("F", 0)
            add("I", 0)
            add("W", 0)
            add("F", 1)
            add("I", 1)
            add("W", 1)
        for _ in range(r):
            add("I", 0)
            add("I", 1)
        for _ in range(p - r):
            add("I", 0)
            add("W", 0)
        while cnt["W1"] < cnt["I1"]:
            add("W", 1)
        while cnt["W0"] < cnt["I0"]:
            add("W", 0)
        out.append([a for a in acts if a.mb < m])
    return out


def dualpipev(p: int, m: int) -> list[list[Action]]:
    """DualPipeV (DeepSeek-V3's DualPipe cut in half, as in deepseek-ai/DualPipe and torch's
    ``ScheduleDualPipeV``): two chunks per rank in a V. After a warm-up of forwards the main phase runs
    pairs: the forward of one microbatch on one chunk, then the full backward of an earlier microbatch on
    the other chunk (``F0 B1``, ``F1 B0``), so each pair's transfers (activations down, gradients up) are
    in flight together; the cool-down splits backwards into ``I`` and ``W`` (zero bubble) on half the
    ranks' last steps. Needs ``m >= 2p``."""
    _check(p, m, 1)
    if m < 2 * p:
        raise GptparConfigError(f"the dualpipev schedule needs micro-batches m={m} >= 2 * pp = {2 * p}")
    out = []
    for r in range(p):
        acts: list[Action] = []
        cnt: dict[tuple[str, int], int] = {}
        weights: list[tuple[int, int]] = []  # (chunk, mb) of I's whose W is pending

        def add(kind, c, acts=acts, cnt=cnt, weights=weights):
            key = (kind if kind != "B" else "I", c)
            mb = cnt.get(key, 0)
            acts.append(Action(kind, mb, c))
            cnt[key] = mb + 1
            if kind == "I":
                weights.append((c, mb))

        def pending_w(acts=acts, weights=weights):
            if weights:
                c, mb = weights.pop(0)
                acts.append(Action("W", mb, c))

        for _ in range((p - r - 1) * 2):
            add("F", 0)
        for _ in range(r + 1):
            add("F", 0)
            add("F", 1)
        for _ in range(p - r - 1):
            add("I", 1)
            pending_w()
            add("F", 1)
        for _ in range(m - 2 * p + r + 1):
            add("F", 0)  # (the pairs: F0 with B1, then F1 with B0)
            add("B", 1)
            add("F", 1)
            add("B", 0)
        for _ in range(p - r - 1):
            add("B", 1)
            add("F", 1)
            add("B", 0)
        zb = False
        steps = r + 1
        for i in range(steps):
            if i == steps // 2 and r % 2 == 1:
                zb = True
            add("I" if zb else "B", 1)
            if i == steps // 2 and r % 2 == 0:
                zb = True
            add("I" if zb else "B", 0)
        for _ in range(p - r - 1):
            pending_w()
            add("I" if zb else "B", 0)
        while weights:
            pending_w()
        out.append(acts)
    return out


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
    if name == "zbv":
        return zbv(p, m)
    if name == "dualpipev":
        return dualpipev(p, m)
    raise GptparConfigError(f"schedule {name!r} is unknown; expected one of {SCHEDULES}")


# ---------------------------------------------------------------------------------------------- simulation
@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    start: dict  # (rank, index) -> start time
    peak_in_flight: list[int]
    # per rank: each chunk's count of microbatches held, after every forward (for weighting chunks whose
    # activations differ in size), and whether a forward runs after the rank's first backward
    live_trace: list[list[tuple[int, ...]]] | None = None
    forward_after_backward: list[bool] | None = None

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the ranks' time: ``1 - sum(busy) / (p * makespan)``."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(actions: list[list[Action]], v: int = 1, cost: dict | None = None, style: str = "loop") -> SimResult:
    """Run the schedule on an ideal machine (zero communication time): every action starts as soon as its
    rank is free and its inputs exist. ``v`` chunks per rank placed by ``style`` (:func:`placement`).
    Raises ``RuntimeError`` on deadlock (no rank can make progress) or on an invalid schedule (an action
    whose dependency never runs)."""
    cost = cost or {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
    p = len(actions)
    nvs = p * v

    def vstage(r: int, c: int) -> int:
        return virtual_stage(r, c, p, style)

    finish: dict[tuple[str, int, int], float] = {}  # (kind, mb, virtual stage) -> time
    pos = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    start = {}
    live = [0] * p
    peak = [0] * p
    chunk_live = [[0] * v for _ in range(p)]
    trace: list[list[tuple[int, ...]]] = [[] for _ in range(p)]
    backward_seen = [False] * p
    fwd_after_bwd = [False] * p
    # Event-driven: a rank runs its actions in order until one waits on a result not produced yet; it is
    # woken when that result appears. (Start times depend only on dependencies and program order, not on
    # the order ranks are visited.)
    waiters: dict[tuple[str, int, int], list[int]] = {}
    ready = list(range(p))
    while ready:
        r = ready.pop()
        acts = actions[r]
        while pos[r] < len(acts):
            a = acts[pos[r]]
            vs = vstage(r, a.chunk)
            if a.kind == "F":
                deps = (("F", a.mb, vs - 1),) if vs > 0 else ()
            elif a.kind in ("B", "I"):  # needs its forward and the next stage's input gradient ("G")
                deps = (("F", a.mb, vs), ("G", a.mb, vs + 1)) if vs < nvs - 1 else (("F", a.mb, vs),)
            elif a.kind == "W":
                deps = (("G", a.mb, vs),)
            else:
                raise RuntimeError(f"unknown action {a!r}")
            missing = next((d for d in deps if d not in finish), None)
            if missing is not None:
                waiters.setdefault(missing, []).append(r)
                break
            t0 = clock[r]
            for d in deps:
                t0 = max(t0, finish[d])
            start[(r, pos[r])] = t0
            clock[r] = t0 + cost[a.kind]
            busy[r] += cost[a.kind]
            made = [(a.kind, a.mb, vs)] + ([("G", a.mb, vs)] if a.kind in ("B", "I") else [])
            for key in made:
                finish[key] = clock[r]
                ready.extend(waiters.pop(key, ()))
            if a.kind == "F":
                live[r] += 1
                peak[r] = max(peak[r], live[r])
                chunk_live[r][a.chunk] += 1
                trace[r].append(tuple(chunk_live[r]))
                fwd_after_bwd[r] = fwd_after_bwd[r] or backward_seen[r]
            elif a.kind in ("B", "W"):
                live[r] -= 1
                chunk_live[r][a.chunk] -= 1
            if a.kind in ("B", "I"):
                backward_seen[r] = True
            pos[r] += 1
    stuck = {r: actions[r][pos[r]] for r in range(p) if pos[r] < len(actions[r])}
    if stuck:
        raise RuntimeError(f"schedule deadlocks: ranks wait forever at {stuck}")
    return SimResult(
        makespan=max(clock),
        busy=busy,
        start=start,
        peak_in_flight=peak,
        live_trace=trace,
        forward_after_backward=fwd_after_bwd,
    )


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
