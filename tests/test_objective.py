"""The same objective at every layout (issue 18): loss = sum of per-token losses / the global count of
valid tokens, whatever the micro-batches, pipeline micro-batches, dp and cp; padding and fine-tuning masks
(``ignore_index``) spread unevenly over them must not change the loss or the gradient."""

import contextlib

import pytest
import torch
from gpt_helpers import close

from gptpar import GPT, GPTConfig, ParallelGPT, ParallelLayout, init_parallel
from gptpar.models import gather_grads
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel, global_token_count
from gptpar.testing import run_distributed

CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=4, n_head=4, d_model=32, tie_embeddings=False)
B = 8


def masked_batch(seed=0):
    """Targets with very uneven numbers of ignored tokens per sequence (1 to all but 1 of 16)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CONFIG.vocab_size, (B, CONFIG.seq_len), generator=g)
    tgt = torch.randint(0, CONFIG.vocab_size, (B, CONFIG.seq_len), generator=g)
    keep = [1, 15, 3, 16, 2, 9, 14, 5]
    for r, k in enumerate(keep):
        tgt[r, k:] = -100
    return idx, tgt


def _reference():
    model = GPT(CONFIG)
    idx, tgt = masked_batch()
    _, loss = model(idx, tgt)  # the token-weighted mean over the whole batch
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _run(layout, m, schedule):
    st = init_parallel(layout)
    idx, tgt = masked_batch()
    per = B // st.dp.size
    rows = slice(st.dp.rank * per, (st.dp.rank + 1) * per)
    idx, tgt = idx[rows], tgt[rows]
    count = global_token_count(tgt, st)  # valid tokens over the whole global batch (one all-reduce over dp)
    if schedule:
        from gptpar.pipeline import make_pipeline

        engine, _ = make_pipeline(CONFIG, st, schedule, m)
        chunks = engine.chunks
    else:
        chunks = [ParallelGPT(CONFIG, st)]
    ddp = (
        DataParallel([p for c in chunks for p in c.parameters()], st, average=False)
        if st.dp.size * st.cp.size > 1
        else None
    )
    if schedule:
        with ddp.no_sync() if ddp else contextlib.nullcontext():
            loss = engine.step(idx, tgt, normalizer=count)
    else:
        loss = torch.zeros(())
        for i, (x, y) in enumerate(zip(idx.chunk(m), tgt.chunk(m), strict=True)):
            with ddp.no_sync() if (ddp and i < m - 1) else contextlib.nullcontext():  # reduce once per step
                _, part = chunks[0](x, y, loss_normalizer=count)  # this micro-batch's share of the global mean
                part.backward()
            loss += part.detach()
    if ddp:
        ddp.finish()
    loss = comm.all_reduce(loss.clone(), st.dp)  # shares add up to the global mean
    grads = {}
    for c in chunks:
        grads.update(gather_grads(c, st.tp))
    return loss, grads


CASES = [
    ("m2", ParallelLayout(), 2, None),
    ("m4", ParallelLayout(), 4, None),
    ("dp2", ParallelLayout(dp=2), 1, None),
    ("dp4", ParallelLayout(dp=4), 1, None),
    ("dp2-m2", ParallelLayout(dp=2), 2, None),
    ("cp2-dp2", ParallelLayout(cp=2, dp=2), 1, None),
    ("pp2-gpipe", ParallelLayout(pp=2), 4, "gpipe"),
    ("pp2-1f1b", ParallelLayout(pp=2), 4, "1f1b"),
    ("tp2xpp2-1f1b", ParallelLayout(tp=2, pp=2), 2, "1f1b"),
    ("dp2xpp2-1f1b", ParallelLayout(dp=2, pp=2), 2, "1f1b"),
]


@pytest.mark.parametrize("layout, m, schedule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_token_weighted_loss_and_gradient_at_every_layout(layout, m, schedule):
    want_loss, want_grads = _reference()
    results = run_distributed(_run, layout.world_size, layout, m, schedule)
    merged = {}
    for loss, grads in results:
        close(loss, want_loss, "loss")
        merged.update(grads)
    assert merged.keys() == want_grads.keys()
    for n, g in want_grads.items():
        close(merged[n], g, f"grad {n}")


# ---------------------------------------------------------------------------------------------- dropout streams
def _sp_dropout_masks():
    torch.manual_seed(5)
    st = init_parallel(ParallelLayout(tp=2))
    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=4, d_model=32, dropout=0.5)
    model = ParallelGPT(cfg, st, sequence_parallel=True).train()
    seen = {}
    for name in ("attn.resid_drop", "mlp.drop"):
        mod = model.blocks["0"].get_submodule(name)
        mod.register_forward_hook(lambda m, i, o, name=name: seen.update({name: (o == 0)}))
    idx, tgt = masked_batch()
    model(idx, tgt)
    return seen


def test_sequence_parallel_dropout_masks_differ_across_tp_ranks():
    # each tp rank holds other tokens of the sequence: the same mask on both would correlate them (Megatron
    # draws these from the per-rank stream)
    a, b = run_distributed(_sp_dropout_masks, 2)
    for name in a:
        assert a[name].shape == b[name].shape and 0.3 < a[name].float().mean() < 0.7
        assert not torch.equal(a[name], b[name]), name


def _unequal_seeds():
    st = init_parallel(ParallelLayout(tp=2))
    torch.manual_seed(100 + st.tp.rank)  # a caller that seeded each rank differently
    from gptpar import GptparConfigError

    try:
        ParallelGPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=4, d_model=32, dropout=0.1), st)
    except GptparConfigError as e:
        return str(e)
    return None


def test_tp_ranks_that_disagree_on_the_shared_seed_are_refused_at_construction():
    for msg in run_distributed(_unequal_seeds, 2):
        assert msg is not None and "different default RNG states" in msg


# ---------------------------------------------------------------------------------------------- fp16 on the wire
def _fp16_reduce(dp):
    st = init_parallel(ParallelLayout(dp=dp))
    p = torch.nn.Parameter(torch.zeros(4096))
    ddp = DataParallel([p], st, reduce_dtype=torch.float16)
    g = torch.Generator().manual_seed(0)  # the same on every rank: the average is this gradient itself
    p.grad.copy_(torch.randn(4096, generator=g) * 1e-6)  # small, as unscaled fp32 gradients can be
    want = p.grad.clone()
    ddp._launch(ddp.buckets[0])
    ddp.finish()
    return p.grad.clone(), want


@pytest.mark.parametrize("dp", [2, 4])
def test_fp16_reduction_without_loss_scaling_does_not_flush_small_gradients(dp):
    for got, want in run_distributed(_fp16_reduce, dp, dp):
        zeros = (got == 0).float().mean().item()
        ideal = (want.half() == 0).float().mean().item()  # the average rounded once to fp16
        # dividing by dp before the cast flushed more, the more ranks (measured on a model: 31% dp2, 45% dp4)
        assert zeros <= ideal, f"{zeros:.2%} of the averaged gradient flushed to zero, ideal {ideal:.2%}"
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)
