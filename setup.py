"""Build gptpar: the Python package, the Triton kernels (as gptpar.kernels) and the native extension gptpar._C.

The extension is C++ (CPU, OpenMP) always, plus CUDA sources when torch has CUDA and nvcc is present.
Set GPTPAR_NO_EXT=1 to skip it (the package then runs on its pure-torch reference path).
"""

import glob
import os
import shutil

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("GPTPAR_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -ffast-math and no FP contraction: the CPU ops are bitwise equal to the torch reference.
    # -fno-math-errno lets sqrt vectorise (errno is never read); it changes no result.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None
    if with_cuda:
        srcs = cpp + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "gptpar._C",
            srcs,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=[("GPTPAR_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "gptpar._C",
            cpp,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args=cxx,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="gptpar",
    version="0.1.0",
    description="Model-parallel GPT training in PyTorch: tensor, sequence/context, pipeline and data parallelism",
    python_requires=">=3.10",
    packages=["gptpar", "gptpar.parallel", "gptpar.parallel.pipeline", "gptpar.models", "gptpar.ops", "gptpar.kernels"],
    package_dir={"gptpar.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch", "numpy", "tqdm"],
    entry_points={"console_scripts": ["gptpar=gptpar.cli:main"]},
)
