"""Data parallelism (bucketed, overlapped, low-precision, hierarchical) against single-process references."""

import pytest
import torch
from gpt_helpers import batch, close

from gptpar import GPT, GPTConfig, ParallelGPT, ParallelLayout, init_parallel
from gptpar.models import gather_state_dict
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel, allreduce_gradients
from gptpar.testing import run_distributed

CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=4, n_head=4, d_model=32)
B = 8  # global batch


def _reference(steps, lr=0.5):
    model = GPT(CONFIG)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.1)
    losses = []
    for step in range(steps):
        idx, tgt = batch(CONFIG, seed=step, b=B)
        _, loss = model(idx, tgt)
        loss.backward()
        losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, model.state_dict()


def _train_dp(layout, steps, ddp_kwargs, schedule=None):
    st = init_parallel(layout)
    if schedule:
        from gptpar.pipeline import make_pipeline

        engine, _ = make_pipeline(CONFIG, st, schedule, 2)
        chunks = engine.chunks
    else:
        chunks = [ParallelGPT(CONFIG, st)]
    params = [p for c in chunks for p in c.parameters()]
    ddp = DataParallel(params, st, bucket_mb=0.05, first_bucket_mb=0.01, **ddp_kwargs)  # several buckets
    assert ddp.group.size == st.dp.size * st.cp.size  # cp's partial gradients are summed in the same buckets
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)
    losses = []
    per = B // st.dp.size
    for step in range(steps):
        idx, tgt = batch(CONFIG, seed=step, b=B)
        idx, tgt = idx[st.dp.rank * per : (st.dp.rank + 1) * per], tgt[st.dp.rank * per : (st.dp.rank + 1) * per]
        if schedule:
            with ddp.no_sync():  # micro-batches accumulate locally; one reduction per step
                loss = engine.step(idx, tgt)
        else:
            _, loss = chunks[0](idx, tgt)
            loss.backward()
        ddp.finish()
        losses.append(comm.all_reduce(loss.detach().clone(), st.dp) / st.dp.size)
        opt.step()
        ddp.zero_grad()
    sd = {}
    for c in chunks:
        sd.update(gather_state_dict(c, st.tp))
    return losses, sd, len(ddp.buckets)


@pytest.mark.parametrize(
    "layout, schedule",
    [
        (ParallelLayout(dp=2), None),
        (ParallelLayout(dp=4), None),
        (ParallelLayout(dp=2, tp=2), None),
        (ParallelLayout(dp=2, pp=2), "1f1b"),
        (ParallelLayout(dp=2, cp=2), None),
        (ParallelLayout(cp=2), None),
    ],
    ids=["dp2", "dp4", "dp2xtp2", "dp2xpp2", "dp2xcp2", "cp2"],
)
def test_data_parallel_matches_single_process_on_global_batch(layout, schedule):
    ref_losses, ref_sd = _reference(3)
    results = run_distributed(_train_dp, layout.world_size, layout, 3, {}, schedule)
    for rank, (losses, sd, n_buckets) in enumerate(results):
        assert n_buckets > 2  # the test exercises several buckets
        for s, (a, b) in enumerate(zip(losses, ref_losses, strict=True)):
            close(a, b, f"rank {rank} step {s} loss")
        for n, w in sd.items():  # a pipeline's tied lm_head copy is compared with the reference's (= wte)
            close(w, ref_sd[n], f"rank {rank} weight {n} after 3 steps")


# ---------------------------------------------------------------------------------------------- precision
def _reduce_error(dtype, error_feedback=False):
    st = init_parallel(ParallelLayout(dp=torch.distributed.get_world_size()))
    shapes = [(300,), (17, 5), (1000,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    ddp = DataParallel(
        params, st, reduce_dtype=dtype, bucket_mb=0.001, first_bucket_mb=0.001, error_feedback=error_feedback
    )
    errs = []
    for step in range(3):
        grads = []
        for p in params:  # every rank's gradient, generated identically everywhere
            g = torch.Generator().manual_seed(step * 100 + sum(p.shape))
            all_ranks = torch.randn((st.dp.size,) + tuple(p.shape), generator=g, dtype=torch.float64)
            grads.append(all_ranks)
            p.grad.copy_(all_ranks[st.dp.rank].float())
        ddp.finish()
        err = max(
            ((p.grad.double() - g.mean(0)).abs().max() / g.mean(0).abs().max()).item()
            for p, g in zip(params, grads, strict=True)
        )
        errs.append(err)
        ddp.zero_grad()
    return max(errs)


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)], ids=["bf16", "fp16"])
def test_low_precision_reduce_error_is_bounded_and_does_not_grow_with_ranks(dtype, eps):
    e2 = run_distributed(_reduce_error, 2, dtype)[0]
    e4 = run_distributed(_reduce_error, 4, dtype)[0]
    exact = run_distributed(_reduce_error, 2, torch.float32)[0]
    assert exact < 1e-6
    # two roundings (inputs, then the fp32 sum), each at most half an ulp of the largest value
    assert 0 < e2 <= 2 * eps and 0 < e4 <= 2 * eps, (e2, e4)
    assert e4 <= 1.5 * e2, f"error grew with ranks: dp=2 {e2:.2e}, dp=4 {e4:.2e}"


