"""Native gradient ops against their pure-torch references on random inputs of awkward sizes."""

import pytest
import torch

import gptpar._native as native
from gptpar.ops import (
    adamw_step_,
    pack_cast,
    reference_adamw_step_,
    reference_pack_cast,
    reference_unpack_accumulate,
    reference_unscale_check_,
    unpack_accumulate,
    unscale_check_,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = {
    "none": [],
    "empty": [0],
    "one": [1],
    "odd": [4099],
    "many-small": [int(n) for n in torch.randint(1, 50, (200,), generator=torch.Generator().manual_seed(0))],
    "one-large": [(1 << 20) + 3],
    "mixed": [3, 0, 70000, 1, 131073],
}


@pytest.fixture(autouse=True)
def _native_only():
    assert native.native() is not None, "these tests compare the native ops with the reference"


def _tensors(sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Wide dynamic range so casts round in every direction; never zero.
    return [
        (torch.randn(n, generator=g) * 10 ** torch.randint(-3, 4, (1,), generator=g).item()).to(dtype) for n in sizes
    ]


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("src", DTYPES, ids=str)
@pytest.mark.parametrize("dst", DTYPES, ids=str)
def test_pack_cast_bitwise(sizes, src, dst):
    ts = _tensors(SIZES[sizes], src)
    got = pack_cast(ts, scale=0.37, dtype=dst)
    want = reference_pack_cast(ts, 0.37, torch.empty_like(got))
    assert got.dtype == dst and got.numel() == sum(SIZES[sizes])
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float16], ids=str)
def test_pack_cast_error_feedback_bitwise(dst):
    ts = _tensors(SIZES["mixed"], torch.float32, seed=1)
    total = sum(SIZES["mixed"])
    r_in = torch.randn(total) * 1e-3
    r_native, r_ref = r_in.clone(), r_in.clone()
    got = pack_cast(ts, 2.0, dst, residual=r_native)
    want = reference_pack_cast(ts, 2.0, torch.empty_like(got), residual=r_ref)
    assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(r_native, r_ref)
    assert r_native.abs().max() > 0  # the cast really lost something, and it was kept
    # Error feedback: what was sent plus what was kept is what should have been sent (exactly, in fp32).
    assert torch.equal(got.float() + r_native, torch.cat(ts) * 2.0 + r_in)


def test_pack_cast_nonfinite_values_survive():
    t = torch.randn(1000)
    t[3], t[500], t[999] = float("nan"), float("inf"), -float("inf")
    for dst in (torch.bfloat16, torch.float16):
        got = pack_cast([t], 1.0, dst)
        want = reference_pack_cast([t], 1.0, torch.empty_like(got))
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        finite = ~torch.isnan(want)
        assert torch.equal(_bits(got)[finite], _bits(want)[finite])


@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("src", DTYPES, ids=str)
def test_unpack_accumulate_bitwise(sizes, src):
    dests = _tensors(SIZES[sizes], torch.float32, seed=2)
    flat = torch.randn(sum(SIZES[sizes]), generator=torch.Generator().manual_seed(3)).to(src)
    want = [d.clone() for d in dests]
    unpack_accumulate(flat, dests, scale=0.25)
    reference_unpack_accumulate(flat, want, scale=0.25)
    for d, w in zip(dests, want, strict=True):
        assert torch.equal(d, w)


def test_pack_then_unpack_roundtrip_fp32():
    ts = _tensors(SIZES["mixed"], torch.float32, seed=4)
    flat = pack_cast(ts, 1.0, torch.float32)
    dests = [torch.zeros_like(t) for t in ts]
    unpack_accumulate(flat, dests, 1.0)
    for d, t in zip(dests, ts, strict=True):
        assert torch.equal(d, t)


