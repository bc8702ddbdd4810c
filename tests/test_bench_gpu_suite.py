"""bench/gpu_suite.py end to end on CPU (``--smoke``: tiny shapes, the Triton kernels under the interpreter):
every section runs, every gptpar row agrees with its PyTorch baseline, the JSON holds what RESULTS.md
quotes. On a GPU the same code runs at full size."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_smoke_runs_every_section_and_matches_baselines(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--smoke", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["meta"]["smoke"] and data["meta"]["date"]
    assert {r["section"] for r in rows} == {"attention", "documents", "mlp", "norm"}
    ours = [r for r in rows if r["impl"] == "gptpar"]
    # attention: 2 seqs x 2 masks x (fwd, fwd+bwd); GQA attention: 1 seq x causal x 2; mlp: 2 activations x 2
    # phases; norms: 2 x 2; documents: 2 seqs (beside "causal", the same kernel on one document)
    assert len(ours) == 8 + 2 + 4 + 4 + 2
    docs = [r for r in ours if r["section"] == "documents" and "time_ratio_vs_causal" in r]
    assert len(docs) == 2 and all(0 < r["flop_ratio"] < 1 for r in docs)
    assert sum("/kv1 causal" in r["case"] for r in ours) == 2  # the grouped-query rows (2 heads, 1 K/V head)
    for r in ours:
        assert r["max_diff"] < 1e-3, r
        assert r["x_baseline"] > 0 and r["ms"] > 0
    assert all(0 < r["of_copy"] for r in rows if r["section"] == "norm")


def test_gpu_suite_refuses_to_run_without_a_gpu_or_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode != 0 and "TRITON_INTERPRET=1" in res.stderr
