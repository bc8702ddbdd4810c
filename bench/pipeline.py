"""Pipeline schedules on CPU processes at p=2 and p=4, m=8: measured bubble and hidden-communication
fractions per schedule, and step time, tokens/s and peak memory per rank side by side with
torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble,
ScheduleDualPipeV) on the same model, split at the same layers and placed on the same ranks, in the same
run: each step time is the median of ``--reps`` runs interleaved (gptpar, torch, gptpar, torch, ...)
with the spread (max - min) beside it. Memory is measured in a fresh process per implementation: peak
resident bytes above the process's baseline.

    python bench/pipeline.py [--layers 8] [--d-model 256] [--seq 128] [--batch 16] [--reps 3]

"measured bubble": 1 - (time in F/B/I/W) / (step time), averaged over ranks. On a 2-core machine the
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
from common import peak_memory_of, timed_interleaved
from torch import nn

from gptpar import GPT, GPTConfig, ParallelLayout, init_parallel
from gptpar.pipeline import (
    build,
    make_pipeline,
    partition,
    placement,
    plot_timeline,
    simulate,
    simulated_events,
    virtual_stage,
)
from gptpar.testing import run_distributed

M = 8
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zbv", 2), ("dualpipev", 2))
TORCH = {  # gptpar's schedule -> torch.distributed.pipelining's class of the same name (ZB-H1: none)
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved": "ScheduleInterleaved1F1B",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}


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


def _batch(config, batch):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=g)
    return idx, torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=g)


def _build(impl, name, v, config, batch, p, record=False):
    """A step function for one implementation and schedule on this rank."""
    st = init_parallel(ParallelLayout(pp=p))
    idx, tgt = _batch(config, batch)
    if impl == "gptpar":
        eng = make_pipeline(config, st, name, M, v if name == "interleaved" else 1, record=record)[0]

        def step():
            eng.step(idx, tgt)
            for c in eng.chunks:
                c.zero_grad(set_to_none=True)

        step.engine = eng
        return step
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage

    style = placement(name)
    part = partition(config, p, v, style=style)
    ref = GPT(config)
    stage_ids = [virtual_stage(st.pp.rank, c, p, style) for c in range(v)]
    stages = [
        PipelineStage(_TorchStage(ref, *part.units(st.pp.rank, c)), s, p * v, torch.device("cpu"), group=st.pp.pg)
        for c, s in enumerate(stage_ids)
    ]

    def loss_fn(logits, target):
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    cls = getattr(pipelining, TORCH[name])
    sched = cls(stages if v > 1 else stages[0], M, loss_fn=loss_fn)
    first, last = 0 in stage_ids, p * v - 1 in stage_ids

    def step():
        kw = {"target": tgt} if last else {}
        sched.step(idx, **kw) if first else sched.step(**kw)
        ref.zero_grad(set_to_none=True)

    return step


def _rank(config, batch, reps, p):
    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(pp=p))
    out = {}
    for name, v in SCHEDULES:
        ours = _build("gptpar", name, v, config, batch, p, record=True)
        theirs = _build("torch", name, v, config, batch, p) if name in TORCH else None
        fns = {"ours": ours} if theirs is None else {"ours": ours, "torch": theirs}  # alternated, warm-up first
        runs = timed_interleaved(fns, reps, barrier=lambda: torch.distributed.barrier(st.pp.pg))
        times, torch_times = runs["ours"], runs.get("torch", [])
        stats = ours.engine.last_stats
        busy = sum(t1 - t0 for kind, _, _, t0, t1 in stats.events if kind != "wait")
        out[name] = {
            "time_s": statistics.median(times),
            "spread_s": max(times) - min(times),
            "torch_time_s": statistics.median(torch_times) if torch_times else None,
            "torch_spread_s": max(torch_times) - min(torch_times) if torch_times else None,
            "busy_fraction": busy / stats.total_s,
            "hidden_comm_fraction": stats.hidden_comm_fraction,
            "events": stats.events,
        }
    return out


def _stage_compute(config, micro, reps):
    """Forward + backward of one micro-batch in one process (1 thread) through the two models the stages
    are cut from: the reference GPT (torch.distributed.pipelining's stages) and ParallelGPT at tp=1
    (gptpar's chunks). Each side's pipeline step is these units plus its executor's waits and transfers,
    so their ratio bounds what an executor can gain on this machine. Returns name -> per-round seconds."""
    from gptpar import ParallelGPT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref, ours = GPT(config), ParallelGPT(config, init_parallel(ParallelLayout()))
    idx, tgt = _batch(config, micro)

    def run(model):
        def fwd_bwd():
            model(idx, tgt)[1].backward()
            model.zero_grad(set_to_none=True)

        return fwd_bwd

    return timed_interleaved({"torch": run(ref), "gptpar": run(ours)}, reps)


def _peak(impl, name, v, config, batch, p):
    torch.set_num_threads(1)
    init_parallel(ParallelLayout(pp=p))
    return peak_memory_of(lambda: _build(impl, name, v, config, batch, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compute-only", action="store_true", help="only the one-process stage compute line")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "pipeline_cpu.json"))
    a = ap.parse_args()
    config = GPTConfig(vocab_size=1024, seq_len=a.seq, n_layer=a.layers, n_head=8, d_model=a.d_model)
    tokens = a.batch * a.seq
    rows = []
    print(
        f"pipeline m={M}, GPT {config.num_params() / 1e6:.1f}M params ({a.layers} layers, d={a.d_model}, "
        f"seq={a.seq}, batch={a.batch}), fp32, CPU gloo, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    micro = a.batch // M
    comp = _stage_compute(config, micro, max(5, a.reps))
    med = {k: statistics.median(v) for k, v in comp.items()}
    spread = {k: max(v) - min(v) for k, v in comp.items()}
    print(
        f"stage compute, one process, one micro-batch ({micro} x {a.seq}) forward + backward of the whole model: "
        f"torch's reference GPT {med['torch'] * 1e3:.1f}+-{spread['torch'] * 1e3:.1f} ms, gptpar's ParallelGPT "
        f"{med['gptpar'] * 1e3:.1f}+-{spread['gptpar'] * 1e3:.1f} ms (torch/gptpar {med['torch'] / med['gptpar']:.2f})"
    )
    if a.compute_only:
        return
    print(
        f"{'p':>2} {'schedule':15s} {'gptpar s':>12s} {'tok/s':>7s} {'MB/rank':>8s} {'torch s':>12s} {'tok/s':>7s} "
        f"{'MB/rank':>8s} {'torch/gptpar':>12s} {'bubble sim':>10s} {'meas':>6s} {'comm hidden':>11s}"
    )
    figs = os.path.dirname(a.out)
    os.makedirs(figs, exist_ok=True)
    for p in (2, 4):
        res = run_distributed(_rank, p, config, a.batch, a.reps, p, timeout=1800)
        for name, v in SCHEDULES:
            slow = max(res, key=lambda r, name=name: r[name]["time_s"])[name]  # the slowest rank's runs
            t, spread = slow["time_s"], slow["spread_s"]
            tt = tspread = None
            if res[0][name]["torch_time_s"] is not None:
                tslow = max(res, key=lambda r, name=name: r[name]["torch_time_s"])[name]
                tt, tspread = tslow["torch_time_s"], tslow["torch_spread_s"]
            mem = max(run_distributed(_peak, p, "gptpar", name, v, config, a.batch, p, fresh=True, timeout=600))
            tmem = (
                max(run_distributed(_peak, p, "torch", name, v, config, a.batch, p, fresh=True, timeout=600))
                if tt
                else None
            )
            sim = simulate(build(name, p, M, v), v, style=placement(name)).bubble_fraction
            if name in ("zbv", "dualpipev"):
                events = [r[name]["events"] for r in res]
                plot_timeline(events, os.path.join(figs, f"pipeline_{name}_p{p}.png"), f"{name} p={p} m={M}, measured")
                half = {"F": 0.5, "B": 1.0, "I": 0.5, "W": 0.5}  # a chunk is half a stage
                sim_ev = simulated_events(build(name, p, M), 2, half, placement(name))
                title = f"{name} p={p} m={M}, simulated"
                plot_timeline(sim_ev, os.path.join(figs, f"pipeline_{name}_p{p}_simulated.png"), title, unit="steps")
            meas = 1 - statistics.mean(r[name]["busy_fraction"] for r in res)
            hidden = statistics.mean(r[name]["hidden_comm_fraction"] for r in res)
            rows.append(
                {
                    "pp": p,
                    "schedule": name,
                    "v": v,
                    "time_s": t,
                    "spread_s": spread,
                    "tokens_per_s": tokens / t,
                    "peak_bytes": mem,
                    "torch_time_s": tt,
                    "torch_spread_s": tspread,
                    "torch_peak_bytes": tmem,
                    "bubble_simulated": sim,
                    "bubble_measured": meas,
                    "hidden_comm_fraction": hidden,
                }
            )
            torch_cols = (
                f"{tt:6.3f}+-{tspread:.3f} {tokens / tt:7.0f} {tmem / 1e6:8.1f} {tt / t:12.2f}"
                if tt
                else f"{'-':>12s} {'-':>7s} {'-':>8s} {'-':>12s}"
            )
            print(
                f"{p:2d} {name + (f' v={v}' if v > 1 else ''):15s} {t:6.3f}+-{spread:.3f} {tokens / t:7.0f} "
                f"{mem / 1e6:8.1f} {torch_cols} {sim:10.3f} {meas:6.3f} {hidden:11.3f}"
            )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        stage = {"micro_batch": micro, "torch_s": comp["torch"], "gptpar_s": comp["gptpar"]}
        json.dump(
            {"args": vars(a), "rows": rows, "stage_compute": stage, "date": time.strftime("%Y-%m-%d")}, f, indent=1
        )


if __name__ == "__main__":
    main()
