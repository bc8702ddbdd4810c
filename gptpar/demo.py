"""`make demo`: train a small GPT with tensor parallelism (tp=2, two CPU processes) on real text.

The corpus is this machine's Python standard library source (no download), as bytes (vocabulary 256).
Launches its workers through torchrun's elastic launcher (``torch.distributed.run``); under an outer
``torchrun`` it just runs as a worker. The loss visibly falls within a minute or two on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def stdlib_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order, as int64 token ids in [0, 256)."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    data = fh.read()
                chunks.append(data)
                total += len(data)
                if total >= max_bytes:
                    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def worker(args: argparse.Namespace) -> None:
    from gptpar import GPTConfig, ParallelGPT, init_parallel

    torch.set_num_threads(1)
    st = init_parallel(tp=args.tp)
    config = GPTConfig(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=128)
    model = ParallelGPT(config, st)
    data = stdlib_corpus()
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(st.seed_for("data"))  # same batches on every tp rank

    def batch(src: torch.Tensor):
        starts = torch.randint(0, len(src) - config.seq_len - 1, (args.batch_size,), generator=gen)
        x = torch.stack([src[s : s + config.seq_len] for s in starts])
        y = torch.stack([src[s + 1 : s + 1 + config.seq_len] for s in starts])
        return x, y

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        losses = [model(*batch(val))[1].item() for _ in range(4)]
        model.train()
        return sum(losses) / len(losses)

    say = print if st.rank == 0 else (lambda *a, **k: None)
    n_params = config.num_params()
    say(
        f"gptpar demo: {n_params / 1e6:.2f}M-parameter GPT, {st.layout} on {st.world_size} CPU processes, "
        f"{len(data) / 1e6:.1f}M bytes of Python stdlib source"
    )
    first_val = val_loss()
    say(f"step {0:4d}  val loss {first_val:.3f}")
    t0, tokens = time.time(), 0
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch(train)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
        if step % args.log_every == 0 or step == args.steps:
            say(f"step {step:4d}  train loss {loss.item():.3f}  {tokens / (time.time() - t0):,.0f} tok/s")
    last_val = val_loss()
    say(
        f"step {args.steps:4d}  val loss {last_val:.3f}  (from {first_val:.3f}: "
        f"{'fell' if last_val < first_val else 'DID NOT FALL'})"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gptpar demo", description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # started by torchrun: be a worker
        worker(args)
        return
    from torch.distributed.run import parse_args, run

    passthrough = list(argv if argv is not None else sys.argv[1:])
    run(parse_args(["--standalone", f"--nproc-per-node={args.tp}", "-m", "gptpar.demo", *passthrough]))


if __name__ == "__main__":
    main()
