"""Starting a training run from existing weights instead of a random draft.

`--init-draft PATH`: the weights of an existing draft. `--init-from-base`: the draft's decoder
layer starts as a copy of the base model's layer after the highest aux layer (below).

PATH is a draftdata checkpoint or training output (draft.safetensors + draft_config.json), or an
exported EAGLE3 directory (config.json + model.safetensors: ours, or a third-party
LlamaForCausalLMEagle3 draft such as a SpecForge or ModelOpt export). Its tensors must have the
names and shapes of the draft this run builds, its fc must read the dataset's aux layers, and a
compressed vocabulary must be the run's own: anything else is refused before the run writes its
output, naming the first difference. Only the weights are taken; the optimizer, the schedule and
the data order start fresh (that is what --resume is for).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from draftdata.errors import DraftdataError


def _read(path: Path, num_base_layers: int, hidden: int
          ) -> tuple[dict[str, torch.Tensor], list[int], float, bool, Path]:
    """(tensors in the trainer's names, aux layer ids in ModelOpt convention, rope_theta,
    norm_before_residual, weights file)."""
    from draftdata.train.evaluate import _rope_of, read_export, resolve_aux_layer_ids
    from draftdata.train.export import EXPORT_CONFIG, find_checkpoint
    from draftdata.train.model import DRAFT_CONFIG, DRAFT_WEIGHTS, DraftConfig, read_draft_weights

    if not path.exists():
        raise DraftdataError(f"--init-draft {path} does not exist")
    if (path / EXPORT_CONFIG).exists() and not (path / DRAFT_CONFIG).exists():
        config, state, weights = read_export(path)
        slots = max(1, state["fc.weight"].shape[1] // hidden)
        aux = resolve_aux_layer_ids(config, num_base_layers, slots, str(path / EXPORT_CONFIG))
        theta = _rope_of(config)[0]
        residual_norm = bool(config.get("norm_before_residual", False))
    else:
        ckpt = find_checkpoint(path, command="train")
        weights = ckpt / DRAFT_WEIGHTS
        cfg = DraftConfig.from_dict(json.loads((ckpt / DRAFT_CONFIG).read_text()), source=str(ckpt / DRAFT_CONFIG))
        state, aux, theta = read_draft_weights(weights), list(cfg.aux_layer_ids), float(cfg.rope_theta)
        residual_norm = cfg.norm_before_residual
    return {k: v for k, v in state.items() if not k.startswith("embed_tokens.")}, aux, theta, residual_norm, weights


def read_init_draft(path: str | Path, cfg: Any, d2t: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of the draft at `path` to copy into a fresh draft of config `cfg` (a DraftConfig),
    checked against it; and notes for the log.

    d2t: the run's draft-vocabulary table (None: the full base vocabulary). The lm_head is taken
    only when this run trains it (otherwise the run's head is the base's, frozen).
    """
    from draftdata.train.export import expected_shapes

    state, aux, theta, residual_norm, weights = _read(Path(path), cfg.base_num_hidden_layers, cfg.hidden_size)
    if residual_norm != cfg.norm_before_residual:  # the same tensors, another layer: refuse, not guess
        raise DraftdataError(f"{path}: the draft has norm_before_residual={str(residual_norm).lower()} (its layer's "
                             f"residual is {'hidden_norm(h)' if residual_norm else 'h'}), this run builds "
                             f"{str(cfg.norm_before_residual).lower()}; set eagle_architecture_config."
                             f"norm_before_residual to {str(residual_norm).lower()} in --eagle-config")
    if aux != list(cfg.aux_layer_ids):
        raise DraftdataError(f"{weights}: the draft's fc reads aux layers {aux}, the dataset stores layers "
                             f"{list(cfg.aux_layer_ids)}; collect with --aux-layers {','.join(map(str, aux))} "
                             "or start from a draft of these layers")
    want = expected_shapes(cfg)
    vocab_note = ("pass the --draft-vocab file that draft was trained with" if cfg.draft_vocab_size < cfg.vocab_size
                  else "train with that draft's --draft-vocab file")
    if "d2t" in state:
        if tuple(state["d2t"].shape) != want["d2t"]:
            raise DraftdataError(f"{weights}: the draft has a vocabulary of {state['d2t'].shape[0]} tokens, this "
                                 f"run {cfg.draft_vocab_size}: {vocab_note}")
        mine = torch.zeros(cfg.draft_vocab_size, dtype=torch.int64) if d2t is None else d2t.to(torch.int64)
        if not torch.equal(state["d2t"].to(torch.int64).cpu(), mine.cpu()):
            raise DraftdataError(f"{weights}: the draft's vocabulary (d2t) differs from this run's: {vocab_note}")
    elif cfg.draft_vocab_size < cfg.vocab_size:
        raise DraftdataError(f"{weights}: the draft has no d2t (a full vocabulary) but this run compresses it to "
                             f"{cfg.draft_vocab_size} tokens: drop --draft-vocab")
    notes = []
    take = {k: v for k, v in state.items() if k not in ("d2t", "t2d")}
    if not cfg.train_lm_head:
        if "lm_head.weight" in take:
            notes.append("lm_head not taken (this run keeps the base's, frozen)")
        take.pop("lm_head.weight", None)
    needed = {k: v for k, v in want.items() if k not in ("d2t", "t2d") and (cfg.train_lm_head or k != "lm_head.weight")}
    missing, unexpected = sorted(set(needed) - set(take)), sorted(set(take) - set(needed))
    if missing or unexpected:
        raise DraftdataError(f"{weights}: the draft's tensors differ from this run's draft: missing {missing}, "
                             f"unexpected {unexpected} (fc_norm, biases or an lm_head differ; --eagle-config "
                             "must describe the same architecture)")
    bad = [f"{k} has {tuple(v.shape)}, this run's {needed[k]}" for k, v in sorted(take.items())
           if tuple(v.shape) != needed[k]]
    if bad:
        raise DraftdataError(f"{weights}: wrong shapes for this run's draft: {'; '.join(bad)} (sizes come from the "
                             "base model and --eagle-config)")
    if abs(theta - float(cfg.rope_theta)) > 1e-6 * max(1.0, theta):
        notes.append(f"the draft was trained with rope_theta {theta:g}, this run uses {cfg.rope_theta:g}")
    return take, notes


