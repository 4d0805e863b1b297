#!/bin/bash
# Run 10 (CPU): Run 9 again (same data, vocab, held-out set, lr schedule, seed) with the trainer's new
# CPU default --dtype auto = bf16 autocast on a CPU with native bf16 (AVX512-BF16 here), so the same
# hour holds more steps. Evaluated on mt_bench and on the 16 held-out val prompts, like Run 9.
# Usage: bench/quality/run10.sh RUN8_DIR RUN5_WORKDIR   (RUN8_DIR after run9.sh: ds_synth_cpu, vocab_8192_cpu)
set -ex
run8=${1:?usage: run10.sh RUN8_DIR RUN5_WORKDIR} run5=${2:?}
cd "$run8"
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=60
draftdata train --data ds_synth_cpu --output run10 --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 50 --seed 0 \
  --draft-vocab vocab_8192_cpu.safetensors --max-minutes 55 --val-data "$run5/ds_val_synth" --val-every 100 \
  --dtype bf16 --no-plot
draftdata export run10 --out export10
for p in mt_bench_eval val16; do
  draftdata eval --model smollm2 --draft export10 --prompts "$run5/$p.jsonl" --steps 5 --max-new-tokens 128 \
    --max-turns 1 --no-prompt-lookup --output "eval_${p}_10.json"
done
