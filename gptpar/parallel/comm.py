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

import contextlib
import threading
import time

import torch
import torch.distributed as dist

from gptpar.errors import CollectiveTimeoutError, GptparConfigError
from gptpar.parallel.mesh import Group

ReduceOp = dist.ReduceOp

# torch >= 2.13 renamed the tensor-in/tensor-out collectives; older releases (the GPU image's 2.11) have
# only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


_traffic: dict[str, int] | None = None


@contextlib.contextmanager
def count_traffic():
    """Count the bytes this rank sends, by operation, inside the block: ``with count_traffic() as t: ...``.

    Collectives are counted as their bandwidth-optimal ring algorithms send (all-reduce ``2(p-1)/p n``,
    all-gather ``(p-1) n_in``, reduce-scatter and all-to-all ``(p-1)/p n``); point-to-point exactly.
    """
    global _traffic
    outer, _traffic = _traffic, {}
    try:
        yield _traffic
    finally:
        inner, _traffic = _traffic, outer
        if outer is not None:
            for k, v in inner.items():
                outer[k] = outer.get(k, 0) + v


def _count(op: str, nbytes: float) -> None:
    if _traffic is not None:
        _traffic[op] = _traffic.get(op, 0) + int(nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------- liveness
_heartbeat: dict = {}
HEARTBEAT_S = 1.0


def start_heartbeat(world: Group) -> None:
    """Count up a per-rank key in the default store every second from a daemon thread, so that a rank whose
    collective times out can tell the peers that stopped answering (stopped, hung in a kernel, dead) from
    those that are alive but elsewhere. Idempotent; a no-op for a world of one."""
    if world.size == 1 or _heartbeat.get("rank") == world.global_rank:
        return
    store = dist.distributed_c10d._get_default_store()

    def beat(key=f"gptpar/heartbeat/{world.global_rank}"):
        n = 0
        while True:
            n += 1
            try:
                store.set(key, str(n))
            except Exception:  # the store is gone (shutdown): stop beating
                return
            time.sleep(HEARTBEAT_S)

    _heartbeat.update(rank=world.global_rank, store=store)
    threading.Thread(target=beat, name="gptpar-heartbeat", daemon=True).start()


def silent_ranks(ranks: tuple[int, ...]) -> list[int] | None:
    """The ranks whose heartbeat did not advance over a few seconds (None: no heartbeat running)."""
    store = _heartbeat.get("store")
    if store is None:
        return None

    def read():
        out = {}
        for r in ranks:
            key = f"gptpar/heartbeat/{r}"
            out[r] = store.get(key) if store.check([key]) else None
        return out

    try:
        before = read()
        time.sleep(3 * HEARTBEAT_S)
        after = read()
    except Exception:
        return None
    return [r for r in ranks if after[r] is None or after[r] == before[r]]


def _timeout_error(op: str, group: Group, detail: str) -> CollectiveTimeoutError:
    silent = silent_ranks(group.ranks)
    if silent:
        who = f"rank(s) {silent} stopped answering (no heartbeat): stopped, hung or dead"
    elif silent is not None:
        who = "every rank of the group is alive: one issued a different collective or is stuck inside one"
    else:
        who = "a peer is missing, stuck, or issued a different collective"
    return CollectiveTimeoutError(
        f"rank {group.global_rank}: {op} on group '{group.name}' (ranks {list(group.ranks)}) did not complete "
        f"within {group.timeout.total_seconds():g}s; {who}{detail}"
    )


def _wait(work, op: str, group: Group) -> None:
    try:
        ok = work.wait(timeout=group.timeout)
    except RuntimeError as e:  # gloo/nccl raise RuntimeError (or DistBackendError, a subclass) on timeout
        msg = str(e)
        if "timed out" in msg.lower() or "timeout" in msg.lower():
            raise _timeout_error(op, group, f" ({msg.strip().splitlines()[0]})") from e
        raise RuntimeError(f"rank {group.global_rank}: {op} on group '{group.name}' failed: {msg}") from e
    if ok is False:
        raise _timeout_error(op, group, "")


def all_reduce(tensor: torch.Tensor, group: Group, op=ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over ``group``; returns ``tensor``."""
    if group.size == 1:
        return tensor
    _count("all_reduce", 2 * (group.size - 1) / group.size * _nbytes(tensor))
    _wait(dist.all_reduce(tensor, op=op, group=group.pg, async_op=True), "all_reduce", group)
    return tensor


class Pending:
    """An asynchronous collective: ``wait()`` (bounded by the group's timeout) returns its output."""

    def __init__(self, work, op: str, group: Group, out: torch.Tensor) -> None:
        self.work, self.op, self.group, self.out = work, op, group, out

    def done(self) -> bool:
        return self.work is None or self.work.is_completed()

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            _wait(self.work, self.op, self.group)
            self.work = None
        return self.out


def all_reduce_async(tensor: torch.Tensor, group: Group, op=ReduceOp.SUM) -> Pending:
    """Start an in-place all-reduce; returns a :class:`Pending` whose ``wait()`` returns ``tensor``."""
    if group.size == 1:
        return Pending(None, "all_reduce", group, tensor)
    _count("all_reduce", 2 * (group.size - 1) / group.size * _nbytes(tensor))
    return Pending(dist.all_reduce(tensor, op=op, group=group.pg, async_op=True), "all_reduce", group, tensor)


def all_to_all_async(send: torch.Tensor, group: Group) -> Pending:
    """Start an all-to-all of ``send`` ``[p * n]`` (chunk j to rank j); ``wait()`` returns ``[p * n]``
    whose chunk j came from rank j."""
    recv = torch.empty_like(send)
    if group.size == 1:
        recv.copy_(send)
        return Pending(None, "all_to_all", group, recv)
    _count("all_to_all", (group.size - 1) / group.size * _nbytes(send))
    return Pending(dist.all_to_all_single(recv, send, group=group.pg, async_op=True), "all_to_all", group, recv)


def all_gather_async(shard: torch.Tensor, group: Group) -> Pending:
    """Start an all-gather of equal 1-D shards; ``wait()`` returns ``[p * n]`` in rank order."""
    out = torch.empty(group.size * shard.numel(), dtype=shard.dtype, device=shard.device)
    if group.size == 1:
        out.copy_(shard)
        return Pending(None, "all_gather", group, out)
    _count("all_gather", (group.size - 1) * _nbytes(shard))
    return Pending(_all_gather_single(out, shard, group=group.pg, async_op=True), "all_gather", group, out)


def barrier(group: Group) -> None:
    """Wait until every rank of ``group`` reaches this point (bounded by the group's timeout)."""
    if group.size == 1:
        return
    _wait(dist.barrier(group=group.pg, async_op=True), "barrier", group)


def broadcast(tensor: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
    """In-place broadcast from group-local rank ``src``; returns ``tensor``."""
    if group.size == 1:
        return tensor
    _count("broadcast", _nbytes(tensor))
    _wait(dist.broadcast(tensor, src=group.ranks[src], group=group.pg, async_op=True), "broadcast", group)
    return tensor


def all_gather(tensor: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's equally-shaped ``tensor`` along ``dim`` (group rank order)."""
    if group.size == 1:
        return tensor
    x = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((group.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _count("all_gather", (group.size - 1) * _nbytes(x))
    _wait(_all_gather_single(out, x, group=group.pg, async_op=True), "all_gather", group)
    return out.movedim(0, dim)


def reduce_scatter_async(flat: torch.Tensor, group: Group) -> Pending:
    """Start a reduce-scatter of a 1-D ``flat`` (length divisible by the group size); ``wait()`` returns
    this rank's summed ``1/size`` slice."""
    if group.size == 1:
        return Pending(None, "reduce_scatter", group, flat)
    if flat.numel() % group.size:
        raise GptparConfigError(
            f"reduce_scatter on group '{group.name}': {flat.numel()} elements are not divisible by {group.size}"
        )
    out = torch.empty(flat.numel() // group.size, dtype=flat.dtype, device=flat.device)
    _count("reduce_scatter", (group.size - 1) / group.size * _nbytes(flat))
    return Pending(_reduce_scatter_single(out, flat, group=group.pg, async_op=True), "reduce_scatter", group, out)


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
    _count("reduce_scatter", (group.size - 1) / group.size * _nbytes(x))
    _wait(_reduce_scatter_single(out, x, group=group.pg, async_op=True), "reduce_scatter", group)
    return out.movedim(0, dim)


class P2PHandle:
    """Pending point-to-point operations; :meth:`wait` bounds the wait by the group's timeout."""

    def __init__(self, works: list, op: str, group: Group) -> None:
        self.works, self.op, self.group = works, op, group

    def wait(self) -> None:
        for w in self.works:
            _wait(w, self.op, self.group)
        self.works = []

    def done(self) -> bool:
        """Whether every operation has completed (never blocks)."""
        return all(w.is_completed() for w in self.works)


def isend(tensor: torch.Tensor, group: Group, dst: int, tag: int = 0) -> P2PHandle:
    """Start sending ``tensor`` to group-local rank ``dst``; keep ``tensor`` alive until ``wait()``."""
    _count("send", _nbytes(tensor))
    work = dist.isend(tensor, dst=group.ranks[dst], group=group.pg, tag=tag)
    return P2PHandle([work], f"send to {group.name} rank {dst} (tag {tag})", group)


def irecv(buf: torch.Tensor, group: Group, src: int, tag: int = 0) -> P2PHandle:
    """Start receiving into ``buf`` from group-local rank ``src``; read ``buf`` after ``wait()``."""
    work = dist.irecv(buf, src=group.ranks[src], group=group.pg, tag=tag)
    return P2PHandle([work], f"recv from {group.name} rank {src} (tag {tag})", group)


def ring_shift(tensor: torch.Tensor, group: Group, tag: int = 0) -> tuple[torch.Tensor, P2PHandle]:
    """Start sending ``tensor`` to the next rank of ``group`` and receiving the previous rank's into a new
    buffer (same shape/dtype). Returns ``(buffer, handle)``: compute on, then ``handle.wait()`` before
    reading the buffer. Both directions are posted together (no ordering deadlock)."""
    buf = torch.empty_like(tensor)
    if group.size == 1:
        buf.copy_(tensor)
        return buf, P2PHandle([], "ring_shift", group)
    nxt = group.ranks[(group.rank + 1) % group.size]
    prv = group.ranks[(group.rank - 1) % group.size]
    _count("ring_shift", _nbytes(tensor))
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), nxt, group=group.pg, tag=tag),
        dist.P2POp(dist.irecv, buf, prv, group=group.pg, tag=tag),
    ]
    return buf, P2PHandle(dist.batch_isend_irecv(ops), "ring_shift (send/recv)", group)


def all_to_all(x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into ``size`` chunks along ``scatter_dim``, send chunk j to rank j, and concatenate the
    chunks received along ``gather_dim`` (rank order). E.g. Ulysses: ``[b, h, s/p, d] -> [b, h/p, s, d]``."""
    if group.size == 1:
        return x
    if x.shape[scatter_dim] % group.size:
        raise GptparConfigError(
            f"all_to_all on group '{group.name}': dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by {group.size}"
        )
    send = torch.stack(x.chunk(group.size, dim=scatter_dim)).contiguous()  # [p, ...chunk]
    recv = torch.empty_like(send)
    _count("all_to_all", (group.size - 1) / group.size * _nbytes(send))
    _wait(dist.all_to_all_single(recv, send, group=group.pg, async_op=True), "all_to_all", group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = (group, gather_dim, scatter_dim)
        return all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, *ctx.args), None, None, None


def all_to_all_region(x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable :func:`all_to_all`; its backward is the inverse all-to-all."""
    return x if group.size == 1 else _AllToAll.apply(x, group, scatter_dim, gather_dim)


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
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterAlongSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


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


def gather_along_seq(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sequence parallelism: ``[s/t, b, h] -> [s, b, h]`` forward (``dim``: the sequence dimension);
    reduce-scatter of the gradient backward."""
    return x if group.size == 1 else _GatherAlongSeq.apply(x, group, dim)


def reduce_scatter_along_seq(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sequence parallelism: ``[s, b, h]`` partial sums -> ``[s/t, b, h]`` reduced (``dim``: the sequence
    dimension); all-gather backward."""
    return x if group.size == 1 else _ReduceScatterAlongSeq.apply(x, group, dim)
