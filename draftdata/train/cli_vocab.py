"""`draftdata vocab URL --draft-vocab-size N --out FILE`: build the draft vocabulary (d2t / t2d)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="dataset URL (file://, s3://, gs://, or a local path)")
    p.add_argument("--draft-vocab-size", "-n", type=int, required=True,
                   help="number of draft tokens N (e.g. 32000)")
    p.add_argument("--out", "--output", "-o", required=True, help="output file (safetensors: d2t, t2d, token_counts)")
    p.add_argument("--all-tokens", action="store_true",
                   help="count every stored token, not only loss_mask == 1 (assistant) tokens")
    p.add_argument("--workers", type=int, default=8, help="parts read in parallel (default 8)")
    # Same flag as every dataset command (draftdata.store.fs.add_storage_option_argument), spelled
    # out here so that building the parser does not import the store (and torch).
    p.add_argument("--storage-option", "-S", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for the dataset URL, repeatable; dotted keys nest "
                        "(e.g. client_kwargs.endpoint_url=http://127.0.0.1:9000)")


def run(args: argparse.Namespace) -> int:
    from draftdata.errors import DraftdataError
    from draftdata.store.fs import check_writable_file, is_local, local_path, parse_storage_options
    from draftdata.train.vocab import build_draft_vocab, is_vocab_file, save_draft_vocab

    if args.out and not is_local(args.out):  # Path("s3://b/v") is a local folder named "s3:"
        raise DraftdataError(f"--out {args.out}: the vocabulary is written to a local file (`train --draft-vocab` "
                             "reads a local file); give a local path, and copy the file where it is needed")
    args.out = local_path(args.out) if args.out else args.out  # file:///x -> /x
    if not args.out or Path(args.out).is_dir():
        raise DraftdataError(f"--out {args.out!r} is a directory; name the file to write (e.g. "
                             f"{os.path.join(args.out or '.', 'vocab.safetensors')})")
    if is_local(args.url):  # writing into the dataset would damage it (e.g. --out DS/dataset.json)
        root, target = Path(local_path(args.url)).resolve(), Path(args.out).resolve()
        if (root / "dataset.json").exists() and root in target.parents:
            raise DraftdataError(f"--out {args.out}: inside the dataset {args.url}; write the vocabulary next to it "
                                 "(e.g. vocab.safetensors beside the dataset directory)")
    if os.path.isfile(args.out) and os.path.getsize(args.out) and not is_vocab_file(args.out):  # (mktemp: empty)
        raise DraftdataError(f"--out {args.out}: exists and is not a draft vocabulary file, which it would replace; "
                             "give a new path (or delete that file first)")
    check_writable_file(args.out, "--out", "vocab.safetensors")  # before counting, not after
    vocab = build_draft_vocab(args.url, args.draft_vocab_size, parse_storage_options(args.storage_option),
                              all_tokens=args.all_tokens, workers=args.workers)
    path = save_draft_vocab(args.out, vocab)
    m = vocab.metadata
    print(f"draft vocabulary: {m['draft_vocab_size']} of {m['vocab_size']} tokens; counted {m['tokens_counted']} "
          f"tokens ({m['counted']}), {m['distinct_tokens']} distinct; coverage {float(m['coverage']):.2%} "
          f"-> {path}", file=sys.stderr)
    return 0
