"""`draftdata export`: names, shapes and config fields against what each engine's EAGLE3 loader reads.

The engine expectations below are transcribed from the engines' published source (none of the
engines can run here); docs/EXPORT.md has the longer account:

- vLLM  vllm/model_executor/models/llama_eagle3.py (vllm-project/vllm @ 00bd1493b3e8, and the
  same behaviour @ 055e47c with a WeightsMapper "midlayer." -> "layers.0." + AutoWeightsLoader):
  Eagle3LlamaForCausalLM.load_weights skips "t2d", renames "d2t" -> "draft_id_to_target_id",
  prefixes "model." to every name without "lm_head"; LlamaModel.load_weights renames
  "midlayer." -> "layers.0." and stacks q/k/v -> qkv_proj, gate/up -> gate_up_proj; an unknown
  name is a KeyError / AutoWeightsLoader error. fc input = target_hidden_size * 3 @ 00bd1493;
  @ 055e47c num_aux_hidden_states, else len(eagle_config ids), else 3 (what vllm_params
  models); layer 0's qkv input = 2 * hidden_size; lm_head rows = draft_vocab_size;
  embed_tokens is skipped when absent (the target's is shared); q/k/v/o and MLP biases are
  built when attention_bias / mlp_bias.
  Aux layers: vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py (@ 0cfdd2e15d69)
  get_eagle3_aux_layers_from_config reads the TOP-LEVEL `eagle_aux_hidden_state_layer_ids`;
  EagleModelMixin._maybe_add_hidden_state (model_executor/models/interfaces.py) records
  hidden_states + residual as id 0 before the first layer and as id idx + 1 after layer idx,
  i.e. id v = HF hidden_states[v].
- SGLang python/sglang/srt/models/llama_eagle3.py (sgl-project/sglang @ 03d5a7771f60):
  parameters model.midlayer.*, model.fc (hidden_size_in * 3), model.norm, lm_head
  (ParallelLMHead(draft_vocab_size) unless tie_word_embeddings, which aliases the embedding);
  load_weights: "d2t" -> hot_token_id = d2t + arange, "t2d" skipped, q/k/v and gate/up stacked,
  name -> "model." + name when not a parameter, and a name matching no parameter is SILENTLY
  skipped. draft_vocab_size None => lm_head taken from the target. Aux layers:
  model_runner.py reads eagle_config["eagle_aux_hidden_state_layer_ids"] and
  set_eagle3_layers_to_capture adds 1 ("for the ith layer, it takes the output of the (i-1)th").
  Newer SGLang (sglang_new_load): parameters model.layers.0.* and a legacy_name_map applied to
  every name ("midlayer" -> "layers.0", "aux_norm_low/mid/high" -> "fc_norm.0/1/2"), so both
  spellings load; fc input = num_aux_hidden_states, else len(eagle_config ids), else 3. Both
  versions build the draft layer without biases (QKVParallelLinear(..., bias=False), LlamaMLP
  without bias): bias weights match no parameter and are skipped silently.
- TRT-LLM tensorrt_llm/_torch/models/modeling_speculative.py (NVIDIA/TensorRT-LLM @ b35ac1b64368):
  Eagle3ForCausalLM.load_weights renames ^layers.0. -> midlayer. (one layer), prefixes "model."
  except lm_head (present => not taken from the target); Eagle3DraftModel has midlayer
  (qkv input 2H when not next_layer_regular, i.e. the first layer), fc (target_hidden_size *
  num_capture_layers, only when > 1 layer is captured), fc_norm.{i} when config.fc_norm, norm,
  d2t (int32) only when draft_vocab_size != vocab_size, embed_tokens only when
  target_hidden_size != hidden_size; modules pull their weights by name, extra names are unused.
  norm_output => the post-norm state feeds the next step. Aux layers come from
  EagleDecodingConfig.eagle3_layers_to_capture (LLM API), default {1, N//2-1, N-4};
  speculative/eagle3.py maybe_capture_hidden_states stores the OUTPUT of decoder layer k.
- ModelOpt (installed nvidia-modelopt) torch/export/plugins/hf_spec_configs.py
  llama_eagle_template_config: the config keys of its LlamaForCausalLMEagle3 export.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model  # noqa: E402

from draftdata.config import DatasetSchema, EagleConfig  # noqa: E402
from draftdata.errors import DraftdataError  # noqa: E402
from draftdata.train.export import export_draft  # noqa: E402
from draftdata.train.model import build_draft, save_draft  # noqa: E402

SMALL_DRAFT = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    """Like SmolLM2: tied input/output embeddings."""
    return make_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


def make_checkpoint(tmp: Path, base_dir: Path, *, aux=(0, 1, 2), arch=None, draft_vocab=None,
                    eagle_extra=None, dest: Path | None = None) -> Path:
    """A trainer checkpoint (build_draft + save_draft) in `dest`, default tmp/ckpt."""
    cfg = json.loads((base_dir / "config.json").read_text())
    schema = DatasetSchema(base_model_id="tiny", hidden_size=cfg["hidden_size"], aux_layer_ids=list(aux),
                           num_hidden_layers=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"],
                           max_seq_len=256)
    eagle = EagleConfig.from_dict({"eagle_architecture_config": {**SMALL_DRAFT, **(arch or {})},
                                   **(eagle_extra or {})})
    draft, _ = build_draft(base_dir, eagle, schema, draft_vocab=draft_vocab)
    return save_draft(dest or tmp / "ckpt", draft)


def read_export(out: Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
    cfg = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        tensors = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    return cfg, tensors


def dims(cfg: dict) -> tuple[int, int, int, int, int]:
    h = cfg["hidden_size"]
    return h, cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"], \
        cfg["intermediate_size"], cfg["draft_vocab_size"]


# --------------------------------------------------------------------------- engine loaders, on paper

STACKED = [(".qkv_proj", ".q_proj"), (".qkv_proj", ".k_proj"), (".qkv_proj", ".v_proj"),
           (".gate_up_proj", ".gate_proj"), (".gate_up_proj", ".up_proj")]


def stack(loaded: dict[str, list[tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """Shards of one fused parameter are concatenated along rows (vLLM/SGLang/TRT-LLM fuse q/k/v, gate/up)."""
    return {k: (sum(s[0] for s in v), *v[0][1:]) for k, v in loaded.items()}


def vllm_params(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, q, kv, inter, dv = dims(cfg)
    num_aux = cfg.get("num_aux_hidden_states", 3)
    p = {"model.layers.0.self_attn.qkv_proj.weight": (q + 2 * kv, 2 * h),
         "model.layers.0.self_attn.o_proj.weight": (h, q),
         "model.layers.0.mlp.gate_up_proj.weight": (2 * inter, h),
         "model.layers.0.mlp.down_proj.weight": (h, inter),
         "model.layers.0.input_layernorm.weight": (h,), "model.layers.0.hidden_norm.weight": (h,),
         "model.layers.0.post_attention_layernorm.weight": (h,),
         "model.fc.weight": (h, cfg["target_hidden_size"] * num_aux), "model.norm.weight": (h,),
         "lm_head.weight": (dv, h), "draft_id_to_target_id": (dv,)}
    if cfg.get("fc_norm"):   # vLLM PR #42764 (EAGLE 3.1): model.fc_norm.{i}.weight
        p.update({f"model.fc_norm.{i}.weight": (cfg["target_hidden_size"],) for i in range(num_aux)})
    return p


def vllm_load(tensors: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, tuple[int, ...]]:
    loaded: dict[str, list] = {}
    for name, (shape, _) in tensors.items():
        if "t2d" in name:
            continue
        if "d2t" in name:
            name = name.replace("d2t", "draft_id_to_target_id")
        elif "lm_head" not in name:
            name = "model." + name
        name = name.replace("midlayer.", "layers.0.")
        for fused, shard in STACKED:
            if shard in name:
                name = name.replace(shard, fused)
                break
        loaded.setdefault(name, []).append(shape)
    return stack(loaded)


def sglang_params(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, q, kv, inter, dv = dims(cfg)
    num_aux = cfg.get("num_aux_hidden_states", 3)
    p = {"model.midlayer.self_attn.qkv_proj.weight": (q + 2 * kv, 2 * h),
         "model.midlayer.self_attn.o_proj.weight": (h, q),
         "model.midlayer.mlp.gate_up_proj.weight": (2 * inter, h),
         "model.midlayer.mlp.down_proj.weight": (h, inter),
         "model.midlayer.input_layernorm.weight": (h,), "model.midlayer.hidden_norm.weight": (h,),
         "model.midlayer.post_attention_layernorm.weight": (h,),
         "model.fc.weight": (h, cfg["target_hidden_size"] * num_aux), "model.norm.weight": (h,),
         "lm_head.weight": (dv, h)}
    if cfg.get("fc_norm"):
        p.update({f"model.fc_norm.{i}.weight": (cfg["target_hidden_size"],) for i in range(num_aux)})
    return p


def sglang_load(tensors, params) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """(loaded parameter shapes, names silently skipped)."""
    loaded: dict[str, list] = {}
    skipped = []
    for name, (shape, _) in tensors.items():
        if "d2t" in name or "t2d" in name:
            continue
        for fused, shard in STACKED:
            if shard in name:
                name = name.replace(shard, fused)
                break
        name = name if name in params else f"model.{name}"
        if name in params:
            loaded.setdefault(name, []).append(shape)
        else:
            skipped.append(name)
    return stack(loaded), skipped


SGLANG_LEGACY_NAMES = {"midlayer": "layers.0", "aux_norm_low": "fc_norm.0", "aux_norm_mid": "fc_norm.1",
                       "aux_norm_high": "fc_norm.2"}


def sglang_new_load(tensors, cfg: dict) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], list[str]]:
    """Newer SGLang: (its parameters, loaded shapes, names silently skipped)."""
    params = {k.replace("model.midlayer.", "model.layers.0."): v for k, v in sglang_params(cfg).items()}
    renamed = {}
    for name, value in tensors.items():
        for old, new in SGLANG_LEGACY_NAMES.items():
            name = name.replace(old, new)
        renamed[name] = value
    loaded, skipped = sglang_load(renamed, params)
    return params, loaded, skipped


def trtllm_params(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, q, kv, inter, dv = dims(cfg)
    num_capture = len(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"])  # = eagle3_layers_to_capture
    p = {"model.midlayer.self_attn.qkv_proj.weight": (q + 2 * kv, 2 * h),
         "model.midlayer.self_attn.o_proj.weight": (h, q),
         "model.midlayer.mlp.gate_up_proj.weight": (2 * inter, h),
         "model.midlayer.mlp.down_proj.weight": (h, inter),
         "model.midlayer.input_layernorm.weight": (h,), "model.midlayer.hidden_norm.weight": (h,),
         "model.midlayer.post_attention_layernorm.weight": (h,),
         "model.norm.weight": (h,), "lm_head.weight": (dv, h)}
    if num_capture > 1:
        p["model.fc.weight"] = (h, cfg["target_hidden_size"] * num_capture)
    if cfg.get("fc_norm"):
        p.update({f"model.fc_norm.{i}.weight": (cfg["target_hidden_size"],) for i in range(num_capture)})
    if cfg["draft_vocab_size"] != cfg["vocab_size"]:
        p["model.d2t"] = (dv,)
    return p


def trtllm_load(tensors, params) -> dict[str, tuple[int, ...]]:
    loaded: dict[str, list] = {}
    for name, (shape, _) in tensors.items():
        name = re.sub(r"^layers\.0\.", "midlayer.", name)
        name = name if "lm_head" in name else "model." + name
        for fused, shard in STACKED:
            if shard in name:
                name = name.replace(shard, fused)
                break
        if name in params:                    # modules pull their own weights; others are unused
            loaded.setdefault(name, []).append(shape)
    return stack(loaded)


# --------------------------------------------------------------------------- tests

def test_export_names_shapes_and_config_for_every_engine(tied_base, tmp_path):
    out = export_draft(make_checkpoint(tmp_path, tied_base), tmp_path / "out")
    cfg, tensors = read_export(out)
    h, q, kv, inter, dv = dims(cfg)
    assert set(tensors) == {
        "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
        *[f"midlayer.{n}" for n in ("input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight",
                                    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                    "mlp.down_proj.weight")]}
    assert not any("embed_tokens" in k for k in tensors)
    assert tensors["lm_head.weight"] == ((dv, h), "BF16")          # present although the base is tied
    assert tensors["d2t"] == ((dv,), "I64") and tensors["t2d"] == ((cfg["vocab_size"],), "BOOL")
    assert tensors["fc.weight"][0] == (h, 3 * h)

    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is False and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == cfg["vocab_size"] == 400 and cfg["target_hidden_size"] == h == 64
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["eagle_config"]["use_aux_hidden_state"] is True
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert "num_aux_hidden_states" not in cfg and "fc_norm" not in cfg and "norm_output" not in cfg

    # vLLM: every parameter but the shared embedding is loaded, with its shape; nothing unknown.
    assert vllm_load(tensors) == vllm_params(cfg)
    # SGLang: nothing silently skipped, every parameter loaded; lm_head is its own (not the embedding).
    params = sglang_params(cfg)
    loaded, skipped = sglang_load(tensors, params)
    assert skipped == [] and loaded == params
    params, loaded, skipped = sglang_new_load(tensors, cfg)            # newer SGLang: layers.0 parameters
    assert skipped == [] and loaded == params
    assert cfg["tie_word_embeddings"] is False and cfg["draft_vocab_size"] is not None
    # TRT-LLM: every module finds its weights (d2t is unused when the vocabulary is not compressed).
    assert trtllm_load(tensors, trtllm_params(cfg)) == trtllm_params(cfg)
    assert cfg["eagle_config"]["next_layer_regular"] is True   # => the single (first) layer takes 2H inputs


def test_layers0_names_would_be_silently_dropped_by_sglang(tied_base, tmp_path):
    """Why the export writes `midlayer.*`: vLLM, TRT-LLM and newer SGLang accept either spelling,
    SGLang @ 03d5a77 loads `layers.0.*` into nothing and serves a random decoder layer."""
    out = export_draft(make_checkpoint(tmp_path, tied_base), tmp_path / "out")
    cfg, tensors = read_export(out)
    renamed = {k.replace("midlayer.", "layers.0."): v for k, v in tensors.items()}
    assert vllm_load(renamed) == vllm_params(cfg)
    assert trtllm_load(renamed, trtllm_params(cfg)) == trtllm_params(cfg)
    _, skipped = sglang_load(renamed, sglang_params(cfg))
    assert len(skipped) == 10 and all(".layers.0." in n for n in skipped)   # the whole decoder layer
    params, loaded, skipped = sglang_new_load(renamed, cfg)
    assert skipped == [] and loaded == params


def test_biased_draft_exports_its_biases_with_a_warning_that_sglang_drops_them(tiny_model, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path, tiny_model, arch={"attention_bias": True, "mlp_bias": True})
    out = export_draft(ckpt, tmp_path / "out")
    err = capsys.readouterr().err
    assert "attention and MLP biases" in err and "SGLang" in err and "drops" in err
    cfg, tensors = read_export(out)
    h, q, kv, inter, _ = dims(cfg)
    biases = {k: v[0] for k, v in tensors.items() if k.endswith(".bias")}
    assert biases == {"midlayer.self_attn.q_proj.bias": (q,), "midlayer.self_attn.k_proj.bias": (kv,),
                      "midlayer.self_attn.v_proj.bias": (kv,), "midlayer.self_attn.o_proj.bias": (h,),
                      "midlayer.mlp.gate_proj.bias": (inter,), "midlayer.mlp.up_proj.bias": (inter,),
                      "midlayer.mlp.down_proj.bias": (h,)}
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True      # vLLM / TRT-LLM build them from these
    _, skipped = sglang_load(tensors, sglang_params(cfg))                 # SGLang: no bias parameters
    assert len(skipped) == 7 and all(n.endswith(".bias") for n in skipped)


def test_eagle31_compressed_vocab_two_aux_layers_and_trained_rope(tied_base, tmp_path):
    from draftdata.train.vocab import select_draft_vocab

    counts = torch.arange(400, dtype=torch.int64) % 7
    vocab = select_draft_vocab(counts, 32)
    ckpt = make_checkpoint(tmp_path, tied_base, aux=(1, 2), draft_vocab=vocab,
                           arch={"fc_norm": True, "norm_output": True, "rope_theta": 500000.0})
    out = export_draft(ckpt, tmp_path / "out", dtype="float32")
    cfg, tensors = read_export(out)
    h = cfg["hidden_size"]
    assert cfg["fc_norm"] is True and cfg["norm_output"] is True and cfg["num_aux_hidden_states"] == 2
    assert cfg["draft_vocab_size"] == 32 and cfg["vocab_size"] == 400
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2]
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 3]
    assert tensors["fc.weight"] == ((h, 2 * h), "F32")
    assert tensors["fc_norm.0.weight"] == ((h,), "F32") and tensors["fc_norm.1.weight"] == ((h,), "F32")
    assert tensors["lm_head.weight"][0] == (32, h)
    state = load_file(str(out / "model.safetensors"))
    assert torch.equal(state["d2t"], vocab.d2t) and torch.equal(state["t2d"], vocab.t2d)
    # RoPE as trained (the base has 10000), in transformers 4 and 5 spellings.
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] is None
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(out)
    assert hf.rope_parameters["rope_theta"] == 500000.0 and hf.draft_vocab_size == 32
    # Engines that read num_aux_hidden_states size fc by it; TRT-LLM by the captured layer count.
    assert vllm_load(tensors) == vllm_params(cfg)
    loaded, skipped = sglang_load(tensors, sglang_params(cfg))
    assert skipped == [] and loaded == sglang_params(cfg)
    assert trtllm_load(tensors, trtllm_params(cfg)) == trtllm_params(cfg)   # includes model.d2t now


def test_one_aux_layer_draft_exports_with_a_warning(tiny_model, tmp_path, capsys):
    """fc is [H, H] with one aux layer: SGLang applies fc only to wider inputs and TRT-LLM creates it only
    for > 1 captured layer, so both would skip it; the export says so and still writes the files."""
    out = export_draft(make_checkpoint(tmp_path, tiny_model, aux=(2,)), tmp_path / "out")
    err = capsys.readouterr().err
    assert "warning" in err and "one aux layer" in err and "SGLang" in err and "TensorRT-LLM" in err
    cfg, tensors = read_export(out)
    h = cfg["hidden_size"]
    assert cfg["num_aux_hidden_states"] == 1 and tensors["fc.weight"][0] == (h, h)
    assert "model.fc.weight" not in trtllm_params(cfg)          # the engine has no fc to load it into
    export_draft(make_checkpoint(tmp_path, tiny_model, aux=(1, 2), dest=tmp_path / "two"), tmp_path / "out2")
    assert "warning" not in capsys.readouterr().err


def test_modelopt_rope_scaling_is_opt_in(tiny_model, tmp_path):
    ckpt = make_checkpoint(tmp_path, tiny_model)
    cfg, _ = read_export(export_draft(ckpt, tmp_path / "plain"))
    assert cfg["rope_scaling"] is None and cfg["draftdata"]["modelopt_rope_scaling_applied"] is False
    cfg, _ = read_export(export_draft(ckpt, tmp_path / "yarn", modelopt_rope_scaling=True))
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 2048}
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["draftdata"]["trained_rope_scaling"] is None


def test_config_has_modelopt_export_template_keys(tiny_model, tmp_path):
    spec = importlib.util.find_spec("modelopt")
    if spec is None:
        pytest.skip("nvidia-modelopt is not installed")
    src = Path(spec.origin).parent / "torch/export/plugins/hf_spec_configs.py"
    tree = ast.parse(src.read_text())
    template = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", "") == "llama_eagle_template_config")
    # The base is gone by export time (its bos/eos/pad ids were read from it at export time only).
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    ckpt = make_checkpoint(tmp_path, base)
    shutil.rmtree(base)
    cfg, _ = read_export(export_draft(ckpt, tmp_path / "out"))
    assert set(template) <= set(cfg)
    assert set(template["eagle_config"]) <= set(cfg["eagle_config"])
    assert cfg["architectures"] == template["architectures"] and cfg["model_type"] == template["model_type"]
    base_cfg = json.loads((tiny_model / "config.json").read_text())
    assert all(cfg[k] == base_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in template)


def test_layer_id_conventions_against_hf_hidden_states(tiny_model, tmp_path):
    """Ours/ModelOpt/TRT-LLM id k = output of decoder layer k = HF hidden_states[k+1]; vLLM captures
    hidden_states+residual *before* layer v runs (= HF hidden_states[v]); SGLang adds 1 to
    eagle_config's ids and captures the same way. All three must name the same tensors.
    (Not for the last layer: HF's last hidden_states entry is after the final norm.)"""
    from transformers import AutoModelForCausalLM

    cfg, _ = read_export(export_draft(make_checkpoint(tmp_path, tiny_model, aux=(0, 1, 2)), tmp_path / "out"))
    ours = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    vllm_ids = cfg["eagle_aux_hidden_state_layer_ids"]
    sglang_ids = [i + 1 for i in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    outputs = {}
    hooks = [model.model.layers[k].register_forward_hook(lambda m, a, o, k=k: outputs.__setitem__(k, o))
             for k in [*ours, 3]]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([[4, 5, 6, 7]]), output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    for k, v, s in zip(ours, vllm_ids, sglang_ids):
        out = outputs[k][0] if isinstance(outputs[k], tuple) else outputs[k]
        assert torch.equal(out, hs[k + 1]) and torch.equal(hs[v], hs[k + 1]) and torch.equal(hs[s], hs[k + 1])
    last = outputs[3][0] if isinstance(outputs[3], tuple) else outputs[3]
    assert torch.allclose(model.model.norm(last), hs[4]) and not torch.allclose(last, hs[4])


def test_bad_checkpoints_are_named(tiny_model, tmp_path):
    ckpt = make_checkpoint(tmp_path, tiny_model)
    state = load_file(str(ckpt / "draft.safetensors"))
    save_file({k: v for k, v in state.items() if k != "norm.weight"}, str(ckpt / "draft.safetensors"))
    with pytest.raises(DraftdataError, match=r"draft\.safetensors.*missing \['norm.weight'\]"):
        export_draft(ckpt, tmp_path / "out")
    state["fc.weight"] = state["fc.weight"][:, :10].contiguous()
    save_file(state, str(ckpt / "draft.safetensors"))
    with pytest.raises(DraftdataError, match=r"fc.weight has \(64, 10\), expected \(64, 192\)"):
        export_draft(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()            # nothing is written before the checks pass
    (tmp_path / "empty").mkdir()
    with pytest.raises(DraftdataError, match="holds no draft checkpoint"):
        export_draft(tmp_path / "empty", tmp_path / "out2")


def test_cli_export_picks_newest_checkpoint(tiny_model, tmp_path, capsys):
    import os

    from draftdata.cli import main

    run = tmp_path / "run"
    old = make_checkpoint(run / "step-1", tiny_model)
    new = make_checkpoint(run / "step-2", tiny_model, aux=(0, 1, 3))
    os.utime(old / "draft_config.json", (1, 1))
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    cfg, _ = read_export(tmp_path / "out")
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 3]
    assert new.parent.name == "step-2"
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    # collect's and train's spellings work too: --output, and bf16/fp16/fp32 for --dtype
    assert main(["export", str(run), "--output", str(tmp_path / "out16"), "--dtype", "fp16"]) == 0
    _, tensors = read_export(tmp_path / "out16")
    assert tensors["fc.weight"][1] == "F16"


def test_training_output_dir_exports_final_then_last_step(tiny_model, tmp_path):
    """The trainer's layout: output/final/ wins, else the last output/checkpoints/step-*; never *.tmp."""
    from draftdata.train.export import find_checkpoint

    out = tmp_path / "train_out"
    for name in ("step-00000010", "step-00000020", "step-00000030.tmp"):
        make_checkpoint(tmp_path, tiny_model, dest=out / "checkpoints" / name)
    assert find_checkpoint(out) == out / "checkpoints" / "step-00000020"
    make_checkpoint(tmp_path, tiny_model, dest=out / "final")
    assert find_checkpoint(out) == out / "final"


def test_out_dir_that_is_not_an_export_is_refused(tiny_model, tmp_path, capsys):
    """--out naming the base model's directory (or any non-empty one) must not overwrite its files;
    a previous export, or what a killed export leaves, is overwritten; a file is a one-line error."""
    import shutil

    from draftdata.cli import main

    ckpt = make_checkpoint(tmp_path, tiny_model)
    base_copy = Path(shutil.copytree(tiny_model, tmp_path / "base"))
    before = {p.name: p.read_bytes() for p in base_copy.iterdir()}
    with pytest.raises(DraftdataError, match=r"--out .*base: not empty and not a draftdata export \(config.json: "
                                             r"architectures \['LlamaForCausalLM'\]\).*choose another --out"):
        export_draft(ckpt, base_copy)
    assert {p.name: p.read_bytes() for p in base_copy.iterdir()} == before
    assert main(["export", str(ckpt), "--out", str(base_copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose another --out" in err

    out = export_draft(ckpt, tmp_path / "out")
    cfg, _ = read_export(out)
    assert cfg["draftdata"]["format"] == "draftdata-eagle3-export"
    assert export_draft(ckpt, out, dtype="float32") == out           # a previous export: overwritten
    assert read_export(out)[1]["fc.weight"][1] == "F32"

    (out / "config.json").unlink()                                    # a killed export: weights, no config
    (out / "model.safetensors.tmp").write_bytes(b"partial")
    assert read_export(export_draft(ckpt, out))[0]["architectures"] == ["LlamaForCausalLMEagle3"]

    (tmp_path / "afile").write_text("x")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "afile: is a file, not a directory; choose another --out" in err

    import shutil as sh  # a damaged checkpoint: one line each
    for name, damage in (("draft.safetensors", b"\x08\x00"), ("draft_config.json", b"[1, 2]")):
        bad = Path(sh.copytree(ckpt, tmp_path / f"bad-{name}"))
        (bad / name).write_bytes(damage)
        assert main(["export", str(bad), "--out", str(tmp_path / f"out-{name}")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(bad / name) in err, err


def test_export_records_the_base_model_hash(tiny_model, tmp_path):
    """The hash collect records as the dataset's base_model_hash, so `draftdata eval` can check its --model."""
    from draftdata.models import model_hash

    cfg, _ = read_export(export_draft(make_checkpoint(tmp_path, tiny_model), tmp_path / "out"))
    assert cfg["draftdata"]["base_model_hash"] == model_hash(tiny_model)
    assert cfg["draftdata"]["base_num_hidden_layers"] == 4
