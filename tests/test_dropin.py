"""Drop-in parallelism on real transformers models, never silently wrong (issue 17's table, row by row):
GPT-2's real vocabulary 50257 (n_positions 1024), Llama / Qwen2 / Mistral / Qwen3 (q/k norm) with GQA (2 K/V heads, also at
tp=4: replicated), untied and tied heads, ``pad_token_id=0``, odd vocabularies; logits, every gradient,
three AdamW steps with clipping and ``generate`` against the original model; sequence parallelism at an
odd length; save/load; a nanoGPT fork that is not nanoGPT; torch's clip_grad_norm_ caught."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gptpar
from gptpar import GptparConfigError, ParallelLayout, init_parallel, parallelize
from gptpar.parallelize import Colwise, VocabEmbedding, full_tensor
from gptpar.testing import run_distributed

TOL = dict(rtol=1e-4, atol=2e-6)
MODELS = ("gpt2", "llama", "qwen2", "mistral", "qwen3")


def make(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=101,
    )
    if kind == "gpt2":  # GPT-2's real vocabulary and context
        cfg = tf.GPT2Config(
            n_layer=2,
            n_head=4,
            n_embd=32,
            vocab_size=50257,
            n_positions=1024,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return tf.GPT2LMHeadModel(cfg)
    if kind == "llama":  # untied head, pad id 0 (the embedding's padding_idx), odd vocabulary
        return tf.LlamaForCausalLM(tf.LlamaConfig(**small, pad_token_id=0, tie_word_embeddings=False))
    if kind == "qwen2":  # q/k/v biases, tied head
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, tie_word_embeddings=True, pad_token_id=0))
    if kind == "qwen3":  # per-head q/k RMSNorm (replicated, gradients summed over tp)
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**small, head_dim=8, tie_word_embeddings=False))
    return tf.MistralForCausalLM(tf.MistralConfig(**small, sliding_window=None, pad_token_id=None))


def batch(vocab: int, step: int, b: int = 2, s: int = 7):  # s odd: not divisible by tp
    idx = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(step))
    idx[0, 2] = 0  # the pad id appears (its embedding row must get no gradient)
    return idx


def run(kind: str, tp: int = 0, sp: bool = False, steps: int = 3):
    """Logits and gradients of the first step (original layout), losses and grad norms of ``steps``
    AdamW steps with clipping, then greedy generation."""
    state = init_parallel(ParallelLayout(tp=tp)) if tp else None
    model = make(kind)
    if tp:
        parallelize(model, state, sequence_parallel=sp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    vocab = model.config.vocab_size
    out = {"losses": [], "norms": []}
    for step in range(steps):
        idx = batch(vocab, step)
        res = model(input_ids=idx, labels=idx)
        res.loss.backward()
        if step == 0:
            out["logits"] = res.logits.detach()
            out["grads"] = {
                n: (full_tensor(p, state, p.grad) if tp else p.grad.clone()) for n, p in model.named_parameters()
            }
        clip = gptpar.clip_grad_norm_ if tp else torch.nn.utils.clip_grad_norm_
        out["norms"].append(clip(model.parameters(), 0.05).detach())
        out["losses"].append(res.loss.detach())
        opt.step()
        opt.zero_grad()
    model.eval()
    gen = model.generate(batch(vocab, 9)[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=1)
    out["generated"] = gen
    return out


_REFS: dict = {}


def reference(kind):
    if kind not in _REFS:
        _REFS[kind] = run(kind)
    return _REFS[kind]


def check(got: dict, kind: str, label: str) -> None:
    ref = reference(kind)
    torch.testing.assert_close(got["logits"], ref["logits"], **TOL, msg=lambda m: f"{label} logits: {m}")
    assert got["grads"].keys() == ref["grads"].keys(), label
    for n, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][n], g, **TOL, msg=lambda m, n=n: f"{label} grad {n}: {m}")
    for key in ("losses", "norms"):
        torch.testing.assert_close(
            torch.stack(got[key]), torch.stack(ref[key]), **TOL, msg=lambda m, key=key: f"{label} {key}: {m}"
        )
    assert torch.equal(got["generated"], ref["generated"]), f"{label} generate"
    if kind == "llama":  # pad_token_id=0: the padding row gets no gradient
        assert got["grads"]["model.embed_tokens.weight"][0].abs().max() == 0


def _suite_at(cases, tp):
    return {(kind, sp): run(kind, tp, sp) for kind, sp in cases}


def test_real_models_at_tp2_match_the_original_including_sequence_parallel_at_odd_length():
    cases = [(k, False) for k in MODELS] + [("gpt2", True), ("llama", True)]
    results = run_distributed(_suite_at, 2, cases, 2)
    for rank, res in enumerate(results):
        for kind, sp in cases:
            check(res[kind, sp], kind, f"{kind} tp=2{' sp' if sp else ''} rank {rank}")


def test_real_models_at_tp4_with_replicated_kv_heads_match_the_original():
    cases = [(k, False) for k in MODELS]
    results = run_distributed(_suite_at, 4, cases, 4)
    for rank, res in enumerate(results):
        for kind, _ in cases:
            check(res[kind, False], kind, f"{kind} tp=4 rank {rank}")


# ---------------------------------------------------------------------------------------------- save / load
def _save_load(tmp, kind, tp):
    import transformers as tf

    state = init_parallel(ParallelLayout(tp=tp))
    model = parallelize(make(kind), state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = batch(model.config.vocab_size, 0)
    model(input_ids=idx, labels=idx).loss.backward()
    opt.step()  # weights no longer at their (seeded) initialisation
    model.eval()
    want = model(input_ids=idx).logits.detach()
    path = f"{tmp}/{kind}"
    model.save_pretrained(path)  # gathers; rank 0 writes a standard directory
    hf_err = None
    if state.rank == 0:
        loaded, info = tf.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not any(info.values()), info
        hf_err = (loaded(input_ids=idx).logits - want).abs().max().item()
    mine = gptpar.from_pretrained(path, state)  # meta model, each rank reads its slices
    metas = [n for n, p in mine.named_parameters() if p.device.type == "meta"]
    err = (mine(input_ids=idx).logits - want).abs().max().item()
    return hf_err, err, metas, tuple(mine.get_input_embeddings().weight.shape)


@pytest.mark.parametrize("kind, tp", [("gpt2", 2), ("llama", 4), ("qwen2", 4)])
def test_save_pretrained_writes_a_standard_directory_and_from_pretrained_loads_slices(tmp_path, kind, tp):
    results = run_distributed(_save_load, tp, str(tmp_path), kind, tp)
    assert results[0][0] is not None and results[0][0] < 1e-5, results[0]
    vocab = make(kind).config.vocab_size
    for _, err, metas, emb_shape in results:
        assert err < 1e-5 and metas == []
        assert emb_shape[0] == -(-vocab // tp)  # the padded vocabulary's shard, not a full copy


# ---------------------------------------------------------------------------------------------- refusals
class QKNormAttention(nn.Module):
    """A nanoGPT fork: nanoGPT's attention names, plus RMS-normalised q and k."""

    def __init__(self, n_embd=32, n_head=4):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, 0.0

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = F.rms_norm(q, (C // self.n_head,)), F.rms_norm(k, (C // self.n_head,))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def _qk_norm_fork():
    from test_parallelize import NanoGPT

    state = init_parallel(ParallelLayout(tp=2))
    model = NanoGPT()
    for b in model.transformer.h:
        b.attn = QKNormAttention()
    try:
        parallelize(model, state)
    except GptparConfigError as e:
        return str(e)
    return "parallelised"


def test_a_nanogpt_fork_with_a_different_attention_is_refused_by_name():
    msg = run_distributed(_qk_norm_fork, 2)[0]
    assert "'transformer.h.0.attn' (QKNormAttention) is not nanoGPT's CausalSelfAttention" in msg
    assert "differs" in msg


def _torch_clip(kind):
    state = init_parallel(ParallelLayout(tp=2))
    model = parallelize(make(kind), state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        idx = batch(model.config.vocab_size, step)
        try:
            loss = model(input_ids=idx, labels=idx).loss
        except GptparConfigError as e:
            return step, str(e)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # each rank: its own shard's norm
        opt.step()
        opt.zero_grad()
    return None, "no error"


def test_torch_clip_grad_norm_on_a_parallelised_model_fails_loudly():
    for step, msg in run_distributed(_torch_clip, 2, "llama"):
        assert step == 1, msg  # caught at the first forward after the desynchronising step
        assert "differ across the tp ranks" in msg and "gptpar.clip_grad_norm_" in msg


def _bad_configs():
    import transformers as tf

    state = init_parallel(ParallelLayout(tp=4))
    errors = []
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=3,
        vocab_size=64,
    )
    for model in (tf.LlamaForCausalLM(cfg),):
        try:
            parallelize(model, state)
            errors.append("ok")
        except GptparConfigError as e:
            errors.append(str(e))
    emb = nn.Sequential(nn.Embedding(16, 8, max_norm=1.0))
    try:
        parallelize(emb, state, {"0": VocabEmbedding()})
    except GptparConfigError as e:
        errors.append(str(e))

    class LoRALinear(nn.Linear):
        pass

    try:
        parallelize(nn.Sequential(LoRALinear(8, 8)), state, {"0": Colwise()})
    except GptparConfigError as e:
        errors.append(str(e))
    return errors


def test_impossible_or_unknown_layouts_are_clear_errors():
    errors = run_distributed(_bad_configs, 4)[0]
    assert "6 heads cannot be split over tp=4" in errors[0] and "model.layers.0.self_attn" in errors[0]
    assert "max_norm=1.0 is not supported" in errors[1]
    assert "not exactly nn.Linear" in errors[2] and "LoRALinear" in errors[2]


def test_gptpar_clip_on_an_unparallelised_model_is_torch_clip():
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    m(torch.randn(3, 4)).sum().backward()
    want = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.parameters()))
    assert float(gptpar.clip_grad_norm_(m.parameters(), 1e-3)) == pytest.approx(want, rel=1e-6)
    assert math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.parameters())) == pytest.approx(1e-3, rel=1e-3)


