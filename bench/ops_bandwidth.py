"""Native gradient ops: throughput in GB/s against plain torch doing the same work (ratio, same run) and
against a plain copy of the same bytes (the memory-bandwidth ceiling).

    python bench/ops_bandwidth.py [--numel N] [--device cpu|cuda] [--out bench/results/ops_<device>.json]

Bytes counted are the op's minimum traffic (each input read once, each output written once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from common import timed

import gptpar._native as native
from gptpar.ops import (
    adamw_step_,
    pack_cast,
    reference_adamw_step_,
    reference_pack_cast,
    reference_unpack_accumulate,
    reference_unscale_check_,
    unpack_accumulate,
    unscale_check_,
)


def timeit(fn, device: str, reps: int = 30) -> float:
    """Median seconds per call after three warm-up calls: bench/common.py's timer."""
    return timed(fn, reps, warmup=3, device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if native.native() is None:
        raise SystemExit("the native extension is not built/enabled; nothing to compare")
    dev, n = args.device, args.numel
    g = torch.Generator(device=dev).manual_seed(0)
    # The gradients of a model: 64 tensors of different sizes adding up to n.
    sizes = [n // 64 + (i % 7) for i in range(63)]
    sizes.append(n - sum(sizes))
    grads = [torch.randn(s, device=dev, generator=g) for s in sizes]
    flat32 = torch.randn(n, device=dev, generator=g)
    flat16 = flat32.to(torch.bfloat16)
    out16 = torch.empty(n, dtype=torch.bfloat16, device=dev)
    copy_dst = torch.empty_like(flat32)
    p, m, v = (torch.randn(n, device=dev, generator=g).abs() for _ in range(3))
    found = torch.zeros(1, device=dev)

    copy_s = timeit(lambda: copy_dst.copy_(flat32), dev)
    copy_gbs = 8 * n / copy_s / 1e9
    rows = []

    def row(name, nbytes, fast, slow):
        tf, ts = timeit(fast, dev), timeit(slow, dev)
        gbs = nbytes / tf / 1e9
        rows.append(
            {
                "op": name,
                "native_ms": tf * 1e3,
                "torch_ms": ts * 1e3,
                "native_GBps": gbs,
                "speedup_vs_torch": ts / tf,
                "fraction_of_copy_bw": gbs / copy_gbs,
            }
        )

    row(
        "pack_cast fp32->bf16",
        6 * n,
        lambda: pack_cast(grads, 0.5, out=out16),
        lambda: reference_pack_cast(grads, 0.5, out16),
    )
    row(
        "unpack_accumulate bf16->fp32",
        10 * n,
        lambda: unpack_accumulate(flat16, grads, 1e-3),
        lambda: reference_unpack_accumulate(flat16, grads, 1e-3),
    )
    row(
        "unscale_check fp32",
        8 * n,
        lambda: unscale_check_(grads, 1.0, found),
        lambda: reference_unscale_check_(grads, 1.0, found),
    )
    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, step=10)
    row(
        "adamw_step fp32",
        28 * n,
        lambda: adamw_step_(p, flat32, m, v, **kw),
        lambda: reference_adamw_step_(p, flat32, m, v, **kw),
    )

    print(
        f"device={dev} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), numel={n:,}, "
        f"torch {torch.__version__}; copy bandwidth {copy_gbs:.1f} GB/s"
    )
    print(f"{'op':32s} {'native ms':>10s} {'torch ms':>10s} {'GB/s':>8s} {'x torch':>8s} {'of copy':>8s}")
    for r in rows:
        print(
            f"{r['op']:32s} {r['native_ms']:10.2f} {r['torch_ms']:10.2f} {r['native_GBps']:8.1f} "
            f"{r['speedup_vs_torch']:7.2f}x {100 * r['fraction_of_copy_bw']:7.0f}%"
        )
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"ops_{dev}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "device": dev,
                "numel": n,
                "torch": torch.__version__,
                "copy_GBps": copy_gbs,
                "rows": rows,
                "date": time.strftime("%Y-%m-%d"),
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
