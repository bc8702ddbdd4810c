"""The Triton RoPE kernel (q|k rotation of a fused qkv activation) against the torch reference, forward and
backward, under TRITON_INTERPRET=1; and the reference against the rotate-half definition Hugging Face uses."""

import torch
from test_kernels_attention import _run

from gptpar.ops.rope import apply_rope, reference_rope_qkv, rope_inv_freq, rope_tables

CHECK = r"""
import torch
from gptpar.ops.rope import _TritonRopeQKV, reference_rope_qkv, rope_inv_freq, rope_tables

torch.manual_seed(0)
scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
    for s, b, h, n_rot, d in ((7, 3, 5, 3, 16), (16, 2, 20, 18, 64), (1, 1, 3, 2, 8), (9, 4, 6, 6, 32)):
        x = torch.randn(s, b, h, d).to(dtype).requires_grad_()
        positions = torch.randperm(64)[:s]  # any positions, as a zig-zag or Ulysses shard has
        cos, sin = rope_tables(positions, rope_inv_freq(d, 500000.0, scaling))
        want = reference_rope_qkv(x, cos, sin, n_rot)
        got = _TritonRopeQKV.apply(x, cos, sin, n_rot)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        assert torch.equal(got[:, :, n_rot:], x[:, :, n_rot:])  # v heads untouched
        g = torch.randn_like(want)
        (gw,) = torch.autograd.grad(want, x, g)
        (gg,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(gg.float(), gw.float(), rtol=tol, atol=tol)
print("rope ok")
"""


def test_rope_kernel_matches_reference(tmp_path):
    res = _run(CHECK, tmp_path, "check_rope.py")
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "rope ok"


def test_reference_rope_is_rotate_half_with_duplicated_frequencies():
    torch.manual_seed(0)
    d = 16
    x = torch.randn(2, 3, 10, d)
    cos, sin = rope_tables(torch.arange(10), rope_inv_freq(d, 10000.0))
    cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # Hugging Face's emb = cat(freqs, freqs)
    rotate_half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    torch.testing.assert_close(apply_rope(x, cos, sin), x * cos2 + rotate_half * sin2, rtol=1e-6, atol=1e-6)
    qkv = torch.randn(10, 2, 4, d)
    out = reference_rope_qkv(qkv, cos, sin, 3)
    torch.testing.assert_close(
        out[:, :, :3], apply_rope(qkv[:, :, :3].permute(1, 2, 0, 3), cos, sin).permute(2, 0, 1, 3)
    )
    assert torch.equal(out[:, :, 3:], qkv[:, :, 3:])


def test_llama3_scaling_keeps_high_and_divides_low_frequencies():
    d = 64
    plain = rope_inv_freq(d, 500000.0)
    scaled = rope_inv_freq(
        d, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    )
    wavelen = 2 * torch.pi / plain
    assert torch.equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    torch.testing.assert_close(scaled[wavelen > 8192], plain[wavelen > 8192] / 8)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and torch.all(scaled[mid] < plain[mid]) and torch.all(scaled[mid] > plain[mid] / 8)
