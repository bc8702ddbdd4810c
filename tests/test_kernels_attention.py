"""Triton flash attention (forward + backward, LSE, position masks) against the reference op, and the
parallel GPT with every Triton op on (ring attention, cross-entropy, norms) against the reference model,
all under TRITON_INTERPRET=1 in a subprocess (the interpreter must be on before Triton is imported)."""

import os
import subprocess
import sys

CHECK = r"""
import torch
from gptpar.kernels._interpreter import install
assert install()  # the interpreter's fast helper calls are on (kernels/_interpreter.py): else ~1.5x slower
from gptpar.ops.attention import (reference_attention_backward, reference_attention_forward,
                                  triton_attention_backward, triton_attention_forward)

torch.manual_seed(0)
zigzag = torch.cat([torch.arange(8, 16), torch.arange(48, 56)])  # a zig-zag cp shard's positions
shuffled = torch.randperm(45)  # any order: the causal block bounds must still be exact
CASES = [  # ragged lengths (masked tails), a key block from "another rank" (offsets), fully masked rows
    (torch.arange(40), torch.arange(40)), (torch.arange(20, 53), torch.arange(50)), (torch.arange(16), torch.arange(30, 54)),
    (torch.arange(5, 75), torch.arange(60, 69)), (zigzag, torch.arange(64)), (torch.arange(64), zigzag),
    (shuffled, shuffled[torch.randperm(45)]),
]
# bf16 runs with the UPCAST loads (the interpreter mis-computes bf16 tensor arithmetic); every case in
# fp32 at d=32, the offset, zig-zag and shuffled ones at the other widths and in half precision
RUNS = [(torch.float32, 2e-5, 32, CASES), (torch.float32, 2e-5, 64, [CASES[i] for i in (0, 3, 4)])]
RUNS += [(dt, tol, d, [CASES[i] for i in (1, 4, 6)]) for dt, tol, d in ((torch.float16, 3e-2, 32), (torch.bfloat16, 6e-2, 64))]
for dtype, tol, d, cases in RUNS:
    for causal in (True, False):
        for qp, kp in cases:
            sq, sk = len(qp), len(kp)
            q, k, v = (torch.randn(2, 3, n, d).to(dtype) for n in (sq, sk, sk))
            o, lse = triton_attention_forward(q, k, v, causal, qp, kp)
            ro, rlse = reference_attention_forward(q, k, v, causal, qp, kp)
            assert o.dtype == dtype and torch.equal(torch.isinf(lse), torch.isinf(rlse))
            fin = ~torch.isinf(rlse)
            torch.testing.assert_close(o.float(), ro.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse[fin], rlse[fin], rtol=tol, atol=tol)
            do = torch.randn_like(o)
            for g, rg in zip(triton_attention_backward(do, q, k, v, ro, rlse, causal, qp, kp),
                             reference_attention_backward(do, q, k, v, ro, rlse, causal, qp, kp)):
                torch.testing.assert_close(g.float(), rg.float(), rtol=tol, atol=tol * 4)
print("kernels ok")
"""

