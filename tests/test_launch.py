"""`make demo`'s entry point, briefly: tp=2 x pp=2 on four processes through torchrun's launcher."""

import json
import os
import subprocess
import sys


def test_demo_entry_point_trains_tp2_pp2(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptpar.demo",
            "--steps",
            "12",
            "--tokenizer",
            "bytes",
            "--eval-every",
            "12",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "pipeline split into 2 stage(s) (pp=2, v=1)" in res.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["layout"] == "tp=2 pp=2 dp=1 cp=1" and len(summary["peak_memory_bytes_per_rank"]) == 4
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 12 and log[-1]["loss"] < log[0]["loss"]
