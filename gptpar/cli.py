"""The ``gptpar`` command. Subcommands arrive with their features; today: ``demo``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "train a small GPT with tp=2 on two CPU processes (what `make demo` runs)"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = [f"  {name:8s} {what}" for name, what in commands.items()]
        print("usage: gptpar COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ngptpar: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    if argv[0] == "demo":
        from gptpar.demo import main as demo_main

        demo_main(argv[1:])


if __name__ == "__main__":
    main()
