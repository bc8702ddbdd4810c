"""Sequence parallelism and context (token) parallelism against the single-process reference.

Function level: ring and Ulysses attention (causal and not, contiguous and zig-zag, cp = 2 and 4) against
full attention, outputs and q/k/v gradients. Model level: loss, logits, every gradient and the weights
after two optimizer steps equal the reference GPT's (fp32) for tp=2+SP, ring cp=2/4 (both shardings),
Ulysses cp=2, and tp=2 x cp=2. Then activation memory, and uneven sequences rejected clearly.
"""

import pytest
import torch
import torch.nn.functional as F
from gpt_helpers import assert_matches_reference, batch, train_parallel, train_reference

from gptpar import GPTConfig, GptparConfigError, ParallelGPT, ParallelLayout, init_parallel
from gptpar.parallel.context import ring_attention, seq_shards, ulysses_attention
from gptpar.testing import run_distributed

CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32)
SWIGLU = GPTConfig(
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
)


# ---------------------------------------------------------------------------------------------- shards
def test_seq_shards_contiguous_and_zigzag():
    assert [s.positions().tolist() for s in seq_shards(8, 2, "contiguous")] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [s.positions().tolist() for s in seq_shards(8, 2, "zigzag")] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    zz = seq_shards(16, 4, "zigzag")
    assert zz[0].chunks == ((0, 2), (14, 2)) and zz[3].chunks == ((6, 2), (8, 2))
    assert sorted(torch.cat([s.positions() for s in zz]).tolist()) == list(range(16))


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((10, 4, "contiguous"), r"sequence length 10 is not divisible by 4 \(cp, cp=4\): blocks would be uneven"),
        ((12, 4, "zigzag"), r"sequence length 12 is not divisible by 8 \(2\*cp for zig-zag sharding, cp=4\)"),
        ((16, 2, "zigzag", 3), r"gives 8 tokens per cp rank, not divisible by tp=3"),
        ((16, 2, "striped"), r"cp sharding 'striped' is unknown"),
    ],
)
def test_uneven_blocks_are_rejected_clearly(args, pattern):
    with pytest.raises(GptparConfigError, match=pattern):
        seq_shards(*args)


# ---------------------------------------------------------------------------------------------- attention
def _attention_vs_full(cp, sharding, causal, impl, seq=32):
    st = init_parallel(ParallelLayout(cp=cp))
    g = st.cp
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(2, 4, seq, 8) for _ in range(4))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
    (ref * dout).sum().backward()
    shards = seq_shards(seq, cp, sharding)
    pos = shards[g.rank].positions()
    ql, kl, vl = (t[:, :, pos].clone().requires_grad_() for t in (q, k, v))
    if impl == "ring":
        out, lse = ring_attention(ql, kl, vl, g, shards, causal)
        ref_lse = torch.logsumexp(
            (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(
                causal & ~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf")
            ),
            dim=-1,
        )
        torch.testing.assert_close(lse, ref_lse[:, :, pos], rtol=1e-5, atol=1e-5)
    else:
        out = ulysses_attention(ql, kl, vl, g, shards, causal)
    (out * dout[:, :, pos]).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref[:, :, pos].detach(), **tol)
    for got, want in ((ql, qr), (kl, kr), (vl, vr)):
        torch.testing.assert_close(got.grad, want.grad[:, :, pos], **tol)
    return True


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_matches_full_attention(cp, sharding, causal):
    assert all(run_distributed(_attention_vs_full, cp, cp, sharding, causal, "ring"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ulysses_attention_matches_full_attention(causal):
    assert all(run_distributed(_attention_vs_full, 2, 2, "contiguous", causal, "ulysses"))
    assert all(run_distributed(_attention_vs_full, 4, 4, "zigzag", causal, "ulysses"))


# ---------------------------------------------------------------------------------------------- the model
MODEL_CASES = {
    "tp2-sp": (CONFIG, ParallelLayout(tp=2), {"sequence_parallel": True}),
    "tp2-sp-swiglu": (SWIGLU, ParallelLayout(tp=2), {"sequence_parallel": True}),
    "cp2-ring-zigzag": (CONFIG, ParallelLayout(cp=2), {"cp_impl": "ring", "cp_sharding": "zigzag"}),
    "cp2-ring-contiguous": (SWIGLU, ParallelLayout(cp=2), {"cp_impl": "ring", "cp_sharding": "contiguous"}),
    "cp4-ring-zigzag": (CONFIG, ParallelLayout(cp=4), {"cp_impl": "ring", "cp_sharding": "zigzag"}),
    "cp4-ring-contiguous": (CONFIG, ParallelLayout(cp=4), {"cp_impl": "ring", "cp_sharding": "contiguous"}),
    "cp2-ulysses": (CONFIG, ParallelLayout(cp=2), {"cp_impl": "ulysses", "cp_sharding": "contiguous"}),
    "tp2xcp2-sp-ring": (CONFIG, ParallelLayout(tp=2, cp=2), {"sequence_parallel": True, "cp_impl": "ring"}),
    "tp2xcp2-ulysses": (SWIGLU, ParallelLayout(tp=2, cp=2), {"cp_impl": "ulysses"}),
}
_REFERENCE = {}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_parallel_gpt_matches_reference(case):
    config, layout, options = MODEL_CASES[case]
    key = id(config)
    if key not in _REFERENCE:
        _REFERENCE[key] = train_reference(config, steps=2)
    results = run_distributed(train_parallel, layout.world_size, config, layout, 2, options)
    assert_matches_reference(results, _REFERENCE[key], case, tol=dict(rtol=1e-5, atol=2e-6))


def _bad_sequence():
    st = init_parallel(ParallelLayout(cp=2))
    model = ParallelGPT(CONFIG, st)
    errors = []
    try:
        model(torch.zeros(1, 6, dtype=torch.long))
    except GptparConfigError as e:
        errors.append(str(e))
    for make in (
        lambda: ParallelGPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=4, d_model=32, dropout=0.1), st),
        lambda: ParallelGPT(
            GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=3, d_model=48), st, cp_impl="ulysses"
        ),
        lambda: ParallelGPT(CONFIG, st, cp_impl="tree"),
    ):
        try:
            make()
        except GptparConfigError as e:
            errors.append(str(e))
    return errors


