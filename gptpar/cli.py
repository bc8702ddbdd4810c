"""The ``gptpar`` command: ``train``, ``generate``, ``export`` (``convert``), ``plan`` and ``demo``."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "train a GPT across processes (gptpar train --help)",
    "generate": "sample text from a checkpoint on one process",
    "export": "write a checkpoint (any layout) as a Hugging Face transformers model directory",
    "convert": "the same as export",
    "plan": "rank the parallel layouts that fit a model on a cluster (memory and time estimates)",
    "demo": "what `make demo` runs: a small GPT, tp=2 x pp=2 on 4 CPU processes",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:9s} {what}" for name, what in COMMANDS.items()]
        print("usage: gptpar COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ngptpar: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from gptpar.train import main as train_main

        train_main(rest)
    elif cmd == "plan":
        from gptpar.planner import main as plan_main

        plan_main(rest)
    elif cmd == "demo":
        from gptpar.demo import main as demo_main

        demo_main(rest)
    else:
        from gptpar.tools import convert_main, export_main, generate_main

        {"generate": generate_main, "export": export_main, "convert": convert_main}[cmd](rest)


if __name__ == "__main__":
    main()
