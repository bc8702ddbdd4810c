"""Shared test set-up. The multi-process harness lives in :mod:`gptpar.testing` (importable by workers and
by bench/); this file re-exports it and shuts its worker pools down at the end of the session."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from gptpar.testing import DistributedTestError, run_distributed, shutdown_pools  # noqa: E402

__all__ = ["run_distributed", "DistributedTestError"]


@pytest.fixture(scope="session", autouse=True)
def _worker_pools():
    yield
    shutdown_pools()