GQA_CHECK = r"""
import torch
from gptpar.kernels._interpreter import install
assert install()  # the interpreter's fast helper calls are on (kernels/_interpreter.py): else ~1.5x slower
from gptpar.ops.attention import (reference_attention_backward, reference_attention_forward,
                                  triton_attention_backward, triton_attention_forward)

torch.manual_seed(0)
zigzag = torch.cat([torch.arange(8, 16), torch.arange(48, 56)])
CASES = [(torch.arange(40), torch.arange(40)), (torch.arange(20, 53), torch.arange(50)), (zigzag, torch.arange(64))]
for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 3e-2)):
    for h, hkv in ((4, 2), (4, 1), (6, 3)):  # groups of 2, 4 (MQA) and 2 over an odd head count
        for causal in (True, False):
            # MQA and fp16: the zig-zag case
            for qp, kp in CASES if dtype == torch.float32 and hkv != 1 else CASES[2:]:
                q = torch.randn(2, h, len(qp), 32).to(dtype)
                k, v = (torch.randn(2, hkv, len(kp), 32).to(dtype) for _ in range(2))
                o, lse = triton_attention_forward(q, k, v, causal, qp, kp)
                ro, rlse = reference_attention_forward(q, k, v, causal, qp, kp)
                # the reference itself against K/V repeated per query head (the definition of GQA)
                rep = lambda t: t.repeat_interleave(h // hkv, dim=1)
                mo, mlse = reference_attention_forward(q, rep(k), rep(v), causal, qp, kp)
                torch.testing.assert_close(ro, mo, rtol=tol, atol=tol)
                fin = ~torch.isinf(rlse)
                torch.testing.assert_close(o.float(), ro.float(), rtol=tol, atol=tol)
                torch.testing.assert_close(lse[fin], rlse[fin], rtol=tol, atol=tol)
                do = torch.randn_like(o)
                got = triton_attention_backward(do, q, k, v, ro, rlse, causal, qp, kp)
                want = reference_attention_backward(do, q, k, v, ro, rlse, causal, qp, kp)
                dq_m, dk_m, dv_m = reference_attention_backward(do, q, rep(k), rep(v), ro, rlse, causal, qp, kp)
                fold = lambda t: t.float().unflatten(1, (hkv, h // hkv)).sum(2)  # K/V grads summed over the group
                torch.testing.assert_close(want[1].float(), fold(dk_m), rtol=tol, atol=tol * 4)
                torch.testing.assert_close(want[2].float(), fold(dv_m), rtol=tol, atol=tol * 4)
                assert got[1].shape == k.shape and got[2].shape == v.shape
                for g, rg in zip(got, want):
                    torch.testing.assert_close(g.float(), rg.float(), rtol=tol, atol=tol * 4)
print("gqa ok")
"""

DOCS_CHECK = r"""
import torch
from gptpar.kernels._interpreter import install
assert install()  # the interpreter's fast helper calls are on (kernels/_interpreter.py): else ~1.5x slower
from gptpar.ops.attention import (attention_bounds, kernel_tiles, reference_attention_backward,
                                  reference_attention_forward, triton_attention_backward, triton_attention_forward)

torch.manual_seed(0)
s = 70
ids = ((torch.rand(2, s) < 1 / 9).long().cumsum(1) + 3)  # random boundaries, different in each row
zig = torch.cat([torch.arange(8, 16), torch.arange(48, 56)])
perm = torch.randperm(45)
flat = torch.zeros(2, s, dtype=torch.long)
CASES = [  # (q_pos, k_pos, q_doc, k_doc): one rank, key blocks from other ranks (offsets, zig-zag), any
    # position order, unsorted ids (no block bounds: every block masked explicitly), one document
    (torch.arange(s), torch.arange(s), ids, ids), (torch.arange(20, 53), torch.arange(50), ids[:, 20:53], ids[:, :50]),
    (zig, torch.arange(64), ids[:, zig], ids[:, :64]), (torch.arange(64), zig, ids[:, :64], ids[:, zig]),
    (perm, perm, ids[:, :45], ids[:, :45]), (torch.arange(40), torch.arange(40), ids[:, :40].flip(1), ids[:, :40].flip(1)),
    (torch.arange(s), torch.arange(s), flat, flat),
]
for dtype, tol, h, hkv in ((torch.float32, 2e-5, 4, 2), (torch.float16, 3e-2, 2, 2)):  # GQA in fp32
    for causal in (True, False) if dtype == torch.float32 else (True,):
        for qp, kp, qd, kd in CASES if dtype == torch.float32 else CASES[:3]:
            q = torch.randn(2, h, len(qp), 32).to(dtype)
            k, v = (torch.randn(2, hkv, len(kp), 32).to(dtype) for _ in range(2))
            o, lse = triton_attention_forward(q, k, v, causal, qp, kp, docs=(qd, kd))
            ro, rlse = reference_attention_forward(q, k, v, causal, qp, kp, docs=(qd, kd))
            assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
            fin = ~torch.isinf(rlse)
            torch.testing.assert_close(o.float(), ro.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse[fin], rlse[fin], rtol=tol, atol=tol)
            do = torch.randn_like(o)
            for g, rg in zip(triton_attention_backward(do, q, k, v, ro, rlse, causal, qp, kp, docs=(qd, kd)),
                             reference_attention_backward(do, q, k, v, ro, rlse, causal, qp, kp, docs=(qd, kd))):
                torch.testing.assert_close(g.float(), rg.float(), rtol=tol, atol=tol * 4)
# work falls with document length: tiles the forward visits at s = 1024, documents of mean s/8, vs causal
s, pos = 1024, torch.arange(1024)
short = (torch.arange(s) // (s // 8)).unsqueeze(0)
causal_tiles = sum(kernel_tiles(attention_bounds(pos, pos, True)[0], 64, 64))
doc_tiles = kernel_tiles(attention_bounds(pos, pos, True, (short, short))[0], 64, 64)
assert sum(doc_tiles) <= 0.2 * causal_tiles, (doc_tiles, causal_tiles)
print("docs ok")
"""

