#!/bin/bash
# Quality Run 15: does data shaped like mt_bench's categories lift mt_bench? Run 14's data plus
# base-written prompts steered towards the 8 mt_bench categories (described in our own words; no
# mt_bench text): a per-category system prompt, and opening words (--user-prefix) of generic
# requests of each kind; answered by the base with its default system prompt.
# Run in a directory holding Run 14's outputs (ds_synth, ds_val_synth, val16.jsonl, mt_bench_eval.jsonl),
# copied or linked from bench/quality/run14.sh's directory. Each prompt step is skipped when its
# output exists (the steps are time-boxed, so a rerun would add to them).
set -x
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=30
CATS="writing roleplay reasoning math coding extraction stem humanities"
declare -A SYS=(
  [writing]="You are a writing assistant. Users ask you to write stories, poems, blog posts, emails, speeches and essays, or to improve a text they give you."
  [roleplay]="You are a role-playing assistant. Users ask you to act as a character, a professional or a famous person and to answer in that role."
  [reasoning]="You are a reasoning assistant. Users give you puzzles, riddles and logic questions and ask you to think them through step by step."
  [math]="You are a math tutor. Users ask you to solve arithmetic, algebra, geometry and probability problems and to explain each step."
  [coding]="You are a coding assistant. Users ask you to write, explain or fix programs in Python, JavaScript, C++ and SQL."
  [extraction]="You are a data extraction assistant. Users paste a text and ask you to pull out names, dates, numbers or facts, often as JSON or a table."
  [stem]="You are a science assistant. Users ask about physics, chemistry, biology, engineering and computer science."
  [humanities]="You are a humanities assistant. Users ask about history, philosophy, economics, law, literature and the arts."
)
declare -A PRE=(
  [writing]="Write a|Compose a|Draft an email"
  [roleplay]="Imagine you are|Pretend you are|Act as"
  [reasoning]="Suppose|Which|Explain why"
  [math]="Solve|Calculate|What is the probability"
  [coding]="Write a Python function|Implement|Fix the bug in"
  [extraction]="Extract|From the text below,|Summarize"
  [stem]="Explain how|What is the difference between|Why does"
  [humanities]="Discuss|What were the main causes of|Compare"
)
seed=100
for c in $CATS; do  # (a) system prompt only
  seed=$((seed + 1))
  [ -e cat_$c.jsonl ] || timeout -s INT 70 draftdata prompts --model smollm2 --output cat_$c.jsonl --count 220 \
    --max-new-tokens 128 --top-p 0.95 --temperature 1.0 --batch-size 64 --seed $seed --dtype bf16 --system-prompt "${SYS[$c]}"
done
for c in $CATS; do  # (b) system prompt and opening words
  seed=$((seed + 1))
  IFS='|' read -ra P <<< "${PRE[$c]}"
  args=(); for x in "${P[@]}"; do args+=(--user-prefix "$x"); done
  [ -e pre_$c.jsonl ] || timeout -s INT 55 draftdata prompts --model smollm2 --output pre_$c.jsonl --count 220 \
    --max-new-tokens 128 --top-p 0.95 --temperature 1.0 --batch-size 64 --seed $seed --dtype bf16 \
    --system-prompt "${SYS[$c]}" "${args[@]}"
done
python - <<'PY'
import json
from pathlib import Path
cats = "writing roleplay reasoning math coding extraction stem humanities".split()
rows = {f"{k}_{c}": [json.loads(x) for x in Path(f"{k}_{c}.jsonl").read_text().splitlines() if x.strip()]
        for c in cats for k in ("pre", "cat")}
mixed = [r[i] for i in range(max(map(len, rows.values()))) for r in rows.values() if i < len(r)]
Path("cat_input.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
print({k: len(r) for k, r in rows.items()}, len(mixed), "prompts")
PY
timeout -s INT 1200 draftdata synthesize --model smollm2 --input cat_input.jsonl --output cat_synth.jsonl \
  --max-new-tokens 256 --batch-size 32 --dtype bf16
[ -e ds_mix ] || cp -rL ds_synth ds_mix
draftdata collect --model smollm2 --input cat_synth.jsonl --output ds_mix --codec bf16 --format zarr --max-seq-len 1024 \
  --on-long truncate || exit 1
draftdata vocab ds_mix --draft-vocab-size 8192 --out vocab15.safetensors || exit 1
draftdata train --data ds_mix --output run15 --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 100 --seed 0 \
  --draft-vocab vocab15.safetensors --max-minutes 40 --val-data ds_val_synth --val-every 100 --dtype bf16 --no-plot \
  --weight-decay 0.1 --init-from-base || exit 1
draftdata export run15 --out export15 || exit 1
for p in mt_bench_eval val16; do
  draftdata eval --model smollm2 --draft export15 --prompts $p.jsonl --steps 5 --max-new-tokens 128 --max-turns 1 \
    --no-prompt-lookup --output eval_${p}_15.json
done
echo RUN15_DONE
