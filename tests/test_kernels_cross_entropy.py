"""Triton vocab-parallel cross-entropy against F.cross_entropy (tp=1 and tp=2), under TRITON_INTERPRET=1.

The kernels run in a subprocess (the interpreter must be on before Triton is imported); its tp=2 check
spawns gloo workers from there, which inherit the environment."""

import os
import subprocess
import sys

CHECK = r"""
import torch, torch.nn.functional as F
from gptpar import ParallelLayout, init_parallel
from gptpar.parallel.tensor import vocab_parallel_cross_entropy
from gptpar.testing import run_distributed


def case(tp, dtype, vocab=300):
    st = init_parallel(ParallelLayout(tp=tp))
    torch.manual_seed(0)
    logits = (torch.randn(5, 7, vocab) * 4).to(dtype)  # 300/tp columns: ragged against the 256/512 blocks
    target = torch.randint(0, vocab, (5, 7))
    target[0, :3] = -100
    dl = torch.rand(5, 7)
    lr = logits.float().clone().requires_grad_()
    ref = F.cross_entropy(lr.flatten(0, 1), target.flatten(), reduction="none", ignore_index=-100).view(5, 7)
    (ref * dl).sum().backward()
    lp = logits.chunk(tp, dim=-1)[st.tp.rank].clone().requires_grad_()
    out = vocab_parallel_cross_entropy(lp, target, st.tp)
    (out * dl).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lp.grad.float(), lr.grad.chunk(tp, dim=-1)[st.tp.rank], rtol=tol, atol=tol)
    # inplace_backward: the same gradient, written over the logits' own storage
    li = logits.chunk(tp, dim=-1)[st.tp.rank].clone().requires_grad_()
    work = li * 1.0  # a non-leaf the loss may consume
    out = vocab_parallel_cross_entropy(work, target, st.tp, inplace_backward=True)
    (grad,) = torch.autograd.grad((out * dl).sum(), work)
    assert grad.data_ptr() == work.data_ptr()
    torch.testing.assert_close(grad.float(), lp.grad.float(), rtol=0, atol=0)
    return True


if __name__ == "__main__":
    assert case(1, torch.float32, vocab=9000)  # several 4096-wide blocks: the online max/sum across blocks
    for dtype in (torch.float32, torch.float16):
        assert case(1, dtype)
        assert all(run_distributed(case, 2, 2, dtype))
    print("ok")
"""


def test_triton_cross_entropy_matches_torch_under_the_interpreter(tmp_path):
    script = tmp_path / "check_ce.py"
    script.write_text(CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPTPAR_TRITON": "1"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().endswith("ok")
