"""Splitting a model's units (e.g. ``[embedding, block 0, ..., block L-1, head]``) into balanced pipeline
stages. Model-agnostic: the units and their costs come from the model side (gptpar's GPT:
:mod:`gptpar.models.stages`; transformers models: :mod:`gptpar.models.hf_stages`; or a
:func:`profile_costs` run). The split minimises the most expensive stage (contiguous ranges, every stage
non-empty; uneven splits allowed).
With ``v`` chunks per rank there are ``pp * v`` virtual stages; virtual stage ``c * pp + r`` is chunk ``c``
of pipeline rank ``r`` (``style="v"``, ZB-V and DualPipeV: chunk 0 is stage ``r``, chunk 1 stage
``2 pp - 1 - r``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gptpar.errors import GptparConfigError
from gptpar.parallel.pipeline.schedules import stage_rank, virtual_stage


@dataclass(frozen=True)
class Partition:
    names: tuple[str, ...]
    costs: tuple[float, ...]
    bounds: tuple[tuple[int, int], ...]  # per virtual stage: units [a, b)
    pp: int
    v: int = 1
    style: str = "loop"  # how chunks sit on ranks (schedules.placement)

    def units(self, rank: int, chunk: int = 0) -> tuple[int, int]:
        return self.bounds[virtual_stage(rank, chunk, self.pp, self.style)]

    def stage_costs(self) -> list[float]:
        return [sum(self.costs[a:b]) for a, b in self.bounds]

    def shares(self) -> list[float]:
        total = sum(self.costs)
        return [c / total for c in self.stage_costs()]

    def imbalance(self) -> float:
        """Most expensive stage over the mean stage (1.0 = perfect balance)."""
        sc = self.stage_costs()
        return max(sc) / (sum(sc) / len(sc))

    def report(self) -> str:
        lines = [
            f"pipeline split into {len(self.bounds)} stage(s) (pp={self.pp}, v={self.v}), imbalance {self.imbalance():.3f}"
        ]
        for i, ((a, b), share) in enumerate(zip(self.bounds, self.shares(), strict=True)):
            rank = stage_rank(i, self.pp, self.style)
            chunk = next(c for c in range(self.v) if virtual_stage(rank, c, self.pp, self.style) == i)
            first, last = self.names[a], self.names[b - 1]
            lines.append(
                f"  stage {i} (rank {rank}, chunk {chunk}): {first}..{last} ({b - a} units), {100 * share:.1f}% of cost"
            )
        return "\n".join(lines)


def balance(costs: list[float], parts: int) -> list[tuple[int, int]]:
    """Contiguous split of ``costs`` into ``parts`` non-empty ranges minimising the largest sum."""
    n = len(costs)
    if parts > n:
        raise GptparConfigError(f"cannot split {n} pipeline units into {parts} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-stage cost splitting the first i units into k stages
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        prev, row, cuts = best[k - 1], best[k], cut[k]
        for i in range(k, n - (parts - k) + 1):
            top, b = prefix[i], inf
            for j in range(k - 1, i):
                head = prev[j]
                if head >= b:  # prev[] never decreases with j: no later cut can do better
                    break
                tail = top - prefix[j]
                cand = head if head > tail else tail
                if cand < b:
                    b, cuts[i] = cand, j
            row[i] = b
    bounds, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def partition_units(
    names: list[str] | tuple[str, ...],
    costs: list[float],
    pp: int,
    v: int = 1,
    min_units: int = 0,
    style: str = "loop",
) -> Partition:
    """Balanced split of the units ``names`` (with per-unit ``costs``, from the model side) over ``pp * v``
    virtual stages. ``min_units``: the model's count of units that every stage needs at least one of
    (e.g. transformer blocks); fewer than ``pp`` is an error naming it."""
    if len(costs) != len(names):
        raise GptparConfigError(f"got {len(costs)} unit costs for {len(names)} units ({names[0]}, ..., {names[-1]})")
    if style == "v" and v != 2:
        raise GptparConfigError(f"a V placement has 2 chunks per rank, got v={v}")
    bounds = tuple(balance(list(costs), pp * v))
    return Partition(tuple(names), tuple(float(x) for x in costs), bounds, pp, v, style)


def profile_costs(units: list, reps: int = 3) -> list[float]:
    """Generic cost model: the measured seconds (median of ``reps``) of each unit's ``fn()`` (one forward
    and backward of that unit on a representative input, supplied by the model side)."""

    def timed(fn) -> float:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[len(times[1:]) // 2]

    return [timed(fn) for fn in units]


def split(model, pp: int, blocks: str, rank: int | None = None, costs: list[float] | None = None):
    """Cut the block stack at attribute path ``blocks`` (e.g. ``"transformer.h"``) of any model into ``pp``
    balanced contiguous stages (by parameter count unless ``costs`` are given). Returns a list of
    ``nn.ModuleList`` (one per stage); with ``rank``, only that stage's, and the other stages' blocks are
    dropped from ``model`` (replaced by ``nn.Identity``) so their weights can be freed: the model's own
    forward no longer runs then. To pipeline a transformers causal LM use
    :func:`gptpar.pipeline.hf_pipeline`; for another model, wrap each stage's blocks in a chunk that
    implements :class:`~gptpar.parallel.pipeline.stage.Stage`."""
    from torch import nn

    stack = model.get_submodule(blocks)
    c = list(costs) if costs is not None else [float(sum(p.numel() for p in b.parameters())) for b in stack]
    bounds = balance(c, pp)
    stages = [nn.ModuleList(stack[i] for i in range(a, b)) for a, b in bounds]
    if rank is None:
        return stages
    a, b = bounds[rank]
    for i in range(len(stack)):
        if not a <= i < b:
            stack[i] = nn.Identity()
    return [stages[rank]]
