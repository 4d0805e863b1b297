"""`draftdata export CKPT --out DIR`: a trained draft as a LlamaForCausalLMEagle3 directory."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT",
                   help="trainer checkpoint directory (draft.safetensors + draft_config.json), or a training "
                        "output directory (its final/, else its last checkpoints/step-*)")
    p.add_argument("--out", "--output", required=True, metavar="DIR",
                   help="output directory for config.json + model.safetensors (vLLM / SGLang / TRT-LLM)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], type=_long_dtype,
                   metavar="{bfloat16,float16,float32,bf16,fp16,fp32}",
                   help="dtype of the exported weights (default bfloat16)")
    p.add_argument("--modelopt-rope-scaling", action="store_true",
                   help="write the checkpoint's eagle_export_rope_scaling (ModelOpt's YaRN override) instead "
                        "of the RoPE the draft was trained with")


def _long_dtype(name: str) -> str:
    """bf16/fp16/fp32, the spelling of collect and train, as torch's dtype names."""
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(name, name)


def run(args: argparse.Namespace) -> int:
    from draftdata.train.export import EXPORT_CONFIG, export_draft

    out = export_draft(args.checkpoint, args.out, dtype=args.dtype,
                       modelopt_rope_scaling=args.modelopt_rope_scaling)
    cfg = json.loads((out / EXPORT_CONFIG).read_text())
    aux = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    print(f"exported {cfg['architectures'][0]} to {out}: hidden {cfg['hidden_size']}, "
          f"draft vocab {cfg['draft_vocab_size']}/{cfg['vocab_size']}, aux layers {aux} "
          f"(vLLM ids {cfg['eagle_aux_hidden_state_layer_ids']}), rope_theta {cfg['rope_theta']}",
          file=sys.stderr)
    print(out)
    return 0
