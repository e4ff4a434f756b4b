"""`linscale` command line: one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from linscale import __version__


def main(argv: list[str] | None = None) -> int:
    from linscale.cli import train

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="linscale",
        description="Train deep-learning models on many processes, GPUs and nodes with one command.",
    )
    parser.add_argument("--version", action="version", version=f"linscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    if not argv:
        parser.print_help()
        return 2
    args, rest = parser.parse_known_args(argv)
    try:
        return args.func(args, rest, argv)
    except BrokenPipeError:  # output piped into `head`, say
        sys.stderr.close()
        return 0
