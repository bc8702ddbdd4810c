"""Loads the native extension ``gptpar._C`` if it was built; says once when it is not used.

``GPTPAR_DISABLE_NATIVE=1`` (read at every dispatch) forces the pure-torch reference ops even when the
extension exists.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("gptpar")

try:
    from gptpar import _C  # type: ignore[attr-defined]

    _import_error = None
except ImportError as e:  # not built (GPTPAR_NO_EXT=1, or a source checkout without `pip install -e .`)
    _C = None
    _import_error = f"not built ({e})"

_said = False


def native():
    """The extension module, or None (then a single log line, the first time, says why)."""
    global _said
    disabled = os.environ.get("GPTPAR_DISABLE_NATIVE") == "1"
    if _C is not None and not disabled:
        return _C
    if not _said:
        _said = True
        why = "disabled by GPTPAR_DISABLE_NATIVE=1" if _C is not None else _import_error
        logger.warning("gptpar: native extension %s; using the pure-torch reference ops", why)
    return None


def available() -> bool:
    """Whether the extension was built (regardless of GPTPAR_DISABLE_NATIVE)."""
    return _C is not None
