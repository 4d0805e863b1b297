"""`draftdata eval --model BASE --draft DIR --prompts FILE`: acceptance length and speedup of a draft."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="BASE",
                   help="base model: HF directory, hub id in the local cache, .gguf file, or 'smollm2'")
    p.add_argument("--draft", required=True, metavar="DIR", help="exported draft (`draftdata export` output)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="chat JSONL; every user turn is a prompt (later turns follow the base's answers)")
    p.add_argument("--steps", type=int, default=5, metavar="K", help="draft tokens per verify pass (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="per turn (default 256)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N conversations")
    p.add_argument("--max-turns", type=int, default=None, metavar="T", help="user turns per conversation")
    p.add_argument("--prompt-lookup-tokens", type=int, default=10, metavar="P",
                   help="prompt_lookup_num_tokens of the prompt-lookup baseline (default 10)")
    p.add_argument("--no-prompt-lookup", action="store_true", help="skip the prompt-lookup baseline")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on GPU; float32 on every CPU, unlike collect/train, so CPU outputs "
                        "compare exactly with greedy), float32, float64, bfloat16, float16 (or fp32, bf16, fp16)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 is fastest for tiny models on a busy box)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    p.add_argument("--output", metavar="FILE", help="also write the JSON report to FILE")


def run(args: argparse.Namespace) -> int:
    import torch

    from draftdata.train import evaluate as ev

    with torch.no_grad():  # scoped: `draftdata demo` runs commands in one process
        return _run(args, ev)


def check_output(path: str) -> Path:
    """--output FILE, checked before any model work: its directory is created when missing, and a
    directory or an unwritable location is refused with a one-line DraftdataError."""
    from draftdata.errors import DraftdataError

    out = Path(path)
    if out.is_dir():
        raise DraftdataError(f"--output {path}: is a directory; name a file, e.g. {out / 'report.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DraftdataError(f"--output {path}: cannot create its directory {out.parent}: "
                             f"{e.strerror or e}; choose another --output") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise DraftdataError(f"--output {path}: not writable; choose another --output")
    return out


def _run(args: argparse.Namespace, ev) -> int:
    import torch

    from draftdata.errors import DraftdataError

    for flag in ("limit", "max_turns", "threads", "prompt_lookup_tokens", "steps", "max_new_tokens"):
        value = getattr(args, flag)  # checked before minutes of model loading
        if value is not None and value < 1:
            raise DraftdataError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    output = check_output(args.output) if args.output else None
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = ev.pick_device_dtype(args.device, args.dtype)
    conversations = ev.read_prompts(args.prompts, limit=args.limit)
    base, tokenizer, base_path = ev.load_base(args.model, device, dtype)
    draft = ev.load_exported_draft(args.draft, base, device=device, dtype=dtype)
    bcfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for warning in ev.base_model_warnings(draft.config, base_path, bcfg.num_hidden_layers,
                                          str(Path(args.draft) / "config.json")):
        print(f"draftdata eval: warning: {warning}; expect a lower acceptance length unless this variant "
              "(quantized, fine-tuned) is intended", file=sys.stderr)
    methods = ("greedy", "eagle") if args.no_prompt_lookup else ("greedy", "eagle", "prompt_lookup")
    report = ev.evaluate(base, tokenizer, draft, conversations, steps=args.steps,
                         max_new_tokens=args.max_new_tokens, prompt_lookup_num_tokens=args.prompt_lookup_tokens,
                         methods=methods, max_turns=args.max_turns)
    report = {"base_model": str(base_path), "draft": str(Path(args.draft)), "prompts": args.prompts, **report}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(ev.format_report(report))
    sys.stdout.flush()
    if output is not None:
        try:
            output.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise DraftdataError(f"--output {output}: cannot write the report ({e.strerror or e}); "
                                 "the report is printed above") from None
    if report.get("stopped_early"):  # Ctrl-C (130) or SIGTERM (the CLI makes it 143)
        print("draftdata eval: stopped; the report covers the turns finished before the stop", file=sys.stderr)
        return 130
    return 0
