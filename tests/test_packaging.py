"""Install layout: Triton kernels live at gptpar.kernels, and nothing named plain `kernels` is installed."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import gptpar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_is_a_subpackage():
    import gptpar.kernels

    assert os.path.samefile(os.path.dirname(gptpar.kernels.__file__), os.path.join(ROOT, "kernels"))


def test_no_top_level_kernels_module_outside_the_repo(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels'))"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "None", out.stdout + out.stderr


def test_version_and_public_api():
    assert gptpar.__version__
    for name in ("GPT", "GPTConfig", "ParallelGPT", "ParallelLayout", "init_parallel", "GptparConfigError"):
        assert hasattr(gptpar, name)
    assert importlib.util.find_spec("gptpar._C") is not None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc absent: the CUDA compile check needs it")
def test_cuda_sources_compile_for_sm90(tmp_path):
    cus = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "csrc")) for f in fs if f.endswith(".cu")]
    assert cus, "no .cu sources found"
    for cu in cus:
        out = subprocess.run(
            ["nvcc", "-c", "-arch=sm_90", "-O3", "-I", os.path.join(ROOT, "csrc"), cu, "-o", str(tmp_path / "k.o")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, f"{cu}:\n{out.stderr}"


def test_cuda_bindings_compile_against_this_torch(tmp_path):
    """bindings_cuda.cpp includes no CUDA headers (streams arrive as integers), so its torch-facing code is
    compile-checked here too, with the CUDA branch of bindings.cpp switched on: both in one translation unit
    (torch's headers parsed once, ~20 s), bindings.cpp first, so that a *_cuda definition whose signature
    differs from the declaration bindings.cpp calls is an error here (-Werror=missing-declarations), not a
    link error on the first GPU build."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    both = tmp_path / "both.cpp"
    both.write_text('#include "bindings.cpp"\n#include "cuda/bindings_cuda.cpp"\n')
    incs = [f"-I{p}" for p in include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{os.path.join(ROOT, 'csrc')}",
    ]
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-Werror=missing-declarations", "-DGPTPAR_WITH_CUDA"]
    cmd += ["-DTORCH_EXTENSION_NAME=_C", *incs, str(both)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
