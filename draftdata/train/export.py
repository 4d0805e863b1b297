"""Export a trained draft checkpoint as a `LlamaForCausalLMEagle3` directory for vLLM, SGLang and TRT-LLM.

Input: a trainer checkpoint directory (`draft.safetensors` + `draft_config.json`, names per
docs/TRAIN.md). Output: `config.json` + `model.safetensors`, which the EAGLE3 loaders of
the three engines read (their expectations, with source paths, are in docs/EXPORT.md):

- tensor names are unprefixed and the decoder layer is `midlayer.*`: SGLang's loader maps only
  `midlayer.*` (older releases silently skip `layers.0.*`), vLLM renames `midlayer.` to
  `layers.0.`, TRT-LLM renames `layers.0.` to `midlayer.`; so `midlayer.*` loads everywhere.
- no `embed_tokens` (all three share the base model's embedding when the draft has none);
  `lm_head.weight` is always written, also for tied-embedding base models, and
  `tie_word_embeddings` is false (SGLang would otherwise alias lm_head to the embedding).
- aux layer ids in two conventions: `eagle_config.eagle_aux_hidden_state_layer_ids` holds ours
  (ModelOpt / TRT-LLM / SGLang: id k = output of decoder layer k, 0-based; SGLang adds 1
  itself), and the top-level `eagle_aux_hidden_state_layer_ids` holds vLLM's (k + 1: vLLM
  captures the *input* of layer k+1 and reads only that top-level key).
- a draft with one aux layer exports with a warning: SGLang and TRT-LLM skip its [H, H] fc.
- a draft with attention or MLP biases exports with a warning: SGLang drops them.
- the RoPE the draft was trained with (`rope_theta`, `rope_scaling`, and transformers 5's
  `rope_parameters`), unless `modelopt_rope_scaling=True` asks for ModelOpt's export-time
  YaRN injection (`eagle_export_rope_scaling`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from draftdata.errors import DraftdataError, name_some

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_FORMAT = "draftdata-eagle3-export"
ARCHITECTURE = "LlamaForCausalLMEagle3"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The decoder layer's tensors, as the trainer names them (docs/TRAIN.md) and as engines load them.
MIDLAYER_TENSORS = (
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
)


def find_checkpoint(path: str | os.PathLike, command: str = "export") -> Path:
    """The checkpoint to read from `path`: `path` itself if it holds draft_config.json; for a
    training output directory its `final/`, else its last `checkpoints/step-*`; else the newest
    checkpoint up to two levels below. Directories named *.tmp (being written) are never used.
    The choice is printed when it is not `path` itself (`command` names who prints it)."""
    from draftdata.train.model import DRAFT_CONFIG, DRAFT_WEIGHTS

    path = Path(path)
    if not path.exists():
        raise DraftdataError(f"checkpoint {path} does not exist")
    steps = sorted(p for p in path.glob("checkpoints/step-*")
                   if not p.name.endswith(".tmp") and (p / DRAFT_CONFIG).exists())
    if (path / DRAFT_CONFIG).exists():
        found = path
    elif (path / "final" / DRAFT_CONFIG).exists():
        found = path / "final"
    elif steps:
        found = steps[-1]
    else:
        candidates = [p.parent for p in [*path.glob(f"*/{DRAFT_CONFIG}"), *path.glob(f"*/*/{DRAFT_CONFIG}")]
                      if not any(part.endswith(".tmp") for part in p.relative_to(path).parts)]
        if not candidates:
            raise DraftdataError(f"{path} holds no draft checkpoint ({DRAFT_WEIGHTS} + {DRAFT_CONFIG}), "
                                 "neither directly nor in a subdirectory")
        found = max(candidates, key=lambda p: (p / DRAFT_CONFIG).stat().st_mtime)
    if found != path:
        print(f"draftdata {command}: using checkpoint {found}", file=sys.stderr)
    if not (found / DRAFT_WEIGHTS).exists():
        raise DraftdataError(f"{found / DRAFT_WEIGHTS} is missing (the checkpoint is incomplete)")
    return found


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the export holds, from a trainer DraftConfig."""
    h, inter, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_aux_slots
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {
        "fc.weight": (h, k * h),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (q, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "norm.weight": (h,),
        "lm_head.weight": (cfg.draft_vocab_size, h),
        "d2t": (cfg.draft_vocab_size,),
        "t2d": (cfg.vocab_size,),
    }
    if cfg.fc_norm:
        shapes.update({f"fc_norm.{i}.weight": (h,) for i in range(k)})
    if cfg.attention_bias:
        shapes.update({"midlayer.self_attn.q_proj.bias": (q,), "midlayer.self_attn.k_proj.bias": (kv,),
                       "midlayer.self_attn.v_proj.bias": (kv,), "midlayer.self_attn.o_proj.bias": (h,)})
    if cfg.mlp_bias:
        shapes.update({"midlayer.mlp.gate_proj.bias": (inter,), "midlayer.mlp.up_proj.bias": (inter,),
                       "midlayer.mlp.down_proj.bias": (h,)})
    return shapes


def rope_fields(rope_theta: float, rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    """RoPE in every spelling engines read: top-level rope_theta + rope_scaling (transformers 4,
    vLLM/SGLang/TRT-LLM), and rope_parameters (transformers 5)."""
    scaling = None
    if rope_scaling:
        scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": float(rope_theta)}
    return {"rope_theta": float(rope_theta), "rope_scaling": scaling, "rope_parameters": params}


def _base_special_tokens(cfg: Any) -> dict[str, Any]:
    """bos/eos/pad ids of the base: recorded at training time, else (a checkpoint from before they
    were recorded) from the base config.json when it is still where training found it."""
    from draftdata.train.model import read_base_config

    if cfg.base_special_tokens:
        return dict(cfg.base_special_tokens)
    try:
        return dict(read_base_config(cfg.base_model_path).special_tokens)
    except DraftdataError:  # the base is gone, or its config.json unreadable
        return {}


def _base_hash(base_model_path: str) -> str | None:
    """draftdata.models.model_hash of the base training used (as collect records it in the dataset),
    when that directory is still there; `draftdata eval` compares it with its --model."""
    from draftdata.models import model_hash

    if not base_model_path or not (Path(base_model_path) / "config.json").is_file():
        return None
    try:
        return model_hash(base_model_path)
    except OSError:
        return None


def build_export_config(cfg: Any, dtype: str = "bfloat16", modelopt_rope_scaling: bool = False) -> dict[str, Any]:
    """config.json of the export, from a trainer DraftConfig (see the module docstring)."""
    import transformers

    from draftdata import __version__

    aux = [int(i) for i in cfg.aux_layer_ids]
    rope_scaling, injected = cfg.rope_scaling, False
    if modelopt_rope_scaling:
        # ModelOpt's EagleExporter: inject eagle_export_rope_scaling when training used plain RoPE.
        override = (cfg.eagle_config or {}).get("eagle_export_rope_scaling") or None
        if override and not rope_scaling:
            rope_scaling, injected = dict(override), True
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "target_hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_bias": bool(cfg.attention_bias),
        "attention_dropout": cfg.attention_dropout,
        "mlp_bias": bool(cfg.mlp_bias),
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "tie_word_embeddings": False,
        **rope_fields(cfg.rope_theta, rope_scaling),
        "torch_dtype": dtype,
        "pretraining_tp": 1,
        "use_cache": True,
        "transformers_version": transformers.__version__,
        **_base_special_tokens(cfg),
        # ModelOpt's export template keys; SGLang reads the layer ids from here (and adds 1).
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": aux,
            "use_aux_hidden_state": True,
            "use_input_layernorm_in_first_layer": True,
            "use_last_layernorm": True,
            "use_mtp_layernorm": False,
            "next_layer_regular": True,
            "parallel_draft_step": 1,
            "parallel_draft_heads_num_layers": 1,
        },
        # vLLM's convention (the input of layer k+1 == HF hidden_states[k+1]); vLLM reads only this key.
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in aux],
    }
    if cfg.fc_norm:
        config["fc_norm"] = True
    if cfg.norm_output:
        config["norm_output"] = True
    if cfg.norm_before_residual:
        config["norm_before_residual"] = True
    if len(aux) != 3:
        config["num_aux_hidden_states"] = len(aux)
    config["draftdata"] = {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "created_by": f"draftdata {__version__} (transformers {transformers.__version__})",
        "base_model_id": cfg.base_model_id,
        "base_model_hash": _base_hash(cfg.base_model_path),
        "base_num_hidden_layers": cfg.base_num_hidden_layers,
        "aux_layer_ids": aux,
        "aux_layer_id_conventions": {
            "eagle_config.eagle_aux_hidden_state_layer_ids": "output of decoder layer k, 0-based "
            "(ModelOpt, TRT-LLM eagle3_layers_to_capture, SGLang eagle_config); HF hidden_states[k+1]",
            "eagle_aux_hidden_state_layer_ids": "vLLM: input of decoder layer k (= output of layer k-1); "
            "HF hidden_states[k]",
        },
        "trained_rope_theta": cfg.rope_theta,
        "trained_rope_scaling": cfg.rope_scaling,
        "modelopt_rope_scaling_applied": injected,
    }
    return config


