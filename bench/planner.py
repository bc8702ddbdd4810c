"""The planner against measurements: step-time ranking of real layouts on 4 CPU processes, and Megatron-LM's
published Table 1.

    python bench/planner.py [--reps 3]

* CPU ranking: a small GPT trained for a few steps at 8 layouts of 4 processes (dp, tp, pp, cp and their
  pairs); each layout's step time is the best of ``--reps`` steps after a warm-up. The planner predicts
  each from a calibration of this machine (``gptpar plan --calibrate``'s measurement: one thread's GEMM
  rates and memory bandwidth, each process getting cores/processes of a core) and gloo's measured
  all-reduce latency and bandwidth. Reported: both times per layout and Spearman's rank correlation.
* Table 1 (Narayanan et al. 2021): predicted TFLOP/s per GPU for the ten published layouts with the A100
  curve and one fitted scalar (:func:`gptpar.planner.table1_comparison`), beside the published numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from gptpar import GPTConfig, ParallelGPT, ParallelLayout, init_parallel
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel
from gptpar.planner import calibrate, step_time, table1_comparison
from gptpar.testing import run_distributed

CONFIG = GPTConfig(vocab_size=1024, seq_len=128, n_layer=8, n_head=8, d_model=256)
BATCH, MB = 8, 2  # global batch; sequences per micro-batch
LAYOUTS = {
    "dp4": dict(dp=4),
    "tp4": dict(tp=4),
    "pp4": dict(pp=4),
    "tp2 dp2": dict(tp=2, dp=2),
    "tp2 pp2": dict(tp=2, pp=2),
    "pp2 dp2": dict(pp=2, dp=2),
    "cp2 dp2": dict(cp=2, dp=2),
    "tp2 cp2": dict(tp=2, cp=2),
}


def _step_time(layout: ParallelLayout, reps: int) -> float:
    torch.set_num_threads(1)
    st = init_parallel(layout)
    per_dp = BATCH // layout.dp
    m = per_dp // MB
    engine = None
    if layout.pp > 1:
        from gptpar.pipeline import make_pipeline

        engine, _ = make_pipeline(CONFIG, st, "1f1b", m)
        chunks = engine.chunks
    else:
        chunks = [ParallelGPT(CONFIG, st)]
    params = [p for c in chunks for p in c.parameters()]
    ddp = DataParallel(params, st, average=False) if st.dp.size * st.cp.size > 1 else None
    opt = torch.optim.AdamW(params)
    g = torch.Generator().manual_seed(st.dp.rank)
    idx = torch.randint(0, CONFIG.vocab_size, (per_dp, CONFIG.seq_len), generator=g)

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

    step()
    best = float("inf")
    for _ in range(reps):
        comm.barrier(st.world)
        t0 = time.perf_counter()
        step()
        comm.barrier(st.world)
        best = min(best, time.perf_counter() - t0)
    return best


def _gloo_link() -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of a 4-process gloo all-reduce on this machine, measured between
    compute phases as training interleaves them: on shared cores a collective waits for every process
    to be scheduled, which an idle loop of all-reduces does not show."""
    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(dp=4))
    a = torch.randn(192, 192)

    def work():
        return a @ a

    def per_iter(n: int | None) -> float:
        x = torch.ones(n) if n else None
        for _ in range(2):
            work()
            if x is not None:
                comm.all_reduce(x, st.world)
        comm.barrier(st.world)
        t0 = time.perf_counter()
        for _ in range(20):
            work()
            if x is not None:
                comm.all_reduce(x, st.world)
        comm.barrier(st.world)
        return (time.perf_counter() - t0) / 20

    base = per_iter(None)
    small, large = per_iter(1) - base, per_iter(1 << 18) - base
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "planner.json"))
    a = ap.parse_args()
    import dataclasses

    cores = os.cpu_count() or 1
    cal = calibrate("cpu", threads=1)
    lat, bw = run_distributed(_gloo_link, 4)[0]
    cal = dataclasses.replace(cal, share=min(1.0, cores / 4), latency=lat)
    rows = []
    print(
        f"planner vs measured step time, GPT {CONFIG.num_params() / 1e6:.1f}M, 4 CPU processes on {cores} cores, "
        f"gloo all-reduce latency {lat * 1e6:.0f} us, bandwidth {bw / 1e9:.2f} GB/s, {time.strftime('%Y-%m-%d')}"
    )  # noqa: E501
    print(f"{'layout':10s} {'measured s':>10s} {'predicted s':>11s}")
    for name, kw in LAYOUTS.items():
        layout = ParallelLayout(**kw)
        measured = max(run_distributed(_step_time, 4, layout, a.reps, timeout=900))
        per_dp = BATCH // layout.dp
        m = per_dp // MB
        t = step_time(
            CONFIG, cal, layout.tp, layout.pp, layout.dp, layout.cp, 1, MB, m, False, False, "1f1b", bw, bw, 4, elem=4
        )  # noqa: E501
        rows.append({"layout": name, "measured_s": measured, "predicted_s": sum(t.values()), "predicted": t})
        print(f"{name:10s} {measured:10.3f} {sum(t.values()):11.3f}")
    rho = spearman([r["measured_s"] for r in rows], [r["predicted_s"] for r in rows])
    print(f"Spearman rank correlation, predicted vs measured: {rho:.2f}")
    t1 = table1_comparison()
    print("Megatron-LM Table 1 (A100): TFLOP/s per GPU, predicted (one fitted scalar) vs published")
    for r in t1:
        print(
            f"  {r['params_b']:7.1f}B tp{r['tp']} pp{r['pp']:<3d} dp{r['dp']:<3d} predicted {r['predicted']:6.1f} "
            f"published {r['published']:4d} ({100 * (r['predicted'] / r['published'] - 1):+.1f}%)"
        )  # noqa: E501
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"cpu_ranking": rows, "spearman": rho, "table1": t1, "date": time.strftime("%Y-%m-%d")}, f, indent=1)  # noqa: E501


if __name__ == "__main__":
    main()
