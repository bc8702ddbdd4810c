"""A vocabulary padded to a fixed multiple (not to tp): the same model at every tp, padded logits out of the
softmax, the loss and sampling, padded rows never trained; equal to the unpadded model on the same weights."""

import pytest
import torch
from gpt_helpers import batch, close

from gptpar import GPT, GPTConfig, GptparConfigError, ParallelGPT, ParallelLayout, init_parallel
from gptpar.models import gather_grads, gather_state_dict
from gptpar.parallel import comm
from gptpar.testing import run_distributed

PADDED = GPTConfig(vocab_size=257, vocab_multiple=128, seq_len=16, n_layer=2, n_head=4, d_model=32)  # 384 rows
UNPADDED = GPTConfig(vocab_size=257, seq_len=16, n_layer=2, n_head=4, d_model=32)


def _unpadded_reference():
    """The true-vocabulary model holding the padded model's weights (its first 257 rows)."""
    padded = GPT(PADDED)
    ref = GPT(UNPADDED)
    sd = {k: (v[:257] if k in ("wte.weight", "lm_head.weight") else v) for k, v in padded.state_dict().items()}
    ref.load_state_dict(sd)
    return padded, ref


def test_padded_reference_equals_the_unpadded_model_and_never_trains_padded_rows():
    padded, ref = _unpadded_reference()
    assert padded.wte.weight.shape == (384, 32) and torch.all(padded.wte.weight[257:] == 0)
    idx, tgt = batch(UNPADDED)
    logits, loss = padded(idx, tgt)
    want_logits, want_loss = ref(idx, tgt)
    assert logits.shape == want_logits.shape == (3, 16, 257)
    close(logits, want_logits, "logits")
    close(loss, want_loss, "loss")
    loss.backward()
    want_loss.backward()
    assert torch.all(padded.wte.weight.grad[257:] == 0)  # tied: embedding and output rows
    close(padded.wte.weight.grad[:257], ref.wte.weight.grad, "grad")


def _tp_run(tp):
    st = init_parallel(ParallelLayout(tp=tp))
    model = ParallelGPT(PADDED, st)
    idx, tgt = batch(PADDED)
    logits, loss = model(idx, tgt)
    loss.backward()
    full = comm.all_gather(logits.detach(), st.tp, dim=-1)
    return loss.detach(), full, gather_grads(model, st.tp), gather_state_dict(model, st.tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_the_same_model_and_loss_at_every_tp(tp):
    padded, ref = _unpadded_reference()
    idx, tgt = batch(UNPADDED)
    want_logits, want_loss = ref(idx, tgt)
    want_loss.backward()
    for loss, logits, grads, sd in run_distributed(_tp_run, tp, tp):
        close(loss, want_loss.detach(), f"tp={tp} loss")
        assert logits.shape[-1] == 384
        close(logits[..., :257], want_logits.detach(), f"tp={tp} logits")
        assert torch.all(logits[..., 257:] == float("-inf"))  # padded columns can never be sampled or win
        assert torch.all(grads["wte.weight"][257:] == 0)
        close(grads["wte.weight"][:257], ref.wte.weight.grad, f"tp={tp} embedding grad")
        assert torch.equal(sd["wte.weight"], padded.wte.weight.detach())  # the same weights at every tp


def test_padding_rules_name_the_values():
    assert PADDED.padded_vocab == 384 and PADDED.num_params() == sum(p.numel() for p in GPT(PADDED).parameters())
    with pytest.raises(GptparConfigError, match="vocab_multiple=0 is invalid"):
        GPTConfig(vocab_multiple=0)
    cfg = GPTConfig(vocab_size=257, vocab_multiple=3, n_head=3, d_model=48)
    with pytest.raises(GptparConfigError, match="padded to vocab_multiple=3 gives 258 rows, not divisible by tp=4"):
        ParallelLayout(tp=4).validate_model(cfg)


def _save(out, tp):
    from gptpar import checkpoint

    st = init_parallel(ParallelLayout(tp=tp))
    model = ParallelGPT(PADDED, st, seed=77)
    checkpoint.save(out, 1, [model], None, st, {"model": PADDED.to_dict()})
    return True


def _load(out, tp):
    from gptpar import checkpoint

    st = init_parallel(ParallelLayout(tp=tp))
    model = ParallelGPT(PADDED, st, seed=1)  # other weights, overwritten by the load
    checkpoint.load(checkpoint.latest(out), [model], None, st, PADDED.to_dict())
    idx, tgt = batch(PADDED)
    return model(idx, tgt)[1].detach(), gather_state_dict(model, st.tp)


def test_a_vocab_257_checkpoint_loads_at_every_tp(tmp_path):
    out = str(tmp_path / "run")
    run_distributed(_save, 2, out, 2)
    want = GPT(PADDED, seed=77)
    idx, tgt = batch(PADDED)
    want_loss = want(idx, tgt)[1].detach()
    for tp in (1, 4):
        for loss, sd in run_distributed(_load, tp, out, tp):
            close(loss, want_loss, f"tp={tp} loss")
            assert all(torch.equal(sd[k], v) for k, v in want.state_dict().items())
