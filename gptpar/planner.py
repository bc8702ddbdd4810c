"""``gptpar plan``: which layouts fit a model on a cluster, ranked by estimated step time.

Memory per GPU (bytes), for the rank holding the most:

* weights, gradients: the stage's parameters, tensor-sharded where gptpar shards them (exact count, the
  same rules as :class:`~gptpar.models.parallel_gpt.ParallelGPT`), times the parameter / gradient dtype size;
* optimizer: AdamW's two fp32 moments, plus fp32 master weights when parameters are not fp32; divided by
  dp with ZeRO-1 (Rajbhandari et al. 2020, "ZeRO", stage 1);
* activations: what gptpar's layers save for backward, per microbatch (below), times the microbatches a
  stage holds at once: ``min(p - r, m)`` for 1F1B on rank r (Narayanan et al. 2021), ``m`` for GPipe.

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

Time: compute at an assumed MFU (6 N tokens FLOPs + attention), tp communication (4 all-reduces or
all-gather/reduce-scatter pairs per layer forward+backward of ``s b h e`` bytes, ring cost
``2 (t-1)/t`` over the intra-node link), cp ring attention K/V traffic, the gradient all-reduce over dp x cp
across the slowest link it crosses, pipeline P2P, and the pipeline bubble ``(p-1)/(m+p-1)`` (``/v`` interleaved).
"""

from __future__ import annotations

import argparse
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

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def step_time(self) -> float:
        return sum(self.time.values())


def stage_units(config: GPTConfig, pp: int, rank: int, v: int = 1) -> list[tuple[int, int]]:
    """Units (embedding, blocks, head) of pp rank ``rank``'s chunks, split by gptpar's partitioner."""
    from gptpar.models.stages import partition

    part = partition(config, pp, v)
    return [part.units(rank, c) for c in range(v)]


def param_count(config: GPTConfig, tp: int, units: list[tuple[int, int]]) -> int:
    """Parameters on one tp rank holding ``units`` (:meth:`GPTConfig.unit_params`, ParallelGPT's sharding)."""
    u, L = config.unit_params(tp), config.n_layer
    has_embedding = any(a == 0 for a, _ in units)
    total = 0
    for a, b in units:
        for i in range(a, b):
            if i == 0:
                total += u["embedding"]
            elif i == L + 1:
                total += u["norm"] + (0 if (config.tie_embeddings and has_embedding) else u["head"])
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
        for u in range(lo, hi):
            if u == 0:
                total += s * b * 8  # token ids (int64) for the embedding backward
            elif u == L + 1:
                # ln_f, lm_head input, fp32 softmax of the vocab shard in the loss (+ small index tensors)
                total += norm + sc * b * h * elem + s * b * (V // tp) * 4 + s * b * 8 * 2 + s * b
            else:
                total += sn * b * h * elem if recompute else block
    return total


def korthikanti_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False) -> float:
    """Megatron's activation bytes per layer (fp16), Korthikanti et al. 2022, Table 2."""
    if t == 1:
        return s * b * h * (34 + 5 * a * s / h)
    if sp:
        return s * b * h * (34 / t + 5 * a * s / (h * t))
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def in_flight(schedule: str, p: int, r: int, m: int, v: int) -> int:
    """Microbatches whose activations rank r holds at once (per chunk-equivalent)."""
    if p == 1:
        return 1
    if schedule == "gpipe":
        return m
    if v > 1:  # interleaved: warm-up of (p - r - 1) * 2 + (v - 1) * p chunk-forwards, in units of a full stage
        return math.ceil(min((p - r - 1) * 2 + (v - 1) * p + 1, m * v) / v)
    return min(p - r, m)


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
    units = stage_units(config, pp, rank, v) if pp > 1 else [(0, config.n_layer + 2)]
    n = param_count(config, tp, units)
    # AdamW's fp32 moments, plus fp32 masters when the parameters are not fp32 (ZeroAdamW always keeps them)
    optimizer = n * (8 + (4 if (param_bytes != 4 or zero1) else 0))
    if zero1:  # sharded over dp x cp, the gradient-reduction group
        optimizer = math.ceil(optimizer / (dp * cp))
    acts = activation_bytes(config, units, tp, cp, micro_batch, seq_len or config.seq_len, sp, act_bytes, recompute)
    return {
        "weights": n * param_bytes,
        "gradients": n * grad_bytes,
        "optimizer": optimizer,
        "activations": acts * in_flight(schedule, pp, rank, m, v),
    }


