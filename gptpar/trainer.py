"""The training loop of ``gptpar train`` as a :class:`Trainer`: setup, one step (a pipeline step or
micro-batches), the optimizer step, evaluation, logging, checkpoints and the end-of-run summary, each a
short method. ``gptpar.train.worker`` is ``Trainer(args).train()`` on every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time

import torch

from gptpar import checkpoint
from gptpar.parallel import comm
from gptpar.parallel.mesh import init_parallel
from gptpar.precision import DynamicLossScaler, autocast, clip_grad_norm_
from gptpar.testing import fault_point

RUN_ID_ENV = "GPTPAR_RUN_ID"  # the launcher names the run; checkpoints carry it; restarts resume only it


def lr_at(step: int, args: argparse.Namespace) -> float:
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def stop_nonfinite(args, step: int, bad: int, loss: float, rank0: bool) -> None:
    """Every rank stops alike (they share the loss and the global norm) with one clear line; no checkpoint
    is written from a state that kept producing non-finite values."""
    if rank0:
        from gptpar import checkpoint

        last = checkpoint.latest(args.out)
        print(
            f"gptpar train: error: stopping at step {step + 1}: {bad} consecutive steps had a non-finite loss or "
            f"gradient norm (last loss {loss}); they were skipped, the weights are unchanged since; last checkpoint: "
            f"{last or 'none'} (lower --lr, or raise --max-skips)",
            file=sys.stderr,
            flush=True,
        )
    sys.stderr.flush()
    os._exit(4)


def keep_tokenizer(tokenizer_json: str | None, init_from: str | None, folder: str) -> None:
    """Copy the run's tokenizer (and, from a Hugging Face directory, its other tokenizer files) into OUT."""
    from gptpar.models.hf import TOKENIZER_FILES

    os.makedirs(folder, exist_ok=True)
    if init_from:
        for fn in TOKENIZER_FILES:
            if os.path.exists(os.path.join(init_from, fn)):
                shutil.copy(os.path.join(init_from, fn), os.path.join(folder, fn))
    if tokenizer_json:
        shutil.copy(tokenizer_json, os.path.join(folder, "tokenizer.json"))


