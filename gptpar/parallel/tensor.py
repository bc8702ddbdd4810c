"""Megatron-style tensor-parallel layers and the vocab-parallel cross-entropy.

Every sharded parameter carries its sharding spec as attributes (``tp_dim``: the dimension split across
tp, ``tp_chunks``: how many logical blocks that dimension holds, e.g. 3 for a fused q/k/v weight, each
block split separately so that rank r holds the r-th slice of q, of k and of v). :func:`shard_tensor` and
:func:`unshard_tensor` use the spec to go between full and per-rank tensors; nothing else needs to know.

Initialisation: a layer builds the *full* weight with the global RNG (same seed on every tp rank, same
calls as the torch module it replaces) and keeps its shard, so ``torch.manual_seed(s); ColumnParallelLinear``
holds exactly the shard of ``torch.manual_seed(s); nn.Linear``, whatever tp is. This materialises one full
weight at a time on the host; it is not used for loading checkpoints, which go shard by shard.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptpar.errors import GptparConfigError
from gptpar.ops.mlp import check_activation
from gptpar.ops.wgrad import (
    deferred_queue,
    forward_saving,
    linear,
    linear_weight_grads,
    saved_and_pre_activation_grad,
    weight_grads_now_or_later,
)
from gptpar.parallel import comm
from gptpar.parallel.mesh import Group
from gptpar.sharding import (  # noqa: F401  (re-exported: the spec helpers live below the layers)
    Chunks,
    full_length,
    head_split,
    local_length,
    replicated_rows,
    set_tp_spec,
    shard_tensor,
    tp_spec,
    unshard_tensor,
)

_SKIP_INIT = False


@contextlib.contextmanager
def skip_init():
    """Layers built inside leave their parameters uninitialised (no full-size weight is made to shard):
    for models whose weights are loaded right after, e.g. from a checkpoint, slice by slice."""
    global _SKIP_INIT
    outer, _SKIP_INIT = _SKIP_INIT, True
    try:
        yield
    finally:
        _SKIP_INIT = outer


def _check_divisible(what: str, value: int, group: Group) -> int:
    if value % group.size:
        raise GptparConfigError(f"{what}={value} is not divisible by the '{group.name}' group size {group.size}")
    return value // group.size


# ---------------------------------------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A``'s output rows split across tp: rank r computes ``Y[..., r-th slice]``.

    In ``[..., in]`` (replicated), out ``[..., out/tp]`` or, with ``gather_output``, ``[..., out]``.
    Collectives: backward all-reduce of the input gradient (``copy_to_region``); all-gather if ``gather_output``.
    With ``sequence_parallel`` the input is ``[s/tp, b, in]`` and is all-gathered along the sequence first
    (backward: reduce-scatter), replacing the all-reduce; ``seq_dim`` names the sequence dimension (0 for
    Megatron's ``[s, b, h]``, 1 for batch-first models).
    ``chunks``: the output holds that many logical blocks (fused q/k/v = 3, fused gate/up = 2), each split
    separately across tp; or a tuple of head counts per block (grouped-query q|k|v: ``(n_head, n_kv_head,
    n_kv_head)``), see :func:`head_split`. Rows replicated over a few tp ranks (K/V heads when tp >
    n_kv_head) need ``shared_group``, the subgroup of ranks holding the same rows: their gradients are
    partial (each rank's query heads only) and are summed over it as they are produced.
    ``activation``: ``"gelu"`` (tanh) or ``"swiglu"`` (over the gate|up blocks, ``chunks=2``; the output is
    half as wide) applied in the GEMM's epilogue (:mod:`gptpar.ops.mlp`, fused Triton kernel on GPUs) and
    differentiated at the start of its backward.
    ``reduce_input_grad=False``: the input comes from a collective whose backward already sums the input
    gradient over tp (e.g. a sequence all-gather shared by several column linears), so skip that all-reduce.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: Group,
        gather_output: bool = False,
        chunks: Chunks = 1,
        sequence_parallel: bool = False,
        seq_dim: int = 0,
        activation: str | None = None,
        shared_group: Group | None = None,
        reduce_input_grad: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.reduce_input_grad = reduce_input_grad
        if activation is not None:
            check_activation(activation)
            if activation == "swiglu" and chunks != 2:
                raise GptparConfigError(f"activation='swiglu' needs the gate|up blocks: chunks=2, got chunks={chunks}")
        if sequence_parallel and gather_output:
            raise GptparConfigError("ColumnParallelLinear: gather_output and sequence_parallel cannot be combined")
        if isinstance(chunks, int):
            if out_features % chunks:
                raise GptparConfigError(f"out_features={out_features} is not divisible by chunks={chunks}")
            if (out_features // chunks) % group.size:
                raise GptparConfigError(
                    f"out_features={out_features} (in {chunks} block(s)) is not divisible by the '{group.name}' group "
                    f"size {group.size}: each block's rows are split across tp"
                )
        local_out = local_length(out_features, chunks, group.size)
        distinct, sharing = replicated_rows(local_out, chunks, group.size)
        if sharing > 1 and (shared_group is None or shared_group.size != sharing):
            raise GptparConfigError(
                f"ColumnParallelLinear: head spec {chunks} replicates rows over {sharing} tp ranks: pass their "
                f"subgroup as shared_group (got {shared_group})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.group, self.gather_output, self.chunks = group, gather_output, chunks
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(local_out, in_features, **factory))
        set_tp_spec(self.weight, 0, chunks)
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out, **factory))
            set_tp_spec(self.bias, 0, chunks)
        else:
            self.register_parameter("bias", None)
        if sharing > 1:
            for prm in self.parameters():
                mark_shared_rows(prm, distinct, shared_group)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if _SKIP_INIT:
            return
        full = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)  # same RNG calls as nn.Linear
        load_full_(self.weight, full.weight, self.group)
        if self.bias is not None:
            load_full_(self.bias, full.bias, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and self.group.size > 1:
            # [s/tp, b, in] all-gathered to [s, b, in] inside the linear, which keeps only the shard for
            # backward (re-gathered there, overlapped with the input-gradient GEMM), as Megatron does.
            y = _SequenceParallelColumnLinear.apply(
                x, self.weight, self.bias, self.group, self.seq_dim, self.activation
            )
        else:
            if self.reduce_input_grad:
                x = comm.copy_to_region(x, self.group)
            y = linear(x, self.weight, self.bias, self.activation)
        if self.gather_output:
            if self.chunks != 1:
                raise GptparConfigError(
                    "gather_output with chunks > 1 would interleave blocks; gather per block instead"
                )
            y = comm.gather_from_region(y, self.group, dim=-1)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (local {self.weight.shape[0]}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, chunks={self.chunks}"
            + (f", activation={self.activation}" if self.activation else "")
        )


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A``'s input columns split across tp; partial products are summed across tp.

    In ``[..., in/tp]`` (``input_is_parallel``) or ``[..., in]`` (then split locally), out ``[..., out]``.
    Collectives: forward all-reduce of the output (``reduce_from_region``); the bias is replicated and
    added once, after the reduction. With ``sequence_parallel`` the output is reduce-scattered along the
    sequence to ``[s/tp, b, out]`` instead (backward: all-gather).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: Group,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        seq_dim: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise GptparConfigError("RowParallelLinear: sequence_parallel requires input_is_parallel=True")
        local_in = _check_divisible("in_features", in_features, group)
        self.in_features, self.out_features = in_features, out_features
        self.group, self.input_is_parallel = group, input_is_parallel
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, local_in, **factory))
        set_tp_spec(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
            set_tp_spec(self.bias, None)
            if sequence_parallel:  # added to this rank's tokens only: its gradient is partial
                mark_sequence_parallel(self.bias, group)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if _SKIP_INIT:
            return
        full = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        load_full_(self.weight, full.weight, self.group)
        if self.bias is not None:
            load_full_(self.bias, full.bias, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:  # nothing to reduce: the bias goes into the GEMM (one addmm)
            return linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = comm.scatter_to_region(x, self.group, dim=-1)
        y = linear(x, self.weight)
        if self.sequence_parallel:  # [s, b, out] partial sums -> [s/tp, b, out]
            y = comm.reduce_scatter_along_seq(y, self.group, self.seq_dim)
        else:
            y = comm.reduce_from_region(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows: rank r holds rows ``[r*V/tp, (r+1)*V/tp)``.

    In ``[...]`` token ids (replicated), out ``[..., dim]`` (replicated). Ids outside the local range look
    up zeros; the forward all-reduce (``reduce_from_region``) fills in every row from its owner. With
    ``sequence_parallel`` the ids are ``[s, b]`` and the output is reduce-scattered to ``[s/tp, b, dim]``.
    ``padding_idx`` (as ``nn.Embedding``'s): that row gets no gradient, on the rank that holds it.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group: Group,
        sequence_parallel: bool = False,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        local = _check_divisible("num_embeddings (vocab size)", num_embeddings, group)
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        self.sequence_parallel = sequence_parallel
        self.vocab_start = group.rank * local
        self.vocab_end = self.vocab_start + local
        if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
            raise GptparConfigError(f"padding_idx={padding_idx} is outside the vocabulary [0, {num_embeddings})")
        self.padding_idx = padding_idx
        inside = padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_end
        self.local_padding_idx = padding_idx - self.vocab_start if inside else None
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        set_tp_spec(self.weight, 0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if _SKIP_INIT:
            return
        load_full_(self.weight, nn.Embedding(self.num_embeddings, self.embedding_dim).weight, self.group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight, self.local_padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight, self.local_padding_idx).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_along_seq(out, self.group)
        return comm.reduce_from_region(out, self.group)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, local rows [{self.vocab_start}, {self.vocab_end}){pad}"


def _gather_seq_async(x: torch.Tensor, group: Group, dim: int):
    """Start an all-gather of ``x`` along ``dim``; returns a function that waits and returns the result."""
    moved = x.movedim(dim, 0).contiguous()
    pending = comm.all_gather_async(moved.reshape(-1), group)

    def wait() -> torch.Tensor:
        full = pending.wait().view((group.size * moved.shape[0],) + tuple(moved.shape[1:]))
        return full.movedim(0, dim)

    return wait


class _SequenceParallelColumnLinear(torch.autograd.Function):
    """``act(linear(all_gather_seq(x), W, b))`` saving only the sequence shard ``x`` (1/tp of the input)
    (and, with an activation, the pre-activation, as :func:`gptpar.ops.wgrad.linear` does)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, dim, activation):
        ctx.group, ctx.dim = group, dim
        return forward_saving(ctx, x, comm.all_gather(x, group, dim), weight, bias, activation)

    @staticmethod
    def backward(ctx, g):
        x, weight, g = saved_and_pre_activation_grad(ctx, g)
        group, dim = ctx.group, ctx.dim
        gather = _gather_seq_async(x, group, dim)  # the weight gradient needs the full input again
        # (autocast: compute in g's dtype as the forward did; return gradients in the inputs' dtypes)
        grad_x = comm.reduce_scatter(g.matmul(weight.to(g.dtype)), group, dim).to(x.dtype)  # overlaps the gather
        if deferred_queue() is not None:  # zero-bubble W: complete this gather; W gathers again when it runs
            gather()
            full = lambda: _gather_seq_async(x, group, dim)()  # noqa: E731
        else:
            full = gather
        params = ctx.params
        gw, gb = weight_grads_now_or_later(params, lambda: linear_weight_grads(g, full(), params))
        return grad_x, gw, gb, None, None, None


