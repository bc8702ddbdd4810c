"""Pipeline schedules on CPU processes: measured bubble and hidden-communication fractions per schedule
at p=4, m=8, and wall time side by side with torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B)
on the same model, split at the same layers, in the same run (alternating).

    python bench/pipeline.py [--layers 8] [--d-model 256] [--seq 128] [--batch 16] [--reps 3]

"measured bubble": 1 - (time in F/B/I/W) / (step time), averaged over ranks. On a 2-core machine the 4
stage processes share 2 cores, so measured bubbles include time a rank was runnable but descheduled;
compare schedules with each other and with the simulated value, not with a GPU cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from gptpar import GPT, GPTConfig, ParallelLayout, init_parallel
from gptpar.pipeline import build, make_pipeline, simulate
from gptpar.testing import run_distributed

P, M = 4, 8


class _TorchStage(nn.Module):
    """The reference GPT's units [a, b) as one module for torch.distributed.pipelining."""

    def __init__(self, model: GPT, a: int, b: int) -> None:
        super().__init__()
        n = model.config.n_layer + 2
        self.first, self.last = a == 0, b == n
        self.emb = nn.ModuleList([model.wte, model.wpe]) if self.first else None
        self.blocks = nn.ModuleList(model.blocks[i - 1] for i in range(max(a, 1), min(b, n - 1)))
        self.head = nn.ModuleList([model.ln_f, model.lm_head]) if self.last else None

    def forward(self, x):
        if self.first:
            x = self.emb[0](x) + self.emb[1](torch.arange(x.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        if self.last:
            x = self.head[1](self.head[0](x))
        return x


def _rank(config, batch, reps):
    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(pp=P))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=g)
    tgt = torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=g)
    out = {}
    engines = {}
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        engines[name] = make_pipeline(config, st, name, M, v, record=True)
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    part = engines["1f1b"][1]
    ref = GPT(config)
    a, b = part.units(st.pp.rank)
    stage = PipelineStage(_TorchStage(ref, a, b), st.pp.rank, P, torch.device("cpu"), group=st.pp.pg)

    def loss_fn(logits, target):
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    torch_sched = {"gpipe": ScheduleGPipe(stage, M, loss_fn=loss_fn), "1f1b": Schedule1F1B(stage, M, loss_fn=loss_fn)}

    def run_torch(name):
        s = torch_sched[name]
        if st.pp.rank == 0:
            s.step(idx)
        elif st.pp.rank == P - 1:
            s.step(target=tgt)
        else:
            s.step()
        ref.zero_grad(set_to_none=True)

    def run_ours(name):
        eng = engines[name][0]
        eng.step(idx, tgt)
        for c in eng.chunks:
            c.zero_grad(set_to_none=True)

    for name in engines:
        times, torch_times = [], []
        for rep in range(reps + 1):  # alternate gptpar and torch; the first round is warm-up
            for impl in ("ours", "torch") if name in torch_sched else ("ours",):
                torch.distributed.barrier(st.pp.pg)
                t0 = time.perf_counter()
                run_ours(name) if impl == "ours" else run_torch(name)
                dt = time.perf_counter() - t0
                if rep:
                    (times if impl == "ours" else torch_times).append(dt)
        stats = engines[name][0].last_stats
        busy = sum(t1 - t0 for kind, _, _, t0, t1 in stats.events if kind != "wait")
        out[name] = {
            "time_s": statistics.median(times),
            "torch_time_s": statistics.median(torch_times) if torch_times else None,
            "busy_fraction": busy / stats.total_s,
            "hidden_comm_fraction": stats.hidden_comm_fraction,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "pipeline_cpu.json"))
    a = ap.parse_args()
    config = GPTConfig(vocab_size=1024, seq_len=a.seq, n_layer=a.layers, n_head=8, d_model=a.d_model)
    res = run_distributed(_rank, P, config, a.batch, a.reps, timeout=1800)
    rows = []
    print(f"pipeline p={P} m={M}, GPT {config.num_params() / 1e6:.1f}M params ({a.layers} layers, d={a.d_model}, "
          f"seq={a.seq}, batch={a.batch}), fp32, CPU gloo, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"{'schedule':12s} {'gptpar s':>9s} {'torch s':>8s} {'torch/gptpar':>12s} {'bubble sim':>10s} "
          f"{'bubble meas':>11s} {'comm hidden':>11s}")  # fmt: skip
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        t = max(r[name]["time_s"] for r in res)
        tt = [r[name]["torch_time_s"] for r in res]
        tt = max(tt) if tt[0] is not None else None
        sim = simulate(build(name, P, M, v), v).bubble_fraction
        meas = 1 - statistics.mean(r[name]["busy_fraction"] for r in res)
        hidden = statistics.mean(r[name]["hidden_comm_fraction"] for r in res)
        rows.append({"schedule": name, "v": v, "time_s": t, "torch_time_s": tt, "bubble_simulated": sim,
                     "bubble_measured": meas, "hidden_comm_fraction": hidden})  # fmt: skip
        ratio = f"{tt / t:12.2f}" if tt else f"{'-':>12s}"
        ttxt = f"{tt:8.3f}" if tt else f"{'-':>8s}"
        print(
            f"{name + (f' v={v}' if v > 1 else ''):12s} {t:9.3f} {ttxt} {ratio} {sim:10.3f} {meas:11.3f} {hidden:11.3f}"
        )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
