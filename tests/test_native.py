"""The native extension: built, and the package works (and says so once) without it."""

import os
import subprocess
import sys

import gptpar._native as native


def test_extension_is_built():
    # `make test` builds it; a missing build here means the install step is broken, not optional.
    assert native.available(), "gptpar._C was not built (pip install --no-build-isolation -e .)"
    assert native.native() is not None


def test_disable_switch_is_read_at_dispatch(monkeypatch):
    monkeypatch.setenv("GPTPAR_DISABLE_NATIVE", "1")
    assert native.native() is None
    monkeypatch.delenv("GPTPAR_DISABLE_NATIVE")
    assert native.native() is not None


def test_package_works_without_extension_and_says_so_once():
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from gptpar.ops import unscale_check_, pack_cast\n"
        "x = torch.ones(5); assert unscale_check_(x, 0.5).item() == 0 and x.eq(0.5).all()\n"
        "assert pack_cast([torch.ones(3)], 2.0).eq(2).all()\n"
        "import gptpar; m = gptpar.GPT(gptpar.GPTConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=16))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "GPTPAR_DISABLE_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert out.stderr.count("native extension disabled by GPTPAR_DISABLE_NATIVE=1") == 1, out.stderr
