"""``gptpar train``: train a GPT across processes on real text, with checkpoints, progress and plots.

    gptpar train --nproc 4 --tp 2 --pp 2 --steps 200            # 4 CPU processes (gloo) or GPUs (NCCL)
    torchrun --nnodes 2 --nproc-per-node 8 -m gptpar.train ...   # multi-node: just joins the outer torchrun

Everything is validated before any process starts. ``--nproc N`` starts the workers through torchrun's
elastic launcher (``torch.distributed.run``; ``--max-restarts`` restarts failed workers, which resume from
the last checkpoint). Rank 0 shows a progress bar, writes ``OUT/log.jsonl`` (one line per step), and at the
end ``OUT/loss.png`` and ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass

import tomllib
import torch

from gptpar.errors import GptparConfigError
from gptpar.models.gpt import PRESETS, GPTConfig, preset
from gptpar.parallel.mesh import ParallelLayout
from gptpar.parallel.pipeline.schedules import SCHEDULES
from gptpar.precision import PRECISIONS
from gptpar.trainer import RUN_ID_ENV

ARGV_ENV = "GPTPAR_TRAIN_ARGV"
SHUTDOWN_GRACE_S = 5


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptpar train", description="Train a GPT with tensor/pipeline/data/context parallelism.")
    a = p.add_argument
    a("--config", help="TOML file of options (command-line flags override it)")
    a("--nproc", type=int, help="processes to start on this machine (default: tp*pp*dp*cp)")
    a("--tp", type=int, default=1)
    a("--pp", type=int, default=1)
    a("--dp", type=int, help="default: nproc / (tp*pp*cp)")
    a("--cp", type=int, default=1)
    a("--schedule", default="1f1b", choices=SCHEDULES)
    a("--virtual-stages", type=int, default=2, help="model chunks per rank for --schedule interleaved")
    a("--sequence-parallel", action="store_true")
    a("--recompute", action="store_true", help="full activation recomputation (keep one input per layer)")
    a("--precision", default="fp32", choices=PRECISIONS)
    a("--reduce-dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="data-parallel gradient reduction")
    a(
        "--zero",
        action="store_true",
        help="ZeRO-1: shard fp32 master weights and AdamW state across dp x cp (needs dp*cp > 1)",
    )
    a("--model", default="tiny", choices=sorted(PRESETS))
    a("--n-layer", type=int)
    a("--n-head", type=int)
    a("--d-model", type=int)
    a("--seq-len", type=int)
    a("--dropout", type=float)
    a("--steps", type=int, default=200)
    a("--batch-size", type=int, default=16, help="global batch, in sequences")
    a("--micro-batches", type=int, default=None, help="default: 2*pp with pipelining, else 1")
    a("--lr", type=float, default=3e-3)
    a("--min-lr", type=float, default=None, help="default: lr/10")
    a("--warmup", type=int, default=20)
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--eval-every", type=int, default=50)
    a("--eval-batches", type=int, default=4)
    a("--save-every", type=int, default=0, help="0: only at the end")
    a("--out", default="runs/gptpar")
    a("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    a("--overwrite", action="store_true", help="replace the previous run in --out (its checkpoints and logs)")
    a("--keep-last", type=int, default=None, help="keep only the N newest checkpoints")
    a(
        "--max-skips",
        type=int,
        default=5,
        help="stop after this many consecutive steps skipped for a non-finite loss or gradient norm",
    )
    a(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a collective may wait before the run fails, naming the ranks that stopped answering",
    )
    a(
        "--rdzv-host",
        default="127.0.0.1",
        help="address the launcher's rendezvous store listens on (loopback: nothing reachable from other hosts; "
        "multi-node runs use an outer torchrun and `python -m gptpar.train`)",
    )
    a(
        "--data",
        help="text file, folder of text files, .jsonl, .parquet, a datasets save_to_disk folder, or nanoGPT .bin "
        "(default: this machine's Python stdlib); each file or record is one document",
    )
    a("--text-field", default="text", help="the text field of .jsonl / .parquet / datasets records")
    a(
        "--doc-mask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="attention stops at document boundaries and positions restart per document (default: on when the "
        "data marks documents)",
    )
    a(
        "--tokenizer",
        default=None,
        help="bpe | bytes | PATH of a tokenizer.json (default: --init-from's tokenizer.json, else bpe)",
    )
    a(
        "--init-from",
        help="a Hugging Face model directory (GPT-2, Llama, Mistral, Qwen2/3): its config and weights, "
        "each rank reading only its slices",
    )
    a("--vocab", type=int, default=2048, help="BPE vocabulary size")
    a("--vocab-size", type=int, help="for a pre-tokenised .bin: its vocabulary size")
    a(
        "--vocab-multiple",
        type=int,
        default=128,
        help="embedding/output rows padded to a multiple of this, the same at every layout (padded logits masked)",
    )
    a("--cache-dir")
    a("--seed", type=int, default=1234)
    a("--max-restarts", type=int, default=0)
    a("--peak-tflops", type=float, default=None, help="per-rank peak for the MFU estimate (default: 989 GPU, 0.4 CPU)")
    a("--no-progress", action="store_true")
    return p


@dataclass
class Run:
    args: argparse.Namespace
    layout: ParallelLayout
    model: GPTConfig
    micro_batches: int
    nproc: int


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other refusal
        raise GptparConfigError(message)


def _toml_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A TOML file's options as command-line tokens, so argparse checks their types and choices exactly as
    it checks flags (``tp = 2.5`` names --tp, ``precision = "fp64"`` lists the choices) and booleans must be
    true or false (``resume = "no"`` is refused, not taken as true)."""
    if not os.path.exists(path):
        raise GptparConfigError(f"--config {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise GptparConfigError(f"--config {path!r} is not valid TOML: {e}") from None
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in table if k.replace("-", "_") not in actions)
    if unknown:
        raise GptparConfigError(f"--config {path!r}: unknown option(s) {unknown}")
    out = []
    for key, value in table.items():
        action = actions[key.replace("-", "_")]
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise GptparConfigError(f"--config {path!r}: {key} = {value!r} must be true or false")
            out += [flag] if value else []
        elif isinstance(value, (bool, list, dict)):
            raise GptparConfigError(f"--config {path!r}: {key} = {value!r} is not a {flag} value")
        else:
            out += [flag, str(value)]
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:  # the file's options first: flags on the command line override them
        args = parser.parse_args(_toml_argv(parser, args.config) + list(argv))
    if args.tokenizer is None:
        args.tokenizer = "bpe"
        if args.init_from:
            args.tokenizer = os.path.join(args.init_from, "tokenizer.json")
            if not os.path.exists(args.tokenizer):
                raise GptparConfigError(
                    f"--init-from {args.init_from!r} has no tokenizer.json: pass --tokenizer (bpe, bytes or a file)"
                )
    return args