# Base layer tensor (after "model.layers.{L}.") -> the draft tensor it initializes.
BASE_LAYER_TENSORS = {
    "input_layernorm.weight": "midlayer.hidden_norm.weight",
    "self_attn.q_proj.weight": "midlayer.self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "midlayer.self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "midlayer.self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "midlayer.self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "midlayer.post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "midlayer.mlp.gate_proj.weight",
    "mlp.up_proj.weight": "midlayer.mlp.up_proj.weight",
    "mlp.down_proj.weight": "midlayer.mlp.down_proj.weight",
}
STATE_HALF = ("midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
              "midlayer.self_attn.v_proj.weight")


def read_base_layer_init(base_dir: str | Path, cfg: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors that make the draft start as the base's decoder layer L = (highest aux layer) + 1.

    fc becomes the identity on the aux slot of layer L-1 (zero elsewhere), the layer's state-side
    norm, q/k/v (their state half: the second H input columns), o_proj, MLP and post-attention
    norm are layer L's, the draft's final norm is the base's: at step 0 the draft computes the
    base's layer L on the layer L-1 state, plus small random terms from the token embedding (the
    embedding half of q/k/v keeps its random init). Llama-style layers only; a base whose layer
    has other tensors (biases, q/k norms) or another shape than the draft's is refused.
    Returns (tensors in the trainer's names, q/k/v holding [out, H] state halves; a log line).
    """
    from draftdata.train.export import expected_shapes
    from draftdata.train.model import FINAL_NORM_NAMES, _read_tensor, _tensor_files

    base_dir = Path(base_dir)
    hi = max(cfg.aux_layer_ids)
    layer = hi + 1
    if layer >= cfg.base_num_hidden_layers:
        raise DraftdataError(f"--init-from-base copies the base's layer after the highest aux layer ({hi}), but "
                             f"layer {hi} is the base's last; collect with a lower highest --aux-layers, or drop "
                             "--init-from-base")
    files = _tensor_files(base_dir)
    prefix = next((p for p in (f"model.layers.{layer}.", f"model.language_model.layers.{layer}.")
                   if f"{p}self_attn.q_proj.weight" in files), None)
    if prefix is None:
        raise DraftdataError(f"{base_dir}: no model.layers.{layer}.self_attn.q_proj.weight; --init-from-base needs a "
                             "Llama-style checkpoint")
    extra = sorted(n[len(prefix):] for n in files if n.startswith(prefix) and n[len(prefix):] not in BASE_LAYER_TENSORS)
    if extra:
        raise DraftdataError(f"{base_dir}: the base's layer {layer} has tensors the draft layer has no place for "
                             f"({', '.join(extra)}); --init-from-base supports Llama-style layers only")
    want = expected_shapes(cfg)
    h = cfg.hidden_size
    out: dict[str, torch.Tensor] = {}
    for src, dst in BASE_LAYER_TENSORS.items():
        if prefix + src not in files:
            raise DraftdataError(f"{base_dir}: {prefix}{src} is missing; --init-from-base needs a Llama-style layer")
        t = _read_tensor(files, prefix + src).float()
        shape = (want[dst][0], h) if dst in STATE_HALF else want[dst]
        if tuple(t.shape) != shape:
            raise DraftdataError(f"--init-from-base: the base's {prefix}{src} has shape {tuple(t.shape)}, the draft "
                                 f"needs {shape}; the draft must be shaped like the base (leave num_attention_heads, "
                                 "num_key_value_heads, head_dim and intermediate_size unset in --eagle-config)")
        out[dst] = t
    norm = next((n for n in FINAL_NORM_NAMES if n in files), None)
    if norm is None:
        raise DraftdataError(f"{base_dir}: no final norm tensor (looked for {list(FINAL_NORM_NAMES)})")
    out["norm.weight"] = _read_tensor(files, norm).float()
    slot = sorted(cfg.aux_layer_ids).index(hi)
    fc = torch.zeros(want["fc.weight"])
    fc[:, slot * h:(slot + 1) * h] = torch.eye(h)
    out["fc.weight"] = fc
    return out, f"draft initialized from the base's layer {layer} (fc: identity on aux layer {hi}) and final norm"


def apply_init_draft(draft: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors (from `read_init_draft` or `read_base_layer_init`) into the draft's
    parameters, in their dtype. A q/k/v tensor of half the input width fills the state half (the
    last H input columns) and leaves the embedding half as it is."""
    params = dict(draft.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if name in STATE_HALF and t.shape[1] * 2 == p.shape[1]:
                p = p[:, t.shape[1]:]
            p.copy_(t.to(device=p.device, dtype=p.dtype))