@pytest.mark.parametrize("sizes", ["one", "odd", "many-small", "one-large", "mixed"])
def test_unscale_check_bitwise_and_clean(sizes):
    ts = _tensors(SIZES[sizes], torch.float32, seed=5)
    want = [t.clone() for t in ts]
    flag = unscale_check_(ts, 1 / 1024)
    ref_flag = reference_unscale_check_(want, 1 / 1024, torch.zeros(1))
    assert flag.item() == 0 and ref_flag.item() == 0
    for t, w in zip(ts, want, strict=True):
        assert torch.equal(t, w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_unscale_check_finds_a_single_hidden_nonfinite(bad):
    ts = _tensors(SIZES["mixed"], torch.float32, seed=6)
    ts[2][54_321] = bad  # one value in a 70000-element tensor among five
    assert unscale_check_(ts, 0.5).item() == 1
    big = torch.randn((1 << 22) + 1)
    big[-1] = bad  # the very last element, in the scalar tail
    assert unscale_check_(big, 0.5).item() == 1


def test_unscale_check_overflow_counts_and_flag_is_never_cleared():
    flag = unscale_check_(torch.full((5,), 3e38), 10.0)
    assert flag.item() == 1
    assert unscale_check_(torch.ones(5), 1.0, found_inf=flag).item() == 1


def _adam_state(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("n", [1, 7, 4099, (1 << 18) + 5])
def test_adamw_step_matches_reference(n):
    p, _ = _adam_state(n, 7)
    bufs = [p, torch.zeros(n), torch.zeros(n)]
    ref = [b.clone() for b in bufs]
    low = torch.empty(n, dtype=torch.bfloat16)
    for step in range(1, 4):
        grad = torch.randn(n, generator=torch.Generator().manual_seed(step))
        kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, step=step)
        adamw_step_(bufs[0], grad, bufs[1], bufs[2], param_lowp=low, **kw)
        reference_adamw_step_(ref[0], grad, ref[1], ref[2], **kw)
    for b, r in zip(bufs, ref, strict=True):
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-7)
    assert torch.equal(low, bufs[0].to(torch.bfloat16))


def test_adamw_step_matches_torch_optim_over_10_steps():
    n = 10_007
    w0, _ = _adam_state(n, 8)
    ref_param = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref_param], lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    p, m, v = w0.clone(), torch.zeros(n), torch.zeros(n)
    low = torch.empty(n, dtype=torch.float16)
    for step in range(1, 11):
        grad = torch.randn(n, generator=torch.Generator().manual_seed(100 + step)) * 0.1
        ref_param.grad = grad.clone()
        opt.step()
        adamw_step_(p, grad, m, v, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, step=step, param_lowp=low)
    st = opt.state[ref_param]
    torch.testing.assert_close(p, ref_param.detach(), rtol=1e-6, atol=1e-7)
    # The moments agree to rounding (torch's vectorised lerp may fuse its multiply-add); where m cancels
    # to near zero the relative error is meaningless, so the bound is absolute, 1e-7 of m's scale (0.1).
    torch.testing.assert_close(m, st["exp_avg"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v, st["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    assert torch.equal(low, p.to(torch.float16))


def test_native_ops_reject_bad_arguments_clearly():
    ext = native.native()
    with pytest.raises(RuntimeError, match="dst has 3 elements, sources have 4"):
        ext.pack_cast([torch.ones(4)], torch.empty(3, dtype=torch.bfloat16), 1.0)
    with pytest.raises(RuntimeError, match="destinations must be float32"):
        ext.unpack_accumulate(torch.ones(4), [torch.ones(4, dtype=torch.float64)], 1.0)
    with pytest.raises(ValueError, match="step=0 must be >= 1"):
        adamw_step_(torch.ones(2), torch.ones(2), torch.zeros(2), torch.zeros(2), lr=1e-3, step=0)


def test_dispatch_falls_back_for_unsupported_inputs():
    x = torch.randn(100, dtype=torch.float64)
    y = x.clone()
    assert unscale_check_(x, 2.0).item() == 0
    assert torch.equal(x, y * 2)
    strided = torch.randn(10, 10).t()  # not contiguous: reference path
    assert pack_cast([strided], 1.0, torch.float32).equal(strided.reshape(-1))
