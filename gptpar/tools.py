"""``gptpar generate`` and ``gptpar convert``: single-process tools over a checkpoint of any layout."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from gptpar import checkpoint
from gptpar.errors import GptparConfigError
from gptpar.models.gpt import GPT, GPTConfig


def _resolve_ckpt(path: str) -> str:
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    folder = checkpoint.latest(path)
    if folder is None:
        raise GptparConfigError(f"--ckpt {path!r}: no checkpoint there (expected a step folder or a run's --out)")
    return folder


def load_reference(path: str) -> tuple[GPT, dict]:
    """The single-device reference GPT with a checkpoint's weights (gathered from its shards)."""
    folder = _resolve_ckpt(path)
    meta = checkpoint.read_meta(folder)
    model = GPT(GPTConfig.from_dict(meta["model"]))
    full = checkpoint.load_full_state_dict(folder)
    if model.config.tie_embeddings:
        full.setdefault("lm_head.weight", full["wte.weight"])
    model.load_state_dict(full)
    return model.eval(), meta


@torch.no_grad()
def sample(
    model: GPT, ids: list[int], n: int, temperature: float = 0.8, top_k: int | None = 50, seed: int = 0
) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long)
    for _ in range(n):
        logits, _ = model(x[:, -model.config.seq_len :])
        logits = logits[0, -1].float() / max(temperature, 1e-5)
        if top_k:
            v, _ = torch.topk(logits, min(top_k, logits.numel()))
            logits[logits < v[-1]] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return x[0].tolist()


def generate_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="gptpar generate", description="Sample text from a checkpoint.")
    p.add_argument("--ckpt", required=True, help="a checkpoint folder or a run's --out")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        model, meta = load_reference(a.ckpt)
    except GptparConfigError as e:
        print(f"gptpar generate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from gptpar.corpus import Corpus

    corpus = Corpus(None, None, model.config.vocab_size, meta.get("tokenizer"))
    ids = corpus.encode(a.prompt) or [0]
    out = sample(model, ids, a.tokens, a.temperature, a.top_k, a.seed)
    print(corpus.decode(out))


def export_main(argv: list[str], prog: str = "gptpar export") -> None:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write a checkpoint (any layout) as a Hugging Face transformers model directory that "
        "AutoModelForCausalLM.from_pretrained loads (config.json, safetensors in files of at most 5 GB, tokenizer).",
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint folder or a run's --out")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="tensor dtype (default: the dtype of the model the run started from, else float32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a = p.parse_args(argv)
    from gptpar.checkpoint import export_checkpoint

    try:
        folder = _resolve_ckpt(a.ckpt)
        dtype = getattr(torch, a.dtype) if a.dtype else None
        export_checkpoint(folder, a.out, dtype=dtype, overwrite=a.overwrite)
    except GptparConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{prog}: wrote {a.out} (from {folder})")


def convert_main(argv: list[str]) -> None:
    """``gptpar convert`` is ``gptpar export``: it once wrote gptpar's own tensor names, which transformers
    accepted and then ran with random weights."""
    export_main(argv, prog="gptpar convert")
