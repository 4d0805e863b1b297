#!/bin/bash
# Session 13's device call: bench/gpu/check_fixes.py, then bench/gpu/profile_synth.py on a random
# model of SmolLM2's shape (config + tokenizer carried in .whl/smol_meta; answers run to
# --max-new-tokens since a random model never ends them). Results under $OUT; written up in
# bench/gpu/results.md. Needs the wheels of bench/gpu/results.md in .whl (carry .whl).
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
timeout 150 python3 bench/gpu/check_fixes.py --out "$OUT/check_fixes.json"
python3 - <<'PY'
import shutil, torch
from transformers import AutoConfig, LlamaForCausalLM
shutil.copytree(".whl/smol_meta", "/tmp/smol_random", dirs_exist_ok=True)
torch.manual_seed(0)
LlamaForCausalLM(AutoConfig.from_pretrained("/tmp/smol_random")).to(torch.bfloat16).save_pretrained("/tmp/smol_random")
PY
timeout "${PROFILE_S:-240}" python3 bench/gpu/profile_synth.py --model /tmp/smol_random --data .whl/prompts1200.jsonl \
  --device cuda --prompts 1024 --batch-size 512 --max-new-tokens 128 --out "$OUT/profile_synth.json"
echo done
