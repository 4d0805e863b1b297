#!/bin/bash
# Run 14 (CPU): Run 9-11's kind of data written again on the CPU (Run 8's GPU-written answers were not
# kept): SmolLM2 writes ~1,300 chat prompts (seed 1), then answers them and train.jsonl prompts
# (2:1, run5_prep.py) and 48 val.jsonl prompts for the held-out set; time-boxed with SIGINT, which keeps
# what is finished. Then Run 11's recipe with --init-from-base, and the mt_bench / held-out evals.
# Usage: bench/quality/run14.sh WORKDIR
set -x
repo=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "${1:?usage: run14.sh WORKDIR}" && cd "$1" || exit 1
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=30
timeout -s INT 300 draftdata prompts --model smollm2 --output self_prompts.jsonl --count 1300 --max-new-tokens 96 \
  --top-p 0.95 --temperature 1.0 --batch-size 64 --seed 1 --dtype bf16
python "$repo/bench/quality/run5_prep.py" "$repo/../shared/data"   # synth_input, val_prompts, mt_bench_eval
timeout -s INT 90 draftdata synthesize --model smollm2 --input val_prompts.jsonl --output val_synth.jsonl \
  --max-new-tokens 256 --batch-size 48 --dtype bf16
timeout -s INT 1080 draftdata synthesize --model smollm2 --input synth_input.jsonl --output synth.jsonl \
  --max-new-tokens 256 --batch-size 32 --dtype bf16
for x in synth val_synth; do
  draftdata collect --model smollm2 --input $x.jsonl --output ds_$x --codec bf16 --format zarr --max-seq-len 1024 \
    --on-long truncate || exit 1
done
draftdata vocab ds_synth --draft-vocab-size 8192 --out vocab.safetensors || exit 1
draftdata train --data ds_synth --output run14 --model smollm2 --steps 1300 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 100 --seed 0 \
  --draft-vocab vocab.safetensors --max-minutes 30 --val-data ds_val_synth --val-every 100 --dtype bf16 --no-plot \
  --weight-decay 0.1 --init-from-base || exit 1
draftdata export run14 --out export14 || exit 1
head -16 val_synth.jsonl > val16.jsonl
for p in mt_bench_eval val16; do
  draftdata eval --model smollm2 --draft export14 --prompts $p.jsonl --steps 5 --max-new-tokens 128 --max-turns 1 \
    --no-prompt-lookup --output eval_${p}_14.json
done
