"""The reference GPT: a plain-torch, single-device decoder, GPT-2 style (learned positions, LayerNorm, GeLU)
or Llama style (rotary positions, grouped-query attention, RMSNorm, SwiGLU, untied head; Qwen2's q/k/v
bias, Qwen3's per-head q/k norm). The ground truth every parallel layout is tested against; given the
same weights it computes what Hugging Face transformers' GPT-2 / Llama / Qwen2 / Mistral models compute.

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
from gptpar.ops.rope import ROPE_SCALING_KEYS, apply_rope, rope_inv_freq, rope_tables

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")


@dataclass
class GPTConfig:
    """A GPT's shape and options. ``ffn_hidden`` defaults to ``4 * d_model``, ``head_dim`` to
    ``d_model / n_head``, ``n_kv_head`` to ``n_head`` (fewer: grouped-query attention; 1: multi-query),
    ``qkv_bias`` to ``bias``.

    ``position``: ``"learned"`` (GPT-2's position table) or ``"rope"`` (rotary, ``rope_theta``; optional
    Llama 3 ``rope_scaling`` with keys ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``). ``qk_norm``: RMSNorm over each head's q and k before the rotation
    (Qwen3, OLMo 2 style per head). ``seq_len`` is the longest sequence the model takes.

    ``vocab_size`` is the true vocabulary; the embedding and output layer hold :attr:`padded_vocab` rows (the
    next multiple of ``vocab_multiple``, whatever the layout, so every tp reads the same checkpoint). Padded
    rows start at zero, padded logits are masked out of the softmax, the loss and sampling, and never leave
    the model (the reference returns ``[..., vocab_size]`` logits; a vocab shard holds -inf there).
    """

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
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    n_kv_head: int | None = None
    head_dim: int | None = None
    qkv_bias: bool | None = None
    qk_norm: bool = False
    vocab_multiple: int = 1

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        for name in (
            "vocab_size",
            "seq_len",
            "n_layer",
            "n_head",
            "d_model",
            "ffn_hidden",
            "n_kv_head",
            "vocab_multiple",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GptparConfigError(f"{name}={v!r} is invalid: it must be a positive integer")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise GptparConfigError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head} (head_dim must be whole; "
                    "or set head_dim explicitly)"
                )
            self.head_dim = self.d_model // self.n_head
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise GptparConfigError(f"head_dim={self.head_dim!r} is invalid: it must be a positive integer")
        if self.n_head % self.n_kv_head:
            raise GptparConfigError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head} "
                "(grouped-query attention: each K/V head serves a whole number of query heads)"
            )
        if self.position not in POSITIONS:
            raise GptparConfigError(f"position={self.position!r} is unknown; expected one of {POSITIONS}")
        if self.position == "rope":
            if self.head_dim % 2:
                raise GptparConfigError(f"head_dim={self.head_dim} must be even for rotary positions (position='rope')")
            if not self.rope_theta > 0:
                raise GptparConfigError(f"rope_theta={self.rope_theta} is invalid: it must be positive")
        if self.rope_scaling is not None:
            if self.position != "rope":
                raise GptparConfigError(
                    f"rope_scaling={self.rope_scaling} needs position='rope' (got {self.position!r})"
                )
            keys = set(self.rope_scaling)
            if keys != set(ROPE_SCALING_KEYS):
                raise GptparConfigError(
                    f"rope_scaling keys {sorted(keys)} are not Llama 3 scaling's {sorted(ROPE_SCALING_KEYS)}"
                )
        if self.qk_norm and self.norm != "rmsnorm":
            raise GptparConfigError(f"qk_norm=True needs norm='rmsnorm' (got norm={self.norm!r})")
        if self.activation not in ACTIVATIONS:
            raise GptparConfigError(f"activation={self.activation!r} is unknown; expected one of {ACTIVATIONS}")
        if self.norm not in NORMS:
            raise GptparConfigError(f"norm={self.norm!r} is unknown; expected one of {NORMS}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptparConfigError(f"dropout={self.dropout} is invalid: it must be in [0, 1)")

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and the output layer: ``vocab_size`` rounded up to ``vocab_multiple``."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def q_size(self) -> int:
        """Width of the queries (and of the attention output): ``n_head * head_dim``."""
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the keys (= of the values): ``n_kv_head * head_dim``."""
        return self.n_kv_head * self.head_dim

    @property
    def qkv_chunks(self) -> int | tuple[int, int, int]:
        """The fused q|k|v weight's tensor-parallel block spec: 3 equal blocks, or heads per block (GQA)."""
        return 3 if self.n_kv_head == self.n_head else (self.n_head, self.n_kv_head, self.n_kv_head)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GptparConfigError(f"unknown GPTConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def unit_params(self, tp: int = 1) -> dict[str, int]:
        """The one parameter count: parameters one tp rank holds of each unit, under ParallelGPT's sharding
        (K/V heads replicated when tp exceeds them; norms and row-linear biases replicated):
        ``embedding`` (token table, padded vocabulary, plus learned positions), ``block`` (each of the
        ``n_layer``), ``norm`` (the final one) and ``head`` (the LM head matrix, counted even when tied)."""
        from gptpar.sharding import local_length

        h, f, v = self.d_model, self.ffn_hidden, self.padded_vocab
        b = 1 if self.bias else 0
        norm = h * (2 if (self.norm == "layernorm" and self.bias) else 1)
        fc_out = 2 * f if self.activation == "swiglu" else f
        qkv = local_length(self.q_size + 2 * self.kv_size, self.qkv_chunks, tp)
        block = (
            2 * norm
            + qkv * h
            + (qkv if self.qkv_bias else 0)  # q|k|v, column
            + (2 * self.head_dim if self.qk_norm else 0)
            + (self.q_size * h) // tp
            + h * b  # attention projection, row (bias replicated)
            + (fc_out * h + fc_out * b) // tp  # fc (gate|up), column
            + (f * h) // tp
            + h * b  # MLP projection, row
        )
        wpe = self.seq_len * h if self.position == "learned" else 0
        return {"embedding": v * h // tp + wpe, "block": block, "norm": norm, "head": v * h // tp}

    def num_params(self) -> int:
        """Parameter count of the (unsharded) model, tied embeddings counted once, padded vocabulary rows in."""
        u = self.unit_params()
        return u["embedding"] + self.n_layer * u["block"] + u["norm"] + (0 if self.tie_embeddings else u["head"])


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, seq_len=128, n_layer=4, n_head=4, d_model=128),
    "small": dict(vocab_size=4096, seq_len=256, n_layer=6, n_head=8, d_model=384),
    "gpt2-small": dict(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(vocab_size=50304, seq_len=1024, n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(vocab_size=50304, seq_len=1024, n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(vocab_size=50304, seq_len=1024, n_layer=48, n_head=25, d_model=1600),
}
_LLAMA = dict(position="rope", activation="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False)
_LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
PRESETS.update(
    {  # the published configs' shapes (config.json of each model)
        # a CPU-sized Llama 3 for tests and the demo: GQA (8 query heads, 2 K/V heads), scaled RoPE
        "llama-tiny": dict(
            vocab_size=512,
            seq_len=128,
            n_layer=4,
            n_head=8,
            n_kv_head=2,
            d_model=128,
            ffn_hidden=352,
            rope_theta=500000.0,
            rope_scaling=_LLAMA3_SCALING,
            **_LLAMA,
        ),
        "smollm-135m": dict(
            vocab_size=49152,
            seq_len=2048,
            n_layer=30,
            n_head=9,
            n_kv_head=3,
            d_model=576,
            ffn_hidden=1536,
            **{**_LLAMA, "tie_embeddings": True},
        ),
        "tinyllama-1.1b": dict(
            vocab_size=32000, seq_len=2048, n_layer=22, n_head=32, n_kv_head=4, d_model=2048, ffn_hidden=5632, **_LLAMA
        ),
        "qwen2.5-0.5b": dict(
            vocab_size=151936,
            seq_len=32768,
            n_layer=24,
            n_head=14,
            n_kv_head=2,
            d_model=896,
            ffn_hidden=4864,
            rope_theta=1000000.0,
            norm_eps=1e-6,
            qkv_bias=True,
            **{**_LLAMA, "tie_embeddings": True},
        ),
        "llama3-8b": dict(
            vocab_size=128256,
            seq_len=8192,
            n_layer=32,
            n_head=32,
            n_kv_head=8,
            d_model=4096,
            ffn_hidden=14336,
            rope_theta=500000.0,
            **_LLAMA,
        ),
        "llama3.1-8b": dict(
            vocab_size=128256,
            seq_len=131072,
            n_layer=32,
            n_head=32,
            n_kv_head=8,
            d_model=4096,
            ffn_hidden=14336,
            rope_theta=500000.0,
            rope_scaling=_LLAMA3_SCALING,
            **_LLAMA,
        ),
        "mistral-7b": dict(
            vocab_size=32768,
            seq_len=32768,
            n_layer=32,
            n_head=32,
            n_kv_head=8,
            d_model=4096,
            ffn_hidden=14336,
            rope_theta=1000000.0,
            **_LLAMA,
        ),  # v0.3: no sliding window
        "llama3-70b": dict(
            vocab_size=128256,
            seq_len=8192,
            n_layer=80,
            n_head=64,
            n_kv_head=8,
            d_model=8192,
            ffn_hidden=28672,
            rope_theta=500000.0,
            **_LLAMA,
        ),
    }
)


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


def make_norm(config: GPTConfig, device=None, dtype=None, fused: bool = False, size: int | None = None) -> nn.Module:
    """The config's norm over ``size`` (default ``d_model``); ``fused`` picks gptpar's op (the reference
    model keeps torch's own)."""
    size = config.d_model if size is None else size
    if config.norm == "rmsnorm":
        return (FusedRMSNorm if fused else nn.RMSNorm)(size, eps=config.norm_eps, device=device, dtype=dtype)
    cls = FusedLayerNorm if fused else nn.LayerNorm
    return cls(size, eps=config.norm_eps, bias=config.bias, device=device, dtype=dtype)


def mlp_activation(config: GPTConfig, h: torch.Tensor) -> torch.Tensor:
    """The MLP nonlinearity on the fc output (``[..., f]``, or ``[..., 2f]`` = gate|up for SwiGLU)."""
    return apply_activation(h, config.activation)


class CausalSelfAttention(nn.Module):
    """Causal self-attention, multi-head or grouped-query. ``[b, s, h] -> [b, s, h]``; ``rope``: the
    ``(cos, sin) [s, head_dim/2]`` tables of the tokens' positions (rotary models)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.q_size, config.d_model, bias=config.bias)
        if config.qk_norm:
            self.q_norm = make_norm(config, size=config.head_dim)
            self.k_norm = make_norm(config, size=config.head_dim)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        c = self.config
        q, k, v = self.qkv(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(b, s, c.n_head, c.head_dim).transpose(1, 2)
        k, v = (t.view(b, s, c.n_kv_head, c.head_dim).transpose(1, 2) for t in (k, v))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        p = c.dropout if self.training else 0.0
        gqa = c.n_kv_head != c.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=gqa)
        else:  # packed documents: causal within each document
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, s, c.q_size)))


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

    def forward(self, x: torch.Tensor, rope=None, mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Reference GPT. ``forward(idx [b, s], targets [b, s] | None) -> (logits [b, s, V], mean loss | None)``.
    ``doc_ids [b, s]`` (packed documents, non-decreasing along s): attention stops at document boundaries
    and positions restart at each document, so each document is computed as if alone."""

    def __init__(self, config: GPTConfig, seed: int = 1234, init_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab, config.d_model)
        if config.position == "learned":
            self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if init_weights:
            init_gpt_weights(self, config, seed)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        doc_ids: torch.Tensor | None = None,
    ):
        check_sequence(idx, self.config)
        mask = None
        if doc_ids is None:
            pos = torch.arange(idx.shape[1], device=idx.device)
        else:
            from gptpar.ops.attention import check_documents, document_mask, document_positions

            check_documents(doc_ids, idx)
            pos, mask = document_positions(doc_ids), document_mask(doc_ids)
        x = self.wte(idx)
        rope = rope_for(self.config, pos, x.device)
        if rope is None:
            x = x + self.wpe(pos)
        elif doc_ids is not None:  # [b, s, d/2] tables against q, k [b, heads, s, d]
            rope = tuple(t.unsqueeze(1) for t in rope)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, mask)
        logits = self.lm_head(self.ln_f(x))[..., : self.config.vocab_size]  # padded rows never leave
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return logits, loss


def rope_for(config: GPTConfig, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rotary ``(cos, sin) [s, head_dim/2]`` fp32 tables at ``positions``, or None for learned positions."""
    if config.position != "rope":
        return None
    inv = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    return rope_tables(positions.to(device), inv)


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
    if ".ln_" in f".{name}" or name.startswith("ln_f") or "_norm." in name:
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    std = config.init_std
    if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
        std = config.init_std / math.sqrt(2 * config.n_layer)
    g = torch.Generator().manual_seed(_param_seed(seed, name))
    full = torch.empty(shape).normal_(0.0, std, generator=g)
    if name in ("wte.weight", "lm_head.weight"):
        full[config.vocab_size :] = 0.0  # padded vocabulary rows
    return full


@torch.no_grad()
def init_gpt_weights(model: nn.Module, config: GPTConfig, seed: int, tp_size: int = 1, tp_rank: int = 0) -> None:
    """Initialise every parameter of a reference or tensor-parallel GPT to its shard of the same full value."""
    from gptpar.sharding import full_length, shard_tensor, tp_spec

    for name, p in model.named_parameters():
        dim, chunks = tp_spec(p)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] = full_length(shape[dim], chunks, tp_size)
        if name == "lm_head.weight" and config.tie_embeddings:
            name = "wte.weight"  # a pipeline's last stage holds its own copy of the tied embedding
        full = full_init_value(name, tuple(shape), config, seed)
        p.copy_(shard_tensor(full, dim, chunks, tp_size, tp_rank))
