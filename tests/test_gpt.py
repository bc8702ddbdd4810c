"""The tensor-parallel GPT against the single-process reference: logits, loss, every gradient, and the
weights after an optimizer step, for tp = 1, 2, 4 and two model variants."""

import pytest
import torch
from gpt_helpers import TOL, assert_matches_reference, batch, train_parallel, train_reference

from gptpar import GPT, GPTConfig, GptparConfigError, ParallelGPT, ParallelLayout, init_parallel
from gptpar.models import gather_state_dict, shard_state_dict
from gptpar.parallel.random import TPRngTracker
from gptpar.testing import run_distributed

CONFIGS = {
    "gelu-layernorm-tied": GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32),
    "swiglu-rmsnorm-untied-nobias": GPTConfig(
        vocab_size=64,
        seq_len=16,
        n_layer=2,
        n_head=4,
        d_model=32,
        ffn_hidden=48,
        activation="swiglu",
        norm="rmsnorm",
        bias=False,
        tie_embeddings=False,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_gpt_matches_reference(name, tp):
    config = CONFIGS[name]
    results = run_distributed(train_parallel, tp, config, ParallelLayout(tp=tp), 2)
    assert_matches_reference(results, train_reference(config, steps=2), f"tp={tp}")


def _load_reference_weights(config, full_sd):
    st = init_parallel(ParallelLayout(tp=2))
    model = ParallelGPT(config, st, seed=999)  # deliberately different init, then overwritten
    model.load_state_dict(shard_state_dict(full_sd, model, st.tp))
    idx, tgt = batch(config, seed=5)
    _, loss = model(idx, tgt)
    back = gather_state_dict(model, st.tp)
    return loss.detach(), all(torch.equal(back[k], full_sd[k]) for k in full_sd)


def test_shard_and_gather_state_dict_roundtrip():
    config = CONFIGS["swiglu-rmsnorm-untied-nobias"]
    ref = GPT(config, seed=7)
    idx, tgt = batch(config, seed=5)
    _, want = ref(idx, tgt)
    for loss, roundtrip in run_distributed(_load_reference_weights, 2, config, ref.state_dict()):
        torch.testing.assert_close(loss, want.detach(), **TOL)
        assert roundtrip


def _dropout_replicated_region():
    config = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32, dropout=0.3)
    st = init_parallel(ParallelLayout(tp=2))
    torch.manual_seed(11)  # same default RNG on both tp ranks, as the trainer seeds it
    model = ParallelGPT(config, st).train()
    seen = {}
    model.ln_f.register_forward_pre_hook(lambda m, args: seen.update(resid=args[0].detach().clone()))
    idx, tgt = batch(config)
    _, loss = model(idx, tgt)
    loss.backward()
    return seen["resid"], loss.detach(), bool(torch.isfinite(model.blocks["0"].attn.qkv.weight.grad).all())


def test_dropout_masks_agree_across_tp_in_replicated_region():
    (r0, l0, ok0), (r1, l1, ok1) = run_distributed(_dropout_replicated_region, 2)
    assert torch.equal(r0, r1), "replicated residual stream diverged across tp ranks under dropout"
    assert torch.equal(l0, l1) and ok0 is True and ok1 is True
    ref = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32, dropout=0.3)).eval()
    idx, tgt = batch(ref.config)
    _, eval_loss = ref(idx, tgt)
    assert not torch.isclose(l0, eval_loss.detach())  # dropout was really applied


def test_tp_rng_tracker_leaves_default_stream_untouched():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    tracker = TPRngTracker(seed=100)
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(100)
    assert torch.equal(torch.cat([a, b]), torch.rand(8))  # the tracker's own stream continues across forks


def test_reference_gpt_basics():
    config = CONFIGS["gelu-layernorm-tied"]
    model = GPT(config)
    idx, tgt = batch(config)
    logits, loss = model(idx, tgt)
    assert logits.shape == (3, 16, 64)
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5  # near-uniform at init
    assert model.lm_head.weight is model.wte.weight
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    untied = CONFIGS["swiglu-rmsnorm-untied-nobias"]
    assert sum(p.numel() for p in GPT(untied).parameters()) == untied.num_params()
    with pytest.raises(GptparConfigError, match="sequence length 17 exceeds the model's seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert torch.equal(GPT(config, seed=5).wte.weight, GPT(config, seed=5).wte.weight)
    assert not torch.equal(GPT(config, seed=5).wte.weight, GPT(config, seed=6).wte.weight)


def _heads_not_divisible():
    st = init_parallel(ParallelLayout(tp=2))
    try:
        ParallelGPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=3, d_model=48), st)
    except GptparConfigError as e:
        return str(e)


def test_parallel_gpt_rejects_bad_layout_at_construction():
    msg = run_distributed(_heads_not_divisible, 2)[0]
    assert "n_head=3 is not divisible by tp=2" in msg


@pytest.mark.parametrize(
    "options", [{"recompute": True}, {"recompute": True, "sequence_parallel": True}], ids=["recompute", "recompute+sp"]
)
def test_activation_recompute_matches_reference(options):
    config = CONFIGS["gelu-layernorm-tied"]
    results = run_distributed(train_parallel, 2, config, ParallelLayout(tp=2), 2, options)
    assert_matches_reference(results, train_reference(config, steps=2), f"tp=2 {options}")


def _recompute_dropout(sp):
    """The same training step with and without recomputation, dropout on: recomputation must replay every
    mask (the default generator's and the tensor-parallel stream's), so loss and gradients are identical."""
    st = init_parallel(ParallelLayout(tp=2))
    config = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32, dropout=0.3)
    out = []
    for recompute in (False, True):
        model = ParallelGPT(config, st, recompute=recompute, sequence_parallel=sp).train()
        torch.manual_seed(7)
        _, loss = model(*batch(config, seed=0, b=2))
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = out
    assert torch.equal(l0, l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    return l0


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2+sp"])
def test_recompute_with_dropout_replays_the_same_masks(sp):
    losses = run_distributed(_recompute_dropout, 2, sp)
    assert torch.isfinite(losses[0])


def _bf16_autocast(sp):
    st = init_parallel(ParallelLayout(tp=2))
    config = CONFIGS["gelu-layernorm-tied"]
    model = ParallelGPT(config, st, sequence_parallel=sp)
    idx, tgt = batch(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, tgt)
    loss.backward()
    from gptpar.models import gather_grads

    return loss.detach(), gather_grads(model, st.tp)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2+sp"])
def test_bf16_autocast_trains_through_the_parallel_layers(sp):
    ref = GPT(CONFIGS["gelu-layernorm-tied"])
    idx, tgt = batch(ref.config)
    _, want = ref(idx, tgt)
    want.backward()
    for loss, grads in run_distributed(_bf16_autocast, 2, sp):
        torch.testing.assert_close(loss, want.detach(), rtol=2e-2, atol=2e-2)
        for n, p in ref.named_parameters():
            assert grads[n].dtype == torch.float32
            # bf16 matmuls: about 3 significant digits; compare each gradient's direction and size
            cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), p.grad.flatten(), dim=0)
            assert cos > 0.99, (n, cos.item())
