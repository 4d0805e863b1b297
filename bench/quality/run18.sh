#!/bin/bash
# Quality Run 18: multi-turn data (`prompts --follow-up`). Half of Run 15's steered conversations
# (every other line of cat_synth.jsonl) get a second user turn written by the base after its own
# answer; the base answers the new turn (synthesize --keep-answers, greedy) and these two-turn conversations
# replace their one-turn versions in Run 15's data; Run 15's recipe, 1,600 steps. Eval on both turns
# of 40 mt_bench conversations, beside Run 15's draft (export15).
# Session 18 ran the prompts step only (1,047 follow-ups) and stopped the run in synthesize: on the
# 2-core CPU beside Run 17 it answered 50 conversations in 8 minutes, both turns (--keep-answers came
# after); rerun with --keep-answers beside the test suite, 126 in 6 minutes (bench/quality/results.md, Run 18).
# Run in a directory holding (copied or linked) Run 14's ds_synth and ds_val_synth, Run 15's
# cat_synth.jsonl and export15, and mt_bench40.jsonl (see run16.sh).
set -x
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=30
awk 'NR % 2 == 1' cat_synth.jsonl > fu_input.jsonl
[ -e fu_prompts.jsonl ] || timeout -s INT 1200 draftdata prompts --model smollm2 --follow-up fu_input.jsonl \
  --output fu_prompts.jsonl --max-new-tokens 128 --batch-size 32 --dtype bf16 --seed 18
timeout -s INT 900 draftdata synthesize --model smollm2 --input fu_prompts.jsonl --output fu_synth.jsonl \
  --max-new-tokens 256 --batch-size 32 --dtype bf16 --keep-answers
python - <<'PY'
import json
from pathlib import Path
two = {json.loads(x)["conversation_id"]: x for x in Path("fu_synth.jsonl").read_text().splitlines() if x.strip()}
rows = [two.get(json.loads(x)["conversation_id"], x) for x in Path("cat_synth.jsonl").read_text().splitlines() if x.strip()]
Path("cat2_synth.jsonl").write_text("\n".join(rows) + "\n")
print(len(rows), "conversations,", sum(json.loads(x)["conversation_id"] in two for x in rows), "with two turns")
PY
[ -e ds_mt ] || cp -rL ds_synth ds_mt
draftdata collect --model smollm2 --input cat2_synth.jsonl --output ds_mt --codec bf16 --format zarr --max-seq-len 1024 \
  --on-long truncate || exit 1
draftdata vocab ds_mt --draft-vocab-size 8192 --out vocab18.safetensors || exit 1
draftdata train --data ds_mt --output run18 --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 100 --seed 0 \
  --draft-vocab vocab18.safetensors --max-minutes 40 --val-data ds_val_synth --val-every 200 --dtype bf16 --no-plot \
  --weight-decay 0.1 --init-from-base || exit 1
draftdata export run18 --out export18 || exit 1
export OMP_NUM_THREADS=1
for e in 18 15; do
  draftdata eval --model smollm2 --draft export$e --prompts mt_bench40.jsonl --steps 5 --max-new-tokens 128 \
    --max-turns 2 --no-prompt-lookup --threads 1 --output eval_mt_bench40_2turns_$e.json > eval_$e.log 2>&1 &
done
wait
echo RUN18_DONE