def export_tensors(state: dict[str, torch.Tensor], cfg: Any, dtype: torch.dtype,
                   source: str = "draft.safetensors") -> dict[str, torch.Tensor]:
    """Check names and shapes against the DraftConfig and cast floats to `dtype`; d2t int64, t2d bool.

    `embed_tokens.*` (a frozen copy of the base embedding, if a checkpoint holds one) is dropped:
    the engines take the embedding from the base model.
    """
    state = {k: v for k, v in state.items() if not k.startswith("embed_tokens.")}
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise DraftdataError(f"{source}: tensors do not match draft_config.json: missing {missing}, "
                             f"unexpected {unexpected}")
    bad = {k: (tuple(state[k].shape), v) for k, v in want.items() if tuple(state[k].shape) != v}
    if bad:
        detail = ", ".join(f"{k} has {got}, expected {exp}" for k, (got, exp) in sorted(bad.items()))
        raise DraftdataError(f"{source}: wrong shapes: {detail}")
    out = {}
    for name in sorted(want):
        t = state[name].detach().cpu()
        if name == "d2t":
            t = t.to(torch.int64)
        elif name == "t2d":
            t = t.to(torch.bool)
        else:
            t = t.to(dtype)
        out[name] = t.contiguous()
    target = out["d2t"] + torch.arange(cfg.draft_vocab_size)
    if int(target.min()) < 0 or int(target.max()) >= cfg.vocab_size:
        raise DraftdataError(f"{source}: d2t maps draft ids outside the base vocabulary [0, {cfg.vocab_size})")
    return out


