"""Packed documents (issue 19, model side): with ``doc_ids`` attention stops at document boundaries and
positions restart per document. The reference GPT on a packed batch equals each document run alone; the
parallel GPT at tp2, tp2+SP, pp2 (every schedule) and tp2 x pp2 equals the reference on random boundaries
(loss, logits, every gradient, fp32), and so do ring (zig-zag) and Ulysses context parallelism."""

import pytest
import torch
from gpt_helpers import close

from gptpar import GPT, GPTConfig, GptparConfigError, ParallelGPT, ParallelLayout, init_parallel
from gptpar.models import gather_grads
from gptpar.parallel import comm
from gptpar.parallel.data import allreduce_gradients
from gptpar.testing import run_distributed

LEARNED = GPTConfig(vocab_size=64, seq_len=24, n_layer=4, n_head=4, d_model=32)
ROPE = GPTConfig(
    vocab_size=64,
    seq_len=24,
    n_layer=4,
    n_head=4,
    n_kv_head=2,
    d_model=32,
    position="rope",
    activation="swiglu",
    norm="rmsnorm",
    bias=False,
)
CONFIGS = {"learned": LEARNED, "rope-gqa": ROPE}


def packed(config, b=4, seed=0):
    """A batch of ``b`` windows, each packing documents of random lengths (some rows one document)."""
    g = torch.Generator().manual_seed(seed)
    s = config.seq_len
    idx = torch.randint(0, config.vocab_size, (b, s), generator=g)
    tgt = torch.randint(0, config.vocab_size, (b, s), generator=g)
    tgt[0, 3] = -100
    doc = torch.zeros(b, s, dtype=torch.long)
    for row in range(1, b):
        cuts = torch.randperm(s - 1, generator=g)[: row + 1] + 1  # 2..4 boundaries
        for c in cuts.tolist():
            doc[row, c:] += 1
    return idx, tgt, doc


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_gpt_on_packed_documents_equals_each_document_alone(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(config)
    idx, _, doc = packed(config)
    logits, _ = model(idx, doc_ids=doc)
    for b in range(idx.shape[0]):
        for d in doc[b].unique().tolist():
            sel = (doc[b] == d).nonzero().flatten()
            alone, _ = model(idx[b : b + 1, sel])
            close(logits[b, sel], alone[0], f"{name} row {b} document {d}")
    # without doc_ids the same batch attends across documents: the masks really change the result
    assert not torch.allclose(model(idx)[0], logits, atol=1e-4)


def reference(config):
    model = GPT(config)
    idx, tgt, doc = packed(config)
    logits, loss = model(idx, tgt, doc_ids=doc)
    loss.backward()
    # tied names too: a pipeline's last stage holds the LM head's copy of the embedding under its own name
    return (
        loss.detach(),
        logits.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)},
    )


def _parallel(name, layout, schedule=None, sp=False, cp_impl="ring"):
    config = CONFIGS[name]
    st = init_parallel(layout)
    idx, tgt, doc = packed(config)
    if st.pp.size == 1:
        model = ParallelGPT(config, st, sequence_parallel=sp, cp_impl=cp_impl)
        logits, loss = model(idx, tgt, doc_ids=doc)
        loss.backward()
        allreduce_gradients(model, st.cp)  # cp ranks hold partial gradients of replicated weights
        logits = comm.all_gather(logits.detach(), st.tp, dim=-1) if st.cp.size == 1 else None
        return loss.detach(), logits, gather_grads(model, st.tp)
    from gptpar.pipeline import make_pipeline

    v = 2 if schedule == "interleaved" else 1
    engine, _ = make_pipeline(config, st, schedule, 2, v, sequence_parallel=sp)
    loss = engine.step(idx, tgt, doc_ids=doc)
    grads = {}
    for c in engine.chunks:
        grads.update({n: g for n, g in gather_grads(c, st.tp).items() if c.get_parameter(n).grad is not None})
    return loss, None, grads


def _check(results, name, label):
    want_loss, want_logits, want_grads = reference(CONFIGS[name])
    seen = set()
    for rank, (loss, logits, grads) in enumerate(results):
        close(loss, want_loss, f"{label} rank {rank} loss")
        if logits is not None:
            close(logits, want_logits, f"{label} rank {rank} logits")
        for n, g in grads.items():
            close(g, want_grads[n], f"{label} rank {rank} grad {n}")
            seen.add("wte.weight" if n == "lm_head.weight" and CONFIGS[name].tie_embeddings else n)
    want = {n for n in want_grads if not (n == "lm_head.weight" and CONFIGS[name].tie_embeddings)}
    assert seen == want, f"{label}: no rank returned {want - seen}"


@pytest.mark.parametrize("name", CONFIGS)
def test_tensor_and_sequence_parallel_on_packed_documents_match_the_reference(name):
    _check(run_distributed(_parallel, 2, name, ParallelLayout(tp=2)), name, f"{name} tp2")
    _check(run_distributed(_parallel, 2, name, ParallelLayout(tp=2), None, True), name, f"{name} tp2+sp")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved", "zb-h1"])
def test_pipelines_on_packed_documents_match_the_reference(schedule):
    name = "rope-gqa"
    _check(run_distributed(_parallel, 2, name, ParallelLayout(pp=2), schedule), name, f"pp2 {schedule}")


def test_tp2_x_pp2_with_sequence_parallel_on_packed_documents_matches_the_reference():
    name = "learned"
    _check(run_distributed(_parallel, 4, name, ParallelLayout(tp=2, pp=2), "1f1b", True), name, "tp2xpp2+sp")


@pytest.mark.parametrize("cp_impl", ["ring", "ulysses"])
def test_context_parallel_attention_on_packed_documents_matches_the_reference(cp_impl):
    """Zig-zag ring (key blocks whose documents do not meet are skipped) and Ulysses, cp2, rotary GQA."""
    name = "rope-gqa"
    res = run_distributed(_parallel, 2, name, ParallelLayout(cp=2), None, False, cp_impl)
    _check(res, name, f"cp2 {cp_impl}")


def test_ring_attention_skips_key_blocks_whose_documents_do_not_meet():
    from gptpar.parallel.context import attention_work, seq_shards

    shards = seq_shards(16, 2, "zigzag")
    one_doc = torch.zeros(1, 16, dtype=torch.long)
    short = (torch.arange(16) // 4).unsqueeze(0)  # four documents of 4 tokens: chunks of 4 never meet earlier ones
    for rank in range(2):
        assert attention_work(shards, rank, True, short) < attention_work(shards, rank, True, one_doc)
    assert attention_work(shards, 0, True, one_doc) == attention_work(shards, 0, True)


def test_document_ids_that_are_not_packed_documents_are_refused():
    model = GPT(LEARNED)
    idx, _, doc = packed(LEARNED)
    with pytest.raises(GptparConfigError, match="non-decreasing"):
        model(idx, doc_ids=doc.flip(-1))
    with pytest.raises(GptparConfigError, match="must have the token ids' shape"):
        model(idx, doc_ids=doc[:, :-1])