def _backward_traffic():
    from gptpar.parallel import comm

    state = init_parallel(ParallelLayout(tp=2))
    model = parallelize(make("llama"), state)
    idx = batch(model.config.vocab_size, 0)
    loss = model(input_ids=idx, labels=idx).loss
    with comm.count_traffic() as t:
        loss.backward()
    return t.get("all_reduce", 0)


def test_q_k_v_and_gate_up_share_one_input_gradient_all_reduce():
    cfg = make("llama").config
    b, s = batch(cfg.vocab_size, 0).shape
    act = b * s * cfg.hidden_size * 4  # one fp32 activation gradient; a ring all-reduce at tp=2 sends 1x it
    per_block = 2  # attention input (q|k|v together) and MLP input (gate|up together), not 5
    want = (per_block * cfg.num_hidden_layers + 1) * act  # + the LM head's input
    assert run_distributed(_backward_traffic, 2) == [want, want]


def _gpt2_with_dropout(attn, resid, twin_heads=False):
    """A GPT-2 with these dropouts; ``twin_heads``: heads 2-3 copy heads 0-1 (at tp=2 both ranks then
    compute the same thing before the output projection, up to the dropout masks)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=16, attn_pdrop=attn,
                        resid_pdrop=resid, embd_pdrop=0.0)  # fmt: skip
    model = tf.GPT2LMHeadModel(cfg)
    if twin_heads:
        with torch.no_grad():
            for blk in model.transformer.h:
                w, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # Conv1D: [in, q|k|v], 4 heads of 8
                for off in (0, 32, 64):
                    w[:, off + 16 : off + 32] = w[:, off : off + 16]
                    b[off + 16 : off + 32] = b[off : off + 16]
    return model


def _dropout_under_tp(sp, twin_heads):
    """At tp=2, one training and one eval forward: what reaches block 0's output projection (this rank's
    heads), the final norm's output (replicated: the residual stream, gathered with SP), and the default
    generator's state after the training forward. (Not the logits: gathered from every rank's vocabulary
    slice, they agree even when the ranks' residual streams do not.)"""
    state = init_parallel(ParallelLayout(tp=2))
    model = parallelize(_gpt2_with_dropout(0.5, 0.3, twin_heads), state, sequence_parallel=sp)
    heads, final = [], []
    model.transformer.h[0].attn.c_proj.register_forward_pre_hook(lambda m, a: heads.append(a[0].detach().clone()))
    model.transformer.ln_f.register_forward_hook(lambda m, a, out: final.append(out.detach().clone()))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for training in (True, False):
        model.train(training)
        model(input_ids=idx)
        out[training] = (heads[-1], final[-1])
    return out, torch.get_rng_state()