def hf_model_config(args: argparse.Namespace, vocab_size: int | None) -> GPTConfig:
    """The model of ``--init-from``'s config.json; a flag that contradicts it is an error."""
    from gptpar.models.hf import HFWeights, config_from_hf

    hf = HFWeights(args.init_from)  # checks the directory's files now, before any worker starts
    config = config_from_hf(hf.config, vocab_multiple=args.vocab_multiple, dropout=args.dropout or 0.0)
    hf.close()
    for flag, field in (("n_layer", "n_layer"), ("n_head", "n_head"), ("d_model", "d_model")):
        given = getattr(args, flag)
        if given is not None and given != getattr(config, field):
            raise GptparConfigError(
                f"--{flag.replace('_', '-')} {given} contradicts {args.init_from}/config.json ({field}={getattr(config, field)})"
            )
    if args.model != "tiny":
        raise GptparConfigError(f"--model {args.model} and --init-from both name a model: pass one")
    if args.seq_len is not None and args.seq_len != config.seq_len:
        if config.position == "learned" or args.seq_len > config.seq_len:
            raise GptparConfigError(
                f"--seq-len {args.seq_len}: the model at {args.init_from} takes sequences of up to {config.seq_len}"
                + (" and has a learned position table of that length" if config.position == "learned" else "")
            )
        config = GPTConfig(**{**config.to_dict(), "seq_len": args.seq_len})  # rotary: train on shorter windows
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise GptparConfigError(
            f"the tokenizer's vocabulary ({vocab_size}) is larger than the model's vocab_size={config.vocab_size}"
        )
    return config


