"""Triton kernels, installed as ``gptpar.kernels``.

Each kernel sits beside its launcher; ``gptpar.ops`` picks between them and the pure-torch reference.
Importing this package never requires Triton: modules import it lazily.
"""
