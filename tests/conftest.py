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


@pytest.fixture
def refused(monkeypatch, capsys):
    """``refused(argv)``: run ``gptpar train``'s launcher on ``argv`` in this process (a subprocess would only
    add start-up time) and return (exit code, stderr); reaching the launch of the workers fails the test."""
    import gptpar.train as cli

    def run(argv):
        monkeypatch.setattr(cli, "launch", lambda *a, **k: pytest.fail(f"{argv}: workers were started"))
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main([str(a) for a in argv])
        return exc.value.code, capsys.readouterr().err

    return run
