"""``gptpar.pipeline``: the public face of :mod:`gptpar.parallel.pipeline`."""

from gptpar.parallel.pipeline import *  # noqa: F403
from gptpar.parallel.pipeline import __all__  # noqa: F401
