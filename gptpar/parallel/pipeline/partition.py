"""Splitting a GPT's units — ``[embedding, block 0, ..., block L-1, head]`` — into balanced pipeline stages.

Costs per unit come from a cost model: ``"params"`` (parameter count; the head counts its V x h matrix even
when tied, since the last stage computes with it), ``"flops"`` (matmul FLOPs per token, attention
included), or ``"profile"`` (measured forward + backward time of each unit on this machine). The split
minimises the most expensive stage (contiguous ranges, every stage non-empty; uneven splits allowed).
With ``v`` chunks per rank there are ``pp * v`` virtual stages; virtual stage ``c * pp + r`` is chunk ``c``
of pipeline rank ``r``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gptpar.errors import GptparConfigError
from gptpar.models.gpt import GPTConfig

COST_MODELS = ("params", "flops", "profile")


@dataclass(frozen=True)
class Partition:
    names: tuple[str, ...]
    costs: tuple[float, ...]
    bounds: tuple[tuple[int, int], ...]  # per virtual stage: units [a, b)
    pp: int
    v: int = 1

    def units(self, rank: int, chunk: int = 0) -> tuple[int, int]:
        return self.bounds[chunk * self.pp + rank]

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
            rank, chunk = i % self.pp, i // self.pp
            first, last = self.names[a], self.names[b - 1]
            lines.append(
                f"  stage {i} (rank {rank}, chunk {chunk}): {first}..{last} ({b - a} units), {100 * share:.1f}% of cost"
            )
        return "\n".join(lines)


def unit_names(config: GPTConfig) -> list[str]:
    return ["embedding"] + [f"block.{i}" for i in range(config.n_layer)] + ["head"]


def unit_costs(config: GPTConfig, model: str = "params", seq_len: int | None = None) -> list[float]:
    h, f, v, L = config.d_model, config.ffn_hidden, config.padded_vocab, config.n_layer
    s = seq_len or config.seq_len
    wpe = config.seq_len * h if config.position == "learned" else 0
    if model == "params":
        block = config.num_params() - v * h - wpe - (0 if config.tie_embeddings else v * h)
        norm = h * (2 if (config.norm == "layernorm" and config.bias) else 1)
        per_block = (block - norm) / L
        return [v * h + wpe] + [per_block] * L + [norm + v * h]
    if model == "flops":  # forward matmul FLOPs per token (x3 for fwd+bwd cancels in the split)
        fc = 2 * f if config.activation == "swiglu" else f
        qkv = config.q_size + 2 * config.kv_size
        per_block = 2 * (qkv * h + config.q_size * h + fc * h + f * h) + 2 * 2 * s * config.q_size  # + QK^T, PV
        return [h] + [per_block] * L + [2 * v * h]
    if model == "profile":
        return profile_unit_costs(config, seq_len=s)
    raise GptparConfigError(f"cost model {model!r} is unknown; expected one of {COST_MODELS} or a list of costs")


def profile_unit_costs(config: GPTConfig, batch: int = 2, seq_len: int | None = None, reps: int = 3) -> list[float]:
    """Measured forward + backward seconds of each unit (median of ``reps``) on this process's device."""
    from gptpar.models.gpt import GPT

    s = seq_len or config.seq_len
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (batch, s))

    def timed(fn) -> float:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[len(times[1:]) // 2]

    def emb():
        x = model.wte(idx)
        if config.position == "learned":
            x = x + model.wpe(torch.arange(s))
        x.sum().backward()

    x0 = torch.randn(batch, s, config.d_model, requires_grad=True)

    from gptpar.models.gpt import rope_for

    rope = rope_for(config, torch.arange(s), x0.device)

    def block(b):
        return lambda: b(x0, rope).sum().backward()

    def head():
        logits = model.lm_head(model.ln_f(x0))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()

    return [timed(emb)] + [timed(block(b)) for b in model.blocks] + [timed(head)]


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
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cand = max(best[k - 1][j], prefix[i] - prefix[j])
                if cand < best[k][i]:
                    best[k][i], cut[k][i] = cand, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def partition(config: GPTConfig, pp: int, v: int = 1, costs: str | list[float] = "params") -> Partition:
    """Balanced split of ``config``'s units over ``pp * v`` virtual stages."""
    names = unit_names(config)
    if config.n_layer < pp:
        raise GptparConfigError(f"n_layer={config.n_layer} is less than pp={pp} (every pipeline stage needs a layer)")
    c = list(costs) if not isinstance(costs, str) else unit_costs(config, costs)
    if len(c) != len(names):
        raise GptparConfigError(f"got {len(c)} unit costs for {len(names)} units ({names[0]}, ..., {names[-1]})")
    return Partition(tuple(names), tuple(float(x) for x in c), tuple(balance(c, pp * v)), pp, v)


def split(model, pp: int, blocks: str, rank: int | None = None, costs: list[float] | None = None):
    """Cut the block stack at attribute path ``blocks`` (e.g. ``"transformer.h"``) of any model into ``pp``
    balanced contiguous stages (by parameter count unless ``costs`` are given). Returns a list of
    ``nn.ModuleList`` (one per stage); with ``rank``, only that stage's, and the other stages' blocks are
    dropped from ``model`` (replaced by ``nn.Identity``) so their weights can be freed."""
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
