"""Measuring a step's peak memory: the number the planner's memory model is checked against.

* On a GPU: the caching allocator's own peak (``torch.cuda.max_memory_allocated``) over the step.
* On CPU (no allocator statistics): every tensor storage alive during the step, tracked by a dispatch
  mode that sees each op's outputs and drops them when their storage is freed (sizes rounded up to 512
  bytes as the CUDA allocator rounds them), with the model's parameters, gradients, buffers and optimizer
  state counted from the start. (torch's own ``MemTracker`` refuses a module run more than once per
  step: gradient accumulation and pipeline micro-batches do that.)

Process RSS is a different number (the interpreter, libraries and the CPU allocator's caches, ~230 MiB of
baseline here): it is reported separately, never as "peak memory".
"""

from __future__ import annotations

import itertools
import resource
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def rss_peak_bytes() -> int:
    """This process's peak resident set size (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _LiveStorages:
    """Bytes of tensor storage alive: each storage counted once (rounded up to the CUDA allocator's 512 B)
    from when it is first seen until it is freed."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in self.seen:
            return
        n = -(-st.nbytes() // 512) * 512
        self.seen.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        if key in self.seen:
            self.seen.discard(key)
            self.live -= n


class _Track(TorchDispatchMode):
    def __init__(self, live: _LiveStorages) -> None:
        super().__init__()
        self.tracked = live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self.tracked.add(t)
        return out


def step_peak_bytes(
    step: Callable[[], object],
    modules: Iterable[nn.Module],
    optimizer=None,
    device: torch.device | None = None,
    extra: Iterable[torch.Tensor] = (),
) -> int:
    """Run ``step()`` once and return its peak tensor memory in bytes. On a GPU the allocator's peak; on
    CPU the most bytes of tensor storage alive at once: the parameters, gradients and buffers of
    ``modules``, ``optimizer``'s state and ``extra`` (e.g. data-parallel buffers) from the start, plus
    every op's outputs while they live (forward activations, temporaries, new gradients and optimizer
    state)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    live = _LiveStorages()
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            live.add(t)
            if t.grad is not None:
                live.add(t.grad)
    if optimizer is not None:
        if hasattr(optimizer, "state_tensors"):  # gptpar's ZeroAdamW
            state = optimizer.state_tensors()
        else:
            state = [v for s in optimizer.state.values() for v in s.values()]
        for t in state:
            live.add(t)
    for t in extra:
        live.add(t)
    with _Track(live):
        step()
    return live.peak
