"""The native extension: built, importable, its op equal to the reference; the package works without it."""

import os
import subprocess
import sys

import pytest
import torch

import gptpar._native as native
from gptpar.ops import reference_unscale_check_, unscale_check_


def test_extension_is_built():
    # `make test` builds it; a missing build here means the install step is broken, not optional.
    assert native.available(), "gptpar._C was not built (pip install --no-build-isolation -e .)"


@pytest.mark.parametrize("n", [0, 1, 7, 4099, 1 << 20])
def test_unscale_check_matches_reference(n):
    torch.manual_seed(n)
    x = torch.randn(n) * 1000
    a, b = x.clone(), x.clone()
    assert native.native().unscale_check_(a, 1 / 1024) is False
    assert reference_unscale_check_(b, 1 / 1024) is False
    assert torch.equal(a, b)  # the same single multiply, so bitwise equal


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_unscale_check_finds_one_hidden_nonfinite(bad):
    x = torch.randn(1 << 20)
    x[777_777] = bad
    assert unscale_check_(x, 0.5) is True
    y = torch.randn(3)
    assert unscale_check_(y, 1e38 * 1e3) is True  # overflow to inf on scaling counts too


def test_dispatch_falls_back_for_unsupported_dtypes():
    x = torch.randn(100, dtype=torch.float64)
    y = x.clone()
    assert unscale_check_(x, 2.0) is False
    assert torch.equal(x, y * 2)


def test_package_works_without_extension_and_says_so_once():
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from gptpar.ops import unscale_check_\n"
        "x = torch.ones(5); assert unscale_check_(x, 0.5) is False and x.eq(0.5).all()\n"
        "assert unscale_check_(torch.ones(5), 0.5) is False\n"
        "import gptpar; m = gptpar.GPT(gptpar.GPTConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=16))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "GPTPAR_DISABLE_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert out.stderr.count("native extension disabled by GPTPAR_DISABLE_NATIVE=1") == 1, out.stderr
