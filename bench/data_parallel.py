"""Data-parallel gradient reduction on CPU processes, side by side with torch DDP in the same run.

    python bench/data_parallel.py [--dp 2] [--layers 4] [--d-model 256] [--reps 5]

Per configuration: median step time (forward + backward + gradient reduction), bytes each rank sends per
step, and the share of the reduction's time hidden behind backward:
``1 - (t_overlapped - t_no_comm) / (t_after_backward - t_no_comm)``, where ``t_after_backward`` runs the
same reduction only after backward has finished and ``t_no_comm`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from common import peak_memory_of
from common import timed as common_timed

from gptpar import GPT, GPTConfig, ParallelGPT, ParallelLayout, init_parallel
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel
from gptpar.testing import run_distributed


def _rank(config, dp, batch, reps):
    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(dp=dp))
    g = torch.Generator().manual_seed(st.rank)
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=g)

    def timed(fn):
        return common_timed(fn, reps, barrier=dist.barrier)

    out = {}
    for name, dtype in (
        ("gptpar fp32", torch.float32),
        ("gptpar bf16", torch.bfloat16),
        ("gptpar fp16", torch.float16),
    ):
        model = ParallelGPT(config, st)
        ddp = DataParallel(model, st, reduce_dtype=dtype)

        def overlapped(model=model, ddp=ddp):
            model(idx, idx)[1].backward()
            ddp.finish()
            ddp.zero_grad()

        def after_backward(model=model, ddp=ddp):
            with ddp.no_sync():
                model(idx, idx)[1].backward()
            ddp.finish()
            ddp.zero_grad()

        def no_comm(model=model, ddp=ddp):
            with ddp.no_sync():
                model(idx, idx)[1].backward()
            ddp.zero_grad()

        t_ov, t_after, t_none = timed(overlapped), timed(after_backward), timed(no_comm)
        with comm.count_traffic() as traffic:
            overlapped()
        hidden = 1 - (t_ov - t_none) / (t_after - t_none) if t_after > t_none else float("nan")
        out[name] = {"time_s": t_ov, "bytes": sum(traffic.values()), "hidden_fraction": hidden}

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    for name, hook in (("torch DDP fp32", None), ("torch DDP fp16 hook", fp16_compress_hook)):
        ddp_model = DDP(GPT(config))
        if hook is not None:
            ddp_model.register_comm_hook(None, hook)

        def step(m=ddp_model):
            m(idx, idx)[1].backward()
            m.zero_grad(set_to_none=True)

        n = sum(p.numel() for p in ddp_model.parameters())
        es = 2 if hook is not None else 4
        out[name] = {"time_s": timed(step), "bytes": int(2 * (dp - 1) / dp * n * es), "hidden_fraction": None}
    return out


def _peak(config, dp, batch, name):
    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(dp=dp))
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len))

    def build():
        if name.startswith("gptpar"):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name.split()[-1]]
            model = ParallelGPT(config, st)
            ddp = DataParallel(model, st, reduce_dtype=dtype)

            def step():
                model(idx, idx)[1].backward()
                ddp.finish()
                ddp.zero_grad()

            return step
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        m = DDP(GPT(config))
        if "hook" in name:
            m.register_comm_hook(None, fp16_compress_hook)

        def step():
            m(idx, idx)[1].backward()
            m.zero_grad(set_to_none=True)

        return step

    return peak_memory_of(build)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "data_parallel_cpu.json"))
    a = ap.parse_args()
    config = GPTConfig(vocab_size=4096, seq_len=128, n_layer=a.layers, n_head=8, d_model=a.d_model)
    print(
        f"data parallel, GPT {config.num_params() / 1e6:.1f}M params, batch {a.batch} x {config.seq_len} per rank, "
        f"CPU gloo, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{'dp':>3} {'reduction':22s} {'step s':>8s} {'tok/s':>7s} {'vs DDP fp32':>11s} {'MB/rank':>8s} "
        f"{'MB sent/rank':>13s} {'reduce hidden':>13s}"
    )
    rows = []
    for dp in a.dp:
        res = run_distributed(_rank, dp, config, dp, a.batch, a.reps, timeout=1800)
        base = max(r["torch DDP fp32"]["time_s"] for r in res)
        for name in res[0]:
            t = max(r[name]["time_s"] for r in res)
            h = res[0][name]["hidden_fraction"]
            mem = max(run_distributed(_peak, dp, config, dp, a.batch, name, fresh=True, timeout=600))
            tok = dp * a.batch * config.seq_len / t
            rows.append(
                {
                    "dp": dp,
                    "name": name,
                    "time_s": t,
                    "tokens_per_s": tok,
                    "peak_bytes": mem,
                    "bytes": res[0][name]["bytes"],
                    "hidden_fraction": h,
                }
            )
            htxt = f"{h:13.2f}" if h is not None else f"{'-':>13s}"
            print(
                f"{dp:3d} {name:22s} {t:8.3f} {tok:7.0f} {base / t:10.2f}x {mem / 1e6:8.1f} "
                f"{res[0][name]['bytes'] / 1e6:13.2f} {htxt}"
            )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
