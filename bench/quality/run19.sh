#!/bin/bash
# Quality Run 19: the effect of fp8 storage at the current recipe's level. Run 15's dataset
# (ds_mix, bf16) transcoded to the fp8 codec (same samples, same part order; the codec encodes
# from bf16 bits, as `collect --codec fp8` does), then exactly Run 15's training command (same
# seed, data order, vocabulary, validation data and schedule) and its mt_bench evals.
# Run in Run 15's directory (bench/quality/run15.sh), with mt_bench40.jsonl beside it.
set -x
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=30
[ -e ds_mix_fp8 ] || python - <<'PY' || exit 1
from draftdata.store.dataset import create_dataset, open_dataset
src = open_dataset("ds_mix")
out = create_dataset("ds_mix_fp8", src.schema, format=src.schema.storage_format, codec="fp8")
for p, info in enumerate(src.parts):
    part = out.open_part()
    for j in range(info.num_samples):
        part.add(src.read_sample(p, j))
    part.commit()
PY
draftdata inspect ds_mix_fp8
draftdata train --data ds_mix_fp8 --output run19 --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 100 --seed 0 \
  --draft-vocab vocab15.safetensors --max-minutes 40 --val-data ds_val_synth --val-every 100 --dtype bf16 --no-plot \
  --weight-decay 0.1 --init-from-base || exit 1
draftdata export run19 --out export19 || exit 1
for p in mt_bench40 mt_bench_eval; do
  draftdata eval --model smollm2 --draft export19 --prompts $p.jsonl --steps 5 --max-new-tokens 128 --max-turns 1 \
    --no-prompt-lookup --output eval_${p}_19.json
done
echo RUN19_DONE
# Arm b: Run 15's bf16 data with the full 49,152-token vocabulary (no --draft-vocab: the draft's
# lm_head is the base's, frozen, as in ModelOpt), otherwise the same command; --max-minutes
# raised because a full-vocabulary step costs ~1.5x on this CPU.
draftdata train --data ds_mix --output run19b --model smollm2 --steps 1600 --lr 0.002 --warmup-steps 30 \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 --save-every 100 --seed 0 \
  --max-minutes 90 --val-data ds_val_synth --val-every 100 --dtype bf16 --no-plot \
  --weight-decay 0.1 --init-from-base || exit 1
draftdata export run19b --out export19b || exit 1
for p in mt_bench40 mt_bench_eval; do
  draftdata eval --model smollm2 --draft export19b --prompts $p.jsonl --steps 5 --max-new-tokens 128 --max-turns 1 \
    --no-prompt-lookup --output eval_${p}_19b.json
done
echo RUN19B_DONE
