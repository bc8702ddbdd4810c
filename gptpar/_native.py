"""Loads the native extension ``gptpar._C`` if it was built; says once when it is not.

``GPTPAR_DISABLE_NATIVE=1`` forces the pure-torch reference path even when the extension exists.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("gptpar")

_C = None
_reason = None
if os.environ.get("GPTPAR_DISABLE_NATIVE") == "1":
    _reason = "disabled by GPTPAR_DISABLE_NATIVE=1"
else:
    try:
        from gptpar import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as e:  # not built (GPTPAR_NO_EXT=1, or a source checkout without `pip install -e .`)
        _reason = f"not built ({e})"

_said = False


def native():
    """The extension module, or None (then a single log line says why, on first use)."""
    global _said
    if _C is None and not _said:
        _said = True
        logger.warning("gptpar: native extension %s; using the pure-torch reference ops", _reason)
    return _C


def available() -> bool:
    return _C is not None
