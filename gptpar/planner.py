"""``gptpar plan``: which layouts fit a model on a cluster, ranked by estimated step time.

Memory per GPU (bytes), for the rank holding the most:

* weights, gradients: the stage's parameters, tensor-sharded where gptpar shards them (exact count, the
  same rules as :class:`~gptpar.models.parallel_gpt.ParallelGPT`), times the parameter / gradient dtype size;
* optimizer: AdamW's two fp32 moments, plus fp32 master weights when parameters are not fp32; divided by
  dp with ZeRO-1 (Rajbhandari et al. 2020, "ZeRO", stage 1);
* activations: what gptpar's layers save for backward, per microbatch (below), times the microbatches a
  stage holds at once, from the schedule (``min(p - r, m)`` for 1F1B on rank r, ``m`` for GPipe, the
  simulation for the others).

Activations per layer, per microbatch of ``b`` sequences of ``s`` tokens (``s`` already divided by cp;
``t`` = tp; ``a`` heads; ``f`` MLP width; element size ``e``), gptpar's implementation — flash-style
attention (no ``s^2`` term), column-parallel inputs stored as shards with sequence parallelism::

    norms:        2 * (s' b h e + 2 s' b * 4)          s' = s/t with SP, else s (input + fp32 mean/rstd)
    q,k,v inputs: s'' b h e                            s'' = s/t with SP (shard kept), else s
    attention:    4 s b h/t e + s b a/t * 4            q, k, v, out + fp32 log-sum-exp
    attn proj:    s b h/t e
    MLP:          s'' b h e + 2 s b f/t e              fc input, GeLU input, proj input

For comparison, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", Table 2) count ``s b h (34 + 5 a s / h)`` bytes per layer for Megatron's fp16 layers without
parallelism, ``s b h (10 + 24/t + 5 a s/(h t))`` with TP and ``s b h (34/t + 5 a s/(h t))`` with TP+SP:
:func:`korthikanti_bytes`. The ``5 a s/h`` term is the stored softmax and dropout mask that flash
attention does not keep.

Full recomputation (``recompute``, gptpar's ``ParallelGPT(recompute=True)``) keeps one ``s' b h e`` input per
layer and costs one more forward (compute x 4/3).

Peak memory (:func:`peak_memory`, what ``gptpar plan`` fits into a GPU): the resident state plus what is
alive at the rank's peak: every in-flight microbatch's activations (the schedule simulated; chunks of a V
or interleaved placement weighted by their own activations), and the larger of the LM head's logits
(during the loss) and a block's backward working set; gradients only once they exist (data-parallel
buffers, or a forward after a backward). Checked against the tracked peak of real steps on 10 CPU
layouts (tests/test_planner.py, within 10%).

Time (:func:`step_time`): every GEMM at its shape's rate from a calibration (``gptpar plan --calibrate`` for
this machine; GPU presets carry a cuBLAS-shaped curve), flash attention, memory-bound elementwise work,
per-op overhead, recomputation; the slowest pipeline stage sets the pace; tp all-reduces exposed; cp
ring traffic, pipeline P2P and the dp reduction hidden as far as the device overlaps communication with
compute (as gptpar schedules them); the bubble from simulating the schedule. Checked against Megatron-LM's
published Table 1 (within 15% with one fitted scalar, :func:`table1_comparison`); bench/planner.py also
ranks real layouts on CPU processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import re
import sys
from dataclasses import dataclass

from gptpar.errors import GptparConfigError
from gptpar.models.gpt import GPTConfig, preset
from gptpar.parallel.tensor import local_length

# GPT-3 paper's shapes (Brown et al. 2020, Table 2.1): name -> (n_layer, d_model, n_head)
GPT3_SHAPES = {
    "125M": (12, 768, 12),
    "350M": (24, 1024, 16),
    "760M": (24, 1536, 16),
    "1.3B": (24, 2048, 16),
    "2.7B": (32, 2560, 32),
    "6.7B": (32, 4096, 32),
    "13B": (40, 5120, 40),
    "30B": (48, 7168, 56),
    "70B": (80, 8192, 64),
    "175B": (96, 12288, 96),
}


@dataclass(frozen=True)
class Plan:
    tp: int
    pp: int
    dp: int
    cp: int
    v: int
    micro_batch: int
    sequence_parallel: bool
    zero1: bool
    memory: dict  # bytes per GPU by kind
    time: dict  # seconds per step by kind
    recompute: bool = False
    schedule: str = "-"  # the pipeline schedule (pp > 1)

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def step_time(self) -> float:
        return sum(self.time.values())


_PARTS: dict = {}  # (config, pp, v, style) -> Partition: one split per shape, however many candidates use it


_PLANNING: list = []  # (config, key) while plan() runs over that config


def _config_key(config: GPTConfig) -> tuple:
    """A hashable key of every field (cheaper than ``repr``; computed once per :func:`plan`)."""
    if _PLANNING and _PLANNING[0][0] is config:
        return _PLANNING[0][1]
    return tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in config.__dict__.values())


def stage_units(config: GPTConfig, pp: int, rank: int, v: int = 1, style: str = "loop") -> list[tuple[int, int]]:
    """Units (embedding, blocks, head) of pp rank ``rank``'s chunks, split by gptpar's partitioner (cached)."""
    from gptpar.models.stages import partition

    key = (_config_key(config), pp, v, style)
    if key not in _PARTS:
        _PARTS[key] = partition(config, pp, v, style=style)
    part = _PARTS[key]
    return [part.units(rank, c) for c in range(v)]


_SIMS: dict = {}  # (schedule, p, m', v) -> SimResult


@dataclass(frozen=True)
class ScheduleStats:
    bubble_fraction: float
    peak_in_flight: list  # chunk-microbatches per rank
    live_trace: list | None = None  # per rank: per-chunk microbatches held after each forward
    forward_after_backward: list | None = None  # per rank: a forward runs after the first backward


def _sim_microbatches(schedule: str, p: int, m: int) -> int:
    """The microbatches to simulate: ``m``, or for long pipelines-of-microbatches a smaller count past
    which warm-up, cool-down and the in-flight peak no longer change (``2p``, kept valid for the
    schedule), so that planning a 1536-GPU cluster simulates small schedules."""
    cap = 2 * p
    if schedule == "gpipe" or m <= cap:
        return m
    if schedule == "interleaved":
        return cap - cap % p if m % p == 0 else m
    return cap


def schedule_sim(schedule: str, p: int, m: int, v: int) -> ScheduleStats:
    """The schedule simulated at unit costs (F = 1, B = 2, I = W = 1 per chunk; cached): its bubble fraction
    and the most chunk-microbatches each rank holds at once. Past ``2p`` microbatches the idle time is
    taken from a ``2p`` simulation (it is the warm-up and cool-down's) and the busy time scaled to ``m``.
    GPipe, 1F1B and interleaved 1F1B by their closed forms."""
    key = (schedule, p, m, v)
    if key not in _STATS:
        _STATS[key] = _schedule_stats(schedule, p, m, v)
    return _STATS[key]


_STATS: dict = {}


def _schedule_stats(schedule: str, p: int, m: int, v: int) -> ScheduleStats:
    from gptpar.parallel.pipeline.schedules import build, placement, simulate

    if schedule in ("gpipe", "1f1b", "zb-h1") or (schedule == "interleaved" and m % p == 0):
        # closed forms (the simulator reproduces them exactly: tests/test_pipeline.py); ZB-H1 idles 2(p-1)
        # units per rank beside 3m busy (F = I = W = 1) and holds what 1F1B holds
        bubble = (p - 1) / (v * m + p - 1) if schedule != "zb-h1" else 2 * (p - 1) / (3 * m + 2 * (p - 1))
        if schedule == "gpipe":
            return ScheduleStats(bubble, [m] * p, [((m,),)] * p, [False] * p)
        if schedule in ("1f1b", "zb-h1"):
            held = [min(p - r, m) for r in range(p)]
            return ScheduleStats(bubble, held, [((n,),) for n in held], [m > n for n in held])
        warm = [min((p - r - 1) * 2 + (v - 1) * p, v * m) for r in range(p)]
        return ScheduleStats(bubble, [min(w + 1, v * m) for w in warm], None, [v * m > w + 1 for w in warm])
    ms = _sim_microbatches(schedule, p, m)
    key = (schedule, p, ms, v)
    if key not in _SIMS:
        _SIMS[key] = simulate(build(schedule, p, ms, v), v, style=placement(schedule))
    sim = _SIMS[key]
    busy = sum(sim.busy) * m / ms
    idle = len(sim.busy) * sim.makespan - sum(sim.busy)
    trace = [_frontier(t) for t in sim.live_trace]
    return ScheduleStats(idle / (idle + busy), list(sim.peak_in_flight), trace, sim.forward_after_backward)


def param_count(config: GPTConfig, tp: int, units: list[tuple[int, int]]) -> int:
    """Parameters on one tp rank holding ``units`` (:meth:`GPTConfig.unit_params`, ParallelGPT's sharding)."""
    key = (_config_key(config), tp, tuple(units))
    if key not in _COUNTS:
        _COUNTS[key] = _param_count(config, tp, units)
    return _COUNTS[key]


_COUNTS: dict = {}


def _param_count(config: GPTConfig, tp: int, units: list[tuple[int, int]]) -> int:
    u, L = config.unit_params(tp), config.n_layer
    total = 0
    for a, b in units:  # a chunk holding the head but not the embedding keeps its own copy of a tied matrix
        for i in range(a, b):
            if i == 0:
                total += u["embedding"]
            elif i == L + 1:
                total += u["norm"] + (0 if (config.tie_embeddings and a == 0) else u["head"])
            else:
                total += u["block"]
    return total


def activation_bytes(
    config: GPTConfig, units, tp: int, cp: int, b: int, s: int, sp: bool, elem: int, recompute: bool = False
) -> int:
    """Bytes gptpar's layers save for backward for one microbatch on one rank holding ``units``. With
    ``recompute`` a block keeps only its input (``s' b h e``; the block being recomputed is transient)."""
    h, f, a, V = config.d_model, config.ffn_hidden, config.n_head, config.padded_vocab
    s = s // cp
    sn = s // tp if sp and tp > 1 else s  # norm / residual region
    sc = s // tp if sp and tp > 1 else s  # column-parallel inputs kept
    norm = sn * b * h * elem + (2 * sn * b * 4 if config.norm == "layernorm" else sn * b * 4)
    fc_saved = 2 * s * b * (f // tp) * elem if config.activation == "gelu" else 3 * s * b * (f // tp) * elem
    q_local = config.q_size // tp
    kv_local = (local_length(config.q_size + 2 * config.kv_size, config.qkv_chunks, tp) - q_local) // 2  # GQA: small
    block = (
        2 * norm
        + sc * b * h * elem  # qkv input
        + (2 * q_local + 2 * kv_local) * s * b * elem
        + s * b * (a // tp) * 4  # q, k, v, out, lse
        + s * b * q_local * elem  # attn proj input
        + sc * b * h * elem
        + fc_saved  # fc input, activation input, mlp proj input
    )
    total = 0
    L = config.n_layer
    for lo, hi in units:
        if lo == 0:
            total += s * b * 8  # token ids (int64) for the embedding backward
        if hi == L + 2:
            # ln_f, lm_head input, fp32 softmax of the vocab shard in the loss (+ small index tensors)
            total += norm + sc * b * h * elem + s * b * (V // tp) * 4 + s * b * 8 * 2 + s * b
        blocks = max(0, min(hi, L + 1) - max(lo, 1))
        total += blocks * (sn * b * h * elem if recompute else block)
    return total


def korthikanti_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False) -> float:
    """Megatron's activation bytes per layer (fp16), Korthikanti et al. 2022, Table 2."""
    if t == 1:
        return s * b * h * (34 + 5 * a * s / h)
    if sp:
        return s * b * h * (34 / t + 5 * a * s / (h * t))
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def in_flight(schedule: str, p: int, r: int, m: int, v: int) -> float:
    """Microbatches' activations rank r holds at once, in units of the whole rank's layers (a chunk holds
    ``1/v`` of them): the schedule's simulated peak (:func:`schedule_sim`)."""
    if p == 1:
        return 1
    return schedule_sim(schedule, p, m, v).peak_in_flight[r] / v


def _weighted_peak(trace: tuple, per_chunk: tuple) -> float:
    return max(sum(k * b for k, b in zip(held, per_chunk, strict=True)) for held in trace)


def _frontier(trace) -> tuple:
    """The held-microbatch vectors no other one dominates: whatever each chunk's (positive) activation
    bytes, the weighted peak is among them (a 1F1B rank's ``(1,), (2,), ... (n,)`` reduces to ``(n,)``)."""
    vecs = sorted(set(map(tuple, trace)), reverse=True)
    out: list[tuple] = []
    for t in vecs:
        if not any(all(a >= b for a, b in zip(o, t, strict=True)) for o in out):
            out.append(t)
    return tuple(out)


def memory(
    config: GPTConfig,
    tp=1,
    pp=1,
    dp=1,
    cp=1,
    v=1,
    micro_batch=1,
    m=1,
    sp=False,
    zero1=False,
    param_bytes=2,
    grad_bytes=2,
    act_bytes=2,
    schedule="1f1b",
    rank=0,
    seq_len=None,
    recompute=False,
) -> dict:
    """Memory per GPU on pp rank ``rank`` by kind, in bytes."""
    from gptpar.parallel.pipeline.schedules import placement

    units = stage_units(config, pp, rank, v, placement(schedule)) if pp > 1 else [(0, config.n_layer + 2)]
    n = param_count(config, tp, units)
    # AdamW's fp32 moments, plus fp32 masters when the parameters are not fp32 (ZeroAdamW always keeps them)
    optimizer = n * (8 + (4 if (param_bytes != 4 or zero1) else 0))
    if zero1:  # sharded over dp x cp, the gradient-reduction group
        optimizer = math.ceil(optimizer / (dp * cp))
    per_chunk = [
        activation_bytes(config, [u], tp, cp, micro_batch, seq_len or config.seq_len, sp, act_bytes, recompute)
        for u in units
    ]
    if pp == 1:
        acts = per_chunk[0]  # one microbatch at a time (gradient accumulation frees each before the next)
    else:
        stats = schedule_sim(schedule, pp, m, v)
        if stats.live_trace is not None:  # each chunk's microbatches weighted by its own activations
            acts = _weighted_peak(stats.live_trace[rank], tuple(per_chunk))
        else:
            acts = sum(per_chunk) * stats.peak_in_flight[rank] / v
    return {
        "weights": n * param_bytes,
        "gradients": n * grad_bytes,
        "optimizer": optimizer,
        "activations": int(acts),
    }


def peak_memory(
    config: GPTConfig,
    tp=1,
    pp=1,
    dp=1,
    cp=1,
    v=1,
    micro_batch=1,
    m=1,
    sp=False,
    zero1=False,
    param_bytes=2,
    grad_bytes=2,
    act_bytes=2,
    schedule="1f1b",
    rank=0,
    seq_len=None,
    recompute=False,
) -> dict:
    """What is alive on pp rank ``rank`` at its peak, by kind, and ``"peak"``, their sum (bytes): the
    resident state (:func:`memory`) plus the transient the peak happens in. That peak is the last forward
    before a backward, when every in-flight microbatch's activations are held; on the rank with the LM
    head the loss is being computed then, so the logits (``s b V/t`` in the activation dtype, plus their
    fp32 copy when that is narrower) are alive beside the fp32 softmax the loss saves."""
    from gptpar.parallel.pipeline.schedules import placement

    parts = memory(
        config,
        tp,
        pp,
        dp,
        cp,
        v,
        micro_batch,
        m,
        sp,
        zero1,
        param_bytes,
        grad_bytes,
        act_bytes,
        schedule,
        rank,
        seq_len,
        recompute,
    )
    units = stage_units(config, pp, rank, v, placement(schedule)) if pp > 1 else [(0, config.n_layer + 2)]
    has_head = any(b == config.n_layer + 2 for _, b in units)
    s = (seq_len or config.seq_len) // cp
    tokens = s * micro_batch
    logits = tokens * (config.padded_vocab // tp)
    head = logits * act_bytes + (logits * 4 if act_bytes != 4 else 0) if has_head else 0
    # a block's backward working set: the MLP's hidden-size gradients and the residual stream's in and out
    work = 3 * tokens * (config.ffn_hidden // tp) * act_bytes + 2 * tokens * config.d_model * act_bytes
    # gradients exist at the peak when data parallelism keeps them in buffers, or once a backward has run
    # before a later forward (gradient accumulation, a pipeline's steady state); not under GPipe's
    # all-forwards-first without data parallelism (the trainer frees them after each step then)
    if pp > 1:
        after = schedule_sim(schedule, pp, m, v).forward_after_backward[rank]
    else:
        after = m > 1
    if not (dp * cp > 1 or zero1 or after):
        parts["gradients"] = 0
    parts["transient"] = max(head, work)
    parts["peak"] = sum(parts.values())
    return parts


def parse_size(text: str) -> float:
    """Bytes (or bytes/s, FLOP/s) from ``80GB`` (decimal: 80e9), ``80GiB`` (binary: 80 * 2**30), ``450GB/s``,
    ``13B``. GB and GiB differ by 7%: a GPU sold as "80GB" has 80 GiB (use ``--gpu h100``)."""
    mt = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?(/S)?\s*", text.upper())
    if not mt:
        raise GptparConfigError(f"cannot read a size from {text!r} (e.g. 80GB, 80GiB, 13B, 450GB/s)")
    prefixes = "KMGT"
    power = prefixes.index(mt.group(2)) + 1 if mt.group(2) else 0
    base = 1024 if mt.group(3) else 1000
    return float(mt.group(1)) * base**power


@dataclass(frozen=True)
class GPU:
    """A GPU as the planner sees it: usable memory, dense bf16 peak, per-GPU NVLink and network bandwidth
    (one direction), GPUs per node."""

    name: str
    memory: float  # bytes, as nvidia-smi reports the total
    peak_flops: float
    nvlink: float  # bytes/s
    network: float  # bytes/s per GPU
    per_node: int = 8


GIB = 2**30
GPUS = {  # NVIDIA's data sheets (dense bf16); memory as nvidia-smi reports it (MiB -> bytes)
    "a100": GPU("A100-SXM 80GB", 81920 * 2**20, 312e12, 300e9, 25e9),  # HDR 200 Gb/s per GPU
    "a100-40gb": GPU("A100-SXM 40GB", 40960 * 2**20, 312e12, 300e9, 25e9),
    "h100": GPU("H100-SXM 80GB", 81559 * 2**20, 989e12, 450e9, 50e9),  # NDR 400 Gb/s per GPU
    "h200": GPU("H200-SXM 141GB", 143771 * 2**20, 989e12, 450e9, 50e9),
    "b200": GPU("B200 192GB", 183359 * 2**20, 2250e12, 900e9, 50e9),
}


# ---------------------------------------------------------------------------------------------- time model
@dataclass(frozen=True)
class Calibration:
    """What a device achieves, for the time model: GEMM FLOP/s as a function of the GEMM's size (the
    geometric mean of M, N, K; interpolated in log space, clamped at the ends), memory bandwidth for the
    elementwise work, and the latency of one collective or P2P message. ``gptpar plan --calibrate``
    measures this machine's; the GPU presets carry a curve shaped like published cuBLAS bf16 results."""

    device: str
    gemm: tuple[tuple[float, float], ...]  # (geometric-mean dimension, FLOP/s), increasing dimension
    mem_bw: float  # bytes/s
    latency: float = 10e-6  # seconds per message
    share: float = 1.0  # fraction of the device one rank gets (CPU processes sharing cores)
    scale: float = 1.0  # end-to-end efficiency over the kernels' (launches, framework): fitted once
    op_overhead: float = 5e-6  # seconds of framework/launch time per op, whatever its size
    overlap: float = 1.0  # share of communication that runs beside compute (GPU: own engines; CPU: ~0)
    # processes sharing cores (share < 1): seconds per message when that many processes are coupled by
    # per-layer collectives, measured between compute phases (a message waits for every coupled process
    # to be scheduled; empty: ``latency`` for every size)
    group_latency: tuple[tuple[int, float], ...] = ()

    def latency_of(self, coupled: int) -> float:
        """Seconds per message among ``coupled`` processes: the measured size at or below it (the
        smallest measured one below all of them)."""
        if not self.group_latency:
            return self.latency
        pts = sorted(self.group_latency)
        return next((t for g, t in reversed(pts) if g <= coupled), pts[0][1])

    def gemm_rate(self, m: float, n: float, k: float) -> float:
        g = max(1.0, (m * n * k) ** (1 / 3))
        pts, f = self.gemm, self.share * self.scale
        if g <= pts[0][0]:
            return pts[0][1] * f
        for (g0, r0), (g1, r1) in itertools.pairwise(pts):
            if g <= g1:
                w = math.log(g / g0) / math.log(g1 / g0)
                return (r0 + w * (r1 - r0)) * f
        return pts[-1][1] * f

    def mem_time(self, nbytes: float) -> float:
        return nbytes / (self.mem_bw * self.share * self.scale)

    def gemm_time(self, m: float, n: float, k: float) -> float:
        return 2 * m * n * k / self.gemm_rate(m, n, k)


def gpu_calibration(gpu: GPU) -> Calibration:
    """A GPU preset's curve: the share of dense peak a bf16 GEMM of that size reaches (typical cuBLAS)."""
    eff = ((256, 0.20), (512, 0.42), (1024, 0.62), (2048, 0.74), (4096, 0.78), (8192, 0.79), (16384, 0.80))
    bw = {"a100": 1.8e12, "a100-40gb": 1.4e12, "h100": 3.0e12, "h200": 4.3e12, "b200": 7.0e12}
    key = next((k for k, g in GPUS.items() if g == gpu), "h100")
    return Calibration(gpu.name, tuple((d, e * gpu.peak_flops) for d, e in eff), bw[key], 10e-6)


def calibrate(device: str = "cpu", threads: int = 1, dtype=None, reps: int = 3) -> Calibration:
    """Measure this machine: matmul FLOP/s at sizes 64..2048 (CPU, ``threads`` threads: one rank's share) or
    up to 8192 (CUDA), and copy bandwidth."""
    import time

    import torch

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cpu":
        torch.set_num_threads(threads)
    sizes = (64, 128, 256, 512, 1024, 2048) + ((4096, 8192) if device == "cuda" else ())
    points = []

    def timed(fn):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        points.append((float(n), 2 * n**3 / timed(lambda a=a, b=b: a @ b)))
    x = torch.randn(1 << 24, device=device)
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / timed(lambda: y.copy_(x))
    tiny = torch.ones(1, device=device)
    op = timed(lambda: [tiny.add(1) for _ in range(100)]) / 100
    name = f"{device} ({threads} thread(s))" if device == "cpu" else device
    # CPU processes compute and communicate on the same cores: nothing overlaps
    return Calibration(name, tuple(points), bw, 50e-6, op_overhead=op, overlap=0.0 if device == "cpu" else 1.0)


_STAGES: dict = {}


def _stage_blocks(config: GPTConfig, pp: int, v: int, style: str) -> list[tuple[int, bool]]:
    """Per pp rank: its transformer blocks and whether it holds the LM head (cached)."""
    key = (repr(config), pp, v, style)
    if key not in _STAGES:
        L, out = config.n_layer, []
        for r in range(pp):
            units = stage_units(config, pp, r, v, style)
            n_blocks = sum(max(0, min(b, L + 1) - max(a, 1)) for a, b in units)
            out.append((n_blocks, any(b == L + 2 for _, b in units)))
        _STAGES[key] = out
    return _STAGES[key]


def step_time(
    config: GPTConfig,
    cal: Calibration,
    tp=1,
    pp=1,
    dp=1,
    cp=1,
    v=1,
    micro_batch=1,
    m=1,
    sp=False,
    recompute=False,
    schedule="1f1b",
    intra_bw=450e9,
    inter_bw=50e9,
    gpus_per_node=8,
    elem=2,
    overlap_dp=True,
    attention="flash",
    split="gptpar",
    reduce_bytes=None,
) -> dict:
    """Seconds per step by kind, as gptpar runs it: ``compute`` (every GEMM at its shape's calibrated rate,
    flash attention, the memory-bound elementwise work, recomputation), ``tp`` (the per-layer all-reduces
    or SP gather/scatter, exposed), ``cp`` (ring K/V traffic beyond what the attention compute hides),
    ``pp`` (P2P on the fill and drain, the rest overlapped), ``dp`` (the gradient reduction beyond what the
    last microbatch's backward hides), ``bubble`` (the schedule simulated) and ``optimizer``.
    ``attention="materialized"``: attention as Megatron ran it in 2021 (scores, softmax and dropout
    written out: ``~10 a s^2 b`` bytes of traffic per layer forward, Korthikanti et al.'s ``5 a s^2`` stored
    bytes read and written), for comparing with published results of that code. ``split``: ``"gptpar"``
    (its balanced partition; the slowest stage sets the pace) or ``"even"`` (``L/pp`` layers per stage,
    the LM head on the last one, as Megatron splits)."""
    h, f, L, V = config.d_model, config.ffn_hidden, config.n_layer, config.padded_vocab
    s = config.seq_len // cp
    T = s * micro_batch  # tokens of a microbatch on this rank
    q, kv = config.q_size // tp, config.kv_size // max(1, tp if config.n_kv_head % tp == 0 else 1)
    up = f * (2 if config.activation == "swiglu" else 1) // tp
    g = cal.gemm_time
    gemms = g(T, q + 2 * kv, h) + g(T, h, q) + g(T, up, h) + g(T, h, f // tp)
    # attention: QK^T and PV over the whole sequence's keys, causal half
    hd = config.head_dim
    if attention == "flash":
        attn = 2 * (config.n_head // tp) * micro_batch * g(s, config.seq_len / 2, hd)
    else:  # full score matrices through memory
        attn = 2 * (config.n_head // tp) * micro_batch * g(s, config.seq_len, hd)
        attn += cal.mem_time(10 * (config.n_head // tp) * s * config.seq_len * micro_batch)
    # norms, residual adds, bias + activation, dropout, layout copies: bytes moved per token and layer
    elementwise = cal.mem_time((16 + 16 * f / (4 * h) / tp) * T * h * elem)
    ops = 30 * cal.op_overhead / (cal.share * cal.scale)  # ~30 ops per layer forward, twice that backward
    layer_f = gemms + attn + elementwise + ops
    layer_b = 2 * gemms + 2.5 * attn + 2 * elementwise + 2 * ops
    head_f = g(T, V / tp, h) + cal.mem_time(3 * T * (V / tp) * 4)
    # the slowest stage sets the pipeline's pace: per stage, its layers and (last) the LM head
    if pp == 1:
        stages = [(L, True)]
    elif split == "even":
        stages = [(L / pp, r == pp - 1) for r in range(pp)]
    else:
        from gptpar.parallel.pipeline.schedules import placement

        stages = _stage_blocks(config, pp, v, placement(schedule))

    def stage_mb(n_layers, has_head):
        f_ = n_layers * layer_f + (head_f if has_head else 0.0)
        b_ = n_layers * layer_b + (2 * head_f if has_head else 0.0)
        return f_, b_ + (n_layers * layer_f if recompute else 0.0)

    f_mb, b_mb = max((stage_mb(*st) for st in stages), key=sum)
    per_mb = f_mb + b_mb
    layers = max(n for n, _ in stages)
    # tensor and context parallel ranks exchange every layer, synchronously: on shared cores a message
    # waits for all of tp x cp coupled processes to be scheduled (pipeline P2P and the data-parallel
    # reduction are asynchronous and buffered: they couple only their own pair or group)
    coupled = tp * cp
    # tensor parallel: 2 all-reduces forward, 2 backward per layer (+2 when recomputing), T h e bytes each
    ar = cal.latency_of(coupled) + 2 * (tp - 1) / tp * T * h * elem / intra_bw if tp > 1 else 0.0
    tp_mb = layers * ar * (6 if recompute else 4)
    # context parallel: (cp-1) K/V blocks forward, K/V + fp32 dK/dV back, per layer (3 messages a step of
    # the ring); hidden behind attention as far as the device overlaps
    if cp > 1:
        cp_bw = intra_bw if tp * cp <= gpus_per_node else inter_bw
        kv_bytes = 2 * T * kv * elem
        comm = (cp - 1) * (3 * cal.latency_of(coupled) + (kv_bytes + kv_bytes * (1 + 4 / elem)) / cp_bw)
        cp_mb = layers * max(0.0, comm - cal.overlap * 3.5 * attn)
    else:
        cp_mb = 0.0
    compute = m * per_mb
    if pp > 1:
        bub = schedule_sim(schedule, pp, m, v).bubble_fraction
        # a device to itself idles through the bubble. Processes sharing cores (share < 1) run at full
        # speed while others wait: the step is the longer of the cores' total work (``compute``, at the
        # shared rate) and the schedule's critical path at full speed (share * compute / (1 - bubble))
        bubble = compute * max(0.0, cal.share / (1 - bub) - 1) if cal.share < 1 else compute * bub / (1 - bub)
        pp_bw = inter_bw if tp * cp * dp >= gpus_per_node else intra_bw
        p2p = cal.latency_of(2) + T * h * elem / pp_bw
        # fill and drain; steady-state transfers overlap compute (as far as the device overlaps at all)
        pp_time = 2 * (pp - 1) * v * p2p + (1 - cal.overlap) * 2 * m * v * p2p
    else:
        bubble = pp_time = 0.0
    n_local = config.num_params() / (tp * pp)
    gsize = dp * cp
    if gsize > 1:
        dp_bw = intra_bw if tp * cp * dp <= gpus_per_node else inter_bw
        red = cal.latency_of(gsize) * 4 + 2 * (gsize - 1) / gsize * n_local * (reduce_bytes or elem) / dp_bw
        dp_time = max(0.1 * red, red - cal.overlap * b_mb) if overlap_dp else red
    else:
        dp_time = 0.0
    optimizer = cal.mem_time(n_local * 16 * 2)  # AdamW: read and write weights, grads, two moments
    return {
        "compute": compute,
        "tp": m * tp_mb,
        "cp": m * cp_mb,
        "pp": pp_time,
        "dp": dp_time,
        "bubble": bubble,
        "optimizer": optimizer,
    }


# Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"),
# Table 1, on A100-80GB (DGX A100 nodes): billions of parameters, heads, hidden, layers, tp, pp, GPUs,
# global batch, achieved TFLOP/s per GPU (their FLOP count: with recomputation, vocab 51200, seq 2048).
MEGATRON_TABLE1 = (
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)


def table1_comparison(cal: Calibration | None = None, fit: bool = True) -> list[dict]:
    """Predicted TFLOP/s per GPU for every Table 1 row, run as Megatron ran it (1F1B, micro-batch 1, full
    recomputation, attention through memory, even layer split, NVLink at NCCL's ~230 GB/s bus bandwidth,
    25 GB/s of InfiniBand per GPU), beside the published number. ``fit``: one scalar for the device's
    end-to-end efficiency (``Calibration.scale``), the geometric mean of published over predicted across
    the rows: the only number fitted; the curve's shape, the layouts and everything else are given."""
    import dataclasses

    cal = cal or gpu_calibration(GPUS["a100"])

    def predict(c):
        out = []
        for params, a, h, L, tp, pp, n, batch, published in MEGATRON_TABLE1:
            cfg = GPTConfig(vocab_size=51200, seq_len=2048, n_layer=L, n_head=a, d_model=h)
            dp = n // (tp * pp)
            m = batch // dp
            t = step_time(
                cfg,
                c,
                tp,
                pp,
                dp,
                1,
                1,
                1,
                m,
                False,
                True,
                "1f1b",
                230e9,
                25e9,
                8,
                attention="materialized",
                overlap_dp=False,
                split="even",
            )
            flops = 96 * batch * 2048 * L * h * h * (1 + 2048 / (6 * h) + 51200 / (16 * L * h))
            tflops = flops / sum(t.values()) / n / 1e12
            out.append(
                {
                    "params_b": params,
                    "tp": tp,
                    "pp": pp,
                    "dp": dp,
                    "gpus": n,
                    "published": published,
                    "predicted": tflops,
                    "time": t,
                }
            )
        return out

    rows = predict(cal)
    if fit:
        k = math.exp(sum(math.log(r["published"] / r["predicted"]) for r in rows) / len(rows))
        rows = predict(dataclasses.replace(cal, scale=cal.scale * k))
    return rows


def model_for(params: str, seq: int) -> GPTConfig:
    key = params.strip().upper()
    for name, (L, h, a) in GPT3_SHAPES.items():
        if name.upper() == key:
            return GPTConfig(vocab_size=50304, seq_len=seq, n_layer=L, n_head=a, d_model=h)
    try:
        return preset(params, seq_len=seq)
    except GptparConfigError:
        raise GptparConfigError(f"--params {params!r}: expected one of {list(GPT3_SHAPES)} or a preset") from None


def model_from_hf(path: str, seq: int) -> GPTConfig:
    """The GPTConfig of a Hugging Face model directory's ``config.json`` (GPT-2, Llama, Qwen2/3, Mistral
    shapes: GQA, SwiGLU, untied heads), at sequence length ``seq``. Reads only the config."""
    import json
    import os

    from gptpar.models.hf import config_from_hf

    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise GptparConfigError(f"--from-hf {path!r}: cannot read config.json ({e})") from None
    return config_from_hf(hf, seq_len=seq)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


PLAN_SCHEDULES = ("1f1b", "interleaved", "zb-h1", "zbv")


def plan(
    config: GPTConfig,
    gpus: int,
    gpu_mem: float,
    global_batch: int,
    gpus_per_node: int = 8,
    intra_bw: float = 450e9,
    inter_bw: float = 50e9,
    cal: Calibration | None = None,
    top: int | None = 10,
    schedules: tuple[str, ...] = PLAN_SCHEDULES,
    micro_batches: tuple[int, ...] = (1, 2, 4, 8),
    elem: int = 2,
) -> list[Plan]:
    """Every layout that fits (its peak memory, :func:`peak_memory`, within ``gpu_mem``), ranked by the
    step time :func:`step_time` predicts with ``cal`` (default: an H100's curve). Pipelines are tried under
    each of ``schedules`` (1F1B, interleaved with v=2, ZB-H1, ZB-V, ...): their in-flight activations and
    bubbles come from simulating the schedule itself."""
    cal = cal or gpu_calibration(GPUS["h100"])
    s, L, a = config.seq_len, config.n_layer, config.n_head
    _PLANNING.clear()
    _PLANNING.append((config, _config_key(config)))  # the partition cache's key, computed once
    try:
        out = []
        for tp, pp, cp in itertools.product(divisors(gpus), divisors(gpus), [1, 2, 4, 8]):
            if tp > gpus_per_node or gpus_per_node % tp or tp * pp * cp > gpus or gpus % (tp * pp * cp):
                continue  # (a tp group stays inside a node)
            dp = gpus // (tp * pp * cp)
            if a % tp or config.n_kv_head % tp and tp % config.n_kv_head or config.padded_vocab % tp:
                continue
            if L < pp or s % (2 * cp) and cp > 1:
                continue
            n_floor = config.num_params() / (tp * pp)  # the fewest parameters the fullest rank can hold
            for mb, sched, sp, zero1, rc in itertools.product(
                micro_batches, schedules if pp > 1 else ("1f1b",), [False, True], [False, True], [False, True]
            ):
                v = 2 if sched in ("interleaved", "zbv", "dualpipev") else 1
                if (sp and tp == 1) or (zero1 and dp * cp == 1) or global_batch % (dp * mb):
                    continue
                m = global_batch // (dp * mb)
                if L + 2 < pp * v or (sched == "interleaved" and m % pp) or (sched == "dualpipev" and m < 2 * pp):
                    continue
                # every rank holds at least its share of the weights and their optimizer state: most candidates
                # of a large model fail on that alone, before any schedule is simulated
                opt_bytes = 8 + (4 if (elem != 4 or zero1) else 0)
                if n_floor * (elem + opt_bytes / (dp * cp if zero1 else 1)) > gpu_mem:
                    continue
                mem = {k: 0 for k in ("weights", "gradients", "optimizer", "activations", "transient")}
                for r in {0, pp - 1} if pp > 1 else {0}:  # the first and last stages hold the most
                    mr = peak_memory(
                        config, tp, pp, dp, cp, v, mb, m, sp, zero1, elem, elem, elem, sched, r, recompute=rc
                    )
                    mr.pop("peak")
                    if sum(mr.values()) > sum(mem.values()):
                        mem = mr
                if sum(mem.values()) > gpu_mem:
                    continue
                time = step_time(
                    config, cal, tp, pp, dp, cp, v, mb, m, sp, rc, sched, intra_bw, inter_bw, gpus_per_node, elem
                )
                out.append(Plan(tp, pp, dp, cp, v, mb, sp, zero1, mem, time, rc, sched if pp > 1 else "-"))
    finally:
        _PLANNING.clear()
    out.sort(key=lambda p: (round(p.step_time, 9), p.total_memory))  # ties: the smaller footprint first
    return out[:top] if top else out


def explain(plans: list[Plan]) -> list[str]:
    """Why the first plan wins: against the runner-up of a different (tp, pp, dp, cp), the time components
    that differ most, and the memory the winner needs."""
    if not plans:
        return []
    best = plans[0]
    lines = [
        f"winner: tp={best.tp} pp={best.pp} dp={best.dp} cp={best.cp} ({best.schedule}), "
        f"{best.step_time:.3f} s/step, {best.total_memory / GIB:.1f} GiB/GPU "
        f"(weights {best.memory['weights'] / GIB:.1f}, gradients {best.memory['gradients'] / GIB:.1f}, "
        f"optimizer {best.memory['optimizer'] / GIB:.1f}, activations {best.memory['activations'] / GIB:.1f}, "
        f"transient {best.memory['transient'] / GIB:.1f} at the peak)"
    ]
    other = next((p for p in plans[1:] if (p.tp, p.pp, p.dp, p.cp) != (best.tp, best.pp, best.dp, best.cp)), None)
    if other is None:
        return lines
    diffs = sorted(((other.time[k] - best.time[k], k) for k in best.time), reverse=True)
    parts = [f"{k} {other.time[k]:.3f} -> {best.time[k]:.3f} s" for d, k in diffs if abs(d) > 1e-4][:3]
    lines.append(
        f"beats tp={other.tp} pp={other.pp} dp={other.dp} cp={other.cp} ({other.schedule}) by "
        f"{other.step_time - best.step_time:.3f} s/step: " + ", ".join(parts)
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="gptpar plan",
        description="Rank the parallel layouts that fit a model on a cluster. Sizes: GB = 1e9 bytes, GiB = 2^30.",
    )
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--params", default=None, help=f"GPT-3 size ({', '.join(GPT3_SHAPES)}) or a preset name")
    what.add_argument("--model", default=None, help="a gptpar preset (e.g. llama-tiny, gpt2)")
    what.add_argument("--from-hf", default=None, help="a Hugging Face model directory (reads config.json only)")
    for flag, kind in (("n-layer", int), ("d-model", int), ("n-head", int), ("n-kv-head", int), ("ffn-hidden", int)):
        ap.add_argument(f"--{flag}", type=kind, default=None, help="override the model's shape")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model's)")
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--gpu", choices=sorted(GPUS), default=None, help="a GPU preset: memory, peak, links")
    ap.add_argument(
        "--gpu-mem", default=None, help="memory per GPU, e.g. 80GiB or 40GB (default: the --gpu's, else 80GiB)"
    )
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--gpus-per-node", type=int, default=None)
    ap.add_argument("--link", default=None, help="per-GPU bandwidths, e.g. nvlink:450GB/s,ib:50GB/s")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak, scaling the --gpu's GEMM curve")
    ap.add_argument("--calibration", default=None, help="a JSON written by --calibrate (instead of the --gpu's)")
    ap.add_argument(
        "--calibrate", default=None, metavar="OUT.json", help="measure this machine (GEMMs, memory) into OUT.json"
    )
    ap.add_argument("--schedules", default=",".join(PLAN_SCHEDULES), help="pipeline schedules to consider")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    if args.calibrate:
        import json

        import torch

        cal = calibrate("cuda" if torch.cuda.is_available() else "cpu")
        with open(args.calibrate, "w") as f:
            json.dump(dataclasses.asdict(cal), f, indent=1)
        print(
            f"calibrated {cal.device}: GEMM FLOP/s by size {[(int(d), f'{r:.3g}') for d, r in cal.gemm]}, "
            f"memory {cal.mem_bw / 1e9:.1f} GB/s -> {args.calibrate}"
        )
        return
    try:
        gpu = GPUS[args.gpu or "h100"]
        intra, inter = gpu.nvlink, gpu.network
        if args.link:
            links = dict(x.split(":") for x in args.link.split(","))
            intra = parse_size(links["nvlink"]) if "nvlink" in links else intra
            inter = parse_size(links["ib"]) if "ib" in links else inter
        gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else gpu.memory
        cal = gpu_calibration(gpu)
        if args.peak_tflops:
            cal = dataclasses.replace(
                cal, gemm=tuple((d, r * args.peak_tflops * 1e12 / gpu.peak_flops) for d, r in cal.gemm)
            )
        if args.calibration:
            import json

            with open(args.calibration) as f:
                raw = json.load(f)
            cal = Calibration(**{**raw, "gemm": tuple(tuple(x) for x in raw["gemm"])})
        if args.from_hf:
            config, label = model_from_hf(args.from_hf, args.seq), args.from_hf
        elif args.model:
            config, label = preset(args.model, seq_len=args.seq), args.model
        else:
            label = args.params or "13B"
            config = model_for(label, args.seq)
        over = {k: getattr(args, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "ffn_hidden")}
        over = {k: v for k, v in over.items() if v is not None}
        if args.vocab:
            over["vocab_size"] = args.vocab
        if over:
            reset = {"head_dim": None} if {"d_model", "n_head"} & set(over) else {}
            if "n_head" in over and "n_kv_head" not in over and config.n_kv_head == config.n_head:
                reset["n_kv_head"] = None
            if "d_model" in over and "ffn_hidden" not in over:
                reset["ffn_hidden"] = None
            config = dataclasses.replace(config, **{**reset, **over})
        schedules = tuple(s.strip() for s in args.schedules.split(",") if s.strip())
        from gptpar.parallel.pipeline.schedules import SCHEDULES

        bad = [s for s in schedules if s not in SCHEDULES]
        if bad:
            raise GptparConfigError(f"--schedules: {bad} unknown; expected some of {SCHEDULES}")
        plans = plan(
            config,
            args.gpus,
            gpu_mem,
            args.global_batch,
            args.gpus_per_node or gpu.per_node,
            intra,
            inter,
            cal,
            None,
            schedules,
        )
    except (GptparConfigError, ValueError, KeyError) as e:
        print(f"gptpar plan: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"{label}: {config.num_params() / 1e9:.2f}B parameters, L={config.n_layer} h={config.d_model} "
        f"heads={config.n_head}/{config.n_kv_head} kv, seq {args.seq}, global batch {args.global_batch}, "
        f"{args.gpus} x {(gpu.name + ' ') if not args.gpu_mem else ''}{gpu_mem / GIB:.1f} GiB"
    )
    if not plans:
        print("no layout fits: add GPUs or memory, or shorten the sequence / micro-batch")
        return
    print(
        f"{'tp':>3} {'pp':>3} {'dp':>3} {'cp':>3} {'schedule':>11} {'mb':>3} {'SP':>3} {'Z1':>3} {'RC':>3} {'GiB':>6} "
        f"{'w':>5} {'g':>5} {'opt':>5} {'act':>5} {'tmp':>5} {'step s':>7} {'comp':>6} {'tp':>5} {'cp':>5} {'dp':>5} {'pp':>5} {'bubble':>6}"
    )
    for p in plans[: args.top]:
        m, t = p.memory, p.time
        sched = p.schedule + (f" v{p.v}" if p.v > 1 else "")
        print(
            f"{p.tp:3d} {p.pp:3d} {p.dp:3d} {p.cp:3d} {sched:>11} {p.micro_batch:3d} {'y' if p.sequence_parallel else '-':>3} "
            f"{'y' if p.zero1 else '-':>3} {'y' if p.recompute else '-':>3} {p.total_memory / GIB:6.1f} {m['weights'] / GIB:5.1f} "
            f"{m['gradients'] / GIB:5.1f} {m['optimizer'] / GIB:5.1f} {m['activations'] / GIB:5.1f} {m['transient'] / GIB:5.1f} {p.step_time:7.2f} "
            f"{t['compute']:6.2f} {t['tp']:5.2f} {t['cp']:5.2f} {t['dp']:5.2f} {t['pp']:5.2f} {t['bubble']:6.2f}"
        )
    for line in explain(plans):
        print(line)
