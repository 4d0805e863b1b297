"""Quality run 5 inputs: synth_input.jsonl (self prompts and train.jsonl round-robin, 2:1),
val_prompts.jsonl (val.jsonl, 24 gsm8k + 24 vicuna), mt_bench_eval.jsonl (every 5th), in the current directory.

Usage: python run5_prep.py SHARED_DATA_DIR (run5.sh calls it)."""
import json
import sys
from pathlib import Path

DATA = Path(sys.argv[1])  # ../shared/data
here = Path(".")


def lines(p):
    return [json.loads(x) for x in Path(p).read_text().split("\n") if x.strip()]


def round_robin(records):
    by = {}
    for r in records:
        by.setdefault(r["conversation_id"].split("-")[0], []).append(r)
    qs = list(by.values())
    return [q[i] for i in range(max(map(len, qs))) for q in qs if i < len(q)]


def prompt_only(r):
    return {"conversation_id": r["conversation_id"],
            "conversations": [t for t in r["conversations"] if t["role"] != "assistant"]}


self_p = lines(here / "self_prompts.jsonl")
train = [prompt_only(r) for r in round_robin(lines(DATA / "train.jsonl"))]
mixed, t = [], iter(train)
for i, r in enumerate(self_p):
    mixed.append(r)
    if i % 2 == 1:
        mixed.append(next(t))
(here / "synth_input.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
val = [prompt_only(r) for r in round_robin(lines(DATA / "val.jsonl"))][:48]
(here / "val_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
mt = [x for i, x in enumerate(Path(DATA / "mt_bench.jsonl").read_text().split("\n")) if x.strip()]
(here / "mt_bench_eval.jsonl").write_text("".join(x + "\n" for i, x in enumerate(mt) if i % 5 == 0))
print(len(mixed), "synth inputs,", len(val), "val,", sum(1 for i, _ in enumerate(mt) if i % 5 == 0), "mt_bench")
