"""Synthesize benchmark: generated tokens/s of continuous and static batching ÷ one at a time.

Same run, same prompts, same model, greedy: the first user turn of N conversations from
../shared/data/train.jsonl (the first N, or round-robin over its sources with --prompt-mix
sources), answered by SmolLM2-135M-Instruct (`resolve_model("smollm2")`) with --max-new-tokens
tokens at most. Measured:

- one at a time, ours: `HFGenerator.generate_ids` on one prompt per call (--batch-size 1);
- one at a time, transformers: `model.generate(do_sample=False)` on one prompt per call (the
  usual baseline);
- static batches: `generate_ids` on --batch-sizes prompts per call (left padding, KV cache,
  finished rows leave the batch, no row joins until the batch is empty): what synthesize did
  before continuous batching;
- continuous, ours: `synthesize_conversations` with --batch-size B, the product path: a finished
  answer's slot goes to the next prompt at once.

tokens/s counts every generated token (answers incl. their end-of-turn token). The configurations
run in rounds (every configuration once per round, order rotated) and the best round counts, so a
noisy neighbour on a shared machine hurts all of them alike. Answers of every configuration are
compared with the first configuration's (greedy: they should be identical up to float rounding).
--skip-single leaves out the one-at-a-time configurations (slow with long answers), --skip-static
the static batches. --dtype takes a
comma list (e.g. fp32,bf16): every configuration then runs once per compute dtype, in the same rounds.

    python bench/synth/bench_synth.py --prompts 32 --max-new-tokens 64 --out bench/synth/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from draftdata.collect.conversations import parse_record
from draftdata.collect.synthesize import HFGenerator, Prompt, SynthSettings, synthesize_conversations
from draftdata.models import resolve_model

ROOT = Path(__file__).resolve().parents[2]


def load_prompts(path: Path, n: int, mix: str = "first") -> list[Prompt]:
    """First user turns: the first n records, or (mix="sources") round-robin over the id prefixes."""
    by_source: dict[str, list[Prompt]] = {}
    for line in path.open(encoding="utf-8"):  # not splitlines(): answers may hold U+2028
        if not line.strip():
            continue
        record = json.loads(line)
        first_user = next(m for m in record["conversations"] if m["role"] == "user")
        source = record["conversation_id"].split("-")[0] if mix == "sources" else ""
        by_source.setdefault(source, []).append(Prompt([first_user], seed=0, source=record["conversation_id"]))
    queues = list(by_source.values())
    prompts: list[Prompt] = []
    while len(prompts) < n and any(queues):
        for q in queues:
            if q and len(prompts) < n:
                prompts.append(q.pop(0))
    return prompts


def texts(generator: HFGenerator, out: list[list[int]]) -> list[str]:
    return [generator.answer(tokens, bool(tokens) and tokens[-1] in generator.stop_ids).text for tokens in out]


def continuous(generator: HFGenerator, prompts: list[Prompt], batch_size: int) -> tuple[float, int, list[str]]:
    """(seconds, generated tokens, answers) through `synthesize_conversations` (continuous batching)."""
    convs = [parse_record({"conversation_id": p.source, "conversations": p.messages}) for p in prompts]
    settings = SynthSettings(input="-", output="-", model_path="-", batch_size=batch_size,
                             max_new_tokens=generator.max_new_tokens)
    records: list[dict] = []
    t0 = time.perf_counter()
    stats = synthesize_conversations(convs, generator, settings, sink=records.extend, on_reject=print)
    seconds = time.perf_counter() - t0
    answer = {r["conversation_id"]: r["conversations"][-1]["content"] for r in records}
    return seconds, stats.tokens, [answer[p.source] for p in prompts]


def ours(generator: HFGenerator, prompts: list[Prompt], batch_size: int) -> tuple[float, int, list[str]]:
    """(seconds, generated tokens, answers) generating `batch_size` prompts per call (static batches)."""
    ids = [generator.encode(p) for p in prompts]
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        out += [tokens for tokens, _ in generator.generate_ids(ids[i:i + batch_size], [0] * len(ids[i:i + batch_size]))]
    seconds = time.perf_counter() - t0
    return seconds, sum(map(len, out)), texts(generator, out)


def transformers_generate(generator: HFGenerator, prompts: list[Prompt]) -> tuple[float, int, list[str]]:
    """`model.generate` one prompt at a time (greedy), stopping at the same end-of-turn tokens."""
    ids = [generator.encode(p) for p in prompts]
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for seq in ids:
            x = torch.tensor([seq], device=generator.input_device)
            y = generator.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                         max_new_tokens=generator.max_new_tokens,
                                         eos_token_id=sorted(generator.stop_ids), pad_token_id=generator.pad_id)
            out.append(y[0, len(seq):].tolist())
    seconds = time.perf_counter() - t0
    return seconds, sum(map(len, out)), texts(generator, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/train.jsonl"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-mix", choices=["first", "sources"], default="first")
    ap.add_argument("--skip-single", action="store_true", help="leave out the one-at-a-time configurations")
    ap.add_argument("--skip-static", action="store_true", help="leave out the static-batch configurations")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="compute dtype, or a comma list of them (side by side)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default torch's); 1 gives stable numbers on a busy shared machine")
    ap.add_argument("--out", default=None, help="append a markdown section to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtypes = args.dtype.split(",")
    generators = {d: HFGenerator(resolve_model(args.model), max_new_tokens=args.max_new_tokens, device=args.device,
                                 dtype=d) for d in dtypes}
    prompts = load_prompts(Path(args.data), args.prompts, args.prompt_mix)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    configs = {}
    for generator in generators.values():
        ours(generator, prompts[:2], 2)  # warm-up (first calls pay one-time initialisation)
        tag = f" [{generator.model.dtype}]" if len(dtypes) > 1 else ""
        if not args.skip_single:
            configs[f"one at a time (ours, batch 1){tag}"] = lambda g=generator: ours(g, prompts, 1)
            configs[f"one at a time (transformers generate){tag}"] = lambda g=generator: transformers_generate(g, prompts)
        for b in sizes:
            if not args.skip_static:
                configs[f"static batches (batch {b}){tag}"] = lambda b=b, g=generator: ours(g, prompts, b)
            configs[f"continuous (ours, batch {b}){tag}"] = lambda b=b, g=generator: continuous(g, prompts, b)
    best: dict[str, tuple[float, int, list[str]]] = {}
    names = list(configs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, tokens, out = configs[name]()
            print(f"round {r + 1}: {name}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s",
                  flush=True)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, tokens, out)

    base_name = names[0]
    base = best[base_name]
    base_rate = base[1] / base[0]
    load = os.getloadavg()
    lines = [
        f"## {args.model}, {args.prompts} prompts, max {args.max_new_tokens} new tokens, greedy, {args.device} "
        f"({', '.join(str(g.model.dtype) for g in generators.values())}), {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; prompts: {args.prompt_mix}; load average at the "
        f"end {load[0]:.1f} "
        f"(shared machine). Best of {args.rounds} rounds per configuration.",
        "",
        f"| configuration | generated tokens | seconds | tokens/s | ÷ {base_name} | same answers as {base_name} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        seconds, tokens, out = best[name]
        same = sum(a == b for a, b in zip(out, base[2]))
        lines.append(f"| {name} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.1f} | "
                     f"{tokens / seconds / base_rate:.2f}x | {same}/{len(out)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
