#!/bin/bash
# Run 13 (CPU): random draft vs `--init-from-base` (the draft layer starts as the base's layer 27, fc as the
# identity on the layer-26 aux state), side by side on the same data, vocabulary, seed and schedule.
# Data: 1,600 train.jsonl conversations with their own answers (Run 8's base-written answers were not
# kept), 64 more held out; 400-step and 1,000-step cosine runs of Run 11's recipe; mt_bench (every 5th,
# first turns) and the held-out conversations' prompts evaluated with K=5.
# Usage: bench/quality/run13.sh WORKDIR
set -ex
repo=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "${1:?usage: run13.sh WORKDIR}" && cd "$1"
python - "$repo/../shared/data" <<'EOF'
import json, random, sys
from pathlib import Path
data = Path(sys.argv[1])
rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines() if x.strip()]
random.seed(16)
random.shuffle(rows)
Path("train_a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1600]))
Path("val_a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1600:1664]))
mt = [x for x in (data / "mt_bench.jsonl").read_text().split("\n") if x.strip()]
Path("mt_bench_eval.jsonl").write_text("".join(x + "\n" for i, x in enumerate(mt) if i % 5 == 0))
EOF
export OMP_NUM_THREADS=2 DRAFTDATA_PROGRESS_INTERVAL=60
for split in train val; do
  out=ds; [ $split = val ] && out=ds_val
  draftdata collect --model smollm2 --input ${split}_a.jsonl --output $out --codec bf16 --format zarr \
    --max-seq-len 1024 --on-long truncate
done
draftdata vocab ds --draft-vocab-size 8192 --out vocab.safetensors
train() {  # name steps [extra train args]: the two drafts of a pair run at once, one thread each
  OMP_NUM_THREADS=1 draftdata train --data ds --output "$1" --model smollm2 --steps "$2" --lr 0.002 \
    --warmup-steps 30 --schedule cosine --min-lr-ratio 0.05 --batch-tokens 2048 --max-seq-len 1024 \
    --save-every 200 --seed 0 --draft-vocab vocab.safetensors --val-data ds_val --val-every 50 --dtype bf16 \
    --no-plot --weight-decay 0.1 "${@:3}" > "$1.log" 2>&1
}
train runA 400 & train runB 400 --init-from-base & wait
train fullA 1000 & train fullB 1000 --init-from-base & wait
for name in fullA fullB; do
  draftdata export "$name" --out "export_$name"
done
for name in fullA fullB; do
  draftdata eval --model smollm2 --draft "export_$name" --prompts mt_bench_eval.jsonl --steps 5 \
    --max-new-tokens 128 --max-turns 1 --no-prompt-lookup --output "eval_mt_bench_$name.json"
done
