#!/bin/bash
# Run 6: Run 5's data and settings, the draft attention shaped like the base (9 x 64, 3 KV heads;
# the default since Run 6). The 30-minute continuation (s2) is the same train line with --resume.
set -e
here="$(cd "$(dirname "$0")" && pwd)"
cd "${1:?usage: run6.sh RUN5_WORKDIR (after run5.sh)}"
cp "$here/run6_base_attn.json" .
draftdata train --data ds_synth --output run_s --model smollm2 --steps 100000 --lr 0.001 --warmup-steps 30 \
  --schedule constant --batch-tokens 2048 --max-seq-len 1024 --save-every 50 --seed 0 \
  --draft-vocab vocab_8192.safetensors --max-minutes 30 --val-data ds_val_synth --val-every 100 \
  --eagle-config run6_base_attn.json
draftdata export run_s --out export_s
draftdata eval --model smollm2 --draft export_s --prompts mt_bench_eval.jsonl --steps 5 --max-new-tokens 128 \
  --max-turns 1 --no-prompt-lookup --output eval_mt_bench_s.json