def _two_rank_values(dtype, average):
    st = init_parallel(ParallelLayout(dp=2))
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(300,), (17, 5), (1000,)]]
    ddp = DataParallel(params, st, reduce_dtype=dtype, bucket_mb=0.001, first_bucket_mb=0.001, average=average)
    for step in range(2):
        want = []
        for p in params:
            g = torch.Generator().manual_seed(step * 100 + sum(p.shape))
            both = torch.randn((2, *p.shape), generator=g) * torch.logspace(-3, 3, 2 * p.numel()).view(2, *p.shape)
            p.grad.copy_(both[st.dp.rank])
            fp32_sum = both[0].to(dtype).float() + both[1].to(dtype).float()  # each rank's cast, summed in fp32
            want.append((fp32_sum * (0.5 if average else 1.0)).to(dtype).float())  # rounded once more
        ddp.finish()
        for p, w in zip(params, want, strict=True):
            if not torch.equal(p.grad, w):
                return (p.grad - w).abs().max().item()
        ddp.zero_grad()
    return 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_two_rank_low_precision_reduce_is_the_fp32_sum_rounded_once(dtype):
    # bf16 runs one bf16 all-reduce between two ranks, fp16 the all-to-all / fp32 sum / all-gather: both
    # must give each rank's cast, summed in fp32, scaled, rounded once more, bit for bit
    for average in (True, False):
        assert run_distributed(_two_rank_values, 2, dtype, average) == [0.0, 0.0], (dtype, average)


def test_error_feedback_runs_and_stays_bounded():
    assert run_distributed(_reduce_error, 2, torch.bfloat16, True)[0] <= 2 * 2.0**-8


def _any_completion_order(dtype, hierarchical):
    """Real backward passes whose buckets' collectives each rank sees complete at its own (random) times."""
    import random

    st = init_parallel(ParallelLayout(dp=4))
    torch.manual_seed(0)
    ref = ParallelGPT(CONFIG, st)
    torch.manual_seed(0)
    model = ParallelGPT(CONFIG, st)
    idx, tgt = batch(CONFIG, seed=st.dp.rank, b=2)
    ref(idx, tgt)[1].backward()
    allreduce_gradients(ref, st.dp, average=True)
    kw = {"ranks_per_node": 2, "hierarchical": True} if hierarchical else {}
    ddp = DataParallel(model, st, reduce_dtype=dtype, bucket_mb=0.002, first_bucket_mb=0.001, **kw)
    rng = random.Random(st.rank)
    real_done = comm.Pending.done
    comm.Pending.done = lambda self: real_done(self) and rng.random() < 0.5
    try:
        errs = []
        for _ in range(3):
            model(idx, tgt)[1].backward()
            ddp.finish()
            errs.append(
                max(
                    ((p.grad - r.grad).abs().max() / r.grad.abs().max()).item()
                    for p, r in zip(model.parameters(), ref.parameters(), strict=True)
                )
            )
            ddp.zero_grad()
    finally:
        comm.Pending.done = real_done
    return len(ddp.buckets), max(errs)


@pytest.mark.parametrize(
    "dtype, hierarchical, tol",
    [(torch.bfloat16, False, 2 * 2.0**-8), (torch.float32, True, 1e-6)],
    ids=["bf16-two-phase", "fp32-hierarchical-three-phase"],
)
def test_reduction_is_right_whatever_order_ranks_see_collectives_complete(dtype, hierarchical, tol):
    # Each process group must see its collectives issued in the same order on every rank; a later phase
    # issued as soon as *this* rank saw the earlier one complete would interleave differently per rank
    # (and hang). Later phases go in launch order, each phase on its own group.
    for n_buckets, err in run_distributed(_any_completion_order, 4, dtype, hierarchical, timeout=120):
        assert n_buckets > 8 and err <= tol, (n_buckets, err)


def _hierarchical(hierarchical):
    st = init_parallel(ParallelLayout(dp=4))
    g = torch.Generator().manual_seed(st.rank)
    # Values with few mantissa bits: every sum is exact in any order, so both algorithms must agree bit for bit.
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (1000, 37, 4096)]
    ddp = DataParallel(params, st, ranks_per_node=2, hierarchical=hierarchical, bucket_mb=0.005, first_bucket_mb=0.001)
    for p in params:
        p.grad.copy_(torch.randint(-1000, 1000, p.shape, generator=g).float() / 64)
    ddp.finish()
    return [p.grad.clone() for p in params], ddp.hierarchical


def test_hierarchical_allreduce_equals_flat_bitwise_on_2_nodes_x_2():
    flat = run_distributed(_hierarchical, 4, False)
    hier = run_distributed(_hierarchical, 4, None)  # selected automatically: the dp group spans 2 "nodes"
    for (f, fh), (h, hh) in zip(flat, hier, strict=True):
        assert fh is False and hh is True
        for a, b in zip(f, h, strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(flat[0][0][0], torch.zeros_like(flat[0][0][0]))