def resolve(args: argparse.Namespace, vocab_size: int | None = None) -> Run:
    """Check every option against every other; raises GptparConfigError naming the value and the rule."""
    rest = args.tp * args.pp * args.cp
    for name in (
        "tp",
        "pp",
        "cp",
        "steps",
        "batch_size",
        "vocab_multiple",
        "virtual_stages",
        "eval_batches",
        "keep_last",
        "max_skips",
        "nproc",
        "micro_batches",
        "dp",
        "vocab",
        "n_layer",
        "n_head",
        "d_model",
        "seq_len",
    ):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise GptparConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("lr", "min_lr", "warmup", "weight_decay", "grad_clip", "eval_every", "save_every", "max_restarts"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise GptparConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise GptparConfigError(f"--dropout={args.dropout} must be in [0, 1)")
    if not args.timeout > 0:
        raise GptparConfigError(f"--timeout={args.timeout} must be > 0 seconds")
    if args.dp is None:
        nproc = args.nproc or rest
        if nproc % rest:
            raise GptparConfigError(f"--nproc {nproc} is not divisible by tp*pp*cp = {rest}")
        dp = nproc // rest
    else:
        dp = args.dp
        nproc = args.nproc or rest * dp
    layout = ParallelLayout(tp=args.tp, pp=args.pp, dp=dp, cp=args.cp)
    if nproc != layout.world_size:
        raise GptparConfigError(f"--nproc {nproc} != tp*pp*dp*cp = {layout.world_size}")
    if args.init_from:
        model = hf_model_config(args, vocab_size)
    else:
        over = {
            k: getattr(args, k)
            for k in ("n_layer", "n_head", "d_model", "seq_len", "dropout")
            if getattr(args, k) is not None
        }
        if vocab_size is not None:
            over["vocab_size"] = vocab_size  # the true vocabulary; the model pads its rows by vocab_multiple
        over["vocab_multiple"] = args.vocab_multiple
        model = preset(args.model, **over)
    layout.validate_model(model)
    if args.schedule in ("interleaved", "zbv", "dualpipev") and args.pp == 1:
        raise GptparConfigError(f"--schedule {args.schedule} needs --pp > 1")
    m = args.micro_batches or (2 * args.pp if args.pp > 1 else 1)
    if args.schedule in ("zbv", "dualpipev") and model.n_layer + 2 < 2 * args.pp:
        raise GptparConfigError(
            f"{model.n_layer} layers + embedding + head cannot fill the 2*pp = {2 * args.pp} stages of "
            f"--schedule {args.schedule} (two chunks per rank)"
        )
    if args.schedule == "dualpipev" and m < 2 * args.pp:
        raise GptparConfigError(f"--micro-batches {m} must be at least 2*pp = {2 * args.pp} for --schedule dualpipev")
    if args.schedule == "interleaved":
        if m % args.pp:
            raise GptparConfigError(
                f"--micro-batches {m} must be divisible by --pp {args.pp} for the interleaved schedule"
            )
        if model.n_layer + 2 < args.pp * args.virtual_stages:
            raise GptparConfigError(
                f"{model.n_layer} layers + embedding + head cannot fill pp*virtual_stages = {args.pp * args.virtual_stages} stages"
            )
    if args.zero and dp * args.cp == 1:
        raise GptparConfigError(
            f"--zero shards the optimizer state across data- and context-parallel ranks: it needs dp*cp > 1, got "
            f"dp={dp} cp={args.cp}"
        )
    if args.batch_size % (dp * m):
        raise GptparConfigError(f"--batch-size {args.batch_size} is not divisible by dp*micro_batches = {dp}*{m}")
    if args.cp > 1 and model.dropout > 0:
        raise GptparConfigError(
            "--dropout > 0 is not supported with --cp > 1 (attention dropout under context parallelism)"
        )
    if args.precision == "fp16" and not torch.cuda.is_available():
        print("gptpar train: note: fp16 matmuls are very slow on CPU; prefer --precision bf16", file=sys.stderr)
    if args.resume and not os.path.exists(os.path.join(args.out, "checkpoints", "latest")):
        raise GptparConfigError(f"--resume: no checkpoint in {args.out!r}")
    return Run(args, layout, model, m, nproc)


# ---------------------------------------------------------------------------------------------- worker
def worker(argv: list[str]) -> None:
    """One rank of the run: :class:`gptpar.trainer.Trainer` over the parsed command line."""
    from gptpar.corpus import prepare
    from gptpar.trainer import Trainer

    args = parse(argv)
    corpus = prepare(args.data, args.tokenizer, args.vocab, args.cache_dir, text_field=args.text_field)
    args.doc_mask = doc_masking(args, corpus)
    Trainer(args, resolve(args, args.vocab_size or corpus.vocab_size), corpus).train()


# ---------------------------------------------------------------------------------------------- launcher
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "LOCAL_RANK" in os.environ:  # started by torchrun (ours or an outer one): be a worker
        # Our launcher hands the options over in the environment: torchrun's own parser would otherwise
        # take abbreviations such as --nproc for its --nproc-per-node.
        from gptpar.parallel.mesh import shutdown_parallel

        worker(json.loads(os.environ[ARGV_ENV]) if ARGV_ENV in os.environ else argv)
        shutdown_parallel()
        # Skip the interpreter's teardown: a gloo thread still joinable there aborts the process
        # ("terminate called without an active exception") after a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    try:
        args = parse(argv)
        from gptpar.corpus import prepare

        # Tokenise once here, before any worker starts (they then hit the cache), and validate everything.
        corpus = prepare(
            args.data,
            args.tokenizer,
            args.vocab,
            args.cache_dir,
            text_field=args.text_field,
            progress=not args.no_progress,
        )
        doc_masking(args, corpus)
        run = resolve(args, args.vocab_size or corpus.vocab_size)
        check_data(corpus, run.model.seq_len, args)
        run_id = prepare_out(args, run)
    except GptparConfigError as e:
        print(f"gptpar train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    launch(run, args, argv, run_id)


def doc_masking(args: argparse.Namespace, corpus) -> bool:
    """Whether attention stops at document boundaries: on by default when the data marks documents (an
    end-of-text token), off with ``--no-doc-mask``; the same at every layout."""
    on = corpus.eot is not None if args.doc_mask is None else args.doc_mask
    if on and corpus.eot is None:
        raise GptparConfigError(
            "--doc-mask: the data marks no document boundaries (a pre-tokenised .bin, or a tokenizer.json with no "
            "end-of-text token)"
        )
    return on


def check_data(corpus, seq_len: int, args: argparse.Namespace) -> None:
    """Both splits hold at least one training window."""
    for name, tokens, needed in (("training", corpus.train, True), ("validation", corpus.val, args.eval_every > 0)):
        if needed and len(tokens) <= seq_len + 1:
            raise GptparConfigError(
                f"the {name} split has {len(tokens)} tokens, fewer than one window of seq_len+1 = {seq_len + 1}: "
                "add data or shorten --seq-len" + (" (or --eval-every 0)" if name == "validation" else "")
            )


def prepare_out(args: argparse.Namespace, run: Run) -> str:
    """The run's identity, and OUT made ready for it: ``--resume`` continues the run in OUT (its checkpoint
    verified whole first); a new run refuses an OUT that holds another unless ``--overwrite``, which clears it.
    Checks that OUT is writable. Returns the run id."""
    import uuid

    from gptpar import checkpoint

    out = args.out
    previous = [n for n in ("checkpoints", "log.jsonl") if os.path.exists(os.path.join(out, n))]
    if args.resume:
        folder = checkpoint.latest(out)
        if folder is None:
            raise GptparConfigError(f"--resume: no checkpoint in {out!r}")
        meta = checkpoint.verify(folder)
        checkpoint.check_config(meta, run.model.to_dict(), folder)  # another model's checkpoint: refused here
        run_id = meta.get("run_id") or uuid.uuid4().hex
    elif previous and not args.overwrite:
        raise GptparConfigError(
            f"--out {out!r} holds a previous run ({', '.join(previous)}): pass --resume to continue it or "
            "--overwrite to replace it"
        )
    else:
        for n in ("checkpoints", "log.jsonl", "summary.json", "loss.png", "tokenizer", ".killed-once"):
            path = os.path.join(out, n)
            shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
        run_id = uuid.uuid4().hex
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise GptparConfigError(f"--out {out!r} is not writable: {e.strerror or e}") from None
    return run_id


_LISTENERS: list = []  # sockets behind the launcher's stores (kept open as long as the stores)


def _store_on(host: str, port: int = 0):
    """A TCPStore server listening on ``host`` only. (A TCPStore binds every interface by itself; on a
    socket bound beforehand it listens where that socket does.)"""
    import socket

    from torch.distributed import TCPStore

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    _LISTENERS.append(sock)
    port = sock.getsockname()[1]
    store = TCPStore(
        host, port, is_master=True, master_listen_fd=sock.fileno(), wait_for_workers=False, multi_tenant=True
    )
    _LISTENERS.append(store)
    return store, port


def launch(run: Run, args: argparse.Namespace, argv: list[str], run_id: str) -> None:
    """Start the workers with torchrun's elastic agent, on this machine. The rendezvous store and the
    workers' store listen on ``--rdzv-host`` only (loopback by default: nothing reachable from another
    host); so do gloo's and NCCL's sockets when it is loopback."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import PContext
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    host = args.rdzv_host
    _, port = _store_on(host)
    for fn in (LocalElasticAgent._shutdown, PContext.close):
        if fn.__defaults__ and len(fn.__defaults__) == 2 and fn.__defaults__[1] == 30:
            # After a failure the other workers get SIGTERM, then SIGKILL after this grace (torch's default
            # 30 s): a stopped or hung worker never acts on SIGTERM, so do not wait long for it.
            fn.__defaults__ = (fn.__defaults__[0], SHUTDOWN_GRACE_S)
    if hasattr(dynamic_rendezvous.DynamicRendezvousHandler, "_create_tcp_store_server"):
        # the store torchrun makes for the workers' process group: on the same host only
        dynamic_rendezvous.DynamicRendezvousHandler._create_tcp_store_server = lambda self, addr, p: _store_on(host)[0]
    if host in ("127.0.0.1", "::1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    launch_args = [
        "--nnodes=1",
        f"--nproc-per-node={run.nproc}",
        f"--max-restarts={args.max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{port}",
        "--rdzv-conf=is_host=false",
        f"--rdzv-id={run_id}",
        f"--local-addr={host}",
        "-m",
        "gptpar.train",
    ]
    os.environ[ARGV_ENV] = json.dumps(argv)
    os.environ[RUN_ID_ENV] = run_id
    try:
        torchrun(parse_args(launch_args))
    except Exception as e:  # torchrun's ChildFailedError already printed each rank's traceback
        print(f"gptpar train: failed: {type(e).__name__}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
