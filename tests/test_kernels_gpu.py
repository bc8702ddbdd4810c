"""The Triton kernels on a GPU, bf16 at realistic shapes, against torch. Runs only where CUDA exists;
the same kernels run on CPU under the interpreter in test_kernels_*.py."""

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gptpar.ops.attention import triton_attention_backward, triton_attention_forward  # noqa: E402
from gptpar.ops.norm import layer_norm, rms_norm  # noqa: E402


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_bf16(d, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 2048, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    do = torch.randn_like(ref)
    ref.backward(do)
    o, lse = triton_attention_forward(q.detach(), k.detach(), v.detach(), causal)
    torch.testing.assert_close(o, ref.detach(), rtol=2e-2, atol=2e-2)
    dq, dk, dv = triton_attention_backward(do, q.detach(), k.detach(), v.detach(), o, lse, causal)
    for g, rg in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(g, rg, rtol=5e-2, atol=5e-2)


def test_norms_bf16():
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(4096, device="cuda"), torch.randn(4096, device="cuda")
    torch.testing.assert_close(
        layer_norm(x, w, b), F.layer_norm(x.float(), (4096,), w, b).bfloat16(), rtol=2e-2, atol=2e-2
    )
    torch.testing.assert_close(
        rms_norm(x, w), F.rms_norm(x.float(), (4096,), w, eps=1e-5).bfloat16(), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_fused_mlp_bf16(act):
    from gptpar.ops.mlp import reference_linear_act
    from gptpar.ops.wgrad import linear_act

    torch.manual_seed(0)
    m, k, f = 4096, 1024, 2048
    rows = 2 * f if act == "swiglu" else f
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(rows, k, device="cuda") / k**0.5).to(torch.bfloat16).requires_grad_()
    b = torch.randn(rows, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, f, device="cuda", dtype=torch.bfloat16)
    got = linear_act(x, w, b, act)
    grads = torch.autograd.grad(got, (x, w, b), dy)
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
    want = reference_linear_act(xf, wf, bf, act)
    want_grads = torch.autograd.grad(want, (xf, wf, bf), dy.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, want_grads, strict=True):  # bf16 GEMMs over k=1024 / m=4096 terms: relative to the scale
        assert (g.float() - r).abs().max() <= 2e-2 * r.abs().max() + 1e-2


def test_vocab_parallel_cross_entropy_bf16():
    from gptpar import ParallelLayout, init_parallel
    from gptpar.parallel.tensor import vocab_parallel_cross_entropy

    st = init_parallel(ParallelLayout())
    torch.manual_seed(0)
    logits = (torch.randn(4096, 50304, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 50304, (4096,), device="cuda")
    loss = vocab_parallel_cross_entropy(logits, target, st.tp)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    lf = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(lf, target, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), lf)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2e-2, atol=1e-3)


def test_causal_attention_with_zigzag_positions_bf16():
    """A ring-attention step's shapes on a GPU: a zig-zag shard's queries against another rank's keys."""
    from gptpar.ops.attention import reference_attention_backward, reference_attention_forward

    torch.manual_seed(0)
    n = 1024
    qp = torch.cat([torch.arange(n, 2 * n), torch.arange(6 * n, 7 * n)]).cuda()
    kp = torch.cat([torch.arange(2 * n, 3 * n), torch.arange(5 * n, 6 * n)]).cuda()
    q, k, v = (torch.randn(2, 4, 2 * n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o, lse = triton_attention_forward(q, k, v, True, qp, kp)
    ro, rlse = reference_attention_forward(q.float(), k.float(), v.float(), True, qp, kp)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    torch.testing.assert_close(o.float(), ro, rtol=2e-2, atol=2e-2)
    do = torch.randn_like(q)
    got = triton_attention_backward(do, q, k, v, ro.bfloat16(), rlse, True, qp, kp)
    want = reference_attention_backward(do.float(), q.float(), k.float(), v.float(), ro, rlse, True, qp, kp)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)
