"""Autograd-aware collectives: each region marker's forward and backward on 2 ranks."""

import torch

from gptpar import ParallelLayout, init_parallel
from gptpar.parallel import comm
from gptpar.testing import run_distributed


def _regions():
    st = init_parallel(ParallelLayout(tp=2))
    g, r = st.tp, st.tp.rank
    torch.manual_seed(0)
    full = torch.randn(4, 6)  # same on both ranks
    mine = full.chunk(2, dim=-1)[r].clone()
    out = {}

    x = full.clone().requires_grad_()
    y = comm.copy_to_region(x, g)
    (y * (r + 1)).sum().backward()
    out["copy"] = (torch.equal(y, full), x.grad.clone())  # grad all-reduced: 1 + 2 = 3

    x = (full * (r + 1)).requires_grad_()
    y = comm.reduce_from_region(x, g)
    y.sum().backward()
    out["reduce"] = (y.clone(), x.grad.clone())

    x = mine.clone().requires_grad_()
    y = comm.gather_from_region(x, g, dim=-1)
    (y * torch.arange(6.0)).sum().backward()
    out["gather"] = (y.clone(), x.grad.clone())

    x = full.clone().requires_grad_()
    y = comm.scatter_to_region(x, g, dim=-1)
    y.sum().backward()
    out["scatter"] = (y.clone(), x.grad.clone())

    x = full.chunk(2, dim=0)[r].clone().requires_grad_()
    y = comm.gather_along_seq(x, g)
    (y * (r + 1)).sum().backward()
    out["gather_seq"] = (y.clone(), x.grad.clone())

    x = (full * (r + 1)).requires_grad_()
    y = comm.reduce_scatter_along_seq(x, g)
    (y * (r + 1)).sum().backward()
    out["rs_seq"] = (y.clone(), x.grad.clone())
    return full, out


def test_region_markers_forward_and_backward():
    res = run_distributed(_regions, 2)
    full = res[0][0]
    for r, (_, out) in enumerate(res):
        same, grad = out["copy"]
        assert same and torch.equal(grad, torch.full_like(full, 3.0))
        y, grad = out["reduce"]
        assert torch.allclose(y, 3 * full) and torch.equal(grad, torch.ones_like(full))
        y, grad = out["gather"]
        assert torch.equal(y, full)
        assert torch.equal(grad, torch.arange(6.0).expand(4, 6).chunk(2, dim=-1)[r])
        y, grad = out["scatter"]
        assert torch.equal(y, full.chunk(2, dim=-1)[r])
        assert torch.equal(grad, torch.ones_like(full))  # both halves' grads gathered
        y, grad = out["gather_seq"]
        assert torch.equal(y, full)
        assert torch.equal(grad, torch.full((2, 6), 3.0))  # reduce-scatter of (1 + 2)
        y, grad = out["rs_seq"]
        assert torch.allclose(y, (3 * full).chunk(2, dim=0)[r])
        assert torch.equal(grad, torch.cat([torch.full((2, 6), 1.0), torch.full((2, 6), 2.0)]))


def test_size_one_group_is_identity_without_communication():
    st = init_parallel(ParallelLayout())
    x = torch.randn(3, 4, requires_grad=True)
    for f in (comm.copy_to_region, comm.reduce_from_region, comm.gather_along_seq, comm.reduce_scatter_along_seq):
        assert f(x, st.tp) is x


def _traffic():
    st = init_parallel(ParallelLayout(tp=2))
    with comm.count_traffic() as t:
        comm.all_reduce(torch.ones(100), st.tp)  # 2 * 1/2 * 400 bytes
        comm.all_gather(torch.ones(10), st.tp)  # 1 * 40
        buf, h = comm.ring_shift(torch.full((5,), float(st.rank)), st.tp)
        h.wait()
    return dict(t), buf


def test_ring_shift_and_traffic_counter():
    for rank, (t, buf) in enumerate(run_distributed(_traffic, 2)):
        assert t == {"all_reduce": 400, "all_gather": 40, "ring_shift": 20}
        assert torch.equal(buf, torch.full((5,), float(1 - rank)))
