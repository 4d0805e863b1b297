#!/bin/bash
# Run 9 (CPU): Run 7's recipe on the larger data Run 8 synthesized on the GPU (1,696 conversations: Run 5's
# 900 inputs answered again in bf16 plus 796 new ones). Collect, 8k vocab, ~55 min of training, mt_bench eval.
# Usage: bench/quality/run9.sh RUN8_DIR RUN5_WORKDIR   (RUN8_DIR holds synth.jsonl from run8_gpu.sh;
#        RUN5_WORKDIR holds ds_val_synth and mt_bench_eval.jsonl from run5.sh)
set -ex
run8=${1:?usage: run9.sh RUN8_DIR RUN5_WORKDIR} run5=${2:?}
cd "$run8"
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=60
draftdata collect --model smollm2 --input synth.jsonl --output ds_synth_cpu --codec bf16 --format zarr \
  --max-seq-len 1024 --on-long truncate
draftdata vocab ds_synth_cpu -n 8192 -o vocab_8192_cpu.safetensors
draftdata train --data ds_synth_cpu --output run9 --model smollm2 --steps 1250 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 50 --seed 0 \
  --draft-vocab vocab_8192_cpu.safetensors --max-minutes 58 --val-data "$run5/ds_val_synth" --val-every 100
draftdata export run9 --out export9
draftdata eval --model smollm2 --draft export9 --prompts "$run5/mt_bench_eval.jsonl" --steps 5 --max-new-tokens 128 \
  --max-turns 1 --no-prompt-lookup --output eval_mt_bench_9.json
