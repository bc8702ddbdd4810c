"""Mixed precision: the dynamic loss scaler and global-norm clipping across every parallel dimension."""

import pytest
import torch
from gpt_helpers import batch, close

from gptpar import GPT, GPTConfig, GptparConfigError, ParallelGPT, ParallelLayout, init_parallel
from gptpar.precision import DynamicLossScaler, clip_grad_norm_, global_grad_norm
from gptpar.testing import run_distributed

CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=4, n_head=4, d_model=32)
B = 8  # global batch


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
