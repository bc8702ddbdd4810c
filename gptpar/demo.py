"""`make demo`: train a small GPT with tensor x pipeline parallelism (tp=2 x pp=2, four CPU processes) on
this machine's Python standard library source (byte-level BPE, no download). A few minutes on 2 cores;
the loss visibly falls. Any ``gptpar train`` option may be added or overridden."""

from __future__ import annotations

import sys

DEFAULTS = [
    "--nproc",
    "4",
    "--tp",
    "2",
    "--pp",
    "2",
    "--model",
    "tiny",
    "--steps",
    "300",
    "--batch-size",
    "16",
    "--eval-every",
    "50",
    "--out",
    "runs/demo",
]


def main(argv: list[str] | None = None) -> None:
    from gptpar.train import main as train_main

    train_main(DEFAULTS + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
