"""ZeRO-1 (sharded optimizer state) against plain data parallelism and torch AdamW."""

import pytest
import torch
from gpt_helpers import batch, close

from gptpar import GPT, GPTConfig, GptparConfigError, ParallelGPT, ParallelLayout, init_parallel
from gptpar.models import gather_state_dict
from gptpar.parallel.data import DataParallel
from gptpar.parallel.zero import ZeroAdamW
from gptpar.precision import DynamicLossScaler, clip_grad_norm_
from gptpar.testing import run_distributed

CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=4, n_head=4, d_model=32)
B = 8  # global batch


# ---------------------------------------------------------------------------------------------- ZeRO-1
def _zero(sharded):
    st = init_parallel(ParallelLayout(dp=2))
    model = ParallelGPT(CONFIG, st)
    ddp = DataParallel(model, st, shard_grads=sharded, bucket_mb=0.05, first_bucket_mb=0.01)
    if sharded:
        opt = ZeroAdamW(ddp, lr=1e-3, weight_decay=0.1)
    else:  # the same fused AdamW over the full (unsharded) buffers
        from gptpar.ops import adamw_step_

        states = [
            (b, b.param.detach().float().clone(), torch.zeros(b.param.numel()), torch.zeros(b.param.numel()))
            for b in ddp.buckets
        ]
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
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95)
        )
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
