"""The CUDA versions of the native gradient ops against the pure-torch reference. Runs only where a GPU
and a CUDA build of the extension exist; the CPU versions are covered by test_ops_grad.py everywhere."""

import pytest
import torch

import gptpar._native as native
from gptpar.ops import (
    adamw_step_,
    pack_cast,
    reference_adamw_step_,
    reference_pack_cast,
    reference_unpack_accumulate,
    unpack_accumulate,
    unscale_check_,
)

if not torch.cuda.is_available() or native.native() is None or not native.native().with_cuda:
    pytest.skip("needs a GPU and gptpar._C built with CUDA", allow_module_level=True)

SIZES = [[1], [4099], [int(n) for n in torch.randint(1, 3000, (300,))], [(1 << 22) + 3], [3, 0, 70000, 1, 131073, 5]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tensors(sizes, dtype, offset=0):
    g = torch.Generator(device="cuda").manual_seed(0)
    # `offset` slices into a larger buffer so the tensors start misaligned (scalar path) as well as aligned.
    return [(torch.randn(n + offset, device="cuda", generator=g) * 10)[offset:].to(dtype) for n in sizes]


def _ulps(a, b):
    """Distance in units of the last place of `a`'s dtype (a, b same dtype, finite)."""
    ia = a.view(torch.int32 if a.dtype == torch.float32 else torch.int16).long()
    ib = b.view(torch.int32 if b.dtype == torch.float32 else torch.int16).long()
    return (ia - ib).abs().max().item() if ia.numel() else 0


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}x")
@pytest.mark.parametrize("src", DTYPES, ids=str)
@pytest.mark.parametrize("dst", DTYPES, ids=str)
def test_pack_cast_cuda(sizes, src, dst, offset):
    ts = _tensors(sizes, src, offset)
    got = pack_cast(ts, 0.37, dst)
    want = reference_pack_cast(ts, 0.37, torch.empty_like(got))
    assert _ulps(got, want) <= 1
    r1 = torch.randn(got.numel(), device="cuda") * 1e-3
    r2 = r1.clone()
    got = pack_cast(ts, 0.37, dst, residual=r1)
    want = reference_pack_cast(ts, 0.37, torch.empty_like(got), residual=r2)
    assert _ulps(got, want) <= 1
    torch.testing.assert_close(r1, r2, rtol=0, atol=float(want.float().abs().max()) * 2**-7)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}x")
@pytest.mark.parametrize("src", DTYPES, ids=str)
def test_unpack_accumulate_cuda(sizes, src):
    dests = _tensors(sizes, torch.float32)
    flat = torch.randn(sum(sizes), device="cuda").to(src)
    want = [d.clone() for d in dests]
    unpack_accumulate(flat, dests, 0.25)
    reference_unpack_accumulate(flat, want, 0.25)
    for d, w in zip(dests, want, strict=True):
        assert _ulps(d, w) <= 1


def test_unscale_check_cuda_finds_hidden_nan():
    ts = _tensors(SIZES[4], torch.float32)
    assert unscale_check_(ts, 0.5).item() == 0
    ts[2][54_321] = float("nan")
    assert unscale_check_(ts, 0.5).item() == 1
    big = torch.randn((1 << 24) + 1, device="cuda")
    big[-1] = float("inf")
    assert unscale_check_(big, 1.0).item() == 1


def test_adamw_step_cuda_matches_reference():
    n = (1 << 20) + 7
    p = torch.randn(n, device="cuda")
    bufs, ref = [p, torch.zeros_like(p), torch.zeros_like(p)], [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    low = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    for step in range(1, 11):
        grad = torch.randn(n, device="cuda")
        kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, step=step)
        adamw_step_(bufs[0], grad, bufs[1], bufs[2], param_lowp=low, **kw)
        reference_adamw_step_(ref[0], grad, ref[1], ref[2], **kw)
    torch.testing.assert_close(bufs[0], ref[0], rtol=1e-6, atol=1e-6)
    assert _ulps(low, bufs[0].to(torch.bfloat16)) <= 1
