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
