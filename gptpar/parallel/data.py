"""Data-parallel gradient reduction.

Today: :func:`allreduce_gradients`, one coalesced all-reduce of every gradient over a group (used for the
dp and cp groups, whose ranks hold replicated parameters with partial gradients). Bucketed, overlapped,
mixed-precision reduction arrives with the data-parallel issue.
"""

from __future__ import annotations

import torch
from torch import nn

from gptpar.parallel import comm
from gptpar.parallel.mesh import Group


@torch.no_grad()
def allreduce_gradients(model: nn.Module, group: Group, average: bool = False) -> None:
    """Sum (or average) every parameter's ``.grad`` over ``group``, in one flat all-reduce per dtype."""
    if group.size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        comm.all_reduce(flat, group)
        if average:
            flat.div_(group.size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
