"""The tensor-parallel GPT, built from the same :class:`GPTConfig` as the reference and with the same
parameter names, so a reference state dict shards into it and gathers back out of it.

Shapes: ``idx [b, s]`` -> ``logits [b, s, V/tp]`` (this rank's vocab slice; the loss never gathers them).
The residual stream is ``[s, b, h]`` (sequence first, as Megatron, so sequence parallelism splits dim 0).
Per layer, forward: two all-reduces over tp (after the attention and MLP row-parallel projections);
backward: two more (the column-parallel inputs' gradients). The embedding adds one all-reduce, the loss
two small ``[b*s]`` ones.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptpar.models.gpt import GPTConfig, check_sequence, init_gpt_weights, make_norm, mlp_activation
from gptpar.parallel import comm
from gptpar.parallel.mesh import Group, ParallelState
from gptpar.parallel.random import TPRngTracker
from gptpar.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_tensor,
    tp_spec,
    unshard_tensor,
    vocab_parallel_cross_entropy,
)


class ParallelSelfAttention(nn.Module):
    """Causal self-attention over this rank's ``n_head/tp`` heads. ``[s, b, h] -> [s, b, h]``."""

    def __init__(self, config: GPTConfig, group: Group, rng: TPRngTracker | None = None) -> None:
        super().__init__()
        self.config, self.group, self.rng = config, group, rng
        self.local_heads = config.n_head // group.size
        self.qkv = ColumnParallelLinear(config.d_model, 3 * config.d_model, bias=config.bias, group=group, chunks=3)
        self.proj = RowParallelLinear(config.d_model, config.d_model, bias=config.bias, group=group)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, _ = x.shape
        nh, hd = self.local_heads, self.config.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(s, b, nh, hd).permute(1, 2, 0, 3) for t in (q, k, v))  # [b, nh, s, hd]
        p = self.config.dropout if self.training else 0.0
        if p > 0.0 and self.rng is not None:
            with self.rng.fork():  # each tp rank drops its own heads' probabilities independently
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        y = y.permute(2, 0, 1, 3).reshape(s, b, nh * hd)
        return self.resid_drop(self.proj(y))


class ParallelMLP(nn.Module):
    """Column-parallel fc (gate|up blocks for SwiGLU), activation, row-parallel proj. ``[s, b, h] -> [s, b, h]``."""

    def __init__(self, config: GPTConfig, group: Group) -> None:
        super().__init__()
        self.config = config
        swiglu = config.activation == "swiglu"
        fc_out = 2 * config.ffn_hidden if swiglu else config.ffn_hidden
        self.fc = ColumnParallelLinear(config.d_model, fc_out, bias=config.bias, group=group, chunks=2 if swiglu else 1)
        self.proj = RowParallelLinear(config.ffn_hidden, config.d_model, bias=config.bias, group=group)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(mlp_activation(self.config, self.fc(x))))


class ParallelBlock(nn.Module):
    def __init__(self, config: GPTConfig, group: Group, rng: TPRngTracker | None = None) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = ParallelSelfAttention(config, group, rng)
        self.ln_2 = make_norm(config)
        self.mlp = ParallelMLP(config, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ParallelGPT(nn.Module):
    """Tensor-parallel GPT over ``state.tp``.

    ``forward(idx [b, s], targets [b, s] | None) -> (logits [b, s, V/tp], mean loss | None)``. The loss is
    the same scalar on every tp rank and equals the reference model's.
    """

    def __init__(self, config: GPTConfig, state: ParallelState, seed: int | None = None) -> None:
        super().__init__()
        state.layout.validate_model(config)
        self.config, self.state = config, state
        tp = state.tp
        self.tp = tp
        seed = state.seed_for("params") if seed is None else seed
        rng = TPRngTracker(state.seed_for("tp_local"), state.device) if config.dropout > 0 else None
        self.wte = VocabParallelEmbedding(config.vocab_size, config.d_model, group=tp)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ParallelBlock(config, tp, rng) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = ColumnParallelLinear(config.d_model, config.vocab_size, bias=False, group=tp)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # both [V/tp, h], split the same way
        init_gpt_weights(self, config, seed, tp.size, tp.rank)
        self.to(state.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100):
        check_sequence(idx, self.config)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos)).transpose(0, 1)  # [s, b, h]
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x)).transpose(0, 1)  # [b, s, V/tp]
        loss = None
        if targets is not None:
            per_token = vocab_parallel_cross_entropy(logits, targets, self.tp, ignore_index)
            loss = per_token.sum() / (targets != ignore_index).sum().clamp(min=1)
        return logits, loss


# ---------------------------------------------------------------------------------------------- state dicts
def _specs(model: nn.Module) -> dict[str, tuple[int | None, int]]:
    # remove_duplicate=False: a tied weight appears under both of its names, as in state_dict().
    return {n: tp_spec(p) for n, p in model.named_parameters(remove_duplicate=False)}


def shard_state_dict(full: dict[str, torch.Tensor], model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """This tp rank's state dict for ``model`` from a full (reference) state dict."""
    specs = _specs(model)
    missing = sorted(set(model.state_dict()) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {missing}")
    return {k: shard_tensor(full[k], *specs.get(k, (None, 1)), group.size, group.rank) for k in model.state_dict()}


def gather_full(t: torch.Tensor, spec: tuple[int | None, int], group: Group) -> torch.Tensor:
    """The full tensor from every tp rank's piece ``t`` under ``spec``. Collective: one all-gather if sharded."""
    dim, chunks = spec
    if dim is None or group.size == 1:
        return t.detach().clone()
    pieces = comm.all_gather(t.detach(), group, dim=dim).chunk(group.size, dim=dim)
    return unshard_tensor(list(pieces), dim, chunks)


@torch.no_grad()
def gather_state_dict(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """The full (reference-shaped) state dict, gathered over tp."""
    specs = _specs(model)
    return {k: gather_full(v, specs.get(k, (None, 1)), group) for k, v in model.state_dict().items()}


@torch.no_grad()
def gather_grads(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """Full gradients by parameter name (reference layout), gathered over tp; zeros where a grad is None."""
    return {
        name: gather_full(p.grad if p.grad is not None else torch.zeros_like(p), tp_spec(p), group)
        for name, p in model.named_parameters()
    }
