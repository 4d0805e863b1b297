#!/bin/bash
# Run 12 (CPU): does the last decoder layer as the "high" aux layer help a tiny base? Run 9's data
# collected again with --aux-layers 1,14,29 (default 1,14,26), then Run 11's recipe to step ~400.
set -ex
cd "${1:?usage: run12.sh RUN8_DIR (holds synth.jsonl and vocab_8192_cpu.safetensors; ../quality5 = Run 5 workdir)}"
mkdir -p run12
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=60
draftdata collect --model smollm2 --input synth.jsonl --output run12/ds --codec bf16 --format zarr \
  --max-seq-len 1024 --on-long truncate --aux-layers 1,14,29
draftdata collect --model smollm2 --input ../quality5/val_synth.jsonl --output run12/ds_val --codec bf16 --format zarr \
  --max-seq-len 1024 --on-long truncate --aux-layers 1,14,29
draftdata train --data run12/ds --output run12/train --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 50 --seed 0 \
  --draft-vocab vocab_8192_cpu.safetensors --max-minutes 11 --val-data run12/ds_val --val-every 100 \
  --dtype bf16 --no-plot --weight-decay 0.1