def _is_export(out: Path) -> bool:
    """Whether `out` holds a previous draftdata export (its config.json), or only what a killed
    export leaves behind (weights, temporary files, no config.json)."""
    cfg_path = out / EXPORT_CONFIG
    if not cfg_path.exists():
        leftovers = {EXPORT_WEIGHTS, EXPORT_WEIGHTS + ".tmp", EXPORT_CONFIG + ".tmp"}
        return all(p.name in leftovers for p in out.iterdir())
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(config, dict) and ARCHITECTURE in (config.get("architectures") or [])
            and (config.get("draftdata") or {}).get("format") == EXPORT_FORMAT)


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """--out: a new or empty directory, or a previous draftdata export (overwritten). Anything else,
    e.g. the base model's own directory, is refused with a one-line DraftdataError."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DraftdataError(f"--out {out}: is a file, not a directory; choose another --out")
    if not out.is_dir() or _is_export(out):
        return out
    shown = name_some(sorted(p.name for p in out.iterdir()))
    what = ""
    try:
        arch = json.loads((out / EXPORT_CONFIG).read_text()).get("architectures")
        what = f" (config.json: architectures {arch})" if arch else ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    raise DraftdataError(f"--out {out}: not empty and not a draftdata export{what}: holds {shown}; exporting "
                         "would overwrite its config.json and model.safetensors; choose another --out "
                         "(a new or empty directory)")


def export_draft(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
                 modelopt_rope_scaling: bool = False) -> Path:
    """Write `out_dir/config.json` + `out_dir/model.safetensors` from a trainer checkpoint.

    `out_dir` must be new, empty or a previous draftdata export (`check_out_dir`). Files are
    written under temporary names and renamed into place, config.json last, so a killed export
    never leaves a directory that looks complete. Returns `out_dir`.
    """
    from safetensors.torch import save_file

    from draftdata.train.model import DRAFT_CONFIG, DRAFT_WEIGHTS, DraftConfig, read_draft_weights

    if dtype not in DTYPES:
        raise DraftdataError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out = check_out_dir(out_dir)
    ckpt = find_checkpoint(checkpoint)
    cfg_path = ckpt / DRAFT_CONFIG
    try:
        raw = json.loads(cfg_path.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}, expected an object")
        cfg = DraftConfig.from_dict(raw, source=str(cfg_path))
    except json.JSONDecodeError as e:
        raise DraftdataError(f"{cfg_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except TypeError as e:
        raise DraftdataError(f"{cfg_path}: not a complete draft config ({e})") from None
    weights = ckpt / DRAFT_WEIGHTS
    state = read_draft_weights(weights)  # a damaged file is one line naming it
    tensors = export_tensors(state, cfg, DTYPES[dtype], source=str(weights))
    config = build_export_config(cfg, dtype=dtype, modelopt_rope_scaling=modelopt_rope_scaling)
    if cfg.num_aux_slots == 1:
        print(f"draftdata export: warning: {ckpt} reads one aux layer {list(cfg.aux_layer_ids)}, so its fc is "
              f"[{cfg.hidden_size}, {cfg.hidden_size}]. SGLang (llama_eagle3 applies fc only when its input is "
              "wider than hidden_size) and TensorRT-LLM (Eagle3DraftModel has an fc only when more than one "
              "layer is captured) skip it and run this draft without its trained fc; vLLM applies it. Serve "
              "it with vLLM, or collect with 2+ aux layers (--aux-layers eagle) and retrain.", file=sys.stderr)
    if cfg.attention_bias or cfg.mlp_bias:
        which = " and ".join(n for n, on in (("attention", cfg.attention_bias), ("MLP", cfg.mlp_bias)) if on)
        print(f"draftdata export: warning: {ckpt} has {which} biases. SGLang's llama_eagle3 builds its draft "
              "layer without biases and drops these weights without a word (vLLM and TensorRT-LLM load them): "
              "serve this draft with vLLM or TensorRT-LLM.", file=sys.stderr)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DraftdataError(f"--out {out}: cannot create it ({e.strerror or e}); choose another --out") from None
    (out / EXPORT_CONFIG).unlink(missing_ok=True)  # an old config must not describe new weights
    tmp = out / (EXPORT_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / EXPORT_WEIGHTS)
    tmp = out / (EXPORT_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(out / EXPORT_CONFIG)
    return out


__all__ = ["ARCHITECTURE", "EXPORT_CONFIG", "EXPORT_WEIGHTS", "build_export_config", "check_out_dir",
           "expected_shapes", "export_draft", "export_tensors", "find_checkpoint", "rope_fields"]
