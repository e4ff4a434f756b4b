"""`linscale preprocess CORPUS --out OUT`: tokenize a corpus into token shards on every worker of a job."""

from __future__ import annotations

import argparse
from pathlib import Path

from linscale.cli.common import add_launch_args, check_launcher, error, launch_spec, role, run_as_worker
from linscale.runtime.launch import LaunchError, spawn

USER_ERRORS = (LaunchError, ValueError)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="tokenize a text corpus into token shards for pretraining",
        description="Tokenize CORPUS (a text or JSONL file, or a directory tree of them; hidden files and "
        "folders are left out) into OUT: token shards, tokenizer.json and index.json (written last). The "
        "work is cut into units that the job's workers take largest first; a rerun of an interrupted job "
        "skips the units already done. Across nodes, OUT must be on a file system every node sees.",
    )
    p.add_argument("corpus", help="a text file, a .jsonl file (a 'text' field per line) or a directory of them")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument(
        "--tokenizer",
        default="bytes",
        help="bytes (UTF-8 bytes, vocab 257; default), bpe (train a byte-level BPE on the corpus) or the path "
        "of a tokenizer.json",
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096)")
    p.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of units held out for validation (default: 0.01)"
    )
    p.add_argument("--unit-mb", type=float, default=64.0, help="files larger than this are cut into ranges (64)")
    p.add_argument("--sample-mb", type=float, default=64.0, help="MB of the corpus BPE is trained on (default: 64)")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="take only files whose path under CORPUS matches GLOB (repeatable; '*' crosses directories, "
        "so '*.py' takes Python files at any depth)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files whose path under CORPUS matches GLOB (repeatable), e.g. 'site-packages/*'",
    )
    p.add_argument(
        "--schedule",
        choices=("dynamic", "static"),
        default="dynamic",
        help="dynamic (default): workers take the next unit, largest first; static: a fixed round-robin split "
        "of the units, for comparison",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a worker may wait for the others (1800)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_launch_args(p)
    p.set_defaults(func=run_cli)


def _options(args: argparse.Namespace):
    from linscale.data.preprocess import Options

    return Options(
        corpus=Path(args.corpus),
        out=Path(args.out),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        unit_mb=args.unit_mb,
        sample_mb=args.sample_mb,
        timeout=args.timeout,
        progress=not args.no_progress,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        schedule=args.schedule,
    )


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    if rest:
        return error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        from linscale.data import preprocess

        opts = _options(args)
        if role(args) == "worker":
            return run_as_worker(lambda: preprocess.run(opts), USER_ERRORS)
        from linscale.runtime.device import local_device_count

        spec = launch_spec(args, args.nproc_per_node or local_device_count("cpu"))
        check_launcher(spec)
        _, _, state = preprocess.check(opts)
        if state == "done":
            print(preprocess.done_message(opts.out), flush=True)
            return 0
        if spec.nproc_per_node == 1 and not spec.multi_node:
            preprocess.run(opts)
            return 0
        spawn(spec, argv, log_dir=str(opts.out / ".workers"))
        return 0
    except USER_ERRORS as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted")
