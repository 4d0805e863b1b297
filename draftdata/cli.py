"""The one `draftdata` command line.

Each subcommand lives in the stage that owns it: the module named in COMMANDS defines
`add_arguments(parser)` and `run(args) -> int`. Modules are imported lazily, so a command
imports only what it uses; building the parser finds each command's module (which for the
dataset commands imports the store package, and with it torch).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from draftdata.errors import TERMINATED, DraftdataError, release_sigterm, stop_on_sigterm

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("draftdata.collect.cli_collect", "run a base model over conversations and store hidden states"),
    "prompts": ("draftdata.collect.cli_prompts", "let the base model write user prompts (for synthesize)"),
    "synthesize": ("draftdata.collect.cli_synthesize", "regenerate assistant turns with the base model"),
    "inspect": ("draftdata.store.cli_inspect", "summarize a dataset: samples, tokens, parts, bytes, schema"),
    "verify": ("draftdata.store.cli_verify", "check every committed part; --gc removes crashed writers' leftovers"),
    "vocab": ("draftdata.train.cli_vocab", "build the draft vocabulary (d2t/t2d) from a dataset"),
    "train": ("draftdata.train.cli_train", "train an EAGLE3 draft from a dataset (eagle_offline=True)"),
    "export": ("draftdata.train.cli_export", "export a draft checkpoint for vLLM / SGLang / TRT-LLM"),
    "eval": ("draftdata.train.cli_eval", "measure acceptance length with real speculative decoding"),
    "demo": ("draftdata.demo", "run the whole pipeline on the embedded SmolLM2 model"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, help_)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftdata", description=__doc__.splitlines()[0])
    from draftdata import __version__

    parser.add_argument("--version", action="version", version=f"draftdata {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        module = importlib.import_module(mod)
        module.add_arguments(p)
        p.set_defaults(_module=mod, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The CLI: returns the exit status. Ctrl-C exits 130 and SIGTERM 143, also while the
    command's modules (torch) are still loading."""
    TERMINATED.clear()  # (main() may run again in one process: a library user, the tests)
    previous = stop_on_sigterm()
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command started
        return _stopped("draftdata")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            release_sigterm()


def _stopped(who: str) -> int:
    """Say that Ctrl-C (130) or SIGTERM (143) stopped `who`; the exit status."""
    print(f"{who}: {'terminated (SIGTERM)' if TERMINATED.is_set() else 'interrupted'}", file=sys.stderr)
    return 143 if TERMINATED.is_set() else 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 2
    command_parser = args._parser
    del args._parser  # args stay plain values (a job may pickle them)
    if extra:  # the command's own usage, not the top-level one
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    module = importlib.import_module(args._module)
    try:
        status = int(module.run(args) or 0)
        return 143 if TERMINATED.is_set() and status == 130 else status
    except DraftdataError as e:
        print(f"draftdata {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stopped(f"draftdata {args.command}")
    except BrokenPipeError:  # `draftdata inspect DS | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
