"""Data parallelism: gradients in contiguous buckets, reduced over dp while backward is still running.

:class:`DataParallel` gives every parameter's ``.grad`` a view into one flat buffer per dtype, split into
buckets (default 25 MB, the first one 1 MB, in reverse parameter order — roughly the order backward
produces gradients). A bucket's reduction starts from a post-accumulate-grad hook as soon as its last
gradient is ready, so communication overlaps the rest of backward; :meth:`DataParallel.finish` waits for
what is still in flight. Under :meth:`no_sync` (all but the last micro-batch of a step) nothing is sent.

Reduction precision (``reduce_dtype``):

* ``float32``: one all-reduce per bucket.
* ``bfloat16`` / ``float16``: low-precision on the wire, fp32 accumulation: the bucket is cast unscaled
  (``gptpar.ops.pack_cast``, optionally with error feedback; dividing by dp first would flush small fp16
  gradients to zero), all-to-all'ed so each rank receives every rank's copy of its ``1/dp`` slice, summed
  locally in fp32 and scaled by ``1/dp`` there, cast once, and all-gathered.
  Every value is rounded twice whatever dp is, so the error does not grow with the number of ranks.
  Between two ranks in bf16 that is exactly what one bf16 all-reduce computes (one addition, rounded
  once), so that is what runs there: one collective, and gloo's fastest.

Hierarchical (Horovod-style, ``hierarchical=True`` or automatic when the dp group spans nodes):
reduce-scatter inside the node, all-reduce across nodes on ``1/k`` of the data, all-gather inside the node.

With ``shard_grads=True`` (ZeRO-1, :class:`gptpar.parallel.zero.ZeroAdamW`) buckets are reduce-scattered
instead: rank r keeps the reduced slice r of every bucket.

With context parallelism (cp > 1) the cp ranks hold partial gradients of the same parameters (each saw
its share of the tokens), so the buckets are reduced over the dp x cp group in the same pass: summed over
cp, averaged over dp (as Megatron's data-parallel-with-cp group). ZeRO then shards over dp x cp too.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from gptpar.errors import GptparConfigError
from gptpar.ops import pack_cast, unpack_accumulate
from gptpar.parallel import comm
from gptpar.parallel.mesh import Group, ParallelState

REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def global_token_count(targets: torch.Tensor, state, ignore_index: int = -100) -> torch.Tensor:
    """The number of valid targets (not ``ignore_index``) in the global batch: this dp rank's ``targets``
    (its rows, whole sequences: cp ranks hold the same) summed over dp. One all-reduce. Divide summed token
    losses by it (``ParallelGPT(..., loss_normalizer=)``, ``PipelineEngine.step(normalizer=)``) and reduce
    with ``DataParallel(average=False)`` for the token-weighted mean of the whole batch at any layout."""
    count = (targets != ignore_index).sum().to(torch.float32).to(state.device).reshape(1)
    return comm.all_reduce(count, state.dp)[0].clamp(min=1)


def allreduce_gradients(model: nn.Module, group: Group, average: bool = False) -> None:
    """Sum (or average) every parameter's ``.grad`` over ``group``, one flat all-reduce per dtype. No
    buckets, no overlap: the simple tool for small groups (e.g. cp) and tests."""
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


@dataclass
class Bucket:
    index: int
    params: list[nn.Parameter]
    grad: torch.Tensor  # flat view into the grad buffer, padded to a multiple of dp
    param: torch.Tensor  # the same range of the flat parameter buffer
    numel: int  # without padding
    pending: int = 0
    launched: bool = False
    phases: tuple = ()  # the reduction's steps: each takes the previous collective's output (see _plan)
    issued: int = 0  # how many phases have been issued
    work: object = None  # the collective in flight (comm.Pending), or None
    residual: torch.Tensor | None = None  # error feedback (fp32, in gradient units)
    shard: torch.Tensor | None = None  # ZeRO: this rank's reduced slice (fp32)

    def views(self):
        """``(param, grad view, param view)`` for each parameter, in bucket order."""
        off = 0
        for prm in self.params:
            k = prm.numel()
            yield prm, self.grad[off : off + k].view_as(prm), self.param[off : off + k].view_as(prm)
            off += k


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _hierarchy(
    state: ParallelState, groups: list[tuple[int, ...]], ranks_per_node: int
) -> tuple[Group | None, Group | None, Group | None]:
    """Intra-node and inter-node subgroups of every reduction group, and a second intra-node group for the
    last phase (created collectively on all ranks)."""
    intra, inter = [], []
    for ranks in groups:
        nodes: dict[int, list[int]] = {}
        for r in ranks:
            nodes.setdefault(r // ranks_per_node, []).append(r)
        local = list(nodes.values())
        if len({len(x) for x in local}) != 1:
            raise GptparConfigError(f"reduction group {ranks} spreads unevenly over nodes of {ranks_per_node} ranks")
        intra.extend(tuple(x) for x in local)
        inter.extend(tuple(x[i] for x in local) for i in range(len(local[0])))
    return (
        state.subgroups(f"dp_intra_node/{ranks_per_node}", intra),
        state.subgroups(f"dp_inter_node/{ranks_per_node}", inter),
        state.subgroups(f"dp_intra_node_2/{ranks_per_node}", intra),  # the all-gather phase's own group
    )


class DataParallel:
    """Bucketed, overlapped gradient reduction over dp (dp x cp with context parallelism) for ``params``
    (see module docstring).

    Use: build it after the model (it re-points every ``.grad`` and parameter into flat buffers), run
    backward, call :meth:`finish` before the optimizer, :meth:`zero_grad` after it.
    """

    def __init__(
        self,
        params,
        state: ParallelState,
        *,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        reduce_dtype: torch.dtype = torch.float32,
        error_feedback: bool = False,
        hierarchical: bool | None = None,
        ranks_per_node: int | None = None,
        shard_grads: bool = False,
        average: bool = True,
    ) -> None:
        if reduce_dtype not in REDUCE_DTYPES:
            raise GptparConfigError(f"reduce_dtype={reduce_dtype} is not supported; expected one of {REDUCE_DTYPES}")
        if error_feedback and reduce_dtype == torch.float32:
            raise GptparConfigError("error_feedback needs a low-precision reduce_dtype (bfloat16 or float16)")
        self.params = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
        if not self.params:
            raise GptparConfigError("DataParallel got no parameters that require gradients")
        self.state = state
        groups = state.reduction_ranks()  # with cp > 1: dp x cp, reduced in one pass (see module docstring)
        self.group = state.groups["dp_cp"] if state.cp.size > 1 else state.dp  # made by init_parallel
        self.reduce_dtype, self.error_feedback, self.shard_grads, self.average = (
            reduce_dtype,
            error_feedback,
            shard_grads,
            average,
        )
        p = self.group.size
        ranks_per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", state.world_size))
        spans_nodes = len({r // ranks_per_node for r in self.group.ranks}) > 1
        local_dp = len([r for r in self.group.ranks if r // ranks_per_node == state.rank // ranks_per_node])
        if hierarchical is None:
            hierarchical = spans_nodes and local_dp > 1 and not shard_grads and reduce_dtype == torch.float32
        if hierarchical and (shard_grads or reduce_dtype != torch.float32):
            raise GptparConfigError(
                "hierarchical reduction is implemented for fp32 all-reduce (not ZeRO, not low precision)"
            )
        self.intra = self.inter = self.intra2 = None
        if hierarchical:
            if not spans_nodes or local_dp == 1:
                raise GptparConfigError(
                    f"hierarchical reduction needs a reduction group (dp, or dp x cp) spanning several nodes with "
                    f"several of its ranks on each; ranks {list(self.group.ranks)} with ranks_per_node={ranks_per_node} "
                    "do not"
                )
            self.intra, self.inter, self.intra2 = _hierarchy(state, groups, ranks_per_node)
        self.hierarchical = hierarchical
        # the low-precision all-gather phase runs on its own clone of the reduction group (see _plan)
        low = reduce_dtype != torch.float32 or any(prm.dtype != torch.float32 for prm in self.params)
        self.group2 = None
        if low and not shard_grads:
            self.group2 = state.subgroups(f"{self.group.name}_allgather", groups)  # made by init_parallel
        self._no_sync = False
        # seconds spent, summed over steps until cleared: casting into the low-precision wire buffer
        # ("pack_s"), casting back ("unpack_s"), and blocked in finish() ("finish_s"); for benchmarks
        self.stats: dict[str, float] = {}
        self._build(bucket_mb, first_bucket_mb, p)
        for prm in self.params:
            prm.register_post_accumulate_grad_hook(self._on_grad_ready)

    # -- construction
    def _build(self, bucket_mb: float, first_bucket_mb: float, p: int) -> None:
        order = list(reversed(self.params))  # backward produces gradients roughly last layer first
        dtypes = sorted({prm.dtype for prm in order}, key=str)
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, Bucket] = {}
        for dtype in dtypes:
            group = [prm for prm in order if prm.dtype == dtype]
            esize = torch.empty((), dtype=dtype).element_size()
            spans, cur, cur_bytes = [], [], 0
            cap = first_bucket_mb
            for prm in group:
                cur.append(prm)
                cur_bytes += prm.numel() * esize
                if cur_bytes >= cap * 2**20:
                    spans.append(cur)
                    cur, cur_bytes, cap = [], 0, bucket_mb
            if cur:
                spans.append(cur)
            sizes = [sum(x.numel() for x in s) for s in spans]
            padded = [-(-n // p) * p for n in sizes]
            device = group[0].device
            gbuf = torch.zeros(sum(padded), dtype=dtype, device=device)
            pbuf = torch.zeros(sum(padded), dtype=dtype, device=device)
            off = 0
            for span, n, npad in zip(spans, sizes, padded, strict=True):
                b = Bucket(len(self.buckets), span, gbuf[off : off + npad], pbuf[off : off + npad], n)
                for prm, gview, pview in b.views():
                    pview.copy_(prm.detach())
                    prm.data = pview  # parameters live in the buffer
                    prm.grad = gview  # autograd accumulates in place
                    self.bucket_of[id(prm)] = b
                if self.error_feedback:
                    b.residual = torch.zeros(npad, dtype=torch.float32, device=device)
                self.buckets.append(b)
                off += npad
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._launched: list[Bucket] = []  # this step's buckets, in launch order
        for b in self.buckets:
            b.pending, b.launched, b.phases, b.issued, b.work = len(b.params), False, (), 0, None

    # -- hooks and progress
    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (e.g. all micro-batches but the last); nothing is communicated."""
        outer, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = outer

    def _on_grad_ready(self, prm: nn.Parameter) -> None:
        if self._no_sync:
            return
        b = self.bucket_of[id(prm)]
        b.pending -= 1
        if b.pending == 0 and not b.launched:
            self._launch(b)
        self._progress(block=False)

    # A bucket's reduction is a chain of collectives ("phases"). Every rank must issue the collectives of
    # one process group in the same order, but ranks see collectives complete at different times. So:
    # first phases are issued at launch (buckets launch in autograd's order, the same on every rank);
    # phase k > 0 of a bucket is issued only after every earlier-launched bucket with a phase k has issued
    # its own; and each phase index uses its own process group (phase 0 the reduction group, phase 1 a
    # second group or the inter-node group, phase 2 a second intra-node group).
    def _plan(self, b: Bucket) -> tuple:
        """``(first collective, then-steps...)``: each then-step takes the previous collective's output and
        returns the next collective (a ``comm.Pending``) or None when the bucket is reduced."""
        p = self.group.size
        scale = 1.0 / self.state.dp.size if self.average else 1.0  # summed over cp, averaged over dp
        fp32 = self.reduce_dtype == torch.float32 and b.grad.dtype == torch.float32

        def sum_slices(out):  # every rank's copy of my slice, summed in fp32, then scaled (no underflow)
            parts = out.view(p, -1)
            slice_sum = parts[0].to(torch.float32, copy=True)
            for part in parts[1:]:  # in place: no fp32 copy of the whole received buffer
                slice_sum.add_(part)
            if not fp32 and scale != 1.0:
                slice_sum.mul_(scale)
            if self.shard_grads:
                b.shard = slice_sum
                return None
            return comm.all_gather_async(slice_sum.to(self.reduce_dtype), self.group2)

        def unpack(gathered, scale=1.0):
            t0 = time.perf_counter()
            b.grad.zero_()
            unpack_accumulate(gathered, [b.grad], scale)  # low precision -> the bucket's dtype, one pass
            self._count("unpack_s", t0)

        if not fp32:  # cast unscaled: dividing by dp first would flush small gradients to zero in fp16
            t0 = time.perf_counter()
            low = pack_cast([b.grad], 1.0, self.reduce_dtype, b.residual)
            self._count("pack_s", t0)
            if p == 2 and self.reduce_dtype == torch.bfloat16 and not self.shard_grads:
                # Two ranks: one addition per element, and bf16's sum is the fp32 sum rounded once, as the
                # fp32-accumulating path computes it (bf16 has fp32's range: no overflow; the scale, a power
                # of two, is exact after it). So one bf16 all-reduce, half of fp32's bytes, same values.
                return (comm.all_reduce_async(low, self.group), lambda summed: unpack(summed, scale))
            return (comm.all_to_all_async(low, self.group), sum_slices, unpack)
        if scale != 1.0:
            b.grad.mul_(scale)
        if self.shard_grads:
            return (comm.all_to_all_async(b.grad, self.group), sum_slices)
        if self.hierarchical:  # reduce-scatter in the node, all-reduce across nodes on 1/k, all-gather in the node
            return (
                comm.reduce_scatter_async(b.grad, self.intra),
                lambda part: comm.all_reduce_async(part, self.inter),
                lambda part: comm.all_gather_async(part, self.intra2),
                lambda full: _copy(b.grad, full),
            )
        return (comm.all_reduce_async(b.grad, self.group), lambda _: None)

    def _count(self, key: str, t0: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + time.perf_counter() - t0

    def _launch(self, b: Bucket) -> None:
        first, *then = self._plan(b)
        b.launched, b.work, b.phases, b.issued = True, first, tuple(then), 1
        self._launched.append(b)

    def _progress(self, block: bool) -> None:
        """Issue every next phase that may be issued now (see above); ``block``: wait for all of them."""
        for k in range(max((len(b.phases) for b in self._launched), default=0)):
            for b in self._launched:
                if len(b.phases) <= k or b.issued > k + 1:
                    continue  # no such step, or already past it
                if b.issued < k + 1 or not (block or b.work.done()):
                    break  # an earlier bucket goes first on this phase's group
                nxt = b.phases[k](b.work.wait())
                b.work, b.issued = nxt, b.issued + 1
                if nxt is None:
                    b.phases = b.phases[: k + 1]  # reduced

    def finish(self) -> None:
        """Launch whatever has not been launched (e.g. after :meth:`no_sync`, or parameters that received no
        gradient) and wait for every bucket. After it, ``.grad`` holds the reduced gradients (with
        ``shard_grads``, each bucket's ``shard`` holds this rank's reduced slice)."""
        for b in self.buckets:
            if not b.launched:
                self._launch(b)
        t0 = time.perf_counter()
        self._progress(block=True)
        self._count("finish_s", t0)
        self._reset_pending()

    def zero_grad(self) -> None:
        """Zero the gradient buffer and re-point every ``.grad`` into it (an optimizer's
        ``zero_grad(set_to_none=True)`` would have detached them)."""
        for b in self.buckets:
            b.grad.zero_()
            for prm, gview, _ in b.views():
                prm.grad = gview