def test_bad_context_parallel_configuration_fails_clearly():
    errors = run_distributed(_bad_sequence, 2)[0]
    assert errors[0].startswith("sequence length 6 is not divisible by 4 (2*cp for zig-zag sharding, cp=2)")
    assert "dropout=0.1 with cp=2: attention dropout is not supported under context parallelism" in errors[1]
    assert "Ulysses needs the heads per tp rank (n_head/tp = 3/1) divisible by cp=2" in errors[2]
    assert "cp_impl='tree' is unknown" in errors[3]


# ---------------------------------------------------------------------------------------------- memory
def _saved_bytes(layout, options, where):
    """Bytes of activations saved for backward while inside modules of kind ``where``, per rank."""
    config = GPTConfig(
        vocab_size=64, seq_len=32, n_layer=2, n_head=4, d_model=64, dropout=0.1 if where == "norm" else 0.0
    )
    st = init_parallel(layout)
    torch.manual_seed(0)
    model = ParallelGPT(config, st, **options).train()
    params = {p.data_ptr() for p in model.parameters()}
    inside = [0]
    total = [0]

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1

    for m in model.modules():
        if where == "norm":
            hit = isinstance(m, (torch.nn.LayerNorm, torch.nn.Dropout))
        elif where == "column":
            hit = type(m).__name__ == "ColumnParallelLinear"
        else:
            hit = type(m).__name__ == "ParallelSelfAttention"
        if hit:
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)
    if where == "attention":  # only the attention core: not the qkv/proj projections around it
        for m in model.modules():
            if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear"):
                m.register_forward_pre_hook(leave)
                m.register_forward_hook(enter)

    def pack(t):
        if where == "column" and (t.dim() == 0 or t.shape[-1] != config.d_model):  # inputs, not the pre-activation
            return t
        if inside[0] > 0 and t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    idx, tgt = batch(config, b=2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, tgt)
    loss.backward()
    return total[0]


@pytest.mark.parametrize("where", ["norm", "column"], ids=["norms-and-dropout", "column-linear-inputs"])
def test_sequence_parallel_divides_activations_by_tp(where):
    # Column-parallel linears keep only their sequence shard and all-gather it again in backward.
    base = run_distributed(_saved_bytes, 2, ParallelLayout(tp=2), {}, where)[0]
    sp = run_distributed(_saved_bytes, 2, ParallelLayout(tp=2), {"sequence_parallel": True}, where)[0]
    assert base > 0
    assert abs(sp / base - 1 / 2) <= 0.1 * (1 / 2), (sp, base)


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_context_parallel_divides_attention_activations_by_cp(impl):
    base = _saved_bytes(ParallelLayout(), {}, "attention")
    cp2 = run_distributed(_saved_bytes, 2, ParallelLayout(cp=2), {"cp_impl": impl}, "attention")[0]
    cp4 = run_distributed(_saved_bytes, 4, ParallelLayout(cp=4), {"cp_impl": impl}, "attention")[0]
    assert base > 0
    assert abs(cp2 / base - 1 / 2) <= 0.1 * (1 / 2), (cp2, base)
    assert abs(cp4 / base - 1 / 4) <= 0.1 * (1 / 4), (cp4, base)
