"""Configuration objects: the dataset schema (dataset.json) and the EAGLE draft config."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draftdata.errors import DraftdataError

# draftdata.models.model_hash's prefix for fingerprints that read the weight bytes
SAMPLED_MODEL_HASH = "sampled-sha256:"


def same_weights(a: str | None, b: str | None) -> bool:
    """Two model fingerprints agree on the weights' content (the sampled scheme; the older one
    hashed names and sizes only, which a fine-tune of the same shape shares)."""
    return bool(a) and str(a).startswith(SAMPLED_MODEL_HASH) and a == b


FORMAT_NAME = "draftdata"
FORMAT_VERSION = 1
LAYER_ID_CONVENTION = "decoder_layer_output_0based"
STORAGE_FORMATS = ("zarr", "arrow")
CODECS = ("bf16", "zstd", "fp8")


@dataclass
class DatasetSchema:
    """What every part of a dataset agrees on; written once as dataset.json and never changed.

    `aux_layer_ids` follow LAYER_ID_CONVENTION: id k is the output of decoder layer k
    (0-based), i.e. HF `output_hidden_states[k + 1]`, as ModelOpt and TensorRT-LLM number them.
    `hidden_states` is the final hidden state; `final_hidden_prenorm` says whether it was taken
    before the model's final norm (vLLM) or after it (HF, our default).
    """

    base_model_id: str
    hidden_size: int
    aux_layer_ids: list[int]
    num_hidden_layers: int
    vocab_size: int
    max_seq_len: int
    base_model_revision: str | None = None
    base_model_hash: str | None = None
    tokenizer_hash: str | None = None
    final_hidden_prenorm: bool = False
    loss_mask: str = "assistant"
    layer_id_convention: str = LAYER_ID_CONVENTION
    hidden_dtype: str = "bfloat16"
    storage_format: str = "zarr"
    codec: str = "bf16"
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_aux_slots(self) -> int:
        return len(self.aux_layer_ids)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_aux_slots"] = self.num_aux_slots
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSchema:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"num_aux_slots"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if unknown:
            kwargs.setdefault("extra", {})
            kwargs["extra"] = {**kwargs["extra"], **{k: d[k] for k in unknown}}
        return cls(**kwargs)

    # Fields that must agree for two runs to write into one dataset.
    IDENTITY_FIELDS = (
        "base_model_id", "base_model_revision", "base_model_hash", "tokenizer_hash", "hidden_size",
        "aux_layer_ids", "num_hidden_layers", "vocab_size", "final_hidden_prenorm", "loss_mask",
        "layer_id_convention", "hidden_dtype", "storage_format", "codec", "format_version",
    )

    def differing_fields(self, other: DatasetSchema) -> list[str]:
        """Identity fields where `other` differs from self (empty if the two may share a dataset).

        A base model identified by its directory (`base_model_id` an absolute path) may move: when
        both sides carry the same content fingerprint (`sampled-sha256:`, which reads the weight
        bytes), the paths are not compared, so a copy on local disk or another mount resumes.
        """
        out = []
        for name in self.IDENTITY_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if a != b and not (name == "base_model_id" and self.same_model_elsewhere(other)):
                out.append(name)
        return out

    def same_model_elsewhere(self, other: DatasetSchema) -> bool:
        """Both name their base by a directory path, and the weights' content fingerprints agree."""
        return (str(self.base_model_id).startswith("/") and str(other.base_model_id).startswith("/")
                and same_weights(self.base_model_hash, other.base_model_hash))

    def differences(self, other: DatasetSchema) -> list[str]:
        """Human-readable list of identity fields where `other` differs from self (empty if compatible)."""
        return [f"{name}: dataset has {getattr(self, name)!r}, this run has {getattr(other, name)!r}"
                for name in self.differing_fields(other)]


# ---------------------------------------------------------------------------------------------
# EAGLE draft configuration
# ---------------------------------------------------------------------------------------------

class ConfigError(DraftdataError):
    """An EagleConfig (or its JSON override file) asks for something invalid or unsupported."""


