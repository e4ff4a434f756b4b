"""`linscale` command line: one module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

# torch's C++ warnings (socket retries with stack traces) bury linscale's own messages;
# errors still show. Set TORCH_CPP_LOG_LEVEL=INFO to see everything.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from linscale import __version__

# One module per subcommand; each defines add_parser(subparsers).
SUBCOMMANDS = ("train", "doctor", "slurm", "cluster", "preprocess", "export", "data", "estimate", "plan", "bench")


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="linscale",
        description="Train deep-learning models on many processes, GPUs and nodes with one command.",
    )
    parser.add_argument("--version", action="version", version=f"linscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"linscale.cli.{name}").add_parser(sub)
    if not argv:
        parser.print_help()
        return 2
    args, rest = parser.parse_known_args(argv)
    try:
        return args.func(args, rest, argv)
    except BrokenPipeError:  # output piped into `head`, say
        sys.stderr.close()
        return 0
