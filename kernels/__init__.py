"""Triton kernels, installed as ``gptpar.kernels``.

Each kernel sits beside its launcher; ``gptpar.ops`` picks between them and the pure-torch reference.
Importing this package never requires Triton: modules import it lazily.
"""

import os as _os

if _os.environ.get("TRITON_INTERPRET") == "1":  # CPU tests and debugging: see _interpreter.py
    from ._interpreter import install as _install_interpreter_fast_path

    _install_interpreter_fast_path()
