"""Data-parallel gradient reduction on CPU processes, side by side with torch DDP in the same run.

    python bench/data_parallel.py [--dp 2] [--layers 4] [--d-model 256] [--reps 5]

Per configuration: step time (forward + backward + gradient reduction), the median of ``--reps`` rounds in
which every configuration runs once (interleaved: drift hits all alike), with the spread (max - min);
"~" marks a ratio within noise (the medians differ by less than a spread). gptpar's bf16 buckets are
compared with DDP's fp16 compression hook (both send half the bytes), fp32 with DDP fp32. Bytes each rank
sends per step, a per-step breakdown, and the share of the reduction's time hidden behind backward:
``1 - (t_overlapped - t_no_comm) / (t_after_backward - t_no_comm)``, where ``t_after_backward`` runs the
same reduction only after backward has finished and ``t_no_comm`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from common import peak_memory_of, timed_interleaved

from gptpar import GPT, GPTConfig, ParallelGPT, ParallelLayout, init_parallel
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel
from gptpar.testing import run_distributed


def _rank(config, dp, batch, reps):
    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(dp=dp))
    g = torch.Generator().manual_seed(st.rank)
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=g)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    fns, dps = {}, {}
    for name, dtype in (("gptpar fp32", torch.float32), ("gptpar bf16", torch.bfloat16)):
        model = ParallelGPT(config, st)
        ddp = DataParallel(model, st, reduce_dtype=dtype)
        dps[name] = ddp

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

        fns[name] = overlapped
        fns[name + " after"] = after_backward
        fns[name + " nocomm"] = no_comm
    for name, hook in (("torch DDP fp32", None), ("torch DDP fp16 hook", fp16_compress_hook)):
        ddp_model = DDP(GPT(config))
        if hook is not None:
            ddp_model.register_comm_hook(None, hook)

        def step(m=ddp_model):
            m(idx, idx)[1].backward()
            m.zero_grad(set_to_none=True)

        fns[name] = step
    # every configuration once per round, rounds repeated: drift on the shared cores hits all alike
    runs = timed_interleaved(fns, reps, warmup=2, barrier=dist.barrier)
    out = {}
    for name, ddp in dps.items():
        ddp.stats.clear()
        for _ in range(reps):
            fns[name]()
        per_step = {k: v / reps for k, v in ddp.stats.items()}
        with comm.count_traffic() as traffic:
            fns[name]()
        t_ov, t_after, t_none = (statistics.median(runs[name + s]) for s in ("", " after", " nocomm"))
        hidden = 1 - (t_ov - t_none) / (t_after - t_none) if t_after > t_none else float("nan")
        out[name] = {
            "time_s": t_ov,
            "spread_s": max(runs[name]) - min(runs[name]),
            "bytes": sum(traffic.values()),
            "hidden_fraction": hidden,
            "breakdown": {
                "compute_s": t_none,
                "pack_cast_s": per_step.get("pack_s", 0.0),
                "communication_s": t_after - t_none,
                "unpack_s": per_step.get("unpack_s", 0.0),
                "exposed_s": t_ov - t_none,
                "finish_wait_s": per_step.get("finish_s", 0.0),
            },
        }
    for name in ("torch DDP fp32", "torch DDP fp16 hook"):
        n = sum(p.numel() for p in GPT(config).parameters())
        es = 2 if "hook" in name else 4
        out[name] = {
            "time_s": statistics.median(runs[name]),
            "spread_s": max(runs[name]) - min(runs[name]),
            "bytes": int(2 * (dp - 1) / dp * n * es),
            "hidden_fraction": None,
        }
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
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "data_parallel_cpu.json"))
    a = ap.parse_args()
    config = GPTConfig(vocab_size=4096, seq_len=128, n_layer=a.layers, n_head=8, d_model=a.d_model)
    print(
        f"data parallel, GPT {config.num_params() / 1e6:.1f}M params, batch {a.batch} x {config.seq_len} per rank, "
        f"CPU gloo, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{'dp':>3} {'reduction':20s} {'step s (median+-spread)':>23s} {'tok/s':>6s} {'vs DDP':>7s} {'MB/rank':>8s} "
        f"{'MB sent/rank':>12s} {'reduce hidden':>13s}"
    )
    rows, breakdowns = [], []
    for dp in a.dp:
        res = run_distributed(_rank, dp, config, dp, a.batch, a.reps, timeout=1800)
        slowest = {name: max((r[name] for r in res), key=lambda x: x["time_s"]) for name in res[0]}
        for name, r in slowest.items():
            t, spread = r["time_s"], r["spread_s"]
            base = slowest["torch DDP fp16 hook" if "bf16" in name or "hook" in name else "torch DDP fp32"]
            h = res[0][name]["hidden_fraction"]
            mem = max(run_distributed(_peak, dp, config, dp, a.batch, name, fresh=True, timeout=600))
            tok = dp * a.batch * config.seq_len / t
            # within noise: the two medians' gap is smaller than either spread
            noise = abs(t - base["time_s"]) < max(spread, base["spread_s"])
            rows.append(
                {
                    "dp": dp,
                    "name": name,
                    "time_s": t,
                    "spread_s": spread,
                    "vs_ddp": base["time_s"] / t,
                    "within_noise": noise,
                    "tokens_per_s": tok,
                    "peak_bytes": mem,
                    "bytes": res[0][name]["bytes"],
                    "hidden_fraction": h,
                    "breakdown": r.get("breakdown"),
                }
            )
            htxt = f"{h:13.2f}" if h is not None else f"{'-':>13s}"
            print(
                f"{dp:3d} {name:20s} {t:16.3f}+-{spread:.3f} {tok:6.0f} {base['time_s'] / t:6.2f}x{'~' if noise else ' '}"
                f"{mem / 1e6:8.1f} {res[0][name]['bytes'] / 1e6:12.2f} {htxt}"
            )
            if r.get("breakdown"):
                breakdowns.append((dp, name, r["breakdown"]))
    print("per-step breakdown, ms (compute: no reduction; communication: the reduction run after backward;")
    print("exposed: what the overlapped reduction adds to compute; pack/cast, unpack, finish wait: inside it)")
    print(
        f"{'dp':>3} {'reduction':14s} {'compute':>8s} {'pack/cast':>9s} {'comm':>7s} {'unpack':>7s} {'exposed':>8s} {'finish wait':>11s}"
    )
    for dp, name, b in breakdowns:
        print(
            f"{dp:3d} {name:14s} {b['compute_s'] * 1e3:8.1f} {b['pack_cast_s'] * 1e3:9.1f} {b['communication_s'] * 1e3:7.1f} "
            f"{b['unpack_s'] * 1e3:7.1f} {b['exposed_s'] * 1e3:8.1f} {b['finish_wait_s'] * 1e3:11.1f}"
        )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
