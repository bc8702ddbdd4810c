"""Hugging Face transformers models <-> gptpar's :class:`GPTConfig` and parameter names.

Architectures: ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
``Qwen3ForCausalLM``. A config field gptpar does not implement (sliding-window attention, an unknown RoPE
scaling type, another activation, ...) is refused with its name, never ignored.
"""

from __future__ import annotations

import torch

from gptpar.errors import GptparConfigError
from gptpar.models.gpt import GPTConfig

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ARCHITECTURES = ("GPT2LMHeadModel",) + LLAMA_FAMILY


def _get(cfg, name, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def architecture(hf_config) -> str:
    archs = _get(hf_config, "architectures") or []
    model_type = _get(hf_config, "model_type")
    by_type = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # fmt: skip
    arch = archs[0] if archs else by_type.get(model_type)
    if arch not in ARCHITECTURES:
        raise GptparConfigError(f"architecture {arch or model_type!r} is not supported; expected one of {ARCHITECTURES}")
    return arch


def _rope(hf_config) -> tuple[float, dict | None]:
    params = dict(_get(hf_config, "rope_parameters") or _get(hf_config, "rope_scaling") or {})
    theta = float(params.pop("rope_theta", _get(hf_config, "rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise GptparConfigError(f"rope scaling type {kind!r} is not supported (only Llama 3's 'llama3', or none)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    extra = sorted(set(params) - set(keys))
    if extra:
        raise GptparConfigError(f"rope scaling fields {extra} are not supported")
    return theta, {k: params[k] for k in keys}


def config_from_hf(hf_config, **overrides) -> GPTConfig:
    """The :class:`GPTConfig` of a transformers config (object or config.json dict)."""
    arch = architecture(hf_config)
    g = lambda n, d=None: _get(hf_config, n, d)  # noqa: E731
    if arch == "GPT2LMHeadModel":
        if g("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise GptparConfigError(f"activation_function={g('activation_function')!r} is not supported (tanh GeLU)")
        for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if g(name, False):
                raise GptparConfigError(f"GPT-2 config field {name}=True is not supported")
        cfg = dict(vocab_size=g("vocab_size"), seq_len=g("n_positions"), n_layer=g("n_layer"), n_head=g("n_head"),
                   d_model=g("n_embd"), ffn_hidden=g("n_inner") or 4 * g("n_embd"), norm_eps=g("layer_norm_epsilon"),
                   tie_embeddings=bool(g("tie_word_embeddings", True)), init_std=g("initializer_range", 0.02))  # fmt: skip
        return GPTConfig(**{**cfg, **overrides})
    if g("hidden_act", "silu") != "silu":
        raise GptparConfigError(f"hidden_act={g('hidden_act')!r} is not supported (SwiGLU with silu)")
    if g("sliding_window") is not None and (arch == "MistralForCausalLM" or g("use_sliding_window", False)):
        raise GptparConfigError(f"sliding_window={g('sliding_window')} is not supported (full causal attention only)")
    if g("mlp_bias", False):
        raise GptparConfigError("mlp_bias=True is not supported")
    qkv_bias = arch == "Qwen2ForCausalLM"
    if g("attention_bias", False):
        if arch == "LlamaForCausalLM":
            raise GptparConfigError("attention_bias=True (bias on o_proj but not the MLP) is not supported")
        qkv_bias = True
    theta, scaling = _rope(hf_config)
    heads = g("num_attention_heads")
    cfg = dict(vocab_size=g("vocab_size"), seq_len=g("max_position_embeddings"), n_layer=g("num_hidden_layers"),
               n_head=heads, n_kv_head=g("num_key_value_heads") or heads, d_model=g("hidden_size"),
               ffn_hidden=g("intermediate_size"), head_dim=g("head_dim") or g("hidden_size") // heads,
               norm_eps=g("rms_norm_eps"), tie_embeddings=bool(g("tie_word_embeddings", False)), position="rope",
               rope_theta=theta, rope_scaling=scaling, activation="swiglu", norm="rmsnorm", bias=False,
               qkv_bias=qkv_bias, qk_norm=arch == "Qwen3ForCausalLM", init_std=g("initializer_range", 0.02))  # fmt: skip
    return GPTConfig(**{**cfg, **overrides})


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: GPTConfig, arch: str) -> dict[str, torch.Tensor]:
    """gptpar's (reference-layout) state dict from a transformers model's ``state_dict()``."""
    out = {}
    if arch == "GPT2LMHeadModel":
        t = lambda k: sd[k].t().contiguous()  # noqa: E731  Conv1D stores [in, out]
        out.update({"wte.weight": sd["transformer.wte.weight"], "wpe.weight": sd["transformer.wpe.weight"],
                    "ln_f.weight": sd["transformer.ln_f.weight"], "ln_f.bias": sd["transformer.ln_f.bias"]})  # fmt: skip
        for i in range(config.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for a, b in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
                out[f"{q}{b}.weight"], out[f"{q}{b}.bias"] = sd[f"{p}{a}.weight"], sd[f"{p}{a}.bias"]
            for a, b in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                         ("mlp.c_proj", "mlp.proj")):  # fmt: skip
                out[f"{q}{b}.weight"], out[f"{q}{b}.bias"] = t(f"{p}{a}.weight"), sd[f"{p}{a}.bias"]
    else:
        out.update({"wte.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"]})
        for i in range(config.n_layer):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            a = p + "self_attn."
            out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
            out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
            out[q + "attn.qkv.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"])
            if config.qkv_bias:
                out[q + "attn.qkv.bias"] = torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"])
            out[q + "attn.proj.weight"] = sd[a + "o_proj.weight"]
            if config.qk_norm:
                out[q + "attn.q_norm.weight"], out[q + "attn.k_norm.weight"] = sd[a + "q_norm.weight"], sd[a + "k_norm.weight"]
            out[q + "mlp.fc.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            out[q + "mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    else:
        out["lm_head.weight"] = out["wte.weight"]
    return out
