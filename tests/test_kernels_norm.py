"""Triton LayerNorm / RMSNorm against torch, forward and backward, under TRITON_INTERPRET=1 on CPU.

Runs the kernels in a subprocess: the interpreter must be switched on before Triton is first imported,
and the rest of the suite must not run under it."""

import os
import subprocess
import sys

import pytest

CHECK = r"""
import torch
from gptpar.ops.norm import layer_norm, reference_layer_norm, reference_rms_norm, rms_norm

torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
    # ragged widths (masked tails); 521 rows: backward programs sum 2 rows each, the last group short
    shapes = ((3, 5, 64), (7, 100), (65, 33), (1, 1000), (521, 24))
    for shape in shapes if dtype == torch.float32 else shapes[1:3]:  # fp16: the ragged widths
        n = shape[-1]
        x = (torch.randn(shape) * 3 + 1).to(dtype).requires_grad_()
        w = (torch.rand(n) + 0.5).requires_grad_()
        b = torch.randn(n).requires_grad_()
        dy = torch.randn(shape).to(dtype)
        for rms in (False, True):
            outs = []
            for impl in ("triton", "torch"):
                xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
                if rms:
                    y = (rms_norm if impl == "triton" else reference_rms_norm)(xi.float() if impl == "torch" else xi, wi)
                else:
                    y = (layer_norm if impl == "triton" else reference_layer_norm)(xi.float() if impl == "torch" else xi, wi, bi)
                y.float().backward(dy.float())
                outs.append((y.float(), xi.grad.float(), wi.grad, None if rms else bi.grad))
            (y, dx, dw, db), (ry, rdx, rdw, rdb) = outs
            torch.testing.assert_close(y, ry, rtol=tol, atol=tol)
            torch.testing.assert_close(dx, rdx, rtol=tol, atol=tol * 10)
            torch.testing.assert_close(dw, rdw, rtol=tol, atol=tol * 10)
            if not rms:
                torch.testing.assert_close(db, rdb, rtol=tol, atol=tol * 10)
print("ok")
"""


def test_norm_kernels_match_torch_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPTPAR_TRITON": "1"}
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "ok"


def test_dispatch_uses_the_reference_on_cpu_by_default(monkeypatch):
    import torch

    from gptpar.ops.dispatch import use_triton
    from gptpar.ops.norm import layer_norm

    monkeypatch.delenv("GPTPAR_TRITON", raising=False)
    x = torch.randn(4, 8)
    assert not use_triton(x)
    monkeypatch.setenv("GPTPAR_TRITON", "0")
    assert not use_triton(x)
    torch.testing.assert_close(layer_norm(x, torch.ones(8), torch.zeros(8)), torch.nn.functional.layer_norm(x, (8,)))
