"""Collectives, the only place gptpar calls torch.distributed for communication.

Two layers:

* plain collectives (:func:`all_reduce`, :func:`all_gather`, :func:`reduce_scatter`, :func:`broadcast`) that
  are no-ops on size-1 groups and never wait forever: each is issued async and waited with the group's
  timeout, raising :class:`~gptpar.errors.CollectiveTimeoutError` naming the rank, group and operation;
* autograd-aware region markers (Megatron's conjugate pairs) used by the parallel layers:

  ============================  ======================  =======================
  function                      forward                 backward
  ============================  ======================  =======================
  copy_to_region (f)            identity                all-reduce
  reduce_from_region (g)        all-reduce              identity
  gather_from_region            all-gather (dim)        split (dim)
  scatter_to_region             split (dim)             all-gather (dim)
  gather_along_seq              all-gather (dim 0)      reduce-scatter (dim 0)
  reduce_scatter_along_seq      reduce-scatter (dim 0)  all-gather (dim 0)
  ============================  ======================  =======================
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gptpar.errors import CollectiveTimeoutError, GptparConfigError
from gptpar.parallel.mesh import Group

ReduceOp = dist.ReduceOp


def _wait(work, op: str, group: Group) -> None:
    try:
        ok = work.wait(timeout=group.timeout)
    except RuntimeError as e:  # gloo/nccl raise RuntimeError (or DistBackendError, a subclass) on timeout
        msg = str(e)
        if "timed out" in msg.lower() or "timeout" in msg.lower():
            raise CollectiveTimeoutError(
                f"rank {group.global_rank}: {op} on group '{group.name}' (ranks {list(group.ranks)}) did not complete "
                f"within {group.timeout.total_seconds():g}s; a peer is missing, stuck, or issued a different "
                f"collective ({msg.strip().splitlines()[0]})"
            ) from e
        raise RuntimeError(f"rank {group.global_rank}: {op} on group '{group.name}' failed: {msg}") from e
    if ok is False:
        raise CollectiveTimeoutError(
            f"rank {group.global_rank}: {op} on group '{group.name}' (ranks {list(group.ranks)}) did not complete "
            f"within {group.timeout.total_seconds():g}s"
        )


def all_reduce(tensor: torch.Tensor, group: Group, op=ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over ``group``; returns ``tensor``."""
    if group.size == 1:
        return tensor
    _wait(dist.all_reduce(tensor, op=op, group=group.pg, async_op=True), "all_reduce", group)
    return tensor


def broadcast(tensor: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
    """In-place broadcast from group-local rank ``src``; returns ``tensor``."""
    if group.size == 1:
        return tensor
    _wait(dist.broadcast(tensor, src=group.ranks[src], group=group.pg, async_op=True), "broadcast", group)
    return tensor


def all_gather(tensor: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's equally-shaped ``tensor`` along ``dim`` (group rank order)."""
    if group.size == 1:
        return tensor
    x = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((group.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _wait(dist.all_gather_into_tensor(out, x, group=group.pg, async_op=True), "all_gather", group)
    return out.movedim(0, dim)


def reduce_scatter(tensor: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sum over ranks, then keep this rank's ``1/size`` slice along ``dim``."""
    if group.size == 1:
        return tensor
    if tensor.shape[dim] % group.size:
        raise GptparConfigError(
            f"reduce_scatter on group '{group.name}': dim {dim} of size {tensor.shape[dim]} is not divisible by {group.size}"
        )
    x = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // group.size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _wait(dist.reduce_scatter_tensor(out, x, group=group.pg, async_op=True), "reduce_scatter", group)
    return out.movedim(0, dim)


def split_along(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """This rank's slice of ``tensor`` along ``dim`` (no communication)."""
    if group.size == 1:
        return tensor
    if tensor.shape[dim] % group.size:
        raise GptparConfigError(
            f"cannot split dim {dim} of size {tensor.shape[dim]} evenly across group '{group.name}' of size {group.size}"
        )
    return tensor.chunk(group.size, dim=dim)[group.rank].contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # A fresh buffer: the input may be saved by autograd or viewed elsewhere.
        return all_reduce(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, ctx.group, ctx.dim), None, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherAlongSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, 0), None


class _ReduceScatterAlongSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, 0), None


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward. Enters a parallel region."""
    return x if group.size == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Megatron's ``g``: all-reduce forward, identity backward. Leaves a parallel region."""
    return x if group.size == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """All-gather along ``dim`` forward; keep this rank's slice of the gradient backward."""
    return x if group.size == 1 else _GatherFromRegion.apply(x, group, dim)


def scatter_to_region(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """Keep this rank's slice along ``dim`` forward; all-gather the gradient backward."""
    return x if group.size == 1 else _ScatterToRegion.apply(x, group, dim)


def gather_along_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sequence parallelism: ``[s/t, b, h] -> [s, b, h]`` forward; reduce-scatter of the gradient backward."""
    return x if group.size == 1 else _GatherAlongSeq.apply(x, group)


def reduce_scatter_along_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sequence parallelism: ``[s, b, h]`` partial sums -> ``[s/t, b, h]`` reduced; all-gather backward."""
    return x if group.size == 1 else _ReduceScatterAlongSeq.apply(x, group)
