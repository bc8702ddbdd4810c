"""Measurements behind the planner's CPU validation (``bench/planner.py``, ``tests/test_planner.py``): a
layout's measured step time, gloo's per-message cost among coupled processes on shared cores, and
Spearman's rank correlation. The worker functions run on every rank of :func:`gptpar.testing.run_distributed`."""

from __future__ import annotations

import contextlib
import time

import torch

from gptpar import GPTConfig, ParallelGPT, ParallelLayout, init_parallel
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel


def training_step(
    config: GPTConfig, st, m: int, idx: torch.Tensor, schedule: str = "1f1b", zero1: bool = False, **opts
):
    """One rank's training step as the trainer runs it: ``m`` micro-batches of ``idx`` (data-parallel sync
    on the last) or the pipeline engine under ``schedule``; the reduction; AdamW or ZeRO-1; gradients
    cleared. Returns ``(step, chunks, optimizer, data_parallel or None)``. ``opts``: ParallelGPT's."""
    engine = None
    if st.pp.size > 1:
        from gptpar.pipeline import make_pipeline

        engine, _ = make_pipeline(config, st, schedule, m, 1, **opts)
        chunks = engine.chunks
    else:
        chunks = [ParallelGPT(config, st, **opts)]
    params = [p for c in chunks for p in c.parameters()]
    ddp = DataParallel(params, st, shard_grads=zero1, average=False) if st.dp.size * st.cp.size > 1 else None
    if zero1:
        from gptpar.parallel.zero import ZeroAdamW

        opt = ZeroAdamW(ddp)
    else:
        opt = torch.optim.AdamW(params)

    def step():
        if engine is not None:
            with ddp.no_sync() if ddp else contextlib.nullcontext():
                engine.step(idx, idx)
        else:
            for i, x in enumerate(idx.chunk(m)):
                with ddp.no_sync() if (ddp and i < m - 1) else contextlib.nullcontext():
                    chunks[0](x, x)[1].backward()
        if ddp:
            ddp.finish()
        opt.step()
        if ddp:
            ddp.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)

    return step, chunks, opt, ddp


def layout_step_time(config: GPTConfig, layout: ParallelLayout, batch: int, mb: int, reps: int) -> float:
    """Runs on every rank: the best of ``reps`` training steps (after one warm-up) of ``config`` at ``layout``,
    ``batch`` sequences a step in micro-batches of ``mb`` (pipelines: 1F1B), one thread per process."""
    torch.set_num_threads(1)
    st = init_parallel(layout)
    per_dp = batch // layout.dp
    g = torch.Generator().manual_seed(st.dp.rank)
    idx = torch.randint(0, config.vocab_size, (per_dp, config.seq_len), generator=g)
    step, *_ = training_step(config, st, per_dp // mb, idx)
    step()
    best = float("inf")
    for _ in range(reps):
        comm.barrier(st.world)
        t0 = time.perf_counter()
        step()
        comm.barrier(st.world)
        best = min(best, time.perf_counter() - t0)
    return best


def gloo_link(coupled: int) -> tuple[float, float]:
    """(seconds per message, bandwidth bytes/s) of gloo all-reduces among ``coupled`` of the 4 processes
    (the others in groups of their own), measured between ~2 ms compute phases as training interleaves
    them: on shared cores a collective waits for every process in it to be scheduled, which an idle
    loop of all-reduces does not show."""
    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(tp=coupled, dp=4 // coupled))
    a = torch.randn(256, 256)

    def work():
        return a @ a @ a

    def per_iter(n: int | None, group) -> float:
        x = torch.ones(n) if n else None
        for _ in range(3):
            work()
            if x is not None:
                comm.all_reduce(x, group)
        comm.barrier(st.world)
        t0 = time.perf_counter()
        for _ in range(30):
            work()
            if x is not None:
                comm.all_reduce(x, group)
        comm.barrier(st.world)
        return (time.perf_counter() - t0) / 30

    base = min(per_iter(None, st.tp) for _ in range(2))
    small = min(per_iter(256, st.tp) for _ in range(2)) - base
    large = per_iter(1 << 18, st.world) - base
    bw = 2 * 3 / 4 * (1 << 18) * 4 / max(large - small, 1e-9)
    return max(small, 1e-6), bw


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))
