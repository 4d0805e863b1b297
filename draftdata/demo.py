"""`draftdata demo`: the whole pipeline on the embedded SmolLM2-135M-Instruct, top to bottom.

Each step is the `draftdata` command a user would type (printed before it runs):

  1  synthesize  the base model answers the bundled prompts (its own distribution)
  2  collect     hidden states of those conversations into DIR/dataset
  3  inspect     what the dataset holds
  4  vocab       the draft vocabulary (d2t / t2d) from the stored assistant tokens
  5  train       an EAGLE3 draft for a few minutes on the CPU (eagle_offline=True)
  6  export      a LlamaForCausalLMEagle3 directory for vLLM / SGLang / TRT-LLM
  7  eval        real greedy speculative decoding on held-out prompts: acceptance length

The last prompts of the bundled set are held out of training and used for the evaluation.
Rerunning resumes: synthesis and collection skip what is done; training continues from its
newest checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

from draftdata.errors import DraftdataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "--output", default="demo_out", metavar="DIR", help="demo directory (default ./demo_out)")
    p.add_argument("--model", default="smollm2", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="chat JSONL (default: the ~50 prompts bundled with the package)")
    p.add_argument("--holdout", type=int, default=8, help="prompts kept out of training for eval (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="synthesized answer length (default 160)")
    p.add_argument("--train-steps", type=int, default=300, help="draft training steps at most (default 300)")
    p.add_argument("--train-minutes", type=float, default=4,
                   help="draft training wall-clock budget in minutes (default 4; whichever ends first)")
    p.add_argument("--draft-vocab-size", type=int, default=4096, help="compressed draft vocabulary (default 4096)")
    p.add_argument("--eval-tokens", type=int, default=96, help="new tokens per eval turn (default 96)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N for every step (default cpu, unlike the other commands' auto: the "
                        "demo's timings and acceptance figures are CPU ones, and its eval checks exact greedy "
                        "equality, which bf16 on a GPU breaks at near-ties)")


def bundled_prompts() -> Path:
    """The ~50 conversations shipped with the package (draftdata/data/prompts.jsonl)."""
    return Path(__file__).parent / "data" / "prompts.jsonl"


def step(n: int, text: str, argv: list[str]) -> float:
    print(f"\n== step {n}: {text}\n$ draftdata {shlex.join(argv)}", file=sys.stderr, flush=True)
    return time.perf_counter()


def draftdata(argv: list[str]) -> None:
    """Run one `draftdata` command in this process; stop the demo if it fails."""
    from draftdata.cli import main

    rc = main(argv)
    if rc in (130, 143):  # Ctrl-C or SIGTERM: the step kept what it finished
        print("demo: stopped; the same `draftdata demo` command continues where it stopped", file=sys.stderr)
        raise SystemExit(rc)
    if rc != 0:  # the step said why; the demo ends with its exit status (2: a usage error)
        print(f"demo: `draftdata {shlex.join(argv)}` failed with exit code {rc}", file=sys.stderr)
        raise SystemExit(rc)


# What the demo directory's outputs depend on: a rerun in the same --out must keep them (it resumes).
RERUN_FIXED = ("model", "holdout", "max_new_tokens", "draft_vocab_size")


def check_rerun(out: Path, settings: dict) -> None:
    """Refuse a rerun into an --out whose earlier run had other settings (its dataset, vocabulary
    and draft would be mixed with the new ones, and held-out prompts could be trained on), and an
    --out that holds anything else (the demo would overwrite and mix in files of the same names)."""
    path = out / "demo_settings.json"
    if not path.is_file():
        held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if held:
            from draftdata.errors import name_some

            raise DraftdataError(f"--out {out} holds {name_some(held)} and no demo_settings.json, so it is no "
                                 "demo directory (the demo would overwrite files there); give a new or empty one")
        return
    try:
        then = json.loads(path.read_text())
    except (OSError, ValueError):
        then = None
    if not isinstance(then, dict):
        raise DraftdataError(f"--out {out}: {path.name} is damaged, so whether a rerun there fits the earlier run "
                             "cannot be told; use a new --out, or delete that one")
    diffs = ["the --prompts content" if k == "prompts_sha256" else f"{k} {then.get(k)!r} then, {settings.get(k)!r} now"
             for k in settings if then.get(k) != settings.get(k)]
    if diffs:
        raise DraftdataError(f"--out {out} holds a demo run with other settings ({'; '.join(diffs)}); a rerun "
                             "there resumes that run: use a new --out, or delete that one")


def usable_prompts(source: Path) -> list[str]:
    """The records of --prompts as JSONL lines, each with its id: checked here, against the user's
    own file and line, before any step runs (a bad held-out record failed only at the last step,
    after training), and split by record, so that no id is on both sides of the split."""
    from draftdata.collect.conversations import Reject, read_conversations

    rejects, lines = [], []
    for item in read_conversations(str(source), require_assistant=False, flag="--prompts"):
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        record = {"conversation_id": item.conversation_id, "conversations": item.messages}
        if item.category is not None:
            record["category"] = item.category
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    if rejects:
        shown = "; ".join(f"{r.source}: {r.reason}: {r.detail}" for r in rejects[:3])
        raise DraftdataError(f"--prompts {source}: {len(rejects)} record(s) cannot be used ({shown}"
                             f"{'; ...' if len(rejects) > 3 else ''}); fix or remove them")
    return lines


def run(args: argparse.Namespace) -> int:
    for name in ("max_new_tokens", "train_steps", "draft_vocab_size", "eval_tokens"):
        if getattr(args, name) < 1:
            raise DraftdataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not args.train_minutes > 0:
        raise DraftdataError(f"--train-minutes {args.train_minutes:g}: must be more than 0")
    from draftdata.models import check_device

    check_device(args.device)  # before anything is written
    source = Path(args.prompts or bundled_prompts())
    if not source.is_file():
        raise DraftdataError(f"--prompts {source}: no such file")
    # The file's lines name its content in demo_settings.json (as earlier demo directories recorded
    # it). split("\n"), not splitlines(): U+2028 and U+2029 are valid inside JSON strings.
    lines = [x for x in source.read_text(encoding="utf-8").split("\n") if x.strip()]
    records = usable_prompts(source)
    if len(records) < 2:
        raise DraftdataError(f"--prompts {source}: holds {len(records)} record(s); the demo needs at least 2 (one "
                             "to train on, one to evaluate)")
    if not 1 <= args.holdout < len(records):
        raise DraftdataError(f"--holdout {args.holdout}: keep between 1 and {len(records) - 1} of the {len(records)} "
                             f"prompts in {source} for the evaluation (the rest train the draft)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DraftdataError(f"--out {out}: is a file; the demo writes its outputs into a directory: give a new or "
                             "existing directory (default ./demo_out)")
    train_prompts, eval_prompts = out / "train_prompts.jsonl", out / "eval_prompts.jsonl"
    settings = {k: getattr(args, k) for k in RERUN_FIXED}
    if Path(args.model).exists():  # a local model: the same directory however it is spelled
        settings["model"] = str(Path(args.model).resolve())
    elif args.model.lower() == "smollm2":  # the embedded model's name, in any case
        settings["model"] = "smollm2"
    settings["prompts_sha256"] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    check_rerun(out, settings)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        train_prompts.write_text("".join(records[:-args.holdout]))
        eval_prompts.write_text("".join(records[-args.holdout:]))
    except OSError as e:
        raise DraftdataError(f"--out {out}: cannot write into it ({e.strerror or e}); give a writable "
                             "directory") from None
    dataset, conversations = str(out / "dataset"), str(out / "synthesized.jsonl")
    vocab, train_dir, draft = str(out / "d2t.safetensors"), str(out / "train"), str(out / "draft")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    argv = ["synthesize", "--model", args.model, "--input", str(train_prompts), "--output", conversations,
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "32", "--device", args.device]
    t = step(1, "the base model writes the assistant answers", argv)
    draftdata(argv)
    timings["synthesize"] = time.perf_counter() - t

    argv = ["collect", "--model", args.model, "--input", conversations, "--output", dataset,
            "--max-seq-len", "1024", "--on-long", "truncate", "--device", args.device]
    t = step(2, "capture aux + final hidden states into a dataset", argv)
    draftdata(argv)
    timings["collect"] = time.perf_counter() - t

    argv = ["inspect", dataset]
    step(3, "what the dataset holds", argv)
    draftdata(argv)

    argv = ["vocab", dataset, "--draft-vocab-size", str(args.draft_vocab_size), "--out", vocab]
    t = step(4, "draft vocabulary from the stored assistant tokens", argv)
    draftdata(argv)
    timings["vocab"] = time.perf_counter() - t

    argv = ["train", "--data", dataset, "--model", args.model, "--output", train_dir, "--steps", str(args.train_steps),
            "--max-minutes", f"{args.train_minutes:g}", "--lr", "3e-3", "--schedule", "constant",
            "--warmup-steps", "10", "--batch-tokens", "2048", "--draft-vocab", vocab, "--save-every", "100",
            "--device", args.device, "--init-from-base", "--resume"]
    t = step(5, "train the EAGLE3 draft, its layer started as the base's next layer (the base never runs)", argv)
    draftdata(argv)
    timings["train"] = time.perf_counter() - t

    argv = ["export", train_dir, "--out", draft]
    t = step(6, "export for vLLM / SGLang / TRT-LLM", argv)
    draftdata(argv)
    timings["export"] = time.perf_counter() - t

    report_file = out / "eval.json"
    argv = ["eval", "--model", args.model, "--draft", draft, "--prompts", str(eval_prompts), "--steps", "5",
            "--max-new-tokens", str(args.eval_tokens), "--max-turns", "1", "--device", args.device,
            "--output", str(report_file)]
    t = step(7, "speculative decoding on held-out prompts", argv)
    draftdata(argv)
    timings["eval"] = time.perf_counter() - t

    report = json.loads(report_file.read_text())
    eagle, lookup = report["eagle"], report.get("prompt_lookup") or {}
    total = time.perf_counter() - t_all
    print("\n== demo finished in " + f"{total / 60:.1f} min ("
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ")", file=sys.stderr)
    print(f"acceptance length (tokens per base forward, K=5, greedy): {eagle['acceptance_length']:.2f}")
    if lookup.get("tokens_per_base_forward"):  # both counting the prefill forward: like for like
        print(f"prompt-lookup decoding, same prompts: {lookup['tokens_per_base_forward']:.2f} tokens per base forward "
              f"with its prefill (EAGLE: {eagle.get('tokens_per_base_forward', float('nan')):.2f})")
    print(f"outputs: dataset {dataset}, draft {draft}, eval report {report_file}")
    return 0
