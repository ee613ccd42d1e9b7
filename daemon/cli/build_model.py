"""`edgechat build-model NAME DIR`: build a built-in model into a folder ahead of time (e.g. before serving)."""
from __future__ import annotations

import argparse
import sys


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the build-model subcommand."""
    from ..model.builtin import NAMES  # light import: no torch until the command runs

    p = subparsers.add_parser("build-model", help="Build a built-in model (random weights, real tokenizer).",
                              description="Build a built-in model into DIR, deterministically and atomically. "
                                          "Serve it with --model DIR (or --model NAME, which builds into "
                                          "--cache-dir on first use).")
    p.add_argument("name", metavar="NAME", choices=NAMES, help=" | ".join(NAMES))
    p.add_argument("dir", metavar="DIR", help="Folder to create (an existing built-in folder is replaced).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build, print where; exit code 0 on success, 1 when DIR is taken by something else."""
    from ..model.builtin import build

    try:
        folder = build(args.name, args.dir, log=print)
    except FileExistsError as exc:  # refuse to clobber a folder that is not ours
        print(f"edgechat build-model: {exc}", file=sys.stderr)
        return 1
    print(f"built {args.name} in {folder}; serve it with --model {folder}")
    return 0
