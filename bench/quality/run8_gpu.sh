#!/bin/bash
# Quality Run 8 on one GPU (bench/quality/results.md): SmolLM2 writes chat prompts (`prompts`), answers
# them and train.jsonl prompts 2:1 (`synthesize`), `collect`, an 8k draft vocab, a cosine-scheduled
# training sized to the time left, `export`, then a short GPU eval and the collect benchmark.
# Every stage is time-boxed (SIGINT: finished records are kept) so the whole fits one device lease.
#
# Usage: bench/quality/run8_gpu.sh WORKDIR SHARED_DATA_DIR CALIB_JSON
#   CALIB_JSON: bench/gpu/check_cuda.py's output (smol_calibration.train_steps_per_s sizes --steps)
#   env: BUDGET_S (whole run, default 540), PROMPT_S (45), SYNTH_S (150), TAIL_S (export + eval +
#   bench after training, 120), COUNT (self prompts, 8000), BATCH (512), EVAL_LIMIT (8), DEVICE (cuda; cpu = dry run)
# WORKDIR may hold Run 5's self_prompts_cpu.jsonl and val_synth.jsonl: they are reused.
set -x
work=${1:?usage: run8_gpu.sh WORKDIR SHARED_DATA_DIR CALIB_JSON} data=${2:?} calib=${3:?}
repo=$(cd "$(dirname "$0")/../.." && pwd)
start=$(date +%s) budget=${BUDGET_S:-540} dev=${DEVICE:-cuda} batch=${BATCH:-512}
left() { echo $((start + budget - $(date +%s))); }
mkdir -p "$work" && cd "$work" || exit 1
export DRAFTDATA_PROGRESS_INTERVAL=20 TOKENIZERS_PARALLELISM=false

python3 -c "from draftdata.models import resolve_model; print(resolve_model('smollm2'))" || exit 1
timeout -s INT "${PROMPT_S:-45}" draftdata prompts --model smollm2 --output self_prompts_gpu.jsonl \
  --count "${COUNT:-8000}" --max-new-tokens 96 --top-p 0.95 --temperature 1.0 --batch-size "$batch" --seed 1 \
  --device "$dev" --dtype bf16
cat self_prompts_cpu.jsonl self_prompts_gpu.jsonl > self_prompts.jsonl   # Run 5's 600 (seed 0) + these (seed 1)
python3 "$repo/bench/quality/run5_prep.py" "$data"
timeout -s INT "${SYNTH_S:-150}" draftdata synthesize --model smollm2 --input synth_input.jsonl \
  --output synth.jsonl --max-new-tokens 256 --batch-size "$batch" --device "$dev" --dtype bf16
[ -s val_synth.jsonl ] || timeout -s INT 40 draftdata synthesize --model smollm2 --input val_prompts.jsonl \
  --output val_synth.jsonl --max-new-tokens 256 --batch-size "$batch" --device "$dev" --dtype bf16
for x in synth val_synth; do
  draftdata collect --model smollm2 --input $x.jsonl --output ds_$x --codec bf16 --max-seq-len 1024 \
    --on-long truncate --device "$dev" --dtype bf16 --batch-tokens 32768 || exit 1
done
draftdata vocab ds_synth -n 8192 -o vocab_8192.safetensors || exit 1

train_s=$(($(left) - ${TAIL_S:-120}))
steps=$(python3 -c "import json, os; r = (json.load(open('$calib')) if os.path.exists('$calib') else {}).get('smol_calibration', {}).get('train_steps_per_s', 8); \
print(max(20, int(r * ($train_s - 30) * 0.85)))")   # no calibration: a guess; --max-minutes still bounds it
echo "training: $train_s s left for it, $steps steps"
draftdata train --data ds_synth --output run --model smollm2 --steps "$steps" --lr 0.002 --warmup-steps "$((steps / 20 < 50 ? steps / 20 + 1 : 50))" \
  --schedule cosine --min-lr-ratio 0.05 --batch-tokens 16384 --max-seq-len 1024 --save-every 500 --seed 0 \
  --draft-vocab vocab_8192.safetensors --val-data ds_val_synth --val-every 200 --num-workers 8 --no-plot \
  --max-minutes "$(python3 -c "print(max(0.5, ($train_s - 20) / 60))")" --device "$dev"
draftdata export run --out export --dtype bfloat16 || exit 1

timeout -s INT "$(( $(left) / 2 > 10 ? $(left) / 2 : 10 ))" draftdata eval --model smollm2 --draft export \
  --prompts mt_bench_eval.jsonl --steps 5 --max-new-tokens 128 --max-turns 1 --limit "${EVAL_LIMIT:-8}" \
  --device "$dev" --output eval_gpu.json   # mt_bench_eval.jsonl: every 5th mt_bench conversation (run5_prep.py)
[ "$(left)" -gt 40 ] && timeout "$(($(left) - 5))" python3 "$repo/bench/collect/bench_collect.py" --n 200 \
  --dtype bf16 --device "$dev" > bench_collect.json
echo "run8 done in $(($(date +%s) - start)) s"