def mark_sequence_parallel(param: torch.Tensor, group: Group) -> torch.Tensor:
    """``param`` is replicated across tp but used on each rank's own tokens only (sequence parallelism):
    all-reduce its gradient over tp as it is produced, so every rank holds the full-sequence gradient."""
    if group.size > 1 and not getattr(param, "sequence_parallel", False):
        param.sequence_parallel = True
        param.grad_reduce = lambda g: comm.all_reduce(g.clone(), group)  # also applied to deferred grads
        param.register_hook(param.grad_reduce)
    return param


def mark_shared_rows(param: torch.Tensor, start: int, group: Group) -> torch.Tensor:
    """Rows ``start:`` of ``param`` are the same on every rank of ``group`` (a subgroup of tp: K/V heads
    replicated because tp > n_kv_head) but each rank's gradient for them is partial: sum it over ``group``
    as it is produced (Megatron's rule). Rows before ``start`` are this rank's own. The norm counts the
    shared rows once (:func:`norm_span`)."""
    if group.size > 1:
        param.shared_rows = (start, group.rank)

        def reduce(g: torch.Tensor) -> torch.Tensor:
            g = g.clone()
            g[start:] = comm.all_reduce(g[start:].contiguous(), group)
            return g

        param.grad_reduce = reduce  # also applied to deferred grads
        param.register_hook(reduce)
    return param


