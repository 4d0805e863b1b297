#!/bin/bash
# Quality Run 16: the control for Run 15. Same as run15.sh but the added prompts are written by the
# base without steering (no system prompt, no opening words; seed 2, as Run 14's self prompts), and
# answered and collected with the same time box, so the added data is of the same amount and a
# different kind. Run in a directory holding Run 14's ds_synth and ds_val_synth (linked), and
# mt_bench40.jsonl (every other mt_bench conversation: awk 'NR % 2 == 1') and mt_bench_eval.jsonl.
set -x
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=30
timeout -s INT 600 draftdata prompts --model smollm2 --output ctl_prompts.jsonl --count 2600 --max-new-tokens 128 \
  --top-p 0.95 --temperature 1.0 --batch-size 64 --seed 2 --dtype bf16
timeout -s INT 1200 draftdata synthesize --model smollm2 --input ctl_prompts.jsonl --output ctl_synth.jsonl \
  --max-new-tokens 256 --batch-size 32 --dtype bf16
[ -e ds_ctl ] || cp -rL ds_synth ds_ctl
draftdata collect --model smollm2 --input ctl_synth.jsonl --output ds_ctl --codec bf16 --format zarr --max-seq-len 1024 \
  --on-long truncate || exit 1
draftdata vocab ds_ctl --draft-vocab-size 8192 --out vocab16.safetensors || exit 1
draftdata train --data ds_ctl --output run16 --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 100 --seed 0 \
  --draft-vocab vocab16.safetensors --max-minutes 40 --val-data ds_val_synth --val-every 100 --dtype bf16 --no-plot \
  --weight-decay 0.1 --init-from-base || exit 1
draftdata export run16 --out export16 || exit 1
for p in mt_bench40 mt_bench_eval; do
  draftdata eval --model smollm2 --draft export16 --prompts $p.jsonl --steps 5 --max-new-tokens 128 --max-turns 1 \
    --no-prompt-lookup --output eval_${p}_16.json
done
echo RUN16_DONE
