"""Micro-benchmarks of the fused ops against plain torch and a plain copy of the same bytes.

Run with ``make bench`` (``pytest bench --benchmark-only``); compare the rows of one group in one run.
"""

import pytest
import torch

import gptpar._native as native
from gptpar.ops import reference_unscale_check_

N = 1 << 22  # 16 MiB of fp32 gradients


@pytest.fixture(scope="module")
def grads():
    torch.manual_seed(0)
    return torch.randn(N)


@pytest.mark.benchmark(group="unscale_check fp32 16MiB")
def test_unscale_check_native(benchmark, grads):
    assert native.available()
    benchmark(native.native().unscale_check_, grads, 1.0)


@pytest.mark.benchmark(group="unscale_check fp32 16MiB")
def test_unscale_check_torch(benchmark, grads):
    benchmark(reference_unscale_check_, grads, 1.0)


@pytest.mark.benchmark(group="unscale_check fp32 16MiB")
def test_copy_same_bytes(benchmark, grads):
    out = torch.empty_like(grads)
    benchmark(out.copy_, grads)