MODEL = r"""
import os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
import torch
from gpt_helpers import assert_matches_reference, train_parallel, train_reference
from gptpar import GPTConfig, ParallelLayout
from gptpar.ops.attention import flash_kernel_applies
from gptpar.testing import run_distributed
import dataclasses
import test_documents as documents

# (module level: spawned workers import this script first) heads of 16, which the flash kernel takes
documents.CONFIGS["wide"] = dataclasses.replace(documents.ROPE, d_model=64, n_layer=2, head_dim=None, ffn_hidden=None)

if __name__ == "__main__":
    config = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=64)
    ref = train_reference(config, steps=1)
    # (ring attention's Triton blocks: the Llama and the packed-document runs below)
    res = run_distributed(train_parallel, 2, config, ParallelLayout(tp=2), 1, timeout=600)
    assert_matches_reference(res, ref, "triton tp=2", tol=dict(rtol=1e-4, atol=1e-5))
    # SwiGLU and RMSNorm, sequence parallel: the fused GEMM + SwiGLU inside the sequence-parallel column linear
    config = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=64, activation="swiglu", norm="rmsnorm")
    ref = train_reference(config, steps=1)
    res = run_distributed(train_parallel, 2, config, ParallelLayout(tp=2), 1, {"sequence_parallel": True}, timeout=600)
    assert_matches_reference(res, ref, "triton tp=2 sp swiglu", tol=dict(rtol=1e-4, atol=1e-5))
    # Llama style: RoPE (Triton rotation of q|k), GQA in ring attention's Triton blocks, zig-zag positions
    config = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_kv_head=2, d_model=64, activation="swiglu",
                       norm="rmsnorm", position="rope", bias=False, tie_embeddings=False)
    ref = train_reference(config, steps=1)
    res = run_distributed(train_parallel, 2, config, ParallelLayout(cp=2), 1, {"cp_impl": "ring"}, timeout=600)
    assert_matches_reference(res, ref, "triton cp=2 llama", tol=dict(rtol=1e-4, atol=1e-5))
    # packed documents: the flash kernel's document masks on one rank (tp2) and in ring attention's blocks
    assert flash_kernel_applies(torch.zeros(1), documents.CONFIGS["wide"].head_dim)
    res = run_distributed(documents._parallel, 2, "wide", ParallelLayout(tp=2))
    documents._check(res, "wide", "triton tp2 documents")
    res = run_distributed(documents._parallel, 2, "wide", ParallelLayout(cp=2))
    documents._check(res, "wide", "triton cp2 documents")
    print("model ok")
"""


def _run(code, tmp_path, name):
    script = tmp_path / name
    script.write_text(code)
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPTPAR_TRITON": "1", "TESTS_DIR": os.path.dirname(__file__)}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, env=env)


def test_flash_attention_kernel_matches_reference(tmp_path):
    res = _run(CHECK, tmp_path, "check_attention.py")
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "kernels ok"


def test_flash_attention_kernel_with_grouped_query_heads_matches_reference(tmp_path):
    res = _run(GQA_CHECK, tmp_path, "check_gqa.py")
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "gqa ok"


def test_flash_attention_kernel_with_document_masks_matches_reference(tmp_path):
    res = _run(DOCS_CHECK, tmp_path, "check_docs.py")
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "docs ok"


def test_parallel_gpt_with_triton_ops_matches_reference_model(tmp_path):
    res = _run(MODEL, tmp_path, "check_model.py")
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().endswith("model ok")
