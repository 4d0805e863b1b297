"""`draftdata verify URL [--gc]`: check every committed part; exit 0 when sound, 1 with one line per problem."""

from __future__ import annotations

import argparse
import sys

from draftdata.store.fs import add_storage_option_argument, parse_storage_options

MAX_LINES = 100  # problems printed one per line; the count covers all of them


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="dataset URL")
    p.add_argument("--gc", action="store_true",
                   help="first delete uncommitted parts left by crashed writers (older than --grace)")
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                   help="with --gc: keep uncommitted parts younger than this, they may belong to a running "
                        "writer (default 3600; use 0 only when no writer is running: a local collect's lock "
                        "refuses gc while it writes, other writers and object stores have none)")
    add_storage_option_argument(p)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from draftdata.store import open_dataset
    from draftdata.store.verify import garbage_collect, leftovers, verify_dataset

    opts = parse_storage_options(args.storage_option)
    if args.gc:
        deleted, kept = garbage_collect(args.url, storage_options=opts, grace_seconds=args.grace)
        print(f"gc: removed {len(deleted)} leftover(s) of crashed writers (uncommitted parts, temporary commit "
              "records)", file=sys.stderr)
        for d in deleted:
            print(f"gc: removed {d}", file=sys.stderr)
        if kept:
            print(f"gc: kept {len(kept)} younger than --grace {args.grace:g} s (or of unknown age): a running "
                  "writer's work, or a crash within the grace period; use --grace 0 only when no writer runs",
                  file=sys.stderr)
    else:
        found = leftovers(args.url, storage_options=opts)
        if found:
            print(f"note: {len(found)} uncommitted leftover(s) (crashed writers' or a running writer's; readers "
                  f"never see them); `draftdata verify {args.url} --gc` removes those older than --grace",
                  file=sys.stderr)
    bad_records: list[str] = []
    ds = open_dataset(args.url, storage_options=opts, bad_records=bad_records)
    with tqdm(total=len(ds.parts), desc="verify", unit="part", disable=None, file=sys.stderr) as bar:
        problems = bad_records + verify_dataset(ds, progress=bar.update)
    for line in problems[:MAX_LINES]:
        print(line)
    if len(problems) > MAX_LINES:
        print(f"... and {len(problems) - MAX_LINES} more problem(s)")
    if problems:
        print(f"{len(problems)} problem(s) in {ds.url}", file=sys.stderr)
        return 1
    print(f"ok: {len(ds.parts)} parts, {ds.num_samples} samples, {ds.num_tokens} tokens verified", file=sys.stderr)
    return 0
