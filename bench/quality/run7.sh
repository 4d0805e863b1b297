#!/bin/bash
# Run 7: Run 5's data, the default (base-shaped) draft; lr 2e-3 peak, cosine to 5% over 1,150 steps (~58 min), from scratch.
set -e
cd "${1:?usage: run7.sh RUN5_WORKDIR (after run5.sh)}"
draftdata train --data ds_synth --output run_c --model smollm2 --steps 1150 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 50 --seed 0 \
  --draft-vocab vocab_8192.safetensors --max-minutes 64 --val-data ds_val_synth --val-every 100
draftdata export run_c --out export_c
draftdata eval --model smollm2 --draft export_c --prompts mt_bench_eval.jsonl --steps 5 --max-new-tokens 128 \
  --max-turns 1 --no-prompt-lookup --output eval_mt_bench_c.json
