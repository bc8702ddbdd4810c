"""The reference GPT: a plain-torch, single-device GPT-2-style decoder. The ground truth every parallel
layout is tested against.

Shapes: ``idx [b, s]`` token ids -> ``logits [b, s, V]``; the residual stream is ``[b, s, h]``.
Parameter names are shared with :class:`gptpar.models.parallel_gpt.ParallelGPT`, so state dicts map 1:1
(modulo tensor-parallel sharding).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptpar.errors import GptparConfigError
from gptpar.ops.mlp import ACTIVATIONS, apply_activation

NORMS = ("layernorm", "rmsnorm")


@dataclass
class GPTConfig:
    """A GPT's shape and options. ``ffn_hidden`` defaults to ``4 * d_model``."""

    vocab_size: int = 512
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    ffn_hidden: int | None = None
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"
    norm: str = "layernorm"
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "ffn_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GptparConfigError(f"{name}={v!r} is invalid: it must be a positive integer")
        if self.d_model % self.n_head:
            raise GptparConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head} (head_dim must be whole)"
            )
        if self.activation not in ACTIVATIONS:
            raise GptparConfigError(f"activation={self.activation!r} is unknown; expected one of {ACTIVATIONS}")
        if self.norm not in NORMS:
            raise GptparConfigError(f"norm={self.norm!r} is unknown; expected one of {NORMS}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptparConfigError(f"dropout={self.dropout} is invalid: it must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GptparConfigError(f"unknown GPTConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count of the (unsharded) model, tied embeddings counted once."""
        h, f, v, L = self.d_model, self.ffn_hidden, self.vocab_size, self.n_layer
        b = 1 if self.bias else 0
        norm = h * (2 if (self.norm == "layernorm" and self.bias) else 1)
        fc_out = 2 * f if self.activation == "swiglu" else f
        per_layer = 2 * norm + (3 * h * h + 3 * h * b) + (h * h + h * b) + (fc_out * h + fc_out * b) + (f * h + h * b)
        head = 0 if self.tie_embeddings else v * h
        return v * h + self.seq_len * h + L * per_layer + norm + head


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, seq_len=128, n_layer=4, n_head=4, d_model=128),
    "small": dict(vocab_size=4096, seq_len=256, n_layer=6, n_head=8, d_model=384),
    "gpt2-small": dict(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(vocab_size=50304, seq_len=1024, n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(vocab_size=50304, seq_len=1024, n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(vocab_size=50304, seq_len=1024, n_layer=48, n_head=25, d_model=1600),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise GptparConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict) running ``gptpar.ops.layer_norm`` (Triton on GPUs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gptpar.ops.norm import layer_norm

        return layer_norm(x, self.weight, self.bias, self.eps)


class FusedRMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) running ``gptpar.ops.rms_norm`` (Triton on GPUs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gptpar.ops.norm import rms_norm

        return rms_norm(x, self.weight, self.eps if self.eps is not None else 1e-5)


def make_norm(config: GPTConfig, device=None, dtype=None, fused: bool = False) -> nn.Module:
    """The config's norm; ``fused`` picks gptpar's op (the reference model keeps torch's own)."""
    if config.norm == "rmsnorm":
        return (FusedRMSNorm if fused else nn.RMSNorm)(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)
    cls = FusedLayerNorm if fused else nn.LayerNorm
    return cls(config.d_model, eps=config.norm_eps, bias=config.bias, device=device, dtype=dtype)


def mlp_activation(config: GPTConfig, h: torch.Tensor) -> torch.Tensor:
    """The MLP nonlinearity on the fc output (``[..., f]``, or ``[..., 2f]`` = gate|up for SwiGLU)."""
    return apply_activation(h, config.activation)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        nh, hd = self.config.n_head, self.config.head_dim
        q, k, v = self.qkv(x).split(h, dim=-1)
        q, k, v = (t.view(b, s, nh, hd).transpose(1, 2) for t in (q, k, v))
        p = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, s, h)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        fc_out = 2 * config.ffn_hidden if config.activation == "swiglu" else config.ffn_hidden
        self.fc = nn.Linear(config.d_model, fc_out, bias=config.bias)
        self.proj = nn.Linear(config.ffn_hidden, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(mlp_activation(self.config, self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Reference GPT. ``forward(idx [b, s], targets [b, s] | None) -> (logits [b, s, V], mean loss | None)``."""

    def __init__(self, config: GPTConfig, seed: int = 1234) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_gpt_weights(self, config, seed)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100):
        check_sequence(idx, self.config)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return logits, loss


def check_sequence(idx: torch.Tensor, config: GPTConfig) -> None:
    if idx.dim() != 2:
        raise GptparConfigError(f"expected token ids of shape [batch, seq], got {tuple(idx.shape)}")
    if idx.shape[1] > config.seq_len:
        raise GptparConfigError(f"sequence length {idx.shape[1]} exceeds the model's seq_len={config.seq_len}")


# ---------------------------------------------------------------------------------------------- init
def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init_value(name: str, shape: tuple[int, ...], config: GPTConfig, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter ``name``: GPT-2's scheme, from a per-name seed.

    Linear and embedding weights ~ N(0, init_std); the residual output projections (``attn.proj``,
    ``mlp.proj``) ~ N(0, init_std / sqrt(2 * n_layer)); biases 0; norm weights 1. Seeding per name makes
    the value independent of construction order and of how the model is split.
    """
    leaf = name.rsplit(".", 1)[-1]
    if ".ln_" in f".{name}" or name.startswith("ln_f"):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    std = config.init_std
    if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
        std = config.init_std / math.sqrt(2 * config.n_layer)
    g = torch.Generator().manual_seed(_param_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=g)


@torch.no_grad()
def init_gpt_weights(model: nn.Module, config: GPTConfig, seed: int, tp_size: int = 1, tp_rank: int = 0) -> None:
    """Initialise every parameter of a reference or tensor-parallel GPT to its shard of the same full value."""
    from gptpar.parallel.tensor import shard_tensor, tp_spec

    for name, p in model.named_parameters():
        dim, chunks = tp_spec(p)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp_size
        if name == "lm_head.weight" and config.tie_embeddings:
            name = "wte.weight"  # a pipeline's last stage holds its own copy of the tied embedding
        full = full_init_value(name, tuple(shape), config, seed)
        p.copy_(shard_tensor(full, dim, chunks, tp_size, tp_rank))