def test_dropout_over_heads_is_drawn_per_rank_and_on_replicated_activations_alike():
    """Megatron's rule under parallelize: each rank's attention heads get their own dropout masks (with
    twin head groups the ranks compute the same thing, so equal inputs to the output projection would mean
    repeated masks), the residual stream one mask on every rank (the final norm's output stays the same
    on every rank), and every rank's default generator stays the same."""
    (a, rng_a), (b, rng_b) = run_distributed(_dropout_under_tp, 2, False, True)
    assert torch.equal(a[False][0], b[False][0])  # eval: the twin head groups agree exactly
    assert (a[True][0] - b[True][0]).abs().max() > 0.1  # training: different masks per rank
    assert torch.equal(a[True][1], b[True][1]) and torch.equal(rng_a, rng_b)
    (a, rng_a), (b, rng_b) = run_distributed(_dropout_under_tp, 2, True, False)  # SP: sequence shards
    assert torch.equal(a[True][1], b[True][1]) and torch.equal(rng_a, rng_b)


def _sp_twin_shards():
    """Sequence parallel at tp=2 over a sequence whose halves are the same tokens, with no position
    embedding and zero q/k/v weights (every position then holds the same function of its token): block 0's
    output on each rank's shard, in training and in eval."""
    state = init_parallel(ParallelLayout(tp=2))
    model = _gpt2_with_dropout(0.2, 0.3)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        for blk in model.transformer.h:
            blk.attn.c_attn.weight.zero_()
    parallelize(model, state, sequence_parallel=True)
    seen = []
    model.transformer.h[0].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    )
    half = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = {}
    for training in (True, False):
        model.train(training)
        model(input_ids=torch.cat([half, half], dim=1))
        out[training] = seen[-1]
    return out