def norm_span(param: torch.Tensor, tp_rank: int) -> tuple[int, int]:
    """The flat elements ``[lo, hi)`` of ``param`` (and its gradient) this tp rank adds to a global norm, so
    that across tp every element counts once: all of a tp-sharded parameter; a tp-replicated one on tp
    rank 0 only; rows shared by a tp subgroup (:func:`mark_shared_rows`) on the subgroup's first rank only;
    never a pipeline-tied second copy."""
    n = param.numel()
    if getattr(param, "pipeline_tied_copy", False):
        return 0, 0
    if getattr(param, "tp_dim", None) is None:
        return (0, n) if tp_rank == 0 else (0, 0)
    shared = getattr(param, "shared_rows", None)
    if shared is not None and shared[1] != 0:
        return 0, shared[0] * (n // param.shape[0])
    return 0, n


@torch.no_grad()
def load_full_(param: torch.Tensor, full: torch.Tensor, group: Group) -> None:
    """Copy this rank's shard of the full tensor ``full`` into ``param`` (spec read from ``param``)."""
    dim, chunks = tp_spec(param)
    piece = shard_tensor(full.detach().to(param.device, param.dtype), dim, chunks, group.size, group.rank)
    if piece.shape != param.shape:
        raise GptparConfigError(
            f"shard of shape {tuple(piece.shape)} does not fit parameter of shape {tuple(param.shape)}"
        )
    param.copy_(piece)


# ---------------------------------------------------------------------------------------------- loss
class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        # logits [N, V/tp] (this rank's vocab slice), target [N] global ids. Computed in fp32.
        local_v = logits.shape[-1]
        start = group.rank * local_v
        x = logits.float()
        row_max = x.max(dim=-1).values
        comm.all_reduce(row_max, group, op=comm.ReduceOp.MAX)
        x = x - row_max.unsqueeze(-1)
        in_range = (target >= start) & (target < start + local_v)
        local_t = (target - start).masked_fill(~in_range, 0)
        target_logit = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~in_range, 0.0)
        exp = x.exp_()
        # One all-reduce for both per-row sums: the owner's target logit and the partial sum of exps.
        both = torch.stack([target_logit, exp.sum(dim=-1)])
        comm.all_reduce(both, group)
        target_logit, sum_exp = both[0], both[1]
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, in_range & valid, local_t, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, hit, local_t, valid = ctx.saved_tensors
        # The saved softmax becomes the gradient in place (as in Megatron): the largest activation is not
        # copied, at the price that this graph cannot be back-propagated twice (retain_graph).
        grad = softmax
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -hit.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


