"""init_parallel from torchrun's environment, end to end: the demo under torch.distributed.run."""

import os
import subprocess
import sys


def test_demo_trains_under_torchrun_and_loss_falls():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "gptpar.demo", "--steps", "40", "--log-every", "20", "--batch-size", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tp=2 pp=1 dp=1 cp=1 on 2 CPU processes" in out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("step   40  val loss") and last.endswith("fell)"), out.stdout
