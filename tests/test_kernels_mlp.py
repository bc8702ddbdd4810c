"""Triton fused MLP half (GEMM + bias + GeLU/SwiGLU epilogue, fused activation backward) against torch,
under TRITON_INTERPRET=1 in a subprocess."""

import os
import subprocess
import sys

CHECK = r"""
import torch
from gptpar.ops.mlp import act_backward, apply_activation, reference_act_backward, reference_linear_act
from gptpar.ops.wgrad import linear_act

torch.manual_seed(0)
# fp16 and fp32 through the tensor-core path (matmuls in the input dtype); bf16 through the UPCAST loads
for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 3e-2), (torch.bfloat16, 6e-2)):
    for act in ("gelu", "swiglu"):
        for m, k, f, bias in ((37, 48, 40, True), (5, 64, 96, False), (70, 33, 17, True)):  # ragged tiles
            out_f = 2 * f if act == "swiglu" else f
            x = torch.randn(m, k).to(dtype).requires_grad_()
            w = (torch.randn(out_f, k) / k**0.5).requires_grad_()
            b = torch.randn(out_f).requires_grad_() if bias else None
            dy = torch.randn(m, f).to(dtype)
            y = linear_act(x, w, b, act)
            y.backward(dy)
            got = [y.float(), x.grad.float(), w.grad] + ([b.grad] if bias else [])
            x.grad = w.grad = None
            if bias:
                b.grad = None
            ry = reference_linear_act(x.float(), w, b, act)
            ry.backward(dy.float())
            want = [ry, x.grad, w.grad] + ([b.grad] if bias else [])
            for g, r in zip(got, want):
                torch.testing.assert_close(g, r.float(), rtol=tol, atol=tol * 5)
            # the activation gradient alone (the fused backward's first kernel) against its torch formula
            pre = torch.randn(m, out_f).to(dtype)
            assert torch.equal(act_backward(pre, dy, act).float(), act_backward(pre, dy, act).float())
            torch.testing.assert_close(act_backward(pre, dy, act).float(), reference_act_backward(pre.float(), dy.float(), act),
                                       rtol=tol, atol=tol)
# the reference formula for the activation gradient is autograd's
for act in ("gelu", "swiglu"):
    pre = torch.randn(9, 14 if act == "swiglu" else 7, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(9, 7, dtype=torch.float64)
    apply_activation(pre, act).backward(dy)
    torch.testing.assert_close(reference_act_backward(pre.detach(), dy, act), pre.grad)
print("ok")
"""


def test_fused_mlp_kernel_matches_torch_under_the_interpreter(tmp_path):
    script = tmp_path / "check_mlp.py"
    script.write_text(CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPTPAR_TRITON": "1"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "ok"
