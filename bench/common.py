"""Helpers shared by every benchmark in bench/: the one timer (:func:`timed_interleaved`, :func:`timed`) and
per-rank peak memory."""

from __future__ import annotations

import os
import resource
import statistics
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_interleaved(fns: dict, reps: int, *, warmup: int = 1, device: str = "cpu", barrier=None) -> dict:
    """The one timer of bench/: every function of ``fns`` run ``warmup`` times, then ``reps`` rounds
    interleaved (A B A B ...: drift on a noisy machine hits both alike). Returns each name's per-round
    seconds. ``barrier``: called before each run (e.g. ``torch.distributed.barrier``: ranks start together);
    ``device="cuda"``: CUDA events around each call."""
    cuda = device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if cuda:
        torch.cuda.synchronize()
    out = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if barrier is not None:
                barrier()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out[name].append(time.perf_counter() - t0)
    return out


def timed(fn, reps: int, *, warmup: int = 1, device: str = "cpu", barrier=None) -> float:
    """Median seconds of ``fn`` (:func:`timed_interleaved` of one function)."""
    return statistics.median(timed_interleaved({"fn": fn}, reps, warmup=warmup, device=device, barrier=barrier)["fn"])


def peak_memory_of(build, steps: int = 2) -> int:
    """Peak resident bytes added by ``build()`` (which returns a step function) and ``steps`` steps of it,
    over what this process held before. Run it in a fresh process per implementation."""
    base = rss_bytes()
    step = build()
    for _ in range(steps):
        step()
    return max(0, peak_rss_bytes() - base)
