"""The Triton kernels on a GPU against PyTorch's own, one command, every number a ratio in the same run.

    python bench/gpu_suite.py [--quick] [--out bench/results/gpu_suite.json]
    TRITON_INTERPRET=1 python bench/gpu_suite.py --smoke      # CPU: tiny shapes, checks the suite runs

* attention: gptpar's flash attention forward, and forward + backward, causal and not, head dims 64 and
  128, sequence 1k-16k (batch x seq = 16k tokens, heads x head dim = 2048), against
  ``F.scaled_dot_product_attention`` restricted to its flash backend. TFLOP/s (causal counts half the
  matmul work; backward = 2.5x forward, FlashAttention's convention) and the ratio to SDPA.
* MLP column half: the fused GEMM + bias + GeLU / SwiGLU (``gptpar.ops.mlp.linear_act``) against torch
  eager and ``torch.compile`` of the same ``act(F.linear(x, W, b))``, forward and forward + backward; TFLOP/s.
* norms: fused LayerNorm / RMSNorm forward and forward + backward against eager and ``torch.compile``;
  GB/s of minimum traffic (each tensor read or written once) and that as a share of ``copy_``'s GB/s.
* documents: causal attention over packed documents of mean length s/8 (random boundaries) against one
  causal document with the same kernel (time ratio beside the FLOP ratio) and against SDPA given the
  documents as a dense mask.

Every row also reports the largest difference from the baseline's output, so a wrong fast kernel does
not pass as a fast one. Inputs are bf16 (fp32 under ``--smoke``: the interpreter mis-computes bf16).
``--smoke`` runs tiny shapes on CPU under ``TRITON_INTERPRET=1`` with the compiled baselines left out
(CPU inductor compile time would dominate); its timings mean nothing, it only proves the suite runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from common import timed

from gptpar.ops.attention import attention
from gptpar.ops.norm import layer_norm, rms_norm
from gptpar.ops.wgrad import linear_act


def timeit(fn, device: str, reps: int) -> float:
    """Median seconds per call after warm-up (CUDA: events around each call): bench/common.py's timer.
    On CPU (``--smoke``, the interpreter) no warm-up: its times mean nothing, only that each row runs."""
    return timed(fn, reps, warmup=2 if device == "cuda" else 0, device=device)


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


class Suite:
    def __init__(self, device: str, dtype: torch.dtype, reps: int, compile_baselines: bool):
        self.device, self.dtype, self.reps, self.compile = device, dtype, reps, compile_baselines
        self.rows: list[dict] = []

    def rand(self, *shape, requires_grad=False, scale=1.0):
        t = (torch.randn(*shape, device=self.device) * scale).to(self.dtype)
        return t.requires_grad_(requires_grad)

    def row(self, section, case, impl, seconds, work, unit, diff=None, baseline=None):
        rate = work / seconds / 1e12 if unit == "TFLOP/s" else work / seconds / 1e9
        r = {"section": section, "case": case, "impl": impl, "ms": seconds * 1e3, unit: rate}
        if unit == "GB/s":
            r["of_copy"] = rate / self.copy_gbs
        if baseline is not None:
            r["x_baseline"] = baseline["ms"] / r["ms"]
        if diff is not None:
            r["max_diff"] = diff
        self.rows.append(r)
        ratio = f"{r['x_baseline']:6.2f}x" if "x_baseline" in r else "   base"
        err = f"  maxdiff {diff:.1e}" if diff is not None else ""
        share = f" {r['of_copy']:5.0%} of copy" if "of_copy" in r else ""
        print(f"  {case:34s} {impl:8s} {r['ms']:9.3f} ms {rate:8.1f} {unit}{share} {ratio}{err}", flush=True)
        return r

    # ------------------------------------------------------------------------------------------ attention
    def attention(self, seqs, head_dims, tokens, width, group=1, causals=(True, False)):
        """``group`` > 1: grouped-query attention, ``heads / group`` K/V heads (Llama 3 8B: 32 / 8)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION] if self.device == "cuda" else [SDPBackend.MATH]
        kind = f", GQA {group} query heads per K/V head" if group > 1 else ""
        print(f"attention (tokens {tokens}, heads x head dim {width}{kind}), TFLOP/s, x SDPA flash:")
        for d in head_dims:
            for s in seqs:
                b, h = max(1, tokens // s), max(1, width // d)
                q = self.rand(b, h, s, d, requires_grad=True)
                k, v = (self.rand(b, h // group, s, d, requires_grad=True) for _ in range(2))
                do = self.rand(b, h, s, d)
                for causal in causals:
                    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
                    case = (
                        f"hd{d} s{s} b{b} h{h}"
                        + (f"/kv{h // group}" if group > 1 else "")
                        + (" causal" if causal else " full")
                    )

                    def sdpa(q=q, k=k, v=v, causal=causal):
                        with sdpa_kernel(backends):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)

                    def ours(q=q, k=k, v=v, causal=causal):
                        return attention(q, k, v, causal)[0]

                    with torch.no_grad():
                        ref, got = sdpa(), ours()
                        base = self.row(
                            "attention", case + " fwd", "sdpa", timeit(sdpa, self.device, self.reps), flops, "TFLOP/s"
                        )
                        self.row(
                            "attention",
                            case + " fwd",
                            "gptpar",
                            timeit(ours, self.device, self.reps),
                            flops,
                            "TFLOP/s",
                            maxdiff(got, ref),
                            base,
                        )

                    def fwd_bwd(fn, q=q, k=k, v=v, do=do):
                        return torch.autograd.grad(fn(), (q, k, v), do)

                    diff = maxdiff(
                        torch.cat([g.flatten() for g in fwd_bwd(ours)]), torch.cat([g.flatten() for g in fwd_bwd(sdpa)])
                    )
                    secs = timeit(lambda: fwd_bwd(sdpa), self.device, self.reps)  # noqa: B023 (called here)
                    base = self.row("attention", case + " fwd+bwd", "sdpa", secs, 3.5 * flops, "TFLOP/s")
                    secs = timeit(lambda: fwd_bwd(ours), self.device, self.reps)  # noqa: B023
                    self.row("attention", case + " fwd+bwd", "gptpar", secs, 3.5 * flops, "TFLOP/s", diff, base)

    def documents(self, seqs, d, tokens, width):
        """Packed documents of mean length s/8 against one causal document, gptpar's kernel both times: the
        time ratio against the FLOP ratio (blocks where documents do not meet are skipped), and against
        SDPA given the same documents as a dense mask (what one-rank attention used before)."""
        from gptpar.ops.attention import document_mask

        print(f"attention with packed documents of mean s/8 vs causal (tokens {tokens}, width {width}):")
        g = torch.Generator().manual_seed(0)
        for s in seqs:
            b, h = max(1, tokens // s), max(1, width // d)
            q, k, v, do = (self.rand(b, h, s, d, requires_grad=i < 3) for i in range(4))
            # random boundaries, mean length s/8 (each token starts a document with probability 8/s)
            ids = (torch.rand(b, s, generator=g) < 8 / s).long().cumsum(1).to(self.device)
            lengths = torch.cat([torch.bincount(r - r.min()) for r in ids.cpu()])
            lengths = lengths[lengths > 0].double()
            flop_ratio = float((lengths * (lengths + 1) / 2).sum() / (b * s * (s + 1) / 2))
            mask = document_mask(ids)

            def run(docs, q=q, k=k, v=v, do=do):
                return torch.autograd.grad(attention(q, k, v, True, docs=docs)[0], (q, k, v), do)

            def sdpa(q=q, k=k, v=v, do=do, mask=mask):
                return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), do)

            flops = 3.5 * 4 * b * h * s * s * d * 0.5
            docs = (ids, ids)
            got = torch.cat([t.flatten() for t in run(docs)])
            diff = maxdiff(got, torch.cat([t.flatten() for t in sdpa()]))
            case = f"hd{d} s{s} b{b} h{h} fwd+bwd"
            base = self.row(
                "documents",
                case + " causal",
                "causal",
                timeit(lambda: run(None), self.device, self.reps),
                flops,
                "TFLOP/s",
            )
            dense = self.row(
                "documents",
                case + " docs",
                "sdpa-mask",
                timeit(sdpa, self.device, self.reps),
                flops * flop_ratio,
                "TFLOP/s",
            )
            r = self.row(
                "documents",
                case + " docs",
                "gptpar",
                timeit(lambda: run(docs), self.device, self.reps),  # noqa: B023 (called here)
                flops * flop_ratio,
                "TFLOP/s",
                diff,
                dense,
            )
            r["time_ratio_vs_causal"], r["flop_ratio"] = r["ms"] / base["ms"], flop_ratio
            print(f"    time vs causal {r['time_ratio_vs_causal']:.2f}, FLOP ratio {flop_ratio:.2f}")

    # ------------------------------------------------------------------------------------------ MLP
    def mlp(self, m, k, f):
        print(f"MLP column half act(x W^T + b), x [{m}, {k}], {f} outputs (SwiGLU: gate|up = {2 * f} rows), TFLOP/s:")
        for act in ("gelu", "swiglu"):
            rows = 2 * f if act == "swiglu" else f
            x = self.rand(m, k, requires_grad=True)
            w = self.rand(rows, k, requires_grad=True, scale=1 / math.sqrt(k))
            bias = self.rand(rows, requires_grad=True)
            dy = self.rand(m, f)
            flops = 2 * m * k * rows

            def eager(x=x, w=w, bias=bias, act=act):
                h = F.linear(x, w, bias)
                if act == "swiglu":
                    gate, up = h.chunk(2, dim=-1)
                    return F.silu(gate) * up
                return F.gelu(h, approximate="tanh")

            impls = [("eager", eager)]
            if self.compile:
                impls.append(("compile", torch.compile(eager)))
            impls.append(("gptpar", lambda x=x, w=w, bias=bias, act=act: linear_act(x, w, bias, act)))
            self._compare("mlp", act, impls, flops, "TFLOP/s", dy, (x, w, bias))

    # ------------------------------------------------------------------------------------------ norms
    def norms(self, m, n):
        print(f"norms over x [{m}, {n}], GB/s of minimum traffic, share of copy_ bandwidth:")
        x = self.rand(m, n, requires_grad=True)
        w = torch.randn(n, device=self.device, requires_grad=True)
        bias = torch.randn(n, device=self.device, requires_grad=True)
        dy = self.rand(m, n)
        y = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        copy_s = timeit(lambda: y.copy_(x.detach()), self.device, self.reps)
        self.copy_gbs = 2 * nbytes / copy_s / 1e9
        print(f"  copy_ {self.copy_gbs:.1f} GB/s")
        for name, eager, ours in (
            ("layernorm", lambda: F.layer_norm(x, (n,), w, bias), lambda: layer_norm(x, w, bias)),
            ("rmsnorm", lambda: F.rms_norm(x, (n,), w, eps=1e-5), lambda: rms_norm(x, w)),
        ):
            impls = [("eager", eager)]
            if self.compile:
                impls.append(("compile", torch.compile(eager)))
            impls.append(("gptpar", ours))
            # forward: read x, write y; backward: read x and dy, write dx (weights are negligible)
            self._compare("norm", name, impls, 2 * nbytes, "GB/s", dy, (x, w, bias), bwd_work=5 * nbytes)

    def _compare(self, section, case, impls, work, unit, dy, params, bwd_work=None):
        """Forward rows, then forward + backward rows, for each implementation; the first is the baseline."""
        outs, grads = [], []
        for _, fn in impls:
            out = fn()
            out.backward(dy)
            outs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten().float() for p in params if p.grad is not None]))
            for p in params:
                p.grad = None
        for phase, w in (("fwd", work), ("fwd+bwd", bwd_work if bwd_work is not None else 3 * work)):
            base = None
            for i, (impl, fn) in enumerate(impls):
                if phase == "fwd":
                    with torch.no_grad():
                        secs = timeit(fn, self.device, self.reps)
                    diff = maxdiff(outs[i], outs[0]) if i else None
                else:
                    secs = timeit(
                        lambda fn=fn: torch.autograd.grad(fn(), params, dy, allow_unused=True), self.device, self.reps
                    )
                    diff = maxdiff(grads[i], grads[0]) if i else None
                r = self.row(section, f"{case} {phase}", impl, secs, w, unit, diff, base)
                base = base or r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq 1k-4k, one MLP and norm shape (about 2 minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/gpu_suite.json; --smoke: none)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the Triton kernels on CPU: set TRITON_INTERPRET=1")
        os.environ["GPTPAR_TRITON"] = "1"
        suite = Suite("cpu", torch.float32, reps=1, compile_baselines=False)
        seqs, dims, tokens, width, mlp_shape, norm_shape = [48, 96], [32], 96, 64, (48, 40, 24), (40, 96)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1 on CPU)")
        os.environ.pop("GPTPAR_TRITON", None)  # CUDA tensors dispatch to Triton
        suite = Suite("cuda", torch.bfloat16, reps=20, compile_baselines=True)
        seqs = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
        dims, tokens, width = [64, 128], 16384, 2048
        mlp_shape, norm_shape = (8192, 4096, 4096), (16384, 4096)
    device_name = torch.cuda.get_device_name() if suite.device == "cuda" else platform.processor() or "cpu"
    import triton

    print(f"gpu_suite on {device_name}, torch {torch.__version__}, triton {triton.__version__}, {suite.dtype}")
    torch.manual_seed(0)
    # Llama 3 8B's attention: 32 query heads, 8 K/V heads, head dim 128 (smoke: 2 heads sharing 1)
    gqa = ([max(seqs)], [32], tokens, 64, 2) if args.smoke else ([2048, 8192], [128], tokens, 4096, 4)
    for section, run in (
        ("attention", lambda: suite.attention(seqs, dims, tokens, width)),
        ("attention-gqa", lambda: suite.attention(*gqa, causals=(True,))),
        ("documents", lambda: suite.documents(seqs if args.smoke else [4096, 16384], dims[-1], tokens, width)),
        ("mlp", lambda: suite.mlp(*mlp_shape)),
        ("norms", lambda: suite.norms(*norm_shape)),
    ):
        t0 = time.perf_counter()
        run()
        print(f"({section}: {time.perf_counter() - t0:.0f} s including compilation and autotuning)")
    elapsed = time.perf_counter() - t_start
    print(f"done in {elapsed:.0f} s")
    out = args.out or (None if args.smoke else os.path.join(os.path.dirname(__file__), "results", "gpu_suite.json"))
    if out is None:  # a smoke run's numbers mean nothing: written only where asked
        return
    meta = {
        "device": device_name,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(suite.dtype),
        "smoke": args.smoke,
        "seconds": elapsed,
        "argv": sys.argv[1:],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": suite.rows}, f, indent=1)


if __name__ == "__main__":
    main()
