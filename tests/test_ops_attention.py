"""gptpar.ops.attention (the op ring attention builds on) against torch's SDPA, plus its LSE and masks."""

import pytest
import torch
import torch.nn.functional as F

from gptpar.ops import attention


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa_and_gradcheck(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = attention(q, k, v, causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    scores = q @ k.transpose(-1, -2) / 8**0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, causal)[0], (q, k, v))


def test_positions_mask_a_block_from_elsewhere_and_empty_rows_are_zero():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    # queries at positions 4..7 against keys at 6..9: rows 4 and 5 see nothing, rows 6 and 7 see some
    out, lse = attention(q, k, v, True, torch.arange(4, 8), torch.arange(6, 10))
    assert torch.all(out[..., :2, :] == 0) and torch.all(torch.isinf(lse[..., :2]))
    want = F.scaled_dot_product_attention(q[..., 2:, :], k[..., :2, :], v[..., :2, :], is_causal=True)
    torch.testing.assert_close(out[..., 2:, :], want)


def test_causal_bounds_are_exact_for_any_position_order():
    from gptpar.ops.attention import causal_bounds

    torch.manual_seed(0)
    zigzag = torch.cat([torch.arange(8, 16), torch.arange(48, 56)])
    for qp, kp in (
        (torch.arange(40), torch.arange(40)),
        (zigzag, torch.arange(64)),
        (torch.arange(64), zigzag),
        (torch.arange(16), torch.arange(30, 54)),
        (torch.randperm(50), torch.randperm(37)),
    ):
        khi, kfull, qlo, qfull = causal_bounds(qp, kp)
        visible = qp[:, None] >= kp[None, :]
        ki, qi = torch.arange(len(kp)), torch.arange(len(qp))[:, None]
        want_khi = torch.where(visible, ki + 1, 0).amax(1)  # one past the last visible key, 0 if none
        want_kfull = torch.where(~visible, ki, len(kp)).amin(1)  # the first key not seen
        want_qlo = torch.where(visible, qi, len(qp)).amin(0)
        want_qfull = torch.where(~visible, qi + 1, 0).amax(0)  # one past the last query not seeing it
        for got, want in ((khi, want_khi), (kfull, want_kfull), (qlo, want_qlo), (qfull, want_qfull)):
            assert got.dtype == torch.int32 and torch.equal(got.long(), want)


def test_fp32_kernels_use_exact_dots_unless_torch_allows_tf32():
    from gptpar.ops.dispatch import dot_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = before
    assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"  # tensor cores either way