def test_sequence_parallel_shards_draw_their_own_dropout_masks():
    a, b = run_distributed(_sp_twin_shards, 2)
    assert a[False].shape[1] == 8 and torch.equal(a[False], b[False])  # eval: the two shards hold the same
    assert (a[True] - b[True]).abs().max() > 1e-3  # training: each shard its own masks (repeated ones: 0)


def _grads_with_checkpointing(kind, sp, checkpointing):
    import transformers as tf

    state = init_parallel(ParallelLayout(tp=2))
    if kind == "gpt2":
        model = _gpt2_with_dropout(0.3, 0.2)
    else:
        torch.manual_seed(0)
        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg, num_key_value_heads=2, attention_dropout=0.3))
    parallelize(model, state, sequence_parallel=sp)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    loss = model(input_ids=idx, labels=idx).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind, sp", [("gpt2", False), ("gpt2", True), ("llama", False)])
def test_rank_local_dropout_replays_under_activation_checkpointing(kind, sp):
    """Recomputation draws the same per-rank masks as the forward (the per-rank seed comes from the default
    generator, which checkpointing restores): the same loss and gradients with and without it."""
    plain = run_distributed(_grads_with_checkpointing, 2, kind, sp, False)
    ckpt = run_distributed(_grads_with_checkpointing, 2, kind, sp, True)
    for (loss_p, grads_p), (loss_c, grads_c) in zip(plain, ckpt, strict=True):
        assert torch.equal(loss_p, loss_c)
        for n, g in grads_p.items():
            torch.testing.assert_close(grads_c[n], g, rtol=1e-5, atol=1e-6, msg=n)