# ModelOpt 0.47 `eagle3_default_config` (modelopt/torch/speculative/eagle/default_config.py with
# use_aux_hidden_state=True, use_last_layernorm=True), plus the fields this project adds.
# Differences, each deliberate (docs/TRAIN.md):
#   intermediate_size, rope_theta, rope_scaling: None = take the base model's value
#     (ModelOpt: 14336 and theta 10000 whatever the base is);
#   num_attention_heads, num_key_value_heads, head_dim: None = the base model's attention shape,
#     as the EAGLE3 reference drafts, SpecForge and speculators size it (ModelOpt: 32, 8, 128
#     whatever the base is; on SmolLM2-135M that is a 4096-wide attention on a 576-wide model,
#     which trains 2.2x slower for no gain: bench/quality/results.md, Run 6);
#   draft_vocab_size: None = the base vocabulary, or the size of the --draft-vocab file;
#   fc_norm, norm_output: the EAGLE 3.1 switches (vLLM's config names), off by default;
#   norm_before_residual: the layer's residual is hidden_norm(h), not h (vLLM's and speculators'
#     name; drafts trained by speculators set it), off by default;
#   freeze_lm_head: keep a compressed draft vocabulary's lm_head at the base's rows (not trained).
EAGLE3_ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "position_embedding_type": "rope",
    "rope_scaling": None,
    "rope_theta": None,
    "num_hidden_layers": 1,
    "intermediate_size": None,
    "num_attention_heads": None,
    "num_key_value_heads": None,
    "initializer_range": 0.01,
    "rms_norm_eps": 1e-05,
    "mlp_bias": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_input_layernorm_in_first_layer": True,
    "use_last_layernorm": True,
    "use_aux_hidden_state": True,
    "eagle_aux_hidden_state_layer_ids": [],
    "use_mtp_layernorm": False,
    "parallel_draft_step": 1,
    "parallel_draft_heads_num_layers": 1,
    "has_lm_head": False,
    "head_dim": None,
    "draft_vocab_size": None,
    "fc_norm": False,
    "norm_output": False,
    "norm_before_residual": False,
    "freeze_lm_head": False,
}
# ModelOpt fills these from the base model; so do we, and setting them is an error.
BASE_MODEL_ARCH_FIELDS = ("hidden_size", "vocab_size", "max_position_embeddings")
# Accepted for compatibility with ModelOpt eagle_config.json files; they change nothing here.
IGNORED_ARCH_FIELDS = ("_attn_implementation",)
# Architecture fields that must be JSON booleans (the use_* switches are checked by _SUPPORTED_ARCH).
_BOOL_ARCH_FIELDS = ("mlp_bias", "attention_bias", "has_lm_head", "fc_norm", "norm_output", "norm_before_residual",
                     "freeze_lm_head")
