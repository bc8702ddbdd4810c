"""Under ``TRITON_INTERPRET=1`` only: a @triton.jit helper called from inside a kernel skips the
interpreter's redundant re-patching of ``triton.language``.

Triton's interpreter patches ``triton.language`` (its builtins replaced by NumPy implementations) for the
length of a launch, and patches it again, with ``inspect.getmembers`` over ``tl``, ``tl.core`` and
``tl.math``, on every call of a @triton.jit helper, although inside a launch the language is patched
already. gptpar's kernels call their helpers per tile, so that re-patching was about a third of their
interpreted time. A helper whose ``triton.language`` modules are already patched now goes straight to its
rewritten body; every other call, and a Triton without these internals, takes the interpreter's own path.
Compiled (GPU) kernels never pass here.
"""

import inspect


def install() -> bool:
    """Install once; returns whether the interpreter's device-function call is now the fast one."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    cls = getattr(interpreter, "InterpretedFunction", None)
    error = getattr(interpreter, "InterpreterError", None)
    is_builtin = getattr(tl.core, "is_builtin", None)
    if cls is None or error is None or is_builtin is None or not hasattr(cls, "rewrite"):
        return False
    if getattr(cls.__call__, "_gptpar", False):
        return True
    original = cls.__call__

    def __call__(self, *args, **kwargs):
        langs = [v for v in self.fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if not langs or any(is_builtin(getattr(m, "load", None)) for m in langs):
            return original(self, *args, **kwargs)  # not patched (outside a launch, or a module not yet seen)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # as the interpreter's own call reports it
            raise error(repr(e)) from e

    __call__._gptpar = True
    cls.__call__ = __call__
    return True
