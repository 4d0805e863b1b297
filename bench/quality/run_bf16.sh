#!/bin/bash
# The CPU quality recipe of Runs 10-11: Run 9's data, 8k vocabulary, held-out set, seed and lr schedule
# (2e-3 cosine to 5% over 1,600 steps, 55 minutes at most), bf16 autocast, then export and the
# mt_bench and val16 evals. Extra arguments go to `draftdata train`.
# Usage: bench/quality/run_bf16.sh NAME RUN8_DIR RUN5_WORKDIR [train args...]
#   (RUN8_DIR after run9.sh: ds_synth_cpu, vocab_8192_cpu; writes runNAME, exportNAME, eval_*_NAME.json)
set -ex
name=${1:?usage: run_bf16.sh NAME RUN8_DIR RUN5_WORKDIR [train args...]} run8=${2:?} run5=${3:?}
shift 3
cd "$run8"
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=60
draftdata train --data ds_synth_cpu --output "run$name" --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 50 --seed 0 \
  --draft-vocab vocab_8192_cpu.safetensors --max-minutes 55 --val-data "$run5/ds_val_synth" --val-every 100 \
  --dtype bf16 --no-plot "$@"
draftdata export "run$name" --out "export$name"
for p in mt_bench_eval val16; do
  draftdata eval --model smollm2 --draft "export$name" --prompts "$run5/$p.jsonl" --steps 5 --max-new-tokens 128 \
    --max-turns 1 --no-prompt-lookup --output "eval_${p}_$name.json"
done
