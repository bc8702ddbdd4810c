"""pytest-benchmark micro-benchmarks of the native gradient ops, each beside plain torch and a copy.

``make bench`` runs them; compare rows within a group (same run). For GB/s and ratios in one table, run
``python bench/ops_bandwidth.py``.
"""

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

N = 1 << 22  # 4M elements


@pytest.fixture(scope="module")
def data():
    assert native.native() is not None, "build the extension first (make install)"
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(N // 16, generator=g) for _ in range(16)]
    return {
        "grads": grads,
        "flat32": torch.randn(N, generator=g),
        "flat16": torch.randn(N, generator=g).to(torch.bfloat16),
        "out16": torch.empty(N, dtype=torch.bfloat16),
        "adam": [torch.randn(N, generator=g).abs() for _ in range(3)],
        "found": torch.zeros(1),
    }


ADAM = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, step=10)


@pytest.mark.benchmark(group="copy 16MiB fp32 (bandwidth ceiling)")
def test_copy(benchmark, data):
    dst = torch.empty_like(data["flat32"])
    benchmark(dst.copy_, data["flat32"])


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.benchmark(group="pack_cast fp32->bf16")
def test_pack_cast(benchmark, data, impl):
    if impl == "native":
        benchmark(lambda: pack_cast(data["grads"], 0.5, out=data["out16"]))
    else:
        benchmark(lambda: reference_pack_cast(data["grads"], 0.5, data["out16"]))


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.benchmark(group="unpack_accumulate bf16->fp32")
def test_unpack_accumulate(benchmark, data, impl):
    f = unpack_accumulate if impl == "native" else reference_unpack_accumulate
    benchmark(lambda: f(data["flat16"], data["grads"], 1e-3))


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.benchmark(group="unscale_check fp32")
def test_unscale_check(benchmark, data, impl):
    if impl == "native":
        benchmark(lambda: unscale_check_(data["grads"], 1.0, data["found"]))
    else:
        benchmark(lambda: reference_unscale_check_(data["grads"], 1.0, data["found"]))


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.benchmark(group="adamw_step fp32")
def test_adamw_step(benchmark, data, impl):
    p, m, v = data["adam"]
    f = adamw_step_ if impl == "native" else reference_adamw_step_
    benchmark(lambda: f(p, data["flat32"], m, v, **ADAM))
