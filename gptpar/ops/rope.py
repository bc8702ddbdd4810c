"""Rotary position embeddings (RoPE), as Llama, Qwen2 and Mistral use them (rotate-half convention).

* :func:`rope_inv_freq` — the ``[d/2]`` inverse frequencies, with Llama 3's frequency-dependent scaling;
* :func:`rope_tables` — ``cos, sin [s, d/2]`` (fp32) at given token positions, so a rank rotates its own
  tokens by their true global positions whatever the sharding (sequence parallel, zig-zag ring, Ulysses,
  pipeline stages);
* :func:`apply_rope` — rotate ``x [..., s, d]`` (batch-first, the reference model);
* :func:`rope_qkv` — rotate the q and k heads of a fused ``[s, b, heads, d]`` q|k|v activation in one pass
  (the parallel model): the Triton kernel (``gptpar.kernels.rope``) on GPUs, the torch reference otherwise.
"""

from __future__ import annotations

import math

import torch

from gptpar.errors import GptparConfigError
from gptpar.ops.dispatch import use_triton

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """``[head_dim/2]`` fp32 inverse frequencies ``theta^(-2i/d)``; ``scaling`` (Llama 3: ``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``) stretches the low
    frequencies by ``factor``, keeps the high ones and interpolates smoothly between, as Meta's code does."""
    if head_dim % 2:
        raise GptparConfigError(f"head_dim={head_dim} must be even for rotary embeddings")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    missing = [k for k in ROPE_SCALING_KEYS if k not in scaling]
    if missing:
        raise GptparConfigError(f"rope_scaling {scaling} lacks {missing} (Llama 3 scaling needs {ROPE_SCALING_KEYS})")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [..., d/2]`` fp32 for token ``positions [...]`` (``[s]``, or ``[b, s]`` per token)."""
    freqs = positions.to(device=inv_freq.device, dtype=torch.float32)[..., None] * inv_freq.float()
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., s, d]`` by ``cos, sin [s, d/2]`` (or any shape broadcasting to ``x``'s halves)
    in the rotate-half convention, computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def reference_rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor:
    """Torch reference of :func:`rope_qkv`: ``qkv [s, b, H, d]`` with heads ``[0, n_rot)`` rotated."""
    rot = apply_rope(qkv[:, :, :n_rot], cos[:, None, None, :], sin[:, None, None, :])
    return torch.cat([rot, qkv[:, :, n_rot:]], dim=2)


def _triton_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, sign: int) -> torch.Tensor:
    import triton

    from gptpar.kernels.rope import rope_kernel

    s, b, h, d = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    block_h = min(triton.next_power_of_2(h), 16)
    rope_kernel[(s * b, triton.cdiv(h, block_h))](
        x, out, cos.contiguous(), sin.contiguous(), h, n_rot, b, SIGN=sign, HALF=d // 2, BLOCK_H=block_h
    )
    return out


class _TritonRopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_rot):
        ctx.save_for_backward(cos, sin)
        ctx.n_rot = n_rot
        return _triton_rope(qkv, cos, sin, n_rot, 1)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _triton_rope(g, cos, sin, ctx.n_rot, -1), None, None, None  # the inverse rotation


def _triton_ok(x: torch.Tensor) -> bool:
    half = x.shape[-1] // 2
    return use_triton(x) and half >= 1 and half & (half - 1) == 0


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor:
    """Rotate the first ``n_rot`` heads (q and k) of ``qkv [s, b, H, d]`` by ``cos, sin [s, d/2]`` (each
    sequence row's own position) or ``[s, b, d/2]`` (each token's own: packed documents restart their
    positions); the other heads (v) pass through. Differentiable; no collectives."""
    if cos.dim() == 3:  # per token: the same kernel over s*b rows of one sequence each
        s, b, h, d = qkv.shape
        if cos.shape != (s, b, d // 2):
            raise GptparConfigError(f"rope tables {tuple(cos.shape)} do not fit qkv {tuple(qkv.shape)}: [s, b, d/2]")
        flat = rope_qkv(qkv.reshape(s * b, 1, h, d), cos.reshape(s * b, d // 2), sin.reshape(s * b, d // 2), n_rot)
        return flat.view(s, b, h, d)
    if cos.shape != (qkv.shape[0], qkv.shape[-1] // 2):
        raise GptparConfigError(f"rope tables {tuple(cos.shape)} do not fit qkv {tuple(qkv.shape)}: [s, d/2] needed")
    if _triton_ok(qkv):
        return _TritonRopeQKV.apply(qkv, cos, sin, n_rot)
    return reference_rope_qkv(qkv, cos, sin, n_rot)
