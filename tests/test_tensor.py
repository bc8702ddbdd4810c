"""Each tensor-parallel layer alone against its torch counterpart, forward and backward, on 2 and 4 ranks."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptpar import GptparConfigError, ParallelLayout, init_parallel
from gptpar.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_tensor,
    unshard_tensor,
    vocab_parallel_cross_entropy,
)
from gptpar.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)


def _close(a, b):
    torch.testing.assert_close(a, b, **TOL)


def _column(tp, gather_output):
    st = init_parallel(ParallelLayout(tp=tp))
    g = st.tp
    torch.manual_seed(0)
    ref = nn.Linear(16, 24)
    torch.manual_seed(0)
    col = ColumnParallelLinear(16, 24, group=g, gather_output=gather_output)
    _close(col.weight, ref.weight.chunk(tp)[g.rank])
    _close(col.bias, ref.bias.chunk(tp)[g.rank])
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16)
    dy = torch.randn(3, 5, 24)
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref(xr)
    (yr * dy).sum().backward()
    yp = col(xp)
    dyp = dy if gather_output else dy.chunk(tp, dim=-1)[g.rank]
    (yp * dyp).sum().backward()
    _close(yp, yr if gather_output else yr.chunk(tp, dim=-1)[g.rank])
    _close(xp.grad, xr.grad)
    _close(col.weight.grad, ref.weight.grad.chunk(tp)[g.rank])
    _close(col.bias.grad, ref.bias.grad.chunk(tp)[g.rank])
    return True


def _row(tp, input_is_parallel):
    st = init_parallel(ParallelLayout(tp=tp))
    g = st.tp
    torch.manual_seed(0)
    ref = nn.Linear(16, 12)
    torch.manual_seed(0)
    row = RowParallelLinear(16, 12, group=g, input_is_parallel=input_is_parallel)
    _close(row.weight, ref.weight.chunk(tp, dim=1)[g.rank])
    torch.manual_seed(1)
    x = torch.randn(4, 16)
    dy = torch.randn(4, 12)
    xr = x.clone().requires_grad_()
    xp = (x.chunk(tp, dim=-1)[g.rank] if input_is_parallel else x).clone().requires_grad_()
    yr = ref(xr)
    (yr * dy).sum().backward()
    yp = row(xp)
    (yp * dy).sum().backward()
    _close(yp, yr)
    _close(xp.grad, xr.grad.chunk(tp, dim=-1)[g.rank] if input_is_parallel else xr.grad)
    _close(row.weight.grad, ref.weight.grad.chunk(tp, dim=1)[g.rank])
    _close(row.bias.grad, ref.bias.grad)
    return True


def _embedding(tp):
    st = init_parallel(ParallelLayout(tp=tp))
    g = st.tp
    torch.manual_seed(0)
    ref = nn.Embedding(32, 8)
    torch.manual_seed(0)
    emb = VocabParallelEmbedding(32, 8, group=g)
    _close(emb.weight, ref.weight.chunk(tp)[g.rank])
    torch.manual_seed(1)
    ids = torch.randint(0, 32, (4, 7))
    dy = torch.randn(4, 7, 8)
    (ref(ids) * dy).sum().backward()
    y = emb(ids)
    (y * dy).sum().backward()
    _close(y, ref(ids))
    _close(emb.weight.grad, ref.weight.grad.chunk(tp)[g.rank])
    return True


def _cross_entropy(tp, dtype):
    st = init_parallel(ParallelLayout(tp=tp))
    g = st.tp
    torch.manual_seed(2)
    logits = (3 * torch.randn(6, 5, 40)).to(dtype)
    target = torch.randint(0, 40, (6, 5))
    target[0, :2] = -100  # ignored tokens
    target[1, 0] = 39  # the last vocab row: owned by the last rank
    dl = torch.rand(6, 5)
    lr = logits.clone().requires_grad_()
    ref = F.cross_entropy(lr.float().flatten(0, 1), target.flatten(), reduction="none", ignore_index=-100).view(6, 5)
    (ref * dl).sum().backward()
    lp = logits.chunk(tp, dim=-1)[g.rank].clone().requires_grad_()
    out = vocab_parallel_cross_entropy(lp, target, g)
    (out * dl).sum().backward()
    assert out.dtype == torch.float32 and lp.grad.dtype == dtype
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lp.grad, lr.grad.chunk(tp, dim=-1)[g.rank], **tol)
    assert torch.all(lp.grad[0, :2] == 0)
    return True


@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_linear(gather_output):
    assert all(run_distributed(_column, 2, 2, gather_output))


@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear(input_is_parallel):
    assert all(run_distributed(_row, 2, 2, input_is_parallel))


def test_vocab_parallel_embedding():
    assert all(run_distributed(_embedding, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_cross_entropy(dtype):
    assert all(run_distributed(_cross_entropy, 2, 2, dtype))


def test_layers_on_four_ranks():
    assert all(run_distributed(_column, 4, 4, True))
    assert all(run_distributed(_row, 4, 4, False))
    assert all(run_distributed(_embedding, 4, 4))
    assert all(run_distributed(_cross_entropy, 4, 4, torch.float32))


def test_shard_unshard_roundtrip_with_fused_blocks():
    full = torch.arange(24.0).view(12, 2)  # 3 blocks (q|k|v) of 4 rows
    pieces = [shard_tensor(full, 0, 3, 2, r) for r in range(2)]
    assert torch.equal(pieces[0][:, 0], torch.tensor([0.0, 2, 8, 10, 16, 18]))  # rows 0-1 of each block
    assert torch.equal(unshard_tensor(pieces, 0, 3), full)
    with pytest.raises(GptparConfigError, match=r"dim 0 \(12\) is not divisible by chunks\*tp = 3\*8"):
        shard_tensor(full, 0, 3, 8, 0)


def test_single_rank_layers_equal_torch():
    st = init_parallel(ParallelLayout())
    torch.manual_seed(0)
    ref = nn.Linear(6, 4)
    torch.manual_seed(0)
    col = ColumnParallelLinear(6, 4, group=st.tp)
    x = torch.randn(2, 6)
    assert torch.equal(col(x), ref(x))


def _column_activation(tp):
    """The fused-activation column-parallel linear (plain and sequence parallel, weight grads now or
    deferred to a zero-bubble W step) against nn.Linear + the activation."""
    from gptpar.ops.mlp import apply_activation
    from gptpar.ops.wgrad import defer_weight_grads, deferrable_weight_grads

    g = init_parallel(ParallelLayout(tp=tp)).tp
    for act, sp, defer in [(a, s, d) for a in ("gelu", "swiglu") for s in (False, True) for d in (False, True)]:
        chunks, f = (2, 12) if act == "swiglu" else (1, 24)
        torch.manual_seed(0)
        ref = nn.Linear(16, chunks * f)
        torch.manual_seed(0)
        col = ColumnParallelLinear(16, chunks * f, group=g, chunks=chunks, sequence_parallel=sp, activation=act)
        torch.manual_seed(1)
        x, dy = torch.randn(4, 3, 16), torch.randn(4, 3, f)
        xr = x.clone().requires_grad_()
        yr = apply_activation(ref(xr), act)
        (yr * dy).sum().backward()
        xp = (x.chunk(tp)[g.rank] if sp else x).clone().requires_grad_()
        with deferrable_weight_grads() if defer else contextlib.nullcontext():
            yp = col(xp)
        queue = []
        with defer_weight_grads(queue) if defer else contextlib.nullcontext():
            (yp * dy.chunk(tp, dim=-1)[g.rank]).sum().backward()
        assert (col.weight.grad is None) == defer and len(queue) == int(defer)
        for w_step in queue:
            w_step()
        _close(yp, yr.chunk(tp, dim=-1)[g.rank])
        _close(xp.grad, xr.grad.chunk(tp)[g.rank] if sp else xr.grad)
        _close(col.weight.grad, shard_tensor(ref.weight.grad, 0, chunks, tp, g.rank))
        _close(col.bias.grad, shard_tensor(ref.bias.grad, 0, chunks, tp, g.rank))
    return True


def test_column_parallel_linear_with_fused_activation():
    assert all(run_distributed(_column_activation, 2, 2))


def _bad_split():
    st = init_parallel(ParallelLayout(tp=2))
    errors = []
    for make in (
        lambda: ColumnParallelLinear(8, 9, group=st.tp),
        lambda: ColumnParallelLinear(8, 8, group=st.tp, activation="relu"),
        lambda: ColumnParallelLinear(8, 8, group=st.tp, activation="swiglu"),
        lambda: RowParallelLinear(9, 8, group=st.tp),
        lambda: VocabParallelEmbedding(33, 8, group=st.tp),
    ):
        try:
            make()
        except GptparConfigError as e:
            errors.append(str(e))
    return errors


def test_bad_splits_fail_at_construction():
    errors = run_distributed(_bad_split, 2)[0]
    assert errors == [
        "out_features=9 (in 1 block(s)) is not divisible by the 'tp' group size 2: each block's rows are split across tp",
        "activation='relu' is unknown; expected one of ('gelu', 'swiglu')",
        "activation='swiglu' needs the gate|up blocks: chunks=2, got chunks=1",
        "in_features=9 is not divisible by the 'tp' group size 2",
        "num_embeddings (vocab size)=33 is not divisible by the 'tp' group size 2",
    ]