def plot_losses(log_path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


class Trainer:
    """One rank of a ``gptpar train`` run (``args``: the parsed command line)."""

    def __init__(self, args: argparse.Namespace, run, corpus) -> None:
        """``run``: the resolved layout, model and micro-batches (:func:`gptpar.train.resolve`); ``corpus``:
        the tokenised data (:func:`gptpar.corpus.prepare`)."""
        self.args = args
        self.run_id = os.environ.get(RUN_ID_ENV) or os.environ.get("TORCHELASTIC_RUN_ID", "none")
        self.corpus, self.run = corpus, run
        torch.manual_seed(args.seed)
        self.st = init_parallel(self.run.layout, seed=args.seed, timeout=args.timeout)
        comm.start_heartbeat(self.st.world)  # a timed-out collective then names the ranks that stopped answering
        self.cfg = self.run.model
        self.rank0 = self.st.rank == 0
        self.build_model()
        self.build_optimizer()
        self.meta = self.run_meta()
        self.start = self.resume()
        self.log_path = os.path.join(args.out, "log.jsonl")
        self.open_log()
        self.per_dp = args.batch_size // self.st.dp.size
        self.comm_s, self.tokens_done = 0.0, 0

    # -- setup
    def build_model(self) -> None:
        """This rank's model chunks (and the pipeline engine when pp > 1), with --init-from's weights."""
        from gptpar.models.parallel_gpt import ParallelGPT
        from gptpar.pipeline import make_pipeline

        args, st = self.args, self.st
        options = {"sequence_parallel": args.sequence_parallel, "recompute": args.recompute}
        if args.init_from:
            options["init_weights"] = False  # every parameter is read from --init-from below
        self.engine = None
        if args.pp > 1:
            v = args.virtual_stages if args.schedule == "interleaved" else 1
            self.engine, part = make_pipeline(self.cfg, st, args.schedule, self.run.micro_batches, v, **options)
            self.chunks = self.engine.chunks
            if self.rank0:
                print(part.report())
        else:
            self.chunks = [ParallelGPT(self.cfg, st, **options)]
        self.hf_meta = None
        if args.init_from:
            from gptpar.models.hf import HFWeights, load_hf_weights

            weights = HFWeights(args.init_from)
            for c in self.chunks:  # each rank reads only its own slices; before the optimizer copies any weight
                load_hf_weights(c, weights, st)
            weights.close()
            self.hf_meta = {"architecture": weights.config.get("architectures", [None])[0], "config": weights.config}
        self.params = [p for c in self.chunks for p in c.parameters()]

    def build_optimizer(self) -> None:
        """Data parallelism over dp x cp (summed: each rank's loss is already its share of the global token
        mean), AdamW (ZeRO-1 with --zero) with weight decay on matrices only, fp16's loss scaler."""
        from gptpar.parallel.data import DataParallel
        from gptpar.parallel.zero import ZeroAdamW

        args, st, params = self.args, self.st, self.params
        reduce_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.reduce_dtype]
        self.ddp = None
        if st.dp.size * st.cp.size > 1:
            self.ddp = DataParallel(params, st, reduce_dtype=reduce_dtype, shard_grads=args.zero, average=False)
        if args.zero:
            self.opt = ZeroAdamW(
                self.ddp, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay, decay=lambda p: p.dim() >= 2
            )
        else:
            groups = [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
            self.opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
        self.scaler = DynamicLossScaler(st) if args.precision == "fp16" else None

    def run_meta(self) -> dict:
        """What every checkpoint records about the run; rank 0 keeps the tokenizer files inside OUT."""
        args = self.args
        tokenizer_dir = os.path.join(args.out, "tokenizer")
        if self.rank0:  # generate and export never depend on a cache path
            keep_tokenizer(self.corpus.tokenizer_path, args.init_from, tokenizer_dir)
        tokenizer = os.path.join(tokenizer_dir, "tokenizer.json") if self.corpus.tokenizer_path else None
        return {
            "model": self.cfg.to_dict(),
            "tokenizer": tokenizer,
            "tokenizer_dir": tokenizer_dir,
            "data": args.data,
            "args": vars(args),
            "hf": self.hf_meta,
            "run_id": self.run_id,
        }

    def resume(self) -> int:
        """The step to start from: the latest checkpoint's with --resume, or after a restart of this same run
        (a new run that fails before its first save starts over, never from what an earlier run left)."""
        args = self.args
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        folder = checkpoint.latest(args.out)
        if folder is None or not (
            args.resume or (restarted and checkpoint.read_meta(folder).get("run_id") == self.run_id)
        ):
            return 0
        loaded = checkpoint.load(folder, self.chunks, self.opt, self.st, self.cfg.to_dict())
        if self.scaler is not None and "scaler" in loaded["extra"]:  # weights and optimizer state, resharded
            self.scaler.load_state_dict(loaded["extra"]["scaler"])
        return loaded["step"]

    def open_log(self) -> None:
        """Rank 0's log keeps the lines up to the resumed step."""
        if not self.rank0:
            return
        os.makedirs(self.args.out, exist_ok=True)
        kept = []
        if self.start > 0 and os.path.exists(self.log_path):
            with open(self.log_path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= self.start]
        with open(self.log_path, "w") as f:
            f.writelines(kept)

    # -- the loop
    def train(self) -> None:
        args = self.args
        bar = self.progress_bar()
        t_run = time.perf_counter()
        bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient norm
        for step in range(self.start, args.steps):
            fault_point(step, self.st.rank, self.st.world_size, args.out)
            if step == self.start + 1 and self.st.device.type != "cuda":
                record = self.tracked_step(step)  # CPU: no allocator statistics, so track this one step
                self.tracked_at = step + 1
            else:
                record = self.train_step(step)
            bad_steps = bad_steps + 1 if record["nonfinite"] else 0
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                record["val_loss"] = self.evaluate()
            self.log(record, bar)
            if bad_steps >= args.max_skips:  # logged first: the log shows the skipped steps
                stop_nonfinite(args, step, bad_steps, record["loss"], self.rank0)
            if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
                self.save(step + 1)
        if bar:
            bar.close()
        self.summarize(time.perf_counter() - t_run)

    def tracked_step(self, step: int) -> dict:
        """:meth:`train_step` with every tensor storage it allocates tracked: its peak tensor memory (what a
        GPU's allocator peak measures; reported beside the process RSS)."""
        from gptpar.memory import step_peak_bytes

        out = {}
        extra = [b.grad for b in self.ddp.buckets] if self.ddp else []
        self.tensor_peak = step_peak_bytes(
            lambda: out.update(self.train_step(step)), self.chunks, self.opt, extra=extra
        )
        return out

    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch ``step``; returns its log record."""
        from gptpar.corpus import get_batch
        from gptpar.parallel.data import global_token_count

        args, st = self.args, self.st
        t0 = time.perf_counter()
        lr = self.lr_for(step)
        x, y = get_batch(self.corpus.train, self.cfg.seq_len, self.per_dp, args.seed, step, st.dp.rank, st.dp.size)
        x, y, doc = self.documents(x.to(st.device), y.to(st.device))
        count = global_token_count(y, st)  # the loss is sum over valid tokens / this, at every layout
        run = self.pp_forward_backward if self.engine is not None else self.forward_backward
        loss = run(x, y, count, self.scaler.scale if self.scaler else 1.0, doc)
        tc = time.perf_counter()
        if self.ddp:
            self.ddp.finish()
        self.comm_s += time.perf_counter() - tc
        loss = loss.detach().float()
        comm.all_reduce(loss, st.dp)  # the dp ranks' shares add up to the global token-weighted mean
        loss_value = loss.item()  # the same on every rank
        skip, nonfinite = self.optimizer_step(loss_value)
        dt = time.perf_counter() - t0
        tokens = args.batch_size * self.cfg.seq_len
        self.tokens_done += tokens
        return {
            "step": step + 1,
            "loss": loss_value,
            "lr": lr,
            "tokens_per_s": tokens / dt,
            "mfu": tokens / dt * self.flops_per_token() / (self.peak_flops() * st.world_size),
            "time_s": dt,
            "loss_scale": self.scaler.scale if self.scaler else None,
            "skipped": bool(skip),
            "nonfinite": nonfinite,
        }

    def lr_for(self, step: int) -> float:
        lr = lr_at(step, self.args)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def documents(self, x: torch.Tensor, y: torch.Tensor):
        """With document masking: each token's document within its window, and no target across a boundary
        (an end-of-text token's next token starts another document)."""
        if not getattr(self.args, "doc_mask", False):
            return x, y, None
        from gptpar.corpus import document_ids

        eot = self.corpus.eot
        return x, y.masked_fill(x == eot, -100), document_ids(x, eot)

    def pp_forward_backward(self, x, y, count, scale: float, doc=None) -> torch.Tensor:
        """The pipeline engine's step over the batch's micro-batches (data-parallel sync once, at the end)."""
        sync = self.ddp.no_sync() if self.ddp else contextlib.nullcontext()
        with sync, autocast(self.args.precision, self.st.device.type):
            loss = self.engine.step(x, y, loss_scale=scale, normalizer=count, doc_ids=doc)
        self.comm_s += self.engine.last_stats.blocked_s
        return loss

    def forward_backward(self, x, y, count, scale: float, doc=None) -> torch.Tensor:
        """Gradient accumulation over the micro-batches; data-parallel reduction overlaps the last one."""
        m = self.run.micro_batches
        xs, ys = x.chunk(m), y.chunk(m)
        docs = doc.chunk(m) if doc is not None else [None] * m
        total = torch.zeros((), device=self.st.device)
        for i in range(m):
            sync = self.ddp.no_sync() if (self.ddp and i < m - 1) else contextlib.nullcontext()
            with sync:
                with autocast(self.args.precision, self.st.device.type):
                    # [1]: the logits (the largest tensor of the step) are dropped at once, not held by a
                    # name through backward
                    loss_i = self.chunks[0](xs[i], ys[i], loss_normalizer=count, doc_ids=docs[i])[1]
                (loss_i * scale).backward()
            total += loss_i.detach().float()
        return total

    def optimizer_step(self, loss_value: float) -> tuple[bool, bool]:
        """Unscale (fp16), clip by the global norm (always computed: a non-finite norm skips the step on
        every rank alike), step, clear the gradients. Returns ``(skipped, non-finite)``."""
        args, st = self.args, self.st
        skip = False
        if self.scaler:
            skip = (
                self.scaler.unscale_tensors_(self.opt.grad_shards()) if args.zero else self.scaler.unscale_(self.params)
            )
        nonfinite = not math.isfinite(loss_value)
        if not skip:
            max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
            norm = self.opt.clip_grad_norm_(max_norm, st) if args.zero else clip_grad_norm_(self.params, max_norm, st)
            nonfinite = nonfinite or not math.isfinite(float(norm))
            skip = nonfinite
            if not skip:
                self.opt.step()
        if self.scaler:
            self.scaler.update(skip)
        if self.ddp:
            self.ddp.zero_grad()
        else:
            self.opt.zero_grad(set_to_none=True)
        return skip, nonfinite

    # -- evaluation, logging, checkpoints
    def evaluate(self) -> float:
        """The token-weighted mean validation loss over --eval-batches batches, the same on every rank."""
        from gptpar.corpus import get_batch
        from gptpar.parallel.data import global_token_count

        args, st = self.args, self.st
        for c in self.chunks:
            c.eval()
        losses = []
        for i in range(args.eval_batches):
            x, y = get_batch(self.corpus.val, self.cfg.seq_len, self.per_dp, args.seed + 7, i, st.dp.rank, st.dp.size)
            x, y, doc = self.documents(x.to(st.device), y.to(st.device))
            count = global_token_count(y, st)  # each batch: its dp shares add up to its token mean
            with torch.no_grad(), autocast(args.precision, st.device.type):
                if self.engine:
                    loss = self.engine.evaluate(x, y, normalizer=count, doc_ids=doc)
                else:
                    loss = self.chunks[0](x, y, loss_normalizer=count, doc_ids=doc)[1]
            losses.append(loss.float())
        for c in self.chunks:
            c.train()
        val = torch.stack(losses).sum()
        comm.all_reduce(val, st.dp)
        return val.item() / args.eval_batches

    def progress_bar(self):
        if not self.rank0 or self.args.no_progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.args.steps, initial=self.start, desc="train", dynamic_ncols=True, file=sys.stderr)

    def log(self, record: dict, bar) -> None:
        if not self.rank0:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if bar:
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                tok_s=f"{record['tokens_per_s']:,.0f}",
                mfu=f"{record['mfu']:.1%}",
                lr=f"{record['lr']:.2e}",
                scale=self.scaler.scale if self.scaler else "-",
            )
            bar.update(1)

    def save(self, step: int) -> None:
        extra = {"scaler": self.scaler.state_dict()} if self.scaler else {}
        checkpoint.save(self.args.out, step, self.chunks, self.opt, self.st, self.meta, extra)
        if self.args.keep_last and self.rank0:
            checkpoint.prune(self.args.out, self.args.keep_last)

    def flops_per_token(self) -> float:
        cfg = self.cfg
        return 6 * cfg.num_params() + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len

    def peak_flops(self) -> float:
        return (self.args.peak_tflops or (989.0 if self.st.device.type == "cuda" else 0.4)) * 1e12

    def summarize(self, elapsed: float) -> None:
        """summary.json and loss.png (rank 0): throughput, each rank's peak memory, communication time."""
        from gptpar.memory import rss_peak_bytes

        args, st = self.args, self.st
        if st.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(st.device)  # the caching allocator's peak over the run
        else:
            peak = getattr(self, "tensor_peak", 0)  # tracked over one step (0: the run had one step)
        both = torch.tensor([peak, rss_peak_bytes()], dtype=torch.float64, device=st.device)
        mems, rss = comm.all_gather(both, st.world, 0).view(-1, 2).t().tolist()
        if not self.rank0:
            return
        summary = {
            "steps": args.steps,
            "layout": str(st.layout),
            "tokens_per_s": self.tokens_done / elapsed if elapsed else 0,
            "peak_memory_bytes_per_rank": mems,  # tensors: allocator peak (GPU) or tracked step peak (CPU)
            "peak_rss_bytes_per_rank": rss,  # the whole process, interpreter and libraries included
            "time_in_communication_s_rank0": self.comm_s,
            "elapsed_s": elapsed,
        }
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        png = os.path.join(args.out, "loss.png")
        plot_losses(self.log_path, png)
        if st.device.type == "cuda":
            tensors = f"{max(mems) / 2**20:.1f} MiB (allocator; "
        elif getattr(self, "tracked_at", None):
            tensors = f"{max(mems) / 2**20:.1f} MiB (tracked over step {self.tracked_at}; "
        else:  # the tracked step is the run's second: a one-step run has none
            tensors = "not tracked (one step; "
        print(
            f"gptpar train: {args.steps} steps, {summary['tokens_per_s']:,.0f} tokens/s, peak tensor memory per "
            f"rank {tensors}process RSS {max(rss) / 2**20:.0f} MiB), {self.comm_s:.1f}s in communication (rank 0); "
            f"log {self.log_path}, plot {png}"
        )
