"""Data parallelism, ZeRO-1 and mixed precision against single-process references."""

import pytest
import torch
from gpt_helpers import batch, close

from gptpar import GPT, GPTConfig, GptparConfigError, ParallelGPT, ParallelLayout, init_parallel
from gptpar.models import gather_state_dict
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel, allreduce_gradients
from gptpar.parallel.zero import ZeroAdamW
from gptpar.precision import DynamicLossScaler, clip_grad_norm_, global_grad_norm
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
    [(ParallelLayout(dp=2), None), (ParallelLayout(dp=4), None), (ParallelLayout(dp=2, tp=2), None),
     (ParallelLayout(dp=2, pp=2), "1f1b"), (ParallelLayout(dp=2, cp=2), None), (ParallelLayout(cp=2), None)],
    ids=["dp2", "dp4", "dp2xtp2", "dp2xpp2", "dp2xcp2", "cp2"],
)  # fmt: skip
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
    ddp = DataParallel(params, st, reduce_dtype=dtype, bucket_mb=0.001, first_bucket_mb=0.001,
                       error_feedback=error_feedback)  # fmt: skip
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
            errs.append(max(((p.grad - r.grad).abs().max() / r.grad.abs().max()).item()
                            for p, r in zip(model.parameters(), ref.parameters(), strict=True)))  # fmt: skip
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


# ---------------------------------------------------------------------------------------------- ZeRO-1
def _zero(sharded):
    st = init_parallel(ParallelLayout(dp=2))
    model = ParallelGPT(CONFIG, st)
    ddp = DataParallel(model, st, shard_grads=sharded, bucket_mb=0.05, first_bucket_mb=0.01)
    if sharded:
        opt = ZeroAdamW(ddp, lr=1e-3, weight_decay=0.1)
    else:  # the same fused AdamW over the full (unsharded) buffers
        from gptpar.ops import adamw_step_

        states = [(b, b.param.detach().float().clone(), torch.zeros(b.param.numel()), torch.zeros(b.param.numel()))
                  for b in ddp.buckets]  # fmt: skip
    per = B // 2
    for step in range(3):
        idx, tgt = batch(CONFIG, seed=step, b=B)
        _, loss = model(idx[st.dp.rank * per : (st.dp.rank + 1) * per], tgt[st.dp.rank * per : (st.dp.rank + 1) * per])
        loss.backward()
        ddp.finish()
        if sharded:
            opt.step()
        else:
            for b, master, m, v in states:
                adamw_step_(master, b.grad.float(), m, v, lr=1e-3, weight_decay=0.1, step=step + 1)
                b.param.copy_(master)
        ddp.zero_grad()
    state_bytes = opt.state_bytes() if sharded else sum(3 * 4 * b.param.numel() for b in ddp.buckets)
    return gather_state_dict(model, st.tp), state_bytes


def test_zero1_equals_plain_data_parallel_and_shards_optimizer_state():
    plain = run_distributed(_zero, 2, False)
    zero = run_distributed(_zero, 2, True)
    for (sd_p, bytes_p), (sd_z, bytes_z) in zip(plain, zero, strict=True):
        for n in sd_p:
            close(sd_z[n], sd_p[n], f"ZeRO-1 vs plain DP weight {n}", dict(rtol=1e-6, atol=1e-7))
        assert bytes_z / bytes_p == pytest.approx(0.5, rel=0.01), (bytes_z, bytes_p)
    assert not torch.equal(zero[0][0]["wte.weight"], GPT(CONFIG).wte.weight)  # training moved the weights


def _zero_vs_torch_adamw(layout, zero):
    """What `gptpar train` does each step, ZeRO-1 or torch AdamW: decay on matrices only, a loss scaler's
    unscale, global-norm clipping (active: max norm 0.05), then the update."""
    st = init_parallel(layout)
    model = ParallelGPT(CONFIG, st)
    ddp = DataParallel(model, st, shard_grads=zero, bucket_mb=0.05, first_bucket_mb=0.01)
    params = list(model.parameters())
    if zero:
        opt = ZeroAdamW(ddp, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, decay=lambda p: p.dim() >= 2)
    else:
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95))  # fmt: skip
    scaler = DynamicLossScaler(st, init_scale=1024.0)
    per = B // st.dp.size
    norms = []
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = 1e-2 / (step + 1)
        idx, tgt = batch(CONFIG, seed=step, b=B)
        rows = slice(st.dp.rank * per, (st.dp.rank + 1) * per)
        _, loss = model(idx[rows], tgt[rows])
        scaler.scale_loss(loss).backward()
        ddp.finish()
        if zero:
            assert not scaler.unscale_tensors_(opt.grad_shards())
            norms.append(opt.clip_grad_norm_(0.05, st))
        else:
            assert not scaler.unscale_(params)
            norms.append(clip_grad_norm_(params, 0.05, st))
        opt.step()
        ddp.zero_grad()
    return gather_state_dict(model, st.tp), torch.stack(norms)


@pytest.mark.parametrize(
    "layout",
    [ParallelLayout(dp=2), ParallelLayout(dp=2, tp=2), ParallelLayout(dp=2, cp=2)],
    ids=["dp2", "dp2xtp2", "dp2xcp2"],
)
def test_zero1_with_decay_groups_unscale_and_clipping_equals_torch_adamw(layout):
    plain = run_distributed(_zero_vs_torch_adamw, layout.world_size, layout, False)
    zero = run_distributed(_zero_vs_torch_adamw, layout.world_size, layout, True)
    for (sd_p, norms_p), (sd_z, norms_z) in zip(plain, zero, strict=True):
        close(norms_z, norms_p, "global grad norm", dict(rtol=1e-5, atol=0))
        assert torch.all(norms_p > 0.05)  # clipping was active every step
        for n in sd_p:
            close(sd_z[n], sd_p[n], f"ZeRO-1 vs torch AdamW weight {n}", dict(rtol=1e-5, atol=1e-6))


