#!/bin/bash
# Quality run 5 (bench/quality/results.md): chat prompts written by SmolLM2 itself (draftdata prompts)
# mixed 2:1 with train.jsonl prompts, answered by synthesize (25 min), trained 30 min with a held-out
# set, evaluated on mt_bench (every 5th conversation, first turn, 128 tokens, K=5).
# Usage: bench/quality/run5.sh WORKDIR   (2-core CPU: about 70 minutes)
set -ex
work=${1:?usage: run5.sh WORKDIR}
repo=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$work"
cd "$work"
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=60
draftdata prompts --model smollm2 --output self_prompts.jsonl --count 600 --max-new-tokens 96 --top-p 0.95 \
  --temperature 1.0 --batch-size 32 --seed 0
python "$repo/bench/quality/run5_prep.py" "$repo/../shared/data"   # synth_input.jsonl (self prompts + train.jsonl round-robin, 2:1), val_prompts.jsonl, mt_bench_eval.jsonl
timeout -s KILL 1500 draftdata synthesize --model smollm2 --input synth_input.jsonl --output synth.jsonl \
  --max-new-tokens 256 --batch-size 32 || true   # a 25-minute budget: whatever is written is kept
draftdata synthesize --model smollm2 --input val_prompts.jsonl --output val_synth.jsonl --max-new-tokens 256
for x in synth val_synth; do
  draftdata collect --model smollm2 --input $x.jsonl --output ds_$x --codec bf16 --format zarr --max-seq-len 1024 \
    --on-long truncate
done
draftdata vocab ds_synth -n 8192 -o vocab_8192.safetensors
draftdata train --data ds_synth --output run_a --model smollm2 --steps 100000 --lr 0.001 --warmup-steps 30 \
  --schedule constant --batch-tokens 2048 --max-seq-len 1024 --save-every 50 --seed 0 \
  --draft-vocab vocab_8192.safetensors --max-minutes 30 --val-data ds_val_synth --val-every 100
draftdata export run_a --out export_a
draftdata eval --model smollm2 --draft export_a --prompts mt_bench_eval.jsonl --steps 5 --max-new-tokens 128 \
  --max-turns 1 --no-prompt-lookup --output eval_mt_bench.json