class _TritonVocabParallelCrossEntropy(torch.autograd.Function):
    """Same contract as :class:`_VocabParallelCrossEntropy`; the Triton kernels compute the per-row
    statistics in one pass and keep only the logits (no fp32 softmax copy) for backward. The backward
    kernel writes the gradient in place: over a copy of the logits, or with ``inplace`` over the saved
    logits themselves (no second logits-sized buffer; the caller's logits are then overwritten)."""

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, inplace=False):
        from gptpar.ops.cross_entropy import ce_row_stats

        logits = logits.contiguous()
        start = group.rank * logits.shape[1]
        row_max, sum_exp, target_logit = ce_row_stats(logits, target, start)
        global_max = comm.all_reduce(row_max.clone(), group, op=comm.ReduceOp.MAX)
        both = torch.stack([target_logit, sum_exp * torch.exp(row_max - global_max)])
        comm.all_reduce(both, group)
        valid = target != ignore_index
        loss = (both[1].log() + global_max - both[0]).masked_fill(~valid, 0.0)
        ctx.save_for_backward(logits, target, global_max, both[1], valid)
        ctx.start, ctx.inplace = start, inplace
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        from gptpar.ops.cross_entropy import ce_grad_

        logits, target, global_max, sum_exp, valid = ctx.saved_tensors
        grad = logits if ctx.inplace else logits.clone()  # the kernel overwrites it with the gradient
        d = (grad_loss * valid).float().contiguous()
        return ce_grad_(grad, target, global_max, sum_exp, d, ctx.start), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: Group, ignore_index: int = -100, inplace_backward: bool = False
) -> torch.Tensor:
    """Per-token cross-entropy from vocab-sharded logits without gathering them.

    In ``logits [..., V/tp]`` (rank r holds vocab slice r), ``target [...]`` global ids; out ``[...]`` fp32
    losses (0 where ``target == ignore_index``). Collectives: all-reduce MAX of the row maxima and one
    all-reduce SUM of (target logit, sum of exps), both ``[N]``-sized, over ``group``.
    ``inplace_backward`` (Triton path): backward writes the logits' gradient over ``logits`` itself, saving
    the largest buffer of the step, when the caller has no further use for the logits. (The reference
    path always turns its own softmax buffer into the gradient, as Megatron does.)
    """
    if logits.shape[:-1] != target.shape:
        raise GptparConfigError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on leading dims"
        )
    from gptpar.ops.dispatch import use_triton

    flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    if use_triton(logits):
        flat = _TritonVocabParallelCrossEntropy.apply(flat_logits, flat_target, group, ignore_index, inplace_backward)
    else:
        flat = _VocabParallelCrossEntropy.apply(flat_logits, flat_target, group, ignore_index)
    return flat.view(target.shape)


__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "shard_tensor",
    "unshard_tensor",
    "set_tp_spec",
    "tp_spec",
    "load_full_",
    "mark_sequence_parallel",
    "mark_shared_rows",
    "norm_span",
    "head_split",
    "local_length",
]
