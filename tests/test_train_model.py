"""EagleConfig, the EAGLE3 draft model, base-tensor loading and the TTT loss (no training loop)."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from test_train_support import TINY_ARCH

from draftdata.config import ConfigError, DatasetSchema, EagleConfig
from draftdata.errors import DraftdataError
from draftdata.train.losses import (
    head_cross_entropy,
    step_token_counts,
    ttt_attention_mask,
    ttt_loss,
    ttt_unroll,
)
from draftdata.train.model import (
    RotaryEmbedding,
    build_draft,
    draft_step,
    load_base_parts,
    load_draft,
    read_base_config,
    save_draft,
)
from draftdata.train.vocab import select_draft_vocab

CONTRACT_NAMES = {
    "fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "norm.weight", "lm_head.weight", "d2t", "t2d",
}


def schema_for(model_dir: Path, aux=(0, 1, 2), prenorm: bool = False) -> DatasetSchema:
    cfg = read_base_config(model_dir)
    return DatasetSchema(base_model_id="tiny", hidden_size=cfg.hidden_size, aux_layer_ids=list(aux),
                         num_hidden_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size, max_seq_len=512,
                         final_hidden_prenorm=prenorm)


def eagle(**arch) -> EagleConfig:
    return EagleConfig(eagle_architecture_config={**TINY_ARCH, **arch})


def random_batch(b=2, t=20, h=64, k=3, vocab=400, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths or [t] * b)
    am = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": torch.randint(0, vocab, (b, t), generator=g) * am, "attention_mask": am,
            "loss_mask": am.float(), "lengths": lengths,
            "hidden_states": (torch.randn(b, t, h, generator=g) * 3).bfloat16(),
            "aux_hidden_states": torch.randn(b, t, k * h, generator=g).bfloat16()}


def randomize(draft, scale=0.05):
    """Non-trivial weights everywhere (norms around 1) so tests see every parameter."""
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.startswith("embed_tokens") or not p.requires_grad:
                continue
            if name.endswith("norm.weight") or ".fc_norm." in f".{name}":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, scale)


# ------------------------------------------------------------------------------------------- config

def test_eagle_config_matches_modelopt_fields_and_defaults():
    from modelopt.torch.speculative.config import EagleConfig as MOEagleConfig
    from modelopt.torch.speculative.config import eagle3_default_config

    ours, theirs = EagleConfig(), MOEagleConfig()
    assert set(ours.to_dict()) == set(theirs.model_dump())
    for name, value in theirs.model_dump().items():
        if name in ("eagle_offline", "eagle_architecture_config"):
            continue
        assert getattr(ours, name) == value, name
    # eagle_offline: ModelOpt's class default is False, its recipe derives True for offline data.
    assert ours.eagle_offline is True
    documented = {"intermediate_size", "rope_theta", "rope_scaling",      # None = from the base model
                  "num_attention_heads", "num_key_value_heads", "head_dim"}
    for key, value in eagle3_default_config.items():
        if key not in documented:
            assert ours.arch[key] == value, key
    assert eagle3_default_config["num_attention_heads"] == 32 and eagle3_default_config["head_dim"] == 128
    assert ours.arch["num_attention_heads"] is None and ours.arch["head_dim"] is None
    assert ours.arch["fc_norm"] is False and ours.arch["norm_output"] is False
    assert ours.arch["use_last_layernorm"] is True and ours.arch["use_aux_hidden_state"] is True


def test_eagle_config_override_file(tmp_path):
    f = tmp_path / "eagle.json"
    f.write_text(json.dumps({"eagle_ttt_steps": 2, "eagle_architecture_config": {"fc_norm": True}}))
    c = EagleConfig.from_json_file(f)
    assert c.eagle_ttt_steps == 2 and c.arch["fc_norm"] is True
    assert c.arch["num_attention_heads"] is None and c.eagle_loss_decay_factor == 0.9   # untouched fields

    for bad, words in [
        ({"eagle_architecture_config": {"hidden_size": 128}}, "comes from the base model"),
        ({"eagle_architecture_config": {"vocab_size": 10}}, "comes from the base model"),
        ({"eagle_architecture_config": {"max_position_embeddings": 10}}, "comes from the base model"),
        ({"hidden_size": 128}, "come from the base model"),
        ({"eagle_offline": False}, "eagle_offline must be True"),
        ({"eagle_decoder_type": "kimik2"}, "'kimik2' is not supported"),
        ({"eagle_architecture_config": {"num_hidden_layers": 2}}, "num_hidden_layers=2 is not supported"),
        ({"eagle_architecture_config": {"intermediat_size": 2}}, "unknown eagle_architecture_config"),
        ({"eagle_ttt_step": 2}, r"unknown EagleConfig field.*did you mean.*'eagle_ttt_steps'.*known: \['eagle_architecture_config'"),
    ]:
        f.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=words) as e:
            EagleConfig.from_json_file(f)
        assert str(f) in str(e.value)
    f.write_text('{\n  "eagle_ttt_steps": 2,\n}')
    with pytest.raises(ConfigError, match=r"eagle\.json:3:1: invalid JSON"):
        EagleConfig.from_json_file(f)


@pytest.mark.parametrize("bad, words", [
    ({"eagle_loss_decay_factor": None}, r"eagle_loss_decay_factor must be a number in \(0, 1\], got None"),
    ({"eagle_loss_decay_factor": "0.9"}, "eagle_loss_decay_factor must be a number"),
    ({"eagle_ttt_steps": True}, "eagle_ttt_steps must be an integer"),
    ({"eagle_report_acc": "false"}, "eagle_report_acc must be true or false"),
    ({"eagle_export_rope_scaling": "yarn"}, "eagle_export_rope_scaling must be an object or null"),
    ({"eagle_architecture_config": "x"}, "eagle_architecture_config must be an object"),
    ({"eagle_architecture_config": ["fc_norm"]}, "eagle_architecture_config must be an object"),
    ({"eagle_architecture_config": {"rms_norm_eps": "small"}}, "rms_norm_eps must be a number > 0, got 'small'"),
    ({"eagle_architecture_config": {"rms_norm_eps": 0}}, "rms_norm_eps must be a number > 0"),
    ({"eagle_architecture_config": {"initializer_range": None}}, "initializer_range must be a number >= 0"),
    ({"eagle_architecture_config": {"attention_dropout": 1.5}}, r"attention_dropout must be a number in \[0, 1\)"),
    ({"eagle_architecture_config": {"num_attention_heads": True}}, "num_attention_heads must be a positive integer"),
    ({"eagle_architecture_config": {"fc_norm": "yes"}}, "fc_norm must be true or false"),
    ({"eagle_architecture_config": {"eagle_aux_hidden_state_layer_ids": [1, "2"]}},
     "eagle_aux_hidden_state_layer_ids must be a list of 0-based layer ids"),
    ({"eagle_architecture_config": {"rope_theta": "1e4"}}, "rope_theta must be a number > 0 or null"),
    ({"eagle_architecture_config": {"rope_scaling": {"rope_type": "default", "rope_theta": -1}}},
     "rope_scaling.rope_theta must be a number > 0"),
    ({"eagle_architecture_config": {"rope_theta": 5e5, "rope_scaling": {"rope_theta": 1e4}}},
     "rope_theta=500000.0 but rope_scaling.rope_theta=10000.0"),
    ({"eagle_export_rope_scaling": {}, "eagle_architecture_config": {"rope_scaling": {"rope_type": "nonsense"}}},
     "rope_type='nonsense' is unknown"),
])
def test_bad_eagle_config_values_are_config_errors(tmp_path, bad, words):
    """Wrong JSON types fail when the file is read, as ConfigError naming the file and the field."""
    f = tmp_path / "eagle.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=words) as e:
        EagleConfig.from_json_file(f)
    assert str(e.value).startswith(f"{f}: ")


def test_cli_rejects_online_config(tmp_path, tiny_model, capsys):
    from draftdata.cli import main

    f = tmp_path / "e.json"
    f.write_text('{"eagle_offline": false}')
    rc = main(["train", "--data", str(tmp_path / "none"), "--model", str(tiny_model), "--output",
               str(tmp_path / "o"), "--steps", "1", "--eagle-config", str(f)])
    assert rc == 2
    assert "eagle_offline must be True" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- model

def test_state_dict_names_are_the_contract(tiny_model, tmp_path):
    draft, _ = build_draft(tiny_model, eagle(), schema_for(tiny_model))
    names = set(draft.draft_state_dict())
    assert names == CONTRACT_NAMES
    sd = draft.draft_state_dict()
    assert sd["fc.weight"].shape == (64, 3 * 64)
    assert sd["midlayer.self_attn.q_proj.weight"].shape == (4 * 16, 128)        # 2H inputs
    assert sd["midlayer.self_attn.k_proj.weight"].shape == (2 * 16, 128)
    assert sd["lm_head.weight"].shape == (400, 64)
    assert sd["d2t"].dtype == torch.int64 and sd["d2t"].shape == (400,)
    assert sd["t2d"].dtype == torch.bool and sd["t2d"].shape == (400,) and bool(sd["t2d"].all())

    d31, _ = build_draft(tiny_model, eagle(fc_norm=True, norm_output=True), schema_for(tiny_model))
    assert set(d31.draft_state_dict()) == CONTRACT_NAMES | {f"fc_norm.{i}.weight" for i in range(3)}

    save_draft(tmp_path / "ck", draft)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "draft.safetensors"), "pt") as f:
        assert set(f.keys()) == CONTRACT_NAMES
    cfg = json.loads((tmp_path / "ck" / "draft_config.json").read_text())
    for key in ("eagle_config", "hidden_size", "vocab_size", "max_position_embeddings", "rope_theta",
                "rope_scaling", "aux_layer_ids", "base_model_id", "draft_vocab_size", "intermediate_size"):
        assert key in cfg, key
    assert cfg["eagle_config"]["eagle_architecture_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]


def test_draft_attention_takes_the_base_shape_unless_set(tiny_model):
    schema = schema_for(tiny_model)
    cfg = build_draft(tiny_model, EagleConfig(), schema)[0].config      # tiny base: 4 heads x 16, 2 KV heads
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 16, 128)
    arch = cfg.eagle_config["eagle_architecture_config"]
    assert (arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]) == (4, 2, 16)  # saved resolved
    modelopt = EagleConfig(eagle_architecture_config={"num_attention_heads": 32, "num_key_value_heads": 8,
                                                      "head_dim": 128})
    q = build_draft(tiny_model, modelopt, schema)[0].draft_state_dict()["midlayer.self_attn.q_proj.weight"]
    assert q.shape == (32 * 128, 2 * 64)
    with pytest.raises(ConfigError, match=r"5 attention heads and 2 KV heads \(unset values are the base"):
        build_draft(tiny_model, EagleConfig(eagle_architecture_config={"num_attention_heads": 5}), schema)
    with pytest.raises(ConfigError, match="head_dim 15 must be even"):
        build_draft(tiny_model, EagleConfig(eagle_architecture_config={"head_dim": 15}), schema)


def test_base_parts_and_frozen_head(tmp_path, tiny_model):
    from safetensors.torch import load_file

    base = load_file(str(tiny_model / "model.safetensors"))
    draft, head = build_draft(tiny_model, eagle(), schema_for(tiny_model))
    assert torch.equal(draft.embed_tokens.weight, base["model.embed_tokens.weight"])
    assert torch.equal(head.weight, base["lm_head.weight"])
    assert not draft.embed_tokens.weight.requires_grad and not draft.lm_head.weight.requires_grad
    # ModelOpt semantics: without a compressed vocabulary the draft uses the (frozen) base lm_head.
    assert draft.lm_head.weight is head.weight

    tied = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    tied_w = load_file(str(tied / "model.safetensors"))
    assert "lm_head.weight" not in tied_w
    parts = load_base_parts(tied)
    assert torch.equal(parts["lm_head"], tied_w["model.embed_tokens.weight"])

    vocab = select_draft_vocab(torch.arange(400) % 7, 50)
    d, h = build_draft(tiny_model, eagle(), schema_for(tiny_model), draft_vocab=vocab)
    rows = vocab.target_ids()
    assert torch.equal(h.weight, base["lm_head.weight"][rows]) and torch.equal(d.lm_head.weight, h.weight)
    assert d.lm_head.weight.requires_grad and d.lm_head.weight is not h.weight     # compressed: trained
    assert torch.equal(d.d2t, vocab.d2t) and torch.equal(d.t2d, vocab.t2d)

    with pytest.raises(DraftdataError, match="hidden_size=32 but the base model"):
        build_draft(tiny_model, eagle(), DatasetSchema(base_model_id="x", hidden_size=32, aux_layer_ids=[1],
                                                       num_hidden_layers=4, vocab_size=400, max_seq_len=8))
    with pytest.raises(ConfigError, match="needs the d2t table"):
        build_draft(tiny_model, eagle(draft_vocab_size=100), schema_for(tiny_model))


def test_damaged_base_weights_are_one_line_errors_naming_the_file(tmp_path, tiny_model):
    """A truncated base model.safetensors (a download cut short) is a DraftdataError naming the
    file, both when its header is cut and when its data is; check_base_model finds it before
    any tensor is read."""
    import shutil

    from draftdata.train.model import check_base_model

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model, damaged)
    weights = damaged / "model.safetensors"
    whole = weights.read_bytes()
    for size in (100, len(whole) // 2):
        weights.write_bytes(whole[:size])
        pattern = f"{weights}: cannot read the base model's weights \\(.+\\); the file is damaged or incomplete"
        with pytest.raises(DraftdataError, match=pattern):
            load_base_parts(damaged)
        with pytest.raises(DraftdataError, match=pattern):
            check_base_model(damaged, eagle(), schema_for(tiny_model))


def _write_sparse_safetensors(path: Path, tensors: dict[str, tuple[list[int], torch.Tensor | None]]) -> None:
    """A safetensors file whose `None` tensors are holes (sparse: big on paper, nothing on disk)."""
    header, offset = {}, 0
    for name, (shape, _) in tensors.items():
        n = 4
        for s in shape:
            n *= s
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        start = f.tell()
        for name, (_, value) in tensors.items():
            if value is not None:
                f.seek(start + header[name]["data_offsets"][0])
                f.write(value.float().contiguous().numpy().tobytes())
        f.truncate(start + offset)


def test_base_loading_memory_does_not_grow_with_depth(tmp_path):
    """Sharded checkpoint with 4 x 512 MiB layers: reading embed/lm_head/norm must not touch them."""
    d = tmp_path / "deep"
    d.mkdir()
    vocab, hidden, big = 1000, 64, [128 * 1024, 1024]            # 512 MiB per layer tensor
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "vocab_size": vocab, "num_hidden_layers": 4,
        "intermediate_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}))
    embed, head, norm = torch.randn(vocab, hidden), torch.randn(vocab, hidden), torch.randn(hidden)
    _write_sparse_safetensors(d / "model-00001-of-00002.safetensors", {
        "model.embed_tokens.weight": ([vocab, hidden], embed),
        "model.layers.0.mlp.weight": (big, None), "model.layers.1.mlp.weight": (big, None)})
    _write_sparse_safetensors(d / "model-00002-of-00002.safetensors", {
        "model.layers.2.mlp.weight": (big, None), "model.layers.3.mlp.weight": (big, None),
        "model.norm.weight": ([hidden], norm), "lm_head.weight": ([vocab, hidden], head)})
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.layers.0.mlp.weight": "model-00001-of-00002.safetensors",
                  "model.layers.1.mlp.weight": "model-00001-of-00002.safetensors"}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in
                       ("model.layers.2.mlp.weight", "model.layers.3.mlp.weight", "model.norm.weight",
                        "lm_head.weight")})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    script = textwrap.dedent(f"""
        import resource, torch
        from draftdata.train.model import load_base_parts
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        parts = load_base_parts({str(d)!r}, rows=torch.tensor([3, 10, 999]), need_norm=True)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        torch.save({{k: v.clone() for k, v in parts.items()}}, {str(tmp_path / "parts.pt")!r})
        print((after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grew_mib = int(out.stdout.strip().splitlines()[-1])
    assert grew_mib < 64, f"peak RSS grew by {grew_mib} MiB reading 3 small tensors next to 2 GiB of layers"
    parts = torch.load(tmp_path / "parts.pt", weights_only=True)
    assert torch.equal(parts["embed_tokens"], embed) and torch.equal(parts["norm"], norm)
    assert torch.equal(parts["lm_head"], head[[3, 10, 999]])


def test_rope_follows_the_base_model(tmp_path):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d = make_tiny_model(tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    raw.pop("rope_theta", None)
    raw["rope_parameters"] = {**scaling, "rope_theta": 500000.0}
    (d / "config.json").write_text(json.dumps(raw))
    draft, _ = build_draft(d, eagle(), schema_for(d))
    assert draft.config.rope_theta == 500000.0 and draft.config.rope_scaling["rope_type"] == "llama3"
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                          max_position_embeddings=512,
                                          rope_parameters={**scaling, "rope_theta": 500000.0}))
    pos = torch.arange(300)[None]
    cos, sin = RotaryEmbedding(draft.config)(pos)
    hf_cos, hf_sin = hf(torch.zeros(1, 300, 16), pos)
    torch.testing.assert_close(cos, hf_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=1e-6, atol=1e-6)
    # An explicit override in the EagleConfig wins over the base.
    d2, _ = build_draft(d, eagle(rope_theta=10000.0, rope_scaling={"rope_type": "default"}), schema_for(d))
    assert d2.config.rope_theta == 10000.0 and d2.config.rope_scaling is None


def test_rope_theta_inside_rope_scaling_is_an_explicit_override(tmp_path):
    """ModelOpt 0.47 spells the theta inside rope_scaling too; set by the user it wins like a top-level
    one, while draftdata's defaults (both unset) keep the base's theta."""
    d = make_tiny_model(tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["rope_theta"] = 500000.0
    (d / "config.json").write_text(json.dumps(raw))
    default, _ = build_draft(d, eagle(), schema_for(d))
    assert default.config.rope_theta == 500000.0 and default.config.rope_scaling is None
    modelopt_shape = {"rope_type": "default", "rope_theta": 10000}
    d2, _ = build_draft(d, eagle(rope_scaling=modelopt_shape), schema_for(d))
    assert d2.config.rope_theta == 10000.0 and d2.config.rope_scaling is None
    d3, _ = build_draft(d, eagle(rope_theta=10000, rope_scaling=modelopt_shape), schema_for(d))
    assert d3.config.rope_theta == 10000.0
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}
    d4, _ = build_draft(d, EagleConfig(eagle_export_rope_scaling={}, eagle_architecture_config={
        **TINY_ARCH, "rope_scaling": scaled}), schema_for(d))
    assert d4.config.rope_theta == 20000.0 and d4.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    torch.testing.assert_close(RotaryEmbedding(d4.config).inv_freq,
                               1.0 / 2.0 / 20000.0 ** (torch.arange(0, 16, 2).float() / 16))


def test_mrope_base_trains_with_plain_rope(tmp_path):
    """Qwen2.5-VL's "mrope" is plain RoPE for text positions (SGLang's llama_eagle3 rewrites it to default)."""
    d = make_tiny_model(tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    (d / "config.json").write_text(json.dumps(raw))
    assert read_base_config(d).rope_scaling is None and read_base_config(d).rope_theta == 1000000.0
    draft, _ = build_draft(d, eagle(), schema_for(d))
    assert draft.config.rope_theta == 1000000.0 and draft.config.rope_scaling is None
    plain = 1.0 / 1000000.0 ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(RotaryEmbedding(draft.config).inv_freq, plain)
    cfg = dataclasses.replace(draft.config, rope_scaling={"rope_type": "mrope", "mrope_section": [2, 3, 3]})
    torch.testing.assert_close(RotaryEmbedding(cfg).inv_freq, plain)


def test_save_load_roundtrip_and_draft_step(tiny_model, tmp_path):
    vocab = select_draft_vocab(torch.arange(400) % 11, 120)
    draft, _ = build_draft(tiny_model, eagle(fc_norm=True), schema_for(tiny_model), draft_vocab=vocab)
    randomize(draft)
    save_draft(tmp_path / "ck", draft)
    loaded = load_draft(tmp_path / "ck")
    b = random_batch()
    a = draft_step(draft, b["input_ids"], b["aux_hidden_states"])
    c = draft_step(loaded, b["input_ids"], b["aux_hidden_states"])
    assert a.logits.shape == (2, 20, 120) and a.hidden.shape == (2, 20, 64)
    torch.testing.assert_close(a.logits, c.logits, rtol=0, atol=0)
    ids = a.logits.argmax(-1)
    assert torch.equal(loaded.to_target_ids(ids), vocab.target_ids()[ids])
    with pytest.raises(DraftdataError, match="draft_config.json not found"):
        load_draft(tmp_path)


def test_norm_output_feeds_the_normed_state(tiny_model):
    draft, _ = build_draft(tiny_model, eagle(norm_output=True), schema_for(tiny_model))
    randomize(draft)
    b = random_batch()
    out = draft_step(draft, b["input_ids"], b["aux_hidden_states"])
    plain, _ = build_draft(tiny_model, eagle(), schema_for(tiny_model))
    plain.load_state_dict(draft.state_dict())
    raw = draft_step(plain, b["input_ids"], b["aux_hidden_states"])
    torch.testing.assert_close(out.logits, raw.logits)
    torch.testing.assert_close(out.hidden, draft.norm(raw.hidden))


# ---------------------------------------------------------------------------------------------- TTT

def test_ttt_mask_is_modelopts():
    from modelopt.torch.speculative.utils import get_ttt_msk_func

    for t, step in [(7, 0), (7, 1), (9, 2), (5, 4)]:
        f = get_ttt_msk_func(t, step)
        theirs = f(None, None, torch.arange(t)[:, None], torch.arange(t * (step + 1))[None, :])
        assert torch.equal(ttt_attention_mask(t, step), theirs)


def test_ttt_steps_equal_inference_chains(tiny_model):
    """Step k at position c+k == drafting k tokens after context ending at c (teacher forced), computed
    the slow inference way with draft_step: the TTT masks and hidden-state shifts are right."""
    draft, _ = build_draft(tiny_model, eagle(), schema_for(tiny_model))
    randomize(draft, scale=0.1)
    b = random_batch(b=1, t=16)
    ids, aux = b["input_ids"], b["aux_hidden_states"].float()
    steps = list(ttt_unroll(draft, ids, aux, 4))
    for c in (3, 8, 11):
        seq_ids = ids[:, 1:c + 2]                            # tokens x1..x_{c+1}: the one after each position
        hidden = draft.combine_aux(aux[:, :c + 1])
        for k in range(4):
            out = draft_step(draft, seq_ids, hidden, hidden_is_aux=False)
            torch.testing.assert_close(out.logits[:, -1], steps[k].logits[:, c + k], rtol=1e-4, atol=1e-5)
            seq_ids = torch.cat([seq_ids, ids[:, c + k + 2:c + k + 3]], dim=1)
            hidden = torch.cat([hidden, out.hidden[:, -1:]], dim=1)


def test_loss_definition(tiny_model):
    """Soft CE to the base distribution at t+1, loss-masked, decay^k weighted; per-step accuracy."""
    draft, head = build_draft(tiny_model, eagle(), schema_for(tiny_model))
    randomize(draft, scale=0.2)
    b = random_batch(b=2, t=18, lengths=[18, 11], seed=3)
    b["loss_mask"][0, :6] = 0
    out = ttt_loss(draft, head, b, ttt_steps=3, decay=0.8)
    target = torch.softmax(head(b["hidden_states"]).float(), -1)
    expected, steps = 0.0, list(ttt_unroll(draft, b["input_ids"], b["aux_hidden_states"], 3))
    for k, s in enumerate(steps):
        logp = torch.log_softmax(s.logits[:, k:-1].float(), -1)
        m = b["loss_mask"][:, 1 + k:]
        ce = -(target[:, 1 + k:] * logp).sum(-1)
        lk = (ce * m).sum() / (m.sum() + 1e-5)
        expected += 0.8 ** k * lk
        acc = ((logp.argmax(-1) == target[:, 1 + k:].argmax(-1)) & m.bool()).sum() / m.sum()
        assert out.step_accuracies()[k] == pytest.approx(acc.item())
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(out.count, step_token_counts(b, 3))

    # Masked positions (and padding) do not matter: change their targets, the loss stays.
    b2 = {**b, "hidden_states": b["hidden_states"].clone()}
    b2["hidden_states"][0, :6] += 5          # targets of positions whose loss_mask is 0
    b2["hidden_states"][1, 11:] = 9          # padding
    out2 = ttt_loss(draft, head, b2, ttt_steps=3, decay=0.8)
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)

    # Compressed vocabulary: the target is the base softmax over the draft ids only.
    vocab = select_draft_vocab(torch.arange(400) % 13, 77)
    dc, hc = build_draft(tiny_model, eagle(), schema_for(tiny_model), draft_vocab=vocab)
    full = head(b["hidden_states"])
    torch.testing.assert_close(hc(b["hidden_states"]), full[..., vocab.target_ids()])

    # Hard labels (eagle_self_logit_distillation=False): CE against the next-next stored token.
    hard = ttt_loss(dc, hc, b, ttt_steps=2, decay=0.8, self_logit_distillation=False)
    assert torch.isfinite(hard.loss) and hard.count[0] <= out.count[0]


def test_target_distribution_is_computed_once_per_batch(tiny_model, monkeypatch):
    """The TTT steps share one target projection of the loss positions (each row through the frozen
    head once, not once per step); above TARGET_CACHE_BYTES the per-step path gives the same loss,
    accuracies and gradients."""
    from draftdata.train import losses

    draft, head = build_draft(tiny_model, eagle(), schema_for(tiny_model))
    randomize(draft, scale=0.2)
    b = random_batch(b=2, t=18, lengths=[18, 11], seed=3)
    b["loss_mask"][0, :6] = 0
    rows_through_head = []
    head.register_forward_hook(lambda m, args, out: rows_through_head.append(out.reshape(-1, out.shape[-1]).shape[0]))

    def run():
        rows_through_head.clear()
        draft.zero_grad()
        out = ttt_loss(draft, head, b, ttt_steps=3, decay=0.8)
        out.loss.backward()
        return out, [p.grad.clone() for p in draft.trainable_parameters()], sum(rows_through_head)

    cached, cached_grads, cached_rows = run()
    assert cached_rows == int((b["loss_mask"] > 0).sum())
    monkeypatch.setattr(losses, "TARGET_CACHE_BYTES", 0)
    per_step, grads, rows = run()
    assert rows > 2 * cached_rows
    assert cached.loss.item() == pytest.approx(per_step.loss.item(), rel=1e-6)
    assert cached.step_accuracies() == per_step.step_accuracies()
    for g1, g2 in zip(cached_grads, grads):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_prenorm_dataset_applies_the_base_final_norm(tiny_model):
    from safetensors.torch import load_file

    norm_w = load_file(str(tiny_model / "model.safetensors"))["model.norm.weight"]
    _, head = build_draft(tiny_model, eagle(), schema_for(tiny_model, prenorm=True))
    _, post = build_draft(tiny_model, eagle(), schema_for(tiny_model))
    h = torch.randn(3, 64) * 4
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
    torch.testing.assert_close(head(h), post(normed))


@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_head_cross_entropy_matches_autograd(train_weight):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.3).requires_grad_(train_weight)
    row_w = (torch.rand(37, generator=g) > 0.3).double()
    tgt = torch.randn(37, 50, generator=g, dtype=torch.float64) * 2
    p = torch.softmax(tgt, -1)

    def targets(s, e):
        return p[s:e], tgt[s:e].argmax(-1)

    loss, hits = head_cross_entropy(h, w, row_w, targets, chunk=8)       # 5 chunks, last one short
    ref_logq = torch.log_softmax(h @ w.t(), -1)
    ref = -(row_w * (p * ref_logq).sum(-1)).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert hits.item() == (((h @ w.t()).argmax(-1) == tgt.argmax(-1)) & (row_w > 0)).sum().item()
    (3 * loss).backward()
    gh, gw = h.grad.clone(), (w.grad.clone() if train_weight else None)
    h.grad = None
    if train_weight:
        w.grad = None
    (3 * ref).backward()
    torch.testing.assert_close(gh, h.grad)
    if train_weight:
        torch.testing.assert_close(gw, w.grad)
