"""The planner against measurements: step-time ranking of real layouts on 4 CPU processes, and Megatron-LM's
published Table 1.

    python bench/planner.py [--reps 3]

* CPU ranking: a small GPT trained for a few steps at 8 layouts of 4 processes (dp, tp, pp, cp and their
  pairs); each layout's step time is the best of ``--reps`` steps after a warm-up. The planner predicts
  each from a calibration of this machine (``gptpar plan --calibrate``'s measurement: one thread's GEMM
  rates and memory bandwidth, each process getting cores/processes of a core) and gloo's cost per
  message among 2 and 4 coupled processes, measured between compute phases. Reported: both times per
  layout and Spearman's rank correlation.
* Table 1 (Narayanan et al. 2021): predicted TFLOP/s per GPU for the ten published layouts with the A100
  curve and one fitted scalar (:func:`gptpar.planner.table1_comparison`), beside the published numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from gptpar import GPTConfig, ParallelLayout
from gptpar.planner import calibrate, step_time, table1_comparison
from gptpar.planner_measure import gloo_link, layout_step_time, spearman
from gptpar.testing import run_distributed

CONFIG = GPTConfig(vocab_size=1024, seq_len=128, n_layer=8, n_head=8, d_model=256)
BATCH, MB = 8, 2  # global batch; sequences per micro-batch
LAYOUTS = {
    "dp4": dict(dp=4),
    "tp4": dict(tp=4),
    "pp4": dict(pp=4),
    "tp2 dp2": dict(tp=2, dp=2),
    "tp2 pp2": dict(tp=2, pp=2),
    "pp2 dp2": dict(pp=2, dp=2),
    "cp2 dp2": dict(cp=2, dp=2),
    "tp2 cp2": dict(tp=2, cp=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "planner.json"))
    a = ap.parse_args()
    import dataclasses

    cores = os.cpu_count() or 1
    cal = calibrate("cpu", threads=1)
    links = {g: max(run_distributed(gloo_link, 4, g)) for g in (2, 4)}
    lat, bw = links[2]
    group_latency = tuple((g, t) for g, (t, _) in links.items())
    cal = dataclasses.replace(cal, share=min(1.0, cores / 4), latency=lat, group_latency=group_latency)
    rows = []
    print(
        f"planner vs measured step time, GPT {CONFIG.num_params() / 1e6:.1f}M, 4 CPU processes on {cores} cores, "
        f"gloo all-reduce per message {links[2][0] * 1e3:.2f} ms among 2 coupled processes, "
        f"{links[4][0] * 1e3:.2f} ms among 4, bandwidth {bw / 1e9:.2f} GB/s, {time.strftime('%Y-%m-%d')}"
    )  # noqa: E501
    print(f"{'layout':10s} {'measured s':>10s} {'predicted s':>11s}")
    for name, kw in LAYOUTS.items():
        layout = ParallelLayout(**kw)
        measured = max(run_distributed(layout_step_time, 4, CONFIG, layout, BATCH, MB, a.reps, timeout=900))
        per_dp = BATCH // layout.dp
        m = per_dp // MB
        t = step_time(
            CONFIG, cal, layout.tp, layout.pp, layout.dp, layout.cp, 1, MB, m, False, False, "1f1b", bw, bw, 4, elem=4
        )  # noqa: E501
        rows.append({"layout": name, "measured_s": measured, "predicted_s": sum(t.values()), "predicted": t})
        print(f"{name:10s} {measured:10.3f} {sum(t.values()):11.3f}")
    rho = spearman([r["measured_s"] for r in rows], [r["predicted_s"] for r in rows])
    print(f"Spearman rank correlation, predicted vs measured: {rho:.2f}")
    t1 = table1_comparison()
    print("Megatron-LM Table 1 (A100): TFLOP/s per GPU, predicted (one fitted scalar) vs published")
    for r in t1:
        print(
            f"  {r['params_b']:7.1f}B tp{r['tp']} pp{r['pp']:<3d} dp{r['dp']:<3d} predicted {r['predicted']:6.1f} "
            f"published {r['published']:4d} ({100 * (r['predicted'] / r['published'] - 1):+.1f}%)"
        )  # noqa: E501
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(
            {
                "cpu_ranking": rows,
                "spearman": rho,
                "group_latency": group_latency,
                "table1": t1,
                "date": time.strftime("%Y-%m-%d"),
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