# RoPE types that need no transformers formula: plain RoPE, and multimodal RoPE (plain for text).
_PLAIN_ROPE_TYPES = ("default", "mrope")
# What the trainer can build; anything else is rejected with the reason.
_SUPPORTED_ARCH = {
    "num_hidden_layers": (1, "the draft has one decoder layer ('midlayer', as vLLM/SGLang load it)"),
    "use_aux_hidden_state": (True, "this trainer trains EAGLE3 drafts, which read the aux hidden states"),
    "use_last_layernorm": (True, "EAGLE3 drafts apply the final norm before lm_head"),
    "use_input_layernorm_in_first_layer": (True, "EAGLE3 normalizes the token embedding"),
    "use_mtp_layernorm": (False, "MTP-style drafts are not supported"),
    "parallel_draft_step": (1, "parallel drafting is not supported"),
    "position_embedding_type": ("rope", "only RoPE is supported"),
    "hidden_act": ("silu", "the draft MLP is SwiGLU (silu)"),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class EagleConfig:
    """The EAGLE draft configuration, with the fields and defaults of ModelOpt 0.47's `EagleConfig`.

    Load with `EagleConfig.from_json_file(path)`: the file holds only the fields to change, and
    `eagle_architecture_config` is merged key by key over EAGLE3_ARCHITECTURE_DEFAULTS (as
    ModelOpt's convert does). `hidden_size`, `vocab_size` and `max_position_embeddings` come
    from the base model and are rejected if set. Fields this offline trainer cannot honour
    (an online base, LoRA on the base, kimik2 decoder, ...) raise ConfigError saying why.
    `eagle_offline` defaults to True here: ModelOpt's class default is False, but its recipe
    derives True for every offline data mode, and this trainer only reads stored hidden states.
    """

    eagle_offline: bool = True
    eagle_hidden_state_distillation: bool = False
    eagle_self_logit_distillation: bool = True
    eagle_freeze_base_model: bool = True
    eagle_report_acc: bool = True
    eagle_reuse_base_decoder: bool = False
    eagle_loss_decay_factor: float = 0.9
    eagle_architecture_config: dict[str, Any] = field(default_factory=dict)
    eagle_decoder_type: str = "llama"
    eagle_ttt_steps: int = 3
    eagle_mix_hidden_states: bool = False
    eagle_use_torch_compile: bool = True
    eagle_enable_nvtx: bool = False
    eagle_export_rope_scaling: dict[str, Any] = field(default_factory=lambda: {
        "rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 2048})
    eagle_base_lora: bool = False
    eagle_base_lora_rank: int = 64
    eagle_base_lora_alpha: float = 16.0
    eagle_base_lora_target_modules: list[str] | None = None
    eagle_base_lora_preservation_loss_weight: float = 0.1
    eagle_base_lora_warmup_steps: int = 0
    eagle_base_lora_start_layer: int | None = None
    eagle_base_lora_logits_detach_prob: float = 0.5

    def __post_init__(self) -> None:
        given = self.eagle_architecture_config
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise ConfigError(f"eagle_architecture_config must be an object of architecture fields, got "
                              f"{given!r}")
        self.eagle_architecture_config = {**copy.deepcopy(EAGLE3_ARCHITECTURE_DEFAULTS), **given}
        self.validate()

    @property
    def arch(self) -> dict[str, Any]:
        """The merged `eagle_architecture_config`."""
        return self.eagle_architecture_config

    def validate(self) -> None:
        """Raise ConfigError for a value this project cannot train, naming the field and the fix."""
        self._check_types()
        if self.eagle_decoder_type == "kimik2":
            raise ConfigError("eagle_decoder_type 'kimik2' is not supported by draftdata (it needs the "
                              "Kimi-K2/DeepSeek-V3 MLA decoder); use 'llama'")
        if self.eagle_decoder_type != "llama":
            raise ConfigError(f"eagle_decoder_type {self.eagle_decoder_type!r} is unknown; use 'llama'")
        if not self.eagle_offline:
            raise ConfigError("eagle_offline must be True: this trainer reads stored hidden states and "
                              "never runs the base model (remove the field or set it to true)")
        if not self.eagle_freeze_base_model:
            raise ConfigError("eagle_freeze_base_model must be True with eagle_offline=True: the base "
                              "model is not loaded, so it cannot be trained")
        if self.eagle_hidden_state_distillation:
            raise ConfigError("eagle_hidden_state_distillation is not supported (ModelOpt's HF EAGLE3 "
                              "path does not use it either); use eagle_self_logit_distillation")
        if self.eagle_reuse_base_decoder:
            raise ConfigError("eagle_reuse_base_decoder needs the base decoder layers, which an "
                              "offline (eagle_offline=True) trainer does not load")
        if self.eagle_base_lora:
            raise ConfigError("eagle_base_lora is incompatible with eagle_offline=True (as in ModelOpt)")
        if not _is_int(self.eagle_ttt_steps) or self.eagle_ttt_steps < 1:
            raise ConfigError(f"eagle_ttt_steps must be an integer >= 1, got {self.eagle_ttt_steps!r}")
        if not _is_number(self.eagle_loss_decay_factor) or not 0.0 < self.eagle_loss_decay_factor <= 1.0:
            raise ConfigError(f"eagle_loss_decay_factor must be a number in (0, 1], got "
                              f"{self.eagle_loss_decay_factor!r}")
        arch = self.eagle_architecture_config
        for name in BASE_MODEL_ARCH_FIELDS:
            if name in arch:
                raise ConfigError(f"eagle_architecture_config.{name} comes from the base model and may "
                                  "not be set; remove it")
        known = set(EAGLE3_ARCHITECTURE_DEFAULTS) | set(IGNORED_ARCH_FIELDS)
        unknown = sorted(set(arch) - known)
        if unknown:
            raise ConfigError(f"unknown eagle_architecture_config field(s) {unknown}; known: {sorted(known)}")
        for name, (value, why) in _SUPPORTED_ARCH.items():
            if arch[name] != value:
                raise ConfigError(f"eagle_architecture_config.{name}={arch[name]!r} is not supported "
                                  f"({why}); use {value!r}")
        for name in ("intermediate_size", "draft_vocab_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim"):
            v = arch[name]
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"eagle_architecture_config.{name} must be a positive integer or null, got {v!r}")
        for name in _BOOL_ARCH_FIELDS:
            if not isinstance(arch[name], bool):
                raise ConfigError(f"eagle_architecture_config.{name} must be true or false, got {arch[name]!r}")
        for name, ok, what in (
                ("rms_norm_eps", lambda v: v > 0, "a number > 0"),
                ("initializer_range", lambda v: v >= 0, "a number >= 0"),
                ("attention_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")):
            if not _is_number(arch[name]) or not ok(arch[name]):
                raise ConfigError(f"eagle_architecture_config.{name} must be {what}, got {arch[name]!r}")
        ids = arch["eagle_aux_hidden_state_layer_ids"]
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ConfigError("eagle_architecture_config.eagle_aux_hidden_state_layer_ids must be a list of "
                              f"0-based layer ids, got {ids!r}")
        if arch["has_lm_head"] and arch["freeze_lm_head"]:
            raise ConfigError("eagle_architecture_config sets both has_lm_head (train the draft's lm_head) and "
                              "freeze_lm_head (keep it at the base's rows); set one")
        self._check_rope()
        # ModelOpt's _check_rope_scaling_consistency: the export override only replaces 'default' RoPE.
        rope = arch["rope_scaling"] or {}
        rope_type = rope.get("rope_type") or rope.get("type")
        if self.eagle_export_rope_scaling and rope_type not in (None, "default"):
            raise ConfigError(f"eagle_export_rope_scaling is set but eagle_architecture_config has "
                              f"rope_type={rope_type!r}; export rope overwrite is only valid when the "
                              "training rope_type is 'default' (set eagle_export_rope_scaling to {})")

    def _check_types(self) -> None:
        """JSON types of the top-level fields (a string "false" must not read as true)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise ConfigError(f"{f.name} must be true or false, got {v!r}")
        if not isinstance(self.eagle_architecture_config, dict):
            raise ConfigError(f"eagle_architecture_config must be an object of architecture fields, got "
                              f"{self.eagle_architecture_config!r}")
        if self.eagle_export_rope_scaling is not None and not isinstance(self.eagle_export_rope_scaling, dict):
            raise ConfigError(f"eagle_export_rope_scaling must be an object or null, got "
                              f"{self.eagle_export_rope_scaling!r}")

    def _check_rope(self) -> None:
        """rope_theta (top level or, ModelOpt 0.47's spelling, inside rope_scaling) and the RoPE type."""
        arch = self.eagle_architecture_config
        rope = arch["rope_scaling"]
        if rope is not None and not isinstance(rope, dict):
            raise ConfigError(f"eagle_architecture_config.rope_scaling must be an object or null, got {rope!r}")
        rope = rope or {}
        for where, theta in (("rope_theta", arch["rope_theta"]), ("rope_scaling.rope_theta", rope.get("rope_theta"))):
            if theta is not None and (not _is_number(theta) or not theta > 0):
                raise ConfigError(f"eagle_architecture_config.{where} must be a number > 0 or null, got {theta!r}")
        inner = rope.get("rope_theta")
        if arch["rope_theta"] is not None and inner is not None and float(arch["rope_theta"]) != float(inner):
            raise ConfigError(f"eagle_architecture_config.rope_theta={arch['rope_theta']!r} but rope_scaling."
                              f"rope_theta={inner!r}; set one of them (or the same value in both)")
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type in _PLAIN_ROPE_TYPES:
            return
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            known = [*_PLAIN_ROPE_TYPES, *sorted(ROPE_INIT_FUNCTIONS)]
            raise ConfigError(f"eagle_architecture_config.rope_scaling.rope_type={rope_type!r} is unknown; "
                              f"use one of {known}")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "EagleConfig") -> EagleConfig:
        """Build from a dict of the fields to change; unknown fields raise ConfigError naming `source`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of EagleConfig fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            hint = ""
            base_keys = [k for k in unknown if k in BASE_MODEL_ARCH_FIELDS]
            arch_keys = [k for k in unknown if k in EAGLE3_ARCHITECTURE_DEFAULTS]
            if base_keys:
                hint = f" ({base_keys} come from the base model and may not be set)"
            elif arch_keys:
                hint = f" ({arch_keys} belong inside \"eagle_architecture_config\")"
            else:
                import difflib

                close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
                close = {k: v[0] for k, v in close.items() if v}
                hint = (f" (did you mean {close}?)" if close else "") + f"; known: {sorted(names)}"
            raise ConfigError(f"{source}: unknown EagleConfig field(s) {unknown}{hint}")
        try:
            return cls(**copy.deepcopy(d))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> EagleConfig:
        """Read an override file holding only the fields to change (see class docstring)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read EAGLE config {path}: {e.strerror}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        return cls.from_dict(d, source=str(path))
