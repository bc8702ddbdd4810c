"""Helpers shared by the side-by-side benchmarks: timing and per-rank peak memory."""

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


def timed(fn, reps: int, group=None) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up, ranks starting together."""
    ts = []
    for rep in range(reps + 1):
        torch.distributed.barrier(group)
        t0 = time.perf_counter()
        fn()
        if rep:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_memory_of(build, steps: int = 2) -> int:
    """Peak resident bytes added by ``build()`` (which returns a step function) and ``steps`` steps of it,
    over what this process held before. Run it in a fresh process per implementation."""
    base = rss_bytes()
    step = build()
    for _ in range(steps):
        step()
    return max(0, peak_rss_bytes() - base)
