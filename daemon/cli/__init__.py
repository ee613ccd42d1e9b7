"""The `edgechat` command: one subcommand per module; client commands never import torch.

May import anything of the daemon, lazily; nothing imports cli.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# each module exposes add_parsers(subparsers); subparsers set func(namespace) -> exit code
COMMANDS = ("serve", "chat", "build_model", "monitoring", "stack", "fleet", "soak", "memwatch", "alertsink",
            "diagnose", "tune")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (imports only the light CLI modules)."""
    parser = argparse.ArgumentParser(prog="edgechat", description="Chat inference daemon for "
                                     "edge devices, with memory-leak telemetry.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"edgechat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
