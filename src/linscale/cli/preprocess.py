"""`linscale preprocess CORPUS --out OUT`: tokenize a corpus into token shards, or pack an image folder
into image shards, on every worker of a job."""

from __future__ import annotations

import argparse
from pathlib import Path

from linscale.cli.common import add_launch_args, check_launcher, error, launch_spec, role, run_as_worker
from linscale.runtime.launch import LaunchError, spawn

USER_ERRORS = (LaunchError, ValueError)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="tokenize a text corpus into token shards, or pack an image folder into a few large shards",
        description="Tokenize CORPUS (a text or JSONL file, or a directory tree of them; hidden files and "
        "folders are left out) into OUT: token shards, tokenizer.json and index.json (written last). An "
        "image folder (CORPUS/<class>/<images> or CORPUS/<split>/<class>/<images>) is instead packed into a "
        "few large shard files of the images' unchanged bytes, with a sample table per split and index.json "
        "(see docs/image-shards.md). The work is cut into units that the job's workers take largest first; a "
        "rerun of an interrupted job skips the units already done. Across nodes, OUT must be on a file system "
        "every node sees.",
    )
    p.add_argument(
        "corpus",
        help="a text file, a .jsonl file (a 'text' field per line) or a directory of them; or an image folder",
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument(
        "--kind",
        choices=("auto", "text", "images"),
        default="auto",
        help="auto (default): images when CORPUS is a folder of class folders holding mostly image files, else text",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="(text) bytes (UTF-8 bytes, vocab 257; default), bpe (train a byte-level BPE on the corpus) or the "
        "path of a tokenizer.json",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="(text) BPE vocabulary size (default: 4096)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="(text) share of units held out for validation (default: 0.01); an image folder's splits are its "
        "split folders",
    )
    p.add_argument(
        "--unit-mb",
        type=float,
        default=None,
        help="text: files larger than this are cut into ranges (default: 64); images: MB of image files per "
        "shard (default: 256)",
    )
    p.add_argument(
        "--sample-mb", type=float, default=None, help="(text) MB of the corpus BPE is trained on (default: 64)"
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="(images) pack the files' bytes without decoding each one first; undecodable images are then "
        "skipped when training reads them instead of being left out here",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="(text) take only files whose path under CORPUS matches GLOB (repeatable; '*' crosses directories, "
        "so '*.py' takes Python files at any depth)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="(text) leave out files whose path under CORPUS matches GLOB (repeatable), e.g. 'site-packages/*'",
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


TEXT_FLAGS = (
    ("--tokenizer", "tokenizer"),
    ("--vocab-size", "vocab_size"),
    ("--val-fraction", "val_fraction"),
    ("--sample-mb", "sample_mb"),
    ("--include", "include"),
    ("--exclude", "exclude"),
)


def _kind(args: argparse.Namespace) -> str:
    """ "text" or "images", checking that the flags given fit it (ValueError naming the fix)."""
    if args.kind == "auto":
        from linscale.data.image_shards import detect_kind

        kind = detect_kind(args.corpus)
        why = f"{args.corpus} is an image folder (class folders of image files)"
    else:
        kind = args.kind
        why = "--kind images"
    if kind == "images":
        given = [flag for flag, name in TEXT_FLAGS if getattr(args, name) not in (None, [])]
        if given:
            fix = "pass --kind text to tokenize it as text" if args.kind == "auto" else "drop --kind images"
            raise ValueError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for text corpora, but {why}, which "
                f"is packed into image shards; drop {'it' if len(given) == 1 else 'them'}, or {fix}"
            )
    elif args.no_verify:
        raise ValueError(f"--no-verify is for image folders, but {args.corpus} is preprocessed as text; drop it")
    return kind


def _options(args: argparse.Namespace):
    from linscale.data.preprocess import Options

    given = {
        "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size,
        "val_fraction": args.val_fraction,
        "unit_mb": args.unit_mb,
        "sample_mb": args.sample_mb,
    }
    return Options(
        corpus=Path(args.corpus),
        out=Path(args.out),
        timeout=args.timeout,
        progress=not args.no_progress,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        schedule=args.schedule,
        **{k: v for k, v in given.items() if v is not None},
    )


def _image_options(args: argparse.Namespace):
    from linscale.data.image_shards import DEFAULT_UNIT_MB, ImageOptions

    return ImageOptions(
        source=Path(args.corpus),
        out=Path(args.out),
        unit_mb=DEFAULT_UNIT_MB if args.unit_mb is None else args.unit_mb,
        verify=not args.no_verify,
        timeout=args.timeout,
        progress=not args.no_progress,
        schedule=args.schedule,
    )


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    if rest:
        return error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        kind = _kind(args)
        if kind == "images":
            from linscale.data import image_shards as job

            opts = _image_options(args)
        else:
            from linscale.data import preprocess as job

            opts = _options(args)
        if role(args) == "worker":
            return run_as_worker(lambda: job.run(opts), USER_ERRORS)
        from linscale.runtime.device import local_device_count

        spec = launch_spec(args, args.nproc_per_node or local_device_count("cpu"))
        check_launcher(spec)
        plan, _, state = job.check(opts)
        if state == "done":
            print(job.done_message(opts.out), flush=True)
            return 0
        if spec.nproc_per_node == 1 and not spec.multi_node:
            if kind == "images":
                job.run(opts, plan)  # the plan just made: no second scan of the image folder
            else:
                job.run(opts)
            return 0
        spawn(spec, argv, log_dir=str(opts.out / ".workers"))
        return 0
    except USER_ERRORS as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted")