def test_zero1_state_dict_round_trip_and_layout_check():
    st = init_parallel(ParallelLayout())
    model = ParallelGPT(CONFIG, st)
    ddp = DataParallel(model, st, shard_grads=True)
    opt = ZeroAdamW(ddp, lr=1e-3)
    _, loss = model(*batch(CONFIG, seed=0, b=2))
    loss.backward()
    ddp.finish()
    opt.step()
    saved = opt.state_dict()
    other = ZeroAdamW(ddp, lr=5.0)
    other.load_state_dict(saved)
    assert other.t == 1 and other.lr == 1e-3
    assert all(
        torch.equal(x, y)
        for a, b in zip(saved["slices"], other.state_dict()["slices"], strict=True)
        for x, y in zip(a, b, strict=True)
    )
    saved["slices"] = saved["slices"][:-1]
    with pytest.raises(GptparConfigError, match="do not match this layout"):
        other.load_state_dict(saved)


# ---------------------------------------------------------------------------------------------- loss scaler
def _scaler():
    st = init_parallel(ParallelLayout(dp=2))
    scaler = DynamicLossScaler(st, init_scale=1024.0, growth_interval=2)
    p = torch.nn.Parameter(torch.zeros(4))
    history = []
    for step in range(5):
        p.grad = torch.full((4,), 1024.0)
        if step == 1 and st.rank == 1:
            p.grad[2] = float("inf")  # an overflow on one rank only
        skip = scaler.unscale_([p])
        scaler.update(skip)
        history.append((skip, scaler.scale, p.grad[0].item()))
    return history, scaler.skipped


def test_loss_scaler_skips_everywhere_on_overflow_backs_off_and_grows():
    for history, skipped in run_distributed(_scaler, 2):
        assert [h[0] for h in history] == [False, True, False, False, False]
        assert [h[1] for h in history] == [1024.0, 512.0, 512.0, 1024.0, 1024.0]
        assert history[0][2] == 1.0  # unscaled
        assert skipped == 1
    with pytest.raises(GptparConfigError, match="loss scaler needs growth_factor > 1"):
        DynamicLossScaler(init_parallel(ParallelLayout()), growth_factor=1.0)


def test_loss_scaler_unscales_non_contiguous_gradients_in_place():
    scaler = DynamicLossScaler(init_parallel(ParallelLayout()), init_scale=8.0)
    g = torch.full((3, 4), 8.0).t()  # a transposed (non-contiguous) gradient
    assert not g.is_contiguous()
    assert not scaler.unscale_tensors_([g, torch.full((2,), 16.0)])
    assert torch.equal(g, torch.ones(4, 3))


# ---------------------------------------------------------------------------------------------- clipping
def _clip_tp_pp():
    from gptpar.models import gather_grads
    from gptpar.pipeline import make_pipeline

    st = init_parallel(ParallelLayout(tp=2, pp=2))
    engine, _ = make_pipeline(CONFIG, st, "1f1b", 2)
    idx, tgt = batch(CONFIG, b=4)
    engine.step(idx, tgt)
    params = [p for c in engine.chunks for p in c.parameters()]
    norm = clip_grad_norm_(params, 0.1, st)
    grads = {}
    for c in engine.chunks:
        grads.update(gather_grads(c, st.tp))
    return norm, grads


def test_global_norm_clipping_matches_reference_under_tp2_pp2():
    ref = GPT(CONFIG)
    idx, tgt = batch(CONFIG, b=4)
    _, loss = ref(idx, tgt)
    loss.backward()
    want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    results = run_distributed(_clip_tp_pp, 4)
    for norm, grads in results:
        close(norm, want_norm, "global grad norm")
        for n, g in grads.items():
            close(g, (ref.lm_head.weight if n == "lm_head.weight" else ref.get_parameter(n)).grad, f"clipped grad {n}")
    assert want_norm > 0.1  # clipping really happened


def test_global_grad_norm_single_rank_equals_torch():
    st = init_parallel(ParallelLayout())
    model = ParallelGPT(CONFIG, st)
    idx, tgt = batch(CONFIG, b=2)
    model(idx, tgt)[1].backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    close(global_grad_norm(model.parameters(), st), want, "norm")


def _zero_bf16_params():
    st = init_parallel(ParallelLayout(dp=2))
    model = ParallelGPT(CONFIG, st).to(torch.bfloat16)  # bf16 weights on the model, fp32 masters in ZeRO
    ddp = DataParallel(model, st, shard_grads=True, reduce_dtype=torch.bfloat16)
    opt = ZeroAdamW(ddp, lr=3e-3)
    idx, tgt = batch(CONFIG, seed=0, b=4)
    idx, tgt = idx[st.dp.rank * 2 : st.dp.rank * 2 + 2], tgt[st.dp.rank * 2 : st.dp.rank * 2 + 2]
    losses = []
    for _ in range(8):  # memorise one batch
        _, loss = model(idx, tgt)
        loss.backward()
        ddp.finish()
        opt.step()
        ddp.zero_grad()
        losses.append(loss.item())
    masters = {s[2].dtype for s in opt.slices}
    return losses, {p.dtype for p in model.parameters()}, masters


def test_bf16_parameters_with_fp32_master_weights_train():
    for losses, param_dtypes, master_dtypes in run_distributed(_zero_bf16_params, 2):
        assert param_dtypes == {torch.bfloat16} and master_dtypes == {torch.float32}
        assert losses[-1] < losses[0] - 0.5, losses
