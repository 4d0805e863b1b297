#!/bin/bash
# Run 11 (CPU): Run 10 (bf16 autocast, same data, vocab, held-out set, lr schedule, seed) with AdamW weight
# decay 0.1 against the overfitting Runs 9-10 show at ~6 epochs, alone on the machine (Run 10 shared it
# with other work for ~300 steps). Evaluated on mt_bench and on the 16 held-out val prompts.
# Usage: bench/quality/run11.sh RUN8_DIR RUN5_WORKDIR   (RUN8_DIR after run9.sh: ds_synth_cpu, vocab_8192_cpu)
set -ex
run8=${1:?usage: run11.sh RUN8_DIR RUN5_WORKDIR} run5=${2:?}
cd "$run8"
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=60
draftdata train --data ds_synth_cpu --output run11 --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 50 --seed 0 \
  --draft-vocab vocab_8192_cpu.safetensors --max-minutes 55 --val-data "$run5/ds_val_synth" --val-every 100 \
  --dtype bf16 --weight-decay 0.1 --no-plot
draftdata export run11 --out export11
for p in mt_bench_eval val16; do
  draftdata eval --model smollm2 --draft export11 --prompts "$run5/$p.jsonl" --steps 5 --max-new-tokens 128 \
    --max-turns 1 --no-prompt-lookup --output "eval_${p}_11.json"
done
