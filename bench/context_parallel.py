"""Context parallelism on CPU processes: per-rank time and bytes sent for ring attention (forward +
backward) at cp = 1, 2, 4, against the ideal, and the load imbalance of contiguous vs zig-zag sharding.

    python bench/context_parallel.py [--seq 2048] [--heads 8] [--kv-heads 2] [--head-dim 64] [--reps 3]

Grouped-query rows ("gqa": ``--kv-heads`` K/V heads for ``--heads`` query heads, as Llama 3 has 8 for 32):
K/V blocks travel with their own heads only, so ring bytes per rank fall by heads/kv-heads.

"ideal bytes": the minimum a ring needs per rank, (cp-1) K/V blocks forward and (cp-1) K/V + (cp-1)
fp32 dK/dV blocks backward. "work max/mean": the most loaded rank's attention work (query-key pairs
computed) over the mean; in a ring every step waits for the slowest rank, so this is the time lost to
imbalance. Also Ulysses at the same sizes. The cp=1 row is the single-process attention op, which
computes the full causal score matrix; ring attention skips fully masked blocks, so cp=2 can beat 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import timed_interleaved

from gptpar import ParallelLayout, init_parallel
from gptpar.parallel import comm
from gptpar.parallel.context import attention_work, ring_attention, seq_shards, ulysses_attention
from gptpar.testing import run_distributed


def _rank_run(cp, sharding, impl, seq, heads, hd, reps, kv_heads=None, doc_len=None):
    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(cp=cp))
    g = st.cp
    shards = seq_shards(seq, cp, sharding)
    local = shards[g.rank].length
    gen = torch.Generator().manual_seed(g.rank)
    q = torch.randn(1, heads, local, hd, generator=gen).requires_grad_()
    k, v = (torch.randn(1, kv_heads or heads, local, hd, generator=gen).requires_grad_() for _ in range(2))
    dout = torch.randn(1, heads, local, hd, generator=gen)
    docs = None if doc_len is None else (torch.arange(seq) // doc_len).unsqueeze(0)  # packed documents

    def step():
        if impl == "ring":
            out = ring_attention(q, k, v, g, shards, causal=True, doc_ids=docs)[0]
        else:
            out = ulysses_attention(q, k, v, g, shards, causal=True, doc_ids=docs)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    with comm.count_traffic() as traffic:
        step()
    times = timed_interleaved({"step": step}, reps, barrier=lambda: comm.all_reduce(torch.zeros(1), g))["step"]
    return {
        "time_s": statistics.median(times),
        "bytes": sum(traffic.values()),
        "work": attention_work(shards, g.rank, True, docs),
    }


def _flash_kernel_documents(seq, hd, reps):
    """One rank, gptpar's Triton flash kernel under the CPU interpreter (run in a child with
    ``TRITON_INTERPRET=1``), forward + backward: documents of s/8 against one causal document. Interpreter
    time is per tile visited, not a GPU's speed; it shows block skipping inside the kernel. Tiles counted
    at the interpreter's blocks (:func:`gptpar.ops.attention.kernel_tiles`)."""
    from gptpar.ops.attention import INTERPRETER_BLOCK, attention, attention_bounds, kernel_tiles

    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 1, seq, hd, generator=gen).requires_grad_(i < 3) for i in range(4))
    ids = (torch.arange(seq) // (seq // 8)).unsqueeze(0)
    pos = torch.arange(seq)

    def run(docs):
        torch.autograd.grad(attention(q, k, v, True, docs=docs)[0], (q, k, v), dout)

    t = timed_interleaved({"causal": lambda: run(None), "docs": lambda: run((ids, ids))}, reps)
    tiles = {
        name: sum(kernel_tiles(attention_bounds(pos, pos, True, d)[0], INTERPRETER_BLOCK, INTERPRETER_BLOCK))
        for name, d in (("causal", None), ("docs", (ids, ids)))
    }
    return {
        "time_causal_s": statistics.median(t["causal"]),
        "time_docs_s": statistics.median(t["docs"]),
        "spread_docs_s": max(t["docs"]) - min(t["docs"]),
        "spread_causal_s": max(t["causal"]) - min(t["causal"]),
        "tile_ratio": tiles["docs"] / tiles["causal"],
        "flop_ratio": 8 * ((seq // 8) * (seq // 8 + 1) / 2) / (seq * (seq + 1) / 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--documents-only", action="store_true", help="only the packed-documents section")
    ap.add_argument("--flash-kernel-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "context_parallel_cpu.json"))
    a = ap.parse_args()
    if a.flash_kernel_child:
        print(json.dumps(_flash_kernel_documents(a.seq, a.head_dim, a.reps)))
        return
    # fp32 K and V of one rank with kv K/V heads
    kv_block = lambda cp, kv=a.heads: 2 * kv * (a.seq // cp) * a.head_dim * 4  # noqa: E731
    rows = []
    cases = [
        (cp, impl, sharding, a.heads)
        for cp in (1, 2, 4)
        for impl, sharding in (("ring", "contiguous"), ("ring", "zigzag"), ("ulysses", "contiguous"))
        if cp > 1 or (impl, sharding) == ("ring", "contiguous")
    ]
    cases += [
        (cp, impl, "zigzag" if impl == "ring" else "contiguous", a.kv_heads)
        for cp in (2, 4)
        for impl in ("ring", "ulysses")
    ]
    for cp, impl, sharding, kv in [] if a.documents_only else cases:
        res = run_distributed(_rank_run, cp, cp, sharding, impl, a.seq, a.heads, a.head_dim, a.reps, kv, timeout=1200)
        t = [r["time_s"] for r in res]
        w = [r["work"] for r in res]
        # ring: (cp-1) K/V blocks forward, (cp-1) K/V + (cp-1) fp32 dK/dV backward; Ulysses: 4 all-to-alls
        # each way (q, k, v, out), each sending (cp-1)/cp of a rank's [h, s/cp, d] tensor.
        # (Ulysses with fewer K/V heads than cp repeats them to one per rank first.)
        kv_sent = max(kv, cp) if impl == "ulysses" and kv % cp else kv
        ideal = (
            3 * (cp - 1) * kv_block(cp, kv)
            if impl == "ring"
            else 2 * (cp - 1) / cp * (kv_block(cp) + kv_block(cp, kv_sent))
        )
        rows.append(
            {
                "cp": cp,
                "impl": impl,
                "sharding": sharding,
                "kv_heads": kv,
                "time_max_s": max(t),
                "time_mean_s": statistics.mean(t),
                # Ulysses gives every rank the whole sequence for h/cp heads: balanced by construction.
                "work_imbalance": max(w) / statistics.mean(w) if impl == "ring" else 1.0,
                "bytes_per_rank": max(r["bytes"] for r in res),
                "ideal_bytes_per_rank": ideal,
            }
        )
    base = rows[0]["time_max_s"] if rows else 1.0
    print(
        f"ring/Ulysses attention fwd+bwd, causal, seq={a.seq}, heads={a.heads}, head_dim={a.head_dim}, fp32, "
        f"CPU gloo, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{'cp':>3s} {'impl':8s} {'sharding':10s} {'kv':>3s} {'slowest rank s':>14s} {'vs cp=1':>8s} "
        f"{'work max/mean':>13s} {'MB sent/rank':>13s} {'ideal MB':>9s}"
    )
    for r in rows:
        print(
            f"{r['cp']:3d} {r['impl']:8s} {r['sharding']:10s} {r['kv_heads']:3d} {r['time_max_s']:14.3f} "
            f"{base / r['time_max_s']:7.2f}x "
            f"{r['work_imbalance']:13.2f} {r['bytes_per_rank'] / 1e6:13.2f} {r['ideal_bytes_per_rank'] / 1e6:9.2f}"
        )
    # Packed documents of s/8 tokens: the same ring (zig-zag), with document masks. Attention FLOPs drop to
    # about 1/8 of causal; key blocks whose documents do not meet the query chunk's are skipped whole.
    doc_rows = []
    print(f"ring attention with packed documents of {a.seq // 8} tokens (s/8) vs one document, zig-zag, kv={a.heads}")
    print(
        f"{'cp':>3s} {'time docs s':>11s} {'time causal s':>13s} {'time ratio':>10s} {'block work ratio':>16s} "
        f"{'FLOP ratio':>10s}"
    )
    for cp in (2, 4):
        causal = run_distributed(_rank_run, cp, cp, "zigzag", "ring", a.seq, a.heads, a.head_dim, a.reps, timeout=1200)
        docs = run_distributed(
            _rank_run, cp, cp, "zigzag", "ring", a.seq, a.heads, a.head_dim, a.reps, None, a.seq // 8, timeout=1200
        )
        tc, td = max(r["time_s"] for r in causal), max(r["time_s"] for r in docs)
        work = sum(r["work"] for r in docs) / sum(r["work"] for r in causal)
        flops = 8 * ((a.seq // 8) * (a.seq // 8 + 1) / 2) / (a.seq * (a.seq + 1) / 2)
        doc_rows.append(
            {"cp": cp, "time_docs_s": td, "time_causal_s": tc, "block_work_ratio": work, "flop_ratio": flops}
        )
        print(f"{cp:3d} {td:11.3f} {tc:13.3f} {td / tc:10.2f} {work:16.2f} {flops:10.2f}")
    # The flash kernel itself with document masks: tiles where documents do not meet are skipped
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPTPAR_TRITON": "1"}
    child = [sys.executable, __file__, "--flash-kernel-child", "--seq", "1024", "--head-dim", str(a.head_dim)]
    kern = json.loads(subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout)
    print("flash kernel (Triton interpreter on CPU, one rank, seq 1024, fwd+bwd), documents of s/8 vs causal:")
    print(
        f"  time ratio {kern['time_docs_s'] / kern['time_causal_s']:.2f} (docs {kern['time_docs_s']:.2f} s "
        f"+-{kern['spread_docs_s']:.2f}, causal {kern['time_causal_s']:.2f} s +-{kern['spread_causal_s']:.2f}), "
        f"tile ratio {kern['tile_ratio']:.2f}, FLOP ratio {kern['flop_ratio']:.2f}"
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    if a.documents_only and os.path.exists(a.out):  # keep the other section's rows from the last full run
        with open(a.out) as f:
            rows = json.load(f).get("rows", [])
    with open(a.out, "w") as f:
        out = {"args": vars(a), "rows": rows, "documents": doc_rows, "flash_kernel_documents": kern}
        json.dump({**out, "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
