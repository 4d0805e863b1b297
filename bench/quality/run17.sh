#!/bin/bash
# Quality Run 17: does Run 15 gain from the issue's full hour of CPU training? Run 15's data, vocabulary
# and recipe unchanged, but 3,400 steps (about 53 minutes on 2 cores) instead of 1,600 (25 minutes);
# the cosine schedule is stretched to the new length. Run in a directory holding (copied or linked)
# Run 15's ds_mix, ds_val_synth and vocab15.safetensors, and mt_bench_eval.jsonl, mt_bench40.jsonl
# and val16.jsonl (see run15.sh and run16.sh).
set -x
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=30
draftdata train --data ds_mix --output run17 --model smollm2 --steps 3400 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 100 --seed 0 \
  --draft-vocab vocab15.safetensors --max-minutes 75 --val-data ds_val_synth --val-every 200 --dtype bf16 --no-plot \
  --weight-decay 0.1 --init-from-base || exit 1
draftdata export run17 --out export17 || exit 1
for p in mt_bench_eval mt_bench40 val16; do
  draftdata eval --model smollm2 --draft export17 --prompts $p.jsonl --steps 5 --max-new-tokens 128 --max-turns 1 \
    --no-prompt-lookup --output eval_${p}_17.json
done
echo RUN17_DONE