def parse_size(text: str) -> float:
    mt = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)B?\s*", text.upper())
    if not mt:
        raise GptparConfigError(f"cannot read a size from {text!r} (e.g. 80GB, 13B, 450GB/s)")
    return float(mt.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[mt.group(2)]


def model_for(params: str, seq: int) -> GPTConfig:
    key = params.strip().upper()
    for name, (L, h, a) in GPT3_SHAPES.items():
        if name.upper() == key:
            return GPTConfig(vocab_size=50304, seq_len=seq, n_layer=L, n_head=a, d_model=h)
    try:
        return preset(params, seq_len=seq)
    except GptparConfigError:
        raise GptparConfigError(f"--params {params!r}: expected one of {list(GPT3_SHAPES)} or a preset") from None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(
    config: GPTConfig,
    gpus: int,
    gpu_mem: float,
    global_batch: int,
    gpus_per_node: int = 8,
    intra_bw: float = 450e9,
    inter_bw: float = 50e9,
    peak_flops: float = 989e12,
    mfu: float = 0.5,
    top: int = 10,
) -> list[Plan]:
    """Every layout that fits, ranked by estimated step time (see module docstring)."""
    s, h, L, a = config.seq_len, config.d_model, config.n_layer, config.n_head
    n_total = config.num_params()
    out = []
    for tp, pp, cp in itertools.product(divisors(gpus), divisors(gpus), [1, 2, 4, 8]):
        if tp > gpus_per_node or tp * pp * cp > gpus or gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        if a % tp or config.padded_vocab % tp or L < pp or s % (2 * cp) and cp > 1:
            continue
        for mb, v, sp, zero1, rc in itertools.product(
            [1, 2, 4, 8], [1, 2], [False, True], [False, True], [False, True]
        ):
            if (sp and tp == 1) or (v > 1 and pp == 1) or (zero1 and dp * cp == 1) or global_batch % (dp * mb):
                continue
            m = global_batch // (dp * mb)
            if v > 1 and (m % pp or L + 2 < pp * v):
                continue
            mem = {k: 0 for k in ("weights", "gradients", "optimizer", "activations")}
            for r in {0, pp - 1} if pp > 1 else {0}:  # the first and last stages hold the most
                mr = memory(config, tp, pp, dp, cp, v, mb, m, sp, zero1, 2, 2, 2, "1f1b", r, recompute=rc)
                if sum(mr.values()) > sum(mem.values()):
                    mem = mr
            if sum(mem.values()) > gpu_mem:
                continue
            tokens = global_batch * s
            flops = 6 * n_total * tokens + 12 * L * h * s * tokens
            compute = flops / (gpus * peak_flops * mfu) * (4 / 3 if rc else 1)  # recompute: one more forward
            tp_bw = intra_bw
            per_layer = 4 * 2 * (tp - 1) / tp * (s // cp) * mb * h * 2 if tp > 1 else 0
            tp_time = per_layer * (L / pp) * m / tp_bw
            cp_time = (
                (
                    3
                    * (cp - 1)
                    * 2
                    * mb
                    * (s // cp)
                    * h
                    // tp
                    * 2
                    * (L / pp)
                    * m
                    / (intra_bw if tp * cp <= gpus_per_node else inter_bw)
                )
                if cp > 1
                else 0
            )
            dp_bw = intra_bw if tp * cp * dp <= gpus_per_node else inter_bw
            g = dp * cp  # gradients are reduced over dp x cp (cp ranks hold partial sums)
            dp_time = 2 * (g - 1) / g * (n_total / (tp * pp)) * 2 / dp_bw if g > 1 else 0
            pp_time = (
                (2 * m * (s // cp) * mb * h * 2 / (inter_bw if tp * cp * dp >= gpus_per_node else intra_bw))
                if pp > 1
                else 0
            )
            bubble = compute * ((pp - 1) / (v * m + pp - 1)) / (1 - (pp - 1) / (v * m + pp - 1)) if pp > 1 else 0
            time = {"compute": compute, "tp": tp_time, "cp": cp_time, "dp": dp_time, "pp": pp_time, "bubble": bubble}
            out.append(Plan(tp, pp, dp, cp, v, mb, sp, zero1, mem, time, rc))
    out.sort(key=lambda p: p.step_time)
    return out[:top]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="gptpar plan", description="Rank the parallel layouts that fit a model on a cluster."
    )
    ap.add_argument("--params", default="13B", help=f"model size ({', '.join(GPT3_SHAPES)}) or a preset")
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--gpu-mem", default="80GB")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--link", default="nvlink:450GB/s,ib:50GB/s")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--mfu", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    try:
        links = dict(x.split(":") for x in args.link.split(","))
        intra = parse_size(links.get("nvlink", "450GB").replace("/s", ""))
        inter = parse_size(links.get("ib", "50GB").replace("/s", ""))
        config = model_for(args.params, args.seq)
        plans = plan(
            config,
            args.gpus,
            parse_size(args.gpu_mem),
            args.global_batch,
            args.gpus_per_node,
            intra,
            inter,
            args.peak_tflops * 1e12,
            args.mfu,
            args.top,
        )
    except (GptparConfigError, ValueError) as e:
        print(f"gptpar plan: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"{args.params}: {config.num_params() / 1e9:.2f}B parameters, L={config.n_layer} h={config.d_model} "
        f"heads={config.n_head}, seq {args.seq}, global batch {args.global_batch}, {args.gpus} GPUs x {args.gpu_mem}"
    )
    if not plans:
        print("no layout fits: add GPUs or memory, or shorten the sequence / micro-batch")
        return
    print(
        f"{'tp':>3} {'pp':>3} {'dp':>3} {'cp':>3} {'v':>2} {'mb':>3} {'SP':>3} {'Z1':>3} {'RC':>3} {'GiB':>6} "
        f"{'w':>5} {'g':>5} {'opt':>5} {'act':>5} {'step s':>7} {'comp':>6} {'tp':>5} {'cp':>5} {'dp':>5} {'pp':>5} {'bubble':>6}"
    )
    gib = 2**30
    for p in plans:
        m, t = p.memory, p.time
        print(
            f"{p.tp:3d} {p.pp:3d} {p.dp:3d} {p.cp:3d} {p.v:2d} {p.micro_batch:3d} {'y' if p.sequence_parallel else '-':>3} "
            f"{'y' if p.zero1 else '-':>3} {'y' if p.recompute else '-':>3} {p.total_memory / gib:6.1f} {m['weights'] / gib:5.1f} {m['gradients'] / gib:5.1f} "
            f"{m['optimizer'] / gib:5.1f} {m['activations'] / gib:5.1f} {p.step_time:7.2f} {t['compute']:6.2f} "
            f"{t['tp']:5.2f} {t['cp']:5.2f} {t['dp']:5.2f} {t['pp']:5.2f} {t['bubble']:6.2f}"
        )
