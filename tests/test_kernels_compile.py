"""Every Triton kernel compiled for an H100 (sm_90) by Triton's own compiler, down to a cubin, with the block
configurations its GPU launches can pick (the autotune lists). No GPU is needed to compile: this catches
what the interpreter cannot (dot shapes and operand dtypes, layouts, shared memory beyond the SM's).

Every configuration is compiled for the heaviest variant (head dim 128, causal with document masks, bf16;
SwiGLU with bias);
the other variants with one configuration each."""

import pytest

triton = pytest.importorskip("triton")

from gptpar.kernels import attention, cross_entropy, mlp, norm, rope  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100_SHARED_BYTES = 232448  # the most dynamic shared memory one block may use on sm_90 (227 KiB)


def compile_sm90(kernel, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    """``types``: every non-constexpr argument's Triton type, e.g. ``*bf16``, ``i32``, ``fp32``."""
    signature = {p.name: "constexpr" if p.is_constexpr else types[p.name] for p in kernel.params}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    assert compiled.asm["cubin"], kernel
    assert compiled.metadata.shared <= H100_SHARED_BYTES, (kernel, constexprs, compiled.metadata.shared)
    return compiled


def _attention_types(dt: str) -> dict:
    t = {n: f"*{dt}" for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
    t.update({n: "*fp32" for n in ("LSE", "Delta")})
    t.update(
        {
            "QPos": "*i64",
            "KPos": "*i64",
            "QDoc": "*i64",
            "KDoc": "*i64",
            "Bounds": "*i32",
            "Sq": "i32",
            "Sk": "i32",
            "scale": "fp32",
            "GROUP": "i32",
            "HEADS": "i32",
        }
    )
    return t


ATTENTION = [
    (attention.attn_fwd_kernel, attention.attn_fwd),
    (attention.attn_bwd_dkdv_kernel, attention.attn_bwd_dkdv),
    (attention.attn_bwd_dq_kernel, attention.attn_bwd_dq),
]


@pytest.mark.parametrize("which", range(len(ATTENTION)), ids=["fwd", "bwd_dkdv", "bwd_dq"])
def test_flash_attention_compiles_for_sm90(which):
    kernel, tuned = ATTENTION[which]
    for cfg in tuned.configs:  # every configuration the autotuner may pick, at the heaviest variant
        consts = {"CAUSAL": True, "DOCS": True, "D": 128, "UPCAST": False, "PREC": "tf32", **cfg.kwargs}
        compile_sm90(kernel, _attention_types("bf16"), consts, cfg.num_warps, cfg.num_stages)
    cfg = tuned.configs[0]
    for d, causal, docs, dt, prec in (
        (128, True, False, "bf16", "tf32"),
        (64, True, False, "bf16", "tf32"),
        (64, False, False, "bf16", "tf32"),
        (128, False, True, "fp16", "tf32"),
        (64, True, False, "fp32", "ieee"),
    ):
        consts = {"CAUSAL": causal, "DOCS": docs, "D": d, "UPCAST": False, "PREC": prec, **cfg.kwargs}
        compile_sm90(kernel, _attention_types(dt), consts, cfg.num_warps, cfg.num_stages)


def test_fused_mlp_compiles_for_sm90():
    types = {"X": "*bf16", "W": "*bf16", "B": "*fp32", "Pre": "*bf16", "Y": "*bf16", "M": "i32", "F": "i32", "K": "i32"}
    for cfg in mlp.mlp_fwd.configs:
        consts = {"HAS_B": True, "SWIGLU": True, "UPCAST": False, "PREC": "tf32", **cfg.kwargs}
        compile_sm90(mlp.mlp_fwd_kernel, types, consts, cfg.num_warps, cfg.num_stages)
    cfg = mlp.mlp_fwd.configs[0]
    compile_sm90(
        mlp.mlp_fwd_kernel, types, {"HAS_B": False, "SWIGLU": False, "UPCAST": False, "PREC": "tf32", **cfg.kwargs}
    )
    fp32 = {**types, "X": "*fp32", "W": "*fp32", "Pre": "*fp32", "Y": "*fp32"}
    compile_sm90(
        mlp.mlp_fwd_kernel, fp32, {"HAS_B": True, "SWIGLU": False, "UPCAST": False, "PREC": "ieee", **cfg.kwargs}
    )
    for swiglu in (False, True):
        compile_sm90(
            mlp.mlp_act_bwd_kernel,
            {"Pre": "*bf16", "DY": "*bf16", "DPre": "*bf16", "M": "i32", "F": "i32"},
            {"SWIGLU": swiglu, "BLOCK": 1024},
        )


def test_norm_and_cross_entropy_compile_for_sm90():
    from gptpar.ops.norm import _warps

    types = {
        "X": "*bf16",
        "W": "*fp32",
        "B": "*fp32",
        "Y": "*bf16",
        "DY": "*bf16",
        "DX": "*bf16",
        "Mean": "*fp32",
        "Rstd": "*fp32",
        "DW": "*fp32",
        "DB": "*fp32",
        "stride": "i32",
        "M": "i32",
        "N": "i32",
        "eps": "fp32",
    }
    for rms in (False, True):
        compile_sm90(norm.norm_fwd_kernel, types, {"RMS": rms, "HAS_B": not rms, "BLOCK": 8192}, _warps(8192))
        compile_sm90(norm.norm_bwd_kernel, types, {"ROWS": 32, "RMS": rms, "BLOCK": 8192}, _warps(8192))
    types = {
        "X": "*bf16",
        "T": "*i64",
        "Max": "*fp32",
        "Sum": "*fp32",
        "Tgt": "*fp32",
        "DLoss": "*fp32",
        "stride": "i32",
        "V": "i32",
        "start": "i32",
    }
    compile_sm90(cross_entropy.ce_stats_kernel, types, {"BLOCK": 4096})
    compile_sm90(cross_entropy.ce_grad_kernel, types, {"BLOCK": 4096})


def test_rope_compiles_for_sm90():
    types = {"X": "*bf16", "Out": "*bf16", "Cos": "*fp32", "Sin": "*fp32", "H": "i32", "NROT": "i32", "B": "i32"}
    for half, dt in ((64, "bf16"), (32, "fp16"), (64, "fp32")):  # head dims 128 and 64
        t = {**types, "X": f"*{dt}", "Out": f"*{dt}"}
        for sign in (1, -1):
            compile_sm90(rope.rope_kernel, t, {"SIGN": sign, "HALF": half, "BLOCK_H": 16})
