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
    torch.testing.assert_close(rms_norm(x, w), F.rms_norm(x.float(), (4096,), w).bfloat16(), rtol=2e-2, atol=2e-2)
