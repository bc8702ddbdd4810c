"""gptpar's sharded optimizer next to PyTorch's FSDP2 in the same run, dp=2: ZeRO-1
(``DataParallel(shard_grads=True)`` + ``ZeroAdamW``) vs ``fully_shard`` (ZeRO-3) with AdamW on the same
nanoGPT-style model: step time and the bytes of weights, gradients and optimizer state each rank keeps
between steps.

    python bench/zero.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from common import peak_memory_of, timed_interleaved
from tensor_parallel import Model

from gptpar import ParallelLayout, init_parallel
from gptpar.parallel.data import DataParallel
from gptpar.parallel.zero import ZeroAdamW
from gptpar.testing import run_distributed


def _state_bytes(tensors):
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _zero(reps, only=None, result=None):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(dp=2))
    idx = torch.randint(0, 2048, (4, 128), generator=torch.Generator().manual_seed(st.rank))
    torch.manual_seed(0)
    if only != "torch":
        ours = Model()
        ddp = DataParallel(ours, st, shard_grads=True)
        zopt = ZeroAdamW(ddp, lr=1e-4)

    def ours_step():
        ours(idx).backward()
        ddp.finish()
        zopt.step()
        ddp.zero_grad()

    if only == "gptpar":
        return ours_step
    torch.manual_seed(0)
    theirs = Model()
    for b in theirs.blocks:
        fully_shard(b, mesh=st.mesh["dp"])
    fully_shard(theirs, mesh=st.mesh["dp"])
    fopt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def theirs_step():
        theirs(idx).backward()
        fopt.step()
        fopt.zero_grad(set_to_none=False)

    if only == "torch":
        return theirs_step
    runs = timed_interleaved({"ours": ours_step, "theirs": theirs_step}, reps, barrier=torch.distributed.barrier)
    t_ours, t_theirs = statistics.median(runs["ours"]), statistics.median(runs["theirs"])
    ours_bytes = {
        "weights": sum(b.param.numel() * b.param.element_size() for b in ddp.buckets),
        "gradients": sum(b.grad.numel() * b.grad.element_size() for b in ddp.buckets),
        "optimizer": zopt.state_bytes(),
    }
    theirs_bytes = {
        "weights": _state_bytes(theirs.parameters()),
        "gradients": _state_bytes(p.grad for p in theirs.parameters() if p.grad is not None),
        "optimizer": _state_bytes(v for s in fopt.state.values() for k, v in s.items() if k != "step"),
    }
    return {
        "gptpar ZeRO-1": {"time_s": t_ours, **ours_bytes},
        "torch FSDP2 (ZeRO-3)": {"time_s": t_theirs, **theirs_bytes},
    }


def _peak(impl):
    """Peak resident bytes of one implementation, built and stepped twice in a fresh process."""
    torch.set_num_threads(1)
    return peak_memory_of(lambda: _zero(0, only=impl))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "zero_cpu.json"))
    a = ap.parse_args()
    zero = run_distributed(_zero, 2, a.reps, timeout=1200)
    for name, impl in zip(("gptpar ZeRO-1", "torch FSDP2 (ZeRO-3)"), ("gptpar", "torch"), strict=True):
        peak = max(run_distributed(_peak, 2, impl, fresh=True, timeout=600))
        for r in zero:
            r[name]["peak_bytes"] = peak
    date = time.strftime("%Y-%m-%d")
    print(
        f"sharded optimizer dp=2, CPU gloo, {os.cpu_count()} cores, {date}, torch {torch.__version__}; "
        "step with AdamW, bytes each rank keeps between steps:"
    )
    base = max(r["torch FSDP2 (ZeRO-3)"]["time_s"] for r in zero)
    for name in zero[0]:
        r0 = zero[0][name]
        t = max(r[name]["time_s"] for r in zero)
        print(
            f"  {name:26s} {t:7.3f} s  {2 * 4 * 128 / t:7.0f} tok/s  {base / t:5.2f}x torch  "
            f"peak {r0['peak_bytes'] / 1e6:6.1f} MB/rank  weights {r0['weights'] / 1e6:5.2f} MB  "
            f"grads {r0['gradients'] / 1e6:5.2f} MB  optimizer {r0['optimizer'] / 1e6:5.2f} MB"
        )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"date": date, "sharded_optimizer": zero}, f, indent=1)


if __name__ == "__main__":
    main()
