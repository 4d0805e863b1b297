"""The EAGLE3 / EAGLE 3.1 draft model, and the few base-model tensors it needs.

Data flow of one draft step (vLLM / SGLang `LlamaForCausalLMEagle3` semantics):

    aux [T, k*H] --fc_norm (3.1, per slot)--> fc --> h [T, H]            (first step only)
    h, embed(next token) --> midlayer:
        x = cat(input_layernorm(embed), hidden_norm(h))                 [T, 2H]
        h = h + o_proj(attention(x))        q/k/v take 2H inputs, RoPE
        h = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))                                            [T, draft_vocab]
    next step's h = h (EAGLE3) or norm(h) (EAGLE 3.1, norm_output)

The module's state-dict names are the draft-model contract (listed in docs/TRAIN.md, Output
directory; tested in test_state_dict_names_are_the_contract). From the base checkpoint only embed_tokens, lm_head (or the tied embedding) and the
final norm are read, tensor by tensor from safetensors, so memory does not grow with the
base model's depth. The embedding stays frozen and is not saved with the draft.

Public API:
    build_draft(base_dir, eagle_config, schema, draft_vocab=None) -> (Eagle3Draft, TargetHead)
    save_draft(out_dir, draft)  /  load_draft(path, base_model=None) -> Eagle3Draft
    draft_step(draft, input_ids, hidden, positions) -> DraftStepOutput(logits, hidden)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from draftdata.config import ConfigError, DatasetSchema, EagleConfig
from draftdata.errors import DraftdataError

DRAFT_WEIGHTS = "draft.safetensors"
DRAFT_CONFIG = "draft_config.json"
DRAFT_CONFIG_FORMAT = "draftdata-draft"

# Where HF-style checkpoints keep the three tensors we read (ModelOpt's search lists, + .weight).
EMBED_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
               "language_model.model.embed_tokens.weight", "embed_tokens.weight",
               "backbone.embeddings.weight", "tok_embeddings.weight")
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "output.weight")
FINAL_NORM_NAMES = ("model.norm.weight", "model.language_model.norm.weight",
                    "language_model.model.norm.weight", "norm.weight", "backbone.norm_f.weight")


# ---------------------------------------------------------------------------------------------
# Configuration: EagleConfig + base model sizes + dataset layers, resolved to plain numbers
# ---------------------------------------------------------------------------------------------

@dataclass
class BaseModelConfig:
    """The base-model facts the draft depends on, read from the base's config.json."""

    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    intermediate_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    model_type: str
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    special_tokens: dict[str, Any] = dataclasses.field(default_factory=dict)  # bos/eos/pad ids that are set


def read_base_config(base_dir: str | Path) -> BaseModelConfig:
    """Read the base model's config.json (the text config of a VLM) without loading any weights."""
    path = Path(base_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DraftdataError(f"{path} not found: --model must be a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise DraftdataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    tie = raw.get("tie_word_embeddings")
    for key in ("text_config", "llm_config"):
        if isinstance(raw.get(key), dict):
            raw = {**raw, **raw[key]}
    missing = [k for k in ("hidden_size", "vocab_size", "num_hidden_layers") if k not in raw]
    if missing:
        raise DraftdataError(f"{path} lacks {missing}; is this a decoder-only LM config?")
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    rope_scaling = normalize_rope_scaling(rope)
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"]) if raw.get("num_attention_heads") else None
    return BaseModelConfig(
        hidden_size=hidden, vocab_size=int(raw["vocab_size"]),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
        intermediate_size=int(raw.get("intermediate_size") or 4 * hidden),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", tie if tie is not None else False)),
        model_type=str(raw.get("model_type", "")),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads) if heads else None,
        head_dim=int(raw.get("head_dim") or hidden // heads) if heads else None,
        special_tokens={k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None},
    )


def normalize_rope_scaling(rope: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rope_scaling / rope_parameters dict as the draft uses it: `type` renamed `rope_type`,
    `rope_theta` dropped (kept separately), and None for plain RoPE. Multimodal RoPE (`mrope`,
    Qwen2-VL / Qwen2.5-VL) is plain RoPE for text-only positions (all three position sections
    equal), as SGLang's llama_eagle3 treats it, so it maps to None too."""
    if not rope:
        return None
    out = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "type" in out:
        kind = out.pop("type")
        out.setdefault("rope_type", kind)
    if out.get("rope_type", "default") in ("default", "mrope"):
        return None
    return out


@dataclass
class DraftConfig:
    """Everything that fixes the draft's shapes and numerics; saved as draft_config.json.

    `eagle_config` is the full EagleConfig (ModelOpt field names). The other fields are the
    resolved values the model is built from: base sizes, the RoPE the draft is trained with
    (the base's unless the EagleConfig overrides it), and the dataset's aux layer ids.
    """

    eagle_config: dict[str, Any]
    base_model_id: str
    base_model_path: str
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    draft_vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    aux_layer_ids: list[int]
    base_num_hidden_layers: int
    base_tie_word_embeddings: bool
    base_rms_norm_eps: float
    final_hidden_prenorm: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    norm_before_residual: bool = False
    train_lm_head: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.01
    base_special_tokens: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the export's config.json
    format: str = DRAFT_CONFIG_FORMAT
    format_version: int = 1

    @property
    def num_aux_slots(self) -> int:
        return len(self.aux_layer_ids)

    @property
    def eagle(self) -> EagleConfig:
        return EagleConfig.from_dict(self.eagle_config, source=DRAFT_CONFIG)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = DRAFT_CONFIG) -> DraftConfig:
        if d.get("format") != DRAFT_CONFIG_FORMAT:
            raise DraftdataError(f"{source} is not a draftdata draft config (format={d.get('format')!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_draft_config(base_dir: str | Path, eagle: EagleConfig, schema: DatasetSchema,
                         draft_vocab_size: int | None = None) -> DraftConfig:
    """Combine EagleConfig, the base's config.json and the dataset schema; check they agree."""
    base = read_base_config(base_dir)
    arch = eagle.arch
    where = f"dataset (base_model_id={schema.base_model_id!r})"
    for name in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if getattr(schema, name) != getattr(base, name):
            raise DraftdataError(f"{where} has {name}={getattr(schema, name)} but the base model at "
                                 f"{base_dir} has {getattr(base, name)}: pass the base model the "
                                 "dataset was collected with")
    aux = list(schema.aux_layer_ids)
    if arch["eagle_aux_hidden_state_layer_ids"] and list(arch["eagle_aux_hidden_state_layer_ids"]) != aux:
        raise ConfigError(f"eagle_aux_hidden_state_layer_ids={arch['eagle_aux_hidden_state_layer_ids']} but "
                          f"the {where} stores layers {aux}; remove the field (it comes from the dataset)")
    if arch["draft_vocab_size"] is not None and draft_vocab_size is not None \
            and arch["draft_vocab_size"] != draft_vocab_size:
        raise ConfigError(f"eagle_architecture_config.draft_vocab_size={arch['draft_vocab_size']} but the "
                          f"draft vocabulary file has {draft_vocab_size} entries")
    n_draft = draft_vocab_size or arch["draft_vocab_size"] or base.vocab_size
    if n_draft > base.vocab_size:
        raise ConfigError(f"draft_vocab_size {n_draft} exceeds the base vocabulary ({base.vocab_size})")
    if n_draft < base.vocab_size and draft_vocab_size is None:
        raise ConfigError(f"draft_vocab_size {n_draft} < vocab_size {base.vocab_size} needs the d2t table: "
                          "build it with `draftdata vocab` and pass --draft-vocab FILE")
    # None in the EagleConfig = the base's RoPE; a value the user set wins (top-level rope_theta, or
    # rope_theta inside rope_scaling, ModelOpt 0.47's spelling; validate() rejects the two disagreeing).
    user_rope = arch["rope_scaling"]
    rope_scaling = normalize_rope_scaling(user_rope if user_rope is not None else base.rope_scaling)
    rope_theta = arch["rope_theta"]
    if rope_theta is None and user_rope is not None:
        rope_theta = user_rope.get("rope_theta")
    if rope_theta is None:
        rope_theta = base.rope_theta
    shape = {}
    for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
        shape[name] = arch[name] or getattr(base, name)
        if shape[name] is None:
            raise ConfigError(f"the base model's config.json has no {name}; set eagle_architecture_config."
                              f"{name} in --eagle-config")
    if shape["num_attention_heads"] % shape["num_key_value_heads"]:
        raise ConfigError(f"the draft would have {shape['num_attention_heads']} attention heads and "
                          f"{shape['num_key_value_heads']} KV heads (unset values are the base model's): heads "
                          "must be a multiple of KV heads; set both in --eagle-config")
    if shape["head_dim"] % 2:
        raise ConfigError(f"head_dim {shape['head_dim']} must be even (RoPE rotates pairs)")
    return DraftConfig(
        eagle_config={**eagle.to_dict(), "eagle_architecture_config": {
            **arch, **shape, "eagle_aux_hidden_state_layer_ids": aux, "draft_vocab_size": n_draft}},
        base_model_id=schema.base_model_id, base_model_path=str(Path(base_dir).resolve()),
        hidden_size=base.hidden_size, vocab_size=base.vocab_size,
        max_position_embeddings=base.max_position_embeddings, draft_vocab_size=n_draft,
        intermediate_size=arch["intermediate_size"] or base.intermediate_size,
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"], rms_norm_eps=float(arch["rms_norm_eps"]),
        rope_theta=float(rope_theta), rope_scaling=rope_scaling, aux_layer_ids=aux,
        base_num_hidden_layers=base.num_hidden_layers, base_tie_word_embeddings=base.tie_word_embeddings,
        base_rms_norm_eps=base.rms_norm_eps, final_hidden_prenorm=bool(schema.final_hidden_prenorm),
        fc_norm=bool(arch["fc_norm"]), norm_output=bool(arch["norm_output"]),
        norm_before_residual=bool(arch["norm_before_residual"]),
        train_lm_head=bool(arch["has_lm_head"]) or (n_draft < base.vocab_size and not arch["freeze_lm_head"]),
        attention_bias=bool(arch["attention_bias"]), mlp_bias=bool(arch["mlp_bias"]),
        attention_dropout=float(arch["attention_dropout"]), initializer_range=float(arch["initializer_range"]),
        base_special_tokens=dict(base.special_tokens),
    )


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Llama RMSNorm: normalize in fp32, cast back, scale (same arithmetic as HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin for given positions, with the base model's theta and scaling (HF formulas)."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        dim = cfg.head_dim
        self.attention_scaling = 1.0
        scaling = normalize_rope_scaling(cfg.rope_scaling)
        rope_type = (scaling or {}).get("rope_type", "default")
        if rope_type == "default":
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        else:
            # Scaled RoPE (llama3, yarn, linear, ...): transformers owns those formulas.
            from transformers import LlamaConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (known: default, mrope, "
                                  f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}); set "
                                  "eagle_architecture_config.rope_scaling in --eagle-config")
            hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                             head_dim=dim, max_position_embeddings=cfg.max_position_embeddings,
                             rope_parameters={**scaling, "rope_theta": cfg.rope_theta})
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, None)
        # A plain attribute, not a buffer: `.to(torch.bfloat16)` on the draft must not round the
        # frequencies (that would shift every rotation at long positions).
        self.inv_freq = inv_freq.float()

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, head_dim] in fp32."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Grouped-query attention whose q/k/v projections read the 2H concat of embedding and state."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.dropout = cfg.attention_dropout
        d_in = 2 * cfg.hidden_size
        self.q_proj = nn.Linear(d_in, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d_in, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d_in, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                past: list[KV] | None = None) -> tuple[torch.Tensor, KV]:
        """x [B, T, 2H]; mask bool [T, S] (True = may attend) over the keys of `past` then these T,
        or None for plain causal attention. Returns the output and this call's (k, v)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys = torch.cat([p[0] for p in past or []] + [k], dim=2)
        values = torch.cat([p[1] for p in past or []] + [v], dim=2)
        group = self.n_heads // self.n_kv
        if group > 1:
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class MLP(nn.Module):
    """SwiGLU feed-forward (Llama)."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """The EAGLE3 'midlayer': embedding and state are normalized separately, then concatenated.

    The residual stream is the un-normalized state h (vLLM's default `norm_before_residual=False`),
    or hidden_norm(h) with `norm_before_residual` (drafts trained by speculators).
    ModelOpt's HF module instead runs the stock Llama layer, whose input_layernorm is applied to h
    before hidden_norm (two norms, the first sharing the embedding norm's weight); we follow the
    inference engines, which apply hidden_norm alone (docs/TRAIN.md).
    """

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.norm_before_residual = cfg.norm_before_residual

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, past: list[KV] | None = None) -> tuple[torch.Tensor, KV]:
        normed = self.hidden_norm(hidden)
        x = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        attn, kv = self.self_attn(x, cos, sin, mask, past)
        h = (normed if self.norm_before_residual else hidden) + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, kv


# ---------------------------------------------------------------------------------------------
# The draft
# ---------------------------------------------------------------------------------------------

@dataclass
class DraftStepOutput:
    logits: torch.Tensor | None    # [B, T, draft_vocab] (None when not asked for)
    hidden: torch.Tensor           # [B, T, H] state that feeds the next draft step
    kv: KV | None = None           # this call's keys/values (used by the TTT unroll)
    normed: torch.Tensor | None = None   # [B, T, H] norm(h), the lm_head's input


class Eagle3Draft(nn.Module):
    """EAGLE3 / EAGLE 3.1 draft. `draft_state_dict()` holds exactly the contract names.

    `embed_tokens` is the base model's embedding, frozen and not saved (it is read again from
    the base at load time). `lm_head` starts as the base lm_head rows of the draft vocabulary;
    it is trained when the vocabulary is compressed or `has_lm_head` is set, and frozen
    otherwise (ModelOpt then uses the base lm_head itself).
    """

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        # Filled from the base checkpoint by build_draft / load_draft (set_embedding).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h, device="meta")
        self.embed_tokens.weight.requires_grad_(False)
        self.fc_norm = (nn.ModuleList(RMSNorm(h, cfg.rms_norm_eps) for _ in range(cfg.num_aux_slots))
                        if cfg.fc_norm else None)
        self.fc = nn.Linear(cfg.num_aux_slots * h, h, bias=False)
        self.midlayer = DecoderLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(cfg.train_lm_head)
        self.rotary = RotaryEmbedding(cfg)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool)
                             if cfg.draft_vocab_size == cfg.vocab_size
                             else torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self._init_weights()

    def _init_weights(self) -> None:
        """Linear weights ~ N(0, initializer_range), as HF's _init_weights does; norms at 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_embedding(self, weight: torch.Tensor) -> None:
        """Install the base model's (frozen) token embedding."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise DraftdataError(f"base embedding has shape {tuple(weight.shape)}, the draft expects {expected}; "
                                 "wrong base model?")
        self.embed_tokens.weight = nn.Parameter(weight, requires_grad=False)

    def combine_aux(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [B, T, k*H] (slots in ascending layer order) -> first-step state [B, T, H]."""
        if self.fc_norm is not None:
            slots = aux.chunk(len(self.fc_norm), dim=-1)
            aux = torch.cat([norm(s) for norm, s in zip(self.fc_norm, slots)], dim=-1)
        return self.fc(aux)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None = None, past: list[KV] | None = None,
                logits: bool = True) -> DraftStepOutput:
        """One pass of the midlayer over T positions.

        embeds [B, T, H]: embedding of the token *after* each position; hidden [B, T, H]: the state
        at each position (fc output on the first step); mask: bool [T, S] over past keys + these
        T keys, or None for causal attention without `past`. logits=False skips the lm_head (the
        training loss applies it fused with the cross-entropy).
        """
        cos, sin = self.rotary(position_ids)
        h, kv = self.midlayer(embeds.to(hidden.dtype), hidden, cos, sin, mask, past)
        normed = self.norm(h)
        return DraftStepOutput(logits=self.lm_head(normed) if logits else None,
                               hidden=normed if self.config.norm_output else h, kv=kv, normed=normed)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to base-vocabulary ids (d2t holds offsets)."""
        return draft_ids + self.d2t[draft_ids]

    def draft_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved tensors: contract names, without the frozen base embedding."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed_tokens.")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class TargetHead(nn.Module):
    """Frozen base lm_head (rows of the draft vocabulary) turning stored final hidden states into
    the target logits; applies the base's final norm first when the dataset stored pre-norm states."""

    def __init__(self, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.norm = None
        if norm_weight is not None:
            self.norm = RMSNorm(weight.shape[1], eps)
            self.norm.weight = nn.Parameter(norm_weight, requires_grad=False)

    @torch.no_grad()
    def forward(self, final_hidden: torch.Tensor) -> torch.Tensor:
        h = final_hidden.to(self.weight.dtype)
        if self.norm is not None:
            h = self.norm(h)
        return F.linear(h, self.weight)


def draft_step(draft: Eagle3Draft, input_ids: torch.Tensor, hidden: torch.Tensor,
               positions: torch.Tensor | None = None, hidden_is_aux: bool | None = None) -> DraftStepOutput:
    """One draft forward for inference, without KV cache (causal attention over all T positions).

    input_ids [B, T]: at position t, the token that follows position t (for the context this is
    the prompt shifted left by one plus the base model's next token). hidden [B, T, k*H] aux
    states (combined through fc) or [B, T, H] states (the fc output for context positions, then
    the `hidden` returned by earlier steps); `hidden_is_aux` says which (default: by width, which
    is ambiguous only for a one-slot draft). positions [B, T] default 0..T-1. Returns logits over
    the draft vocabulary (map with `draft.to_target_ids`) and the state for the next step. To
    draft a chain, append the new token and `out.hidden[:, -1:]` and call again (quadratic but
    exact: the same keys a KV cache would hold).
    """
    if input_ids.dim() == 1:
        input_ids, hidden = input_ids[None], hidden[None]
        positions = positions[None] if positions is not None else None
    param = draft.fc.weight
    hidden = hidden.to(param.device, param.dtype)
    cfg = draft.config
    if hidden_is_aux is None:
        if cfg.num_aux_slots == 1:
            raise ValueError("draft_step: pass hidden_is_aux= for a draft with one aux slot")
        hidden_is_aux = hidden.shape[-1] == cfg.num_aux_slots * cfg.hidden_size
    if hidden_is_aux:
        hidden = draft.combine_aux(hidden)
    if hidden.shape[-1] != cfg.hidden_size:
        raise ValueError(f"draft_step: hidden has width {hidden.shape[-1]}, expected {cfg.hidden_size} "
                         f"or {cfg.num_aux_slots * cfg.hidden_size} (aux)")
    if positions is None:
        positions = torch.arange(input_ids.shape[1], device=param.device).expand(input_ids.shape[0], -1)
    return draft(draft.embed(input_ids.to(param.device)), hidden, positions.to(param.device))


# ---------------------------------------------------------------------------------------------
# Reading base tensors and building / saving / loading the draft
# ---------------------------------------------------------------------------------------------

def _open_weights(path: Path) -> Any:
    """safe_open `path`, turning a missing, truncated or foreign file into one line naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        reason = " ".join(str(e).split())
        raise DraftdataError(f"{path}: cannot read the base model's weights ({reason}); the file is damaged or "
                             "incomplete: download or convert the model again") from None


def read_draft_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a draft's weights file (a checkpoint or an export); a damaged file is one
    line naming it. `*.safetensors`, or `pytorch_model.bin` as the EAGLE authors' own drafts ship:
    read with `weights_only=True` (plain tensors only, never arbitrary pickled objects)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix == ".bin":
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- unpickling refusals and damage come as many types
            raise DraftdataError(f"{path}: cannot read the draft's weights as a plain tensor state dict "
                                 f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise DraftdataError(f"{path}: expected a flat {{name: tensor}} state dict")
        return state
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DraftdataError(f"{path}: cannot read the draft's weights ({' '.join(str(e).split())})") from None


def _tensor_files(base_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index of a sharded checkpoint or file headers."""
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DraftdataError(f"{index}: not a readable safetensors index ({type(e).__name__}: {e}); "
                                 "download or convert the model again") from None
        return {name: base_dir / file for name, file in weight_map.items()}
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise DraftdataError(f"no *.safetensors in {base_dir}: the base model must be a safetensors "
                             "checkpoint (convert .bin/.gguf models with `draftdata.models.resolve_model`)")
    out = {}
    for f in files:
        with _open_weights(f) as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


def _read_tensor(files: dict[str, Path], name: str, rows: torch.Tensor | None = None,
                 chunk_rows: int = 8192) -> torch.Tensor:
    """Read one tensor (optionally only `rows` of it, sorted) from its file, chunk by chunk."""
    with _open_weights(files[name]) as st:
        if rows is None:
            return st.get_tensor(name)
        sl = st.get_slice(name)
        n = sl.get_shape()[0]
        parts = []
        for start in range(0, n, chunk_rows):
            sel = rows[(rows >= start) & (rows < start + chunk_rows)]
            if len(sel):
                parts.append(sl[start:min(start + chunk_rows, n)][sel - start])
        return torch.cat(parts)


def load_base_parts(base_dir: str | Path, rows: torch.Tensor | None = None,
                    need_norm: bool = False) -> dict[str, torch.Tensor]:
    """Read embed_tokens, lm_head (rows `rows` only; the embedding when tied) and, if asked, the
    final norm straight from the base's safetensors. Nothing else of the base is touched."""
    base_dir = Path(base_dir)
    cfg = read_base_config(base_dir)
    files = _tensor_files(base_dir)

    def find(names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in files), None)

    embed_name = find(EMBED_NAMES)
    if embed_name is None:
        raise DraftdataError(f"{base_dir}: no embedding tensor found (looked for {list(EMBED_NAMES)})")
    head_name = None if cfg.tie_word_embeddings else find(LM_HEAD_NAMES)
    out = {"embed_tokens": _read_tensor(files, embed_name)}
    if head_name is None:
        out["lm_head"] = out["embed_tokens"] if rows is None else out["embed_tokens"][rows]
    else:
        out["lm_head"] = _read_tensor(files, head_name, rows)
    if need_norm:
        norm_name = find(FINAL_NORM_NAMES)
        if norm_name is None:
            raise DraftdataError(f"{base_dir}: the dataset stores pre-norm final hidden states but no final "
                                 f"norm tensor was found (looked for {list(FINAL_NORM_NAMES)})")
        out["norm"] = _read_tensor(files, norm_name)
    return out


def check_base_model(base_dir: str | Path, eagle: EagleConfig, schema: DatasetSchema,
                     draft_vocab: Any = None) -> DraftConfig:
    """The draft's config for this base model and dataset, after every check that reads no tensor
    data: config.json against the dataset, the draft vocabulary's size (`draft_vocab`: a loaded
    DraftVocab or None) and the safetensors headers (a truncated download). `draftdata train` runs
    it before it writes anything, so bad inputs leave no output directory behind."""
    cfg = resolve_draft_config(base_dir, eagle, schema,
                               draft_vocab_size=None if draft_vocab is None else draft_vocab.draft_vocab_size)
    if draft_vocab is not None and draft_vocab.vocab_size != cfg.vocab_size:
        raise DraftdataError(f"draft vocabulary was built for vocab_size {draft_vocab.vocab_size}, the base "
                             f"model has {cfg.vocab_size}")
    files = _tensor_files(Path(base_dir))
    if not any(n in files for n in EMBED_NAMES):
        raise DraftdataError(f"{base_dir}: no embedding tensor found (looked for {list(EMBED_NAMES)})")
    return cfg


def build_draft(base_dir: str | Path, eagle: EagleConfig, schema: DatasetSchema,
                draft_vocab: Any = None, frozen_dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> tuple[Eagle3Draft, TargetHead]:
    """A freshly initialized draft for `schema`'s base model, and the frozen target head.

    draft_vocab: None, a path to a `draftdata vocab` file, or a `draftdata.train.vocab.DraftVocab`.
    Frozen base tensors (embedding, target head) are kept in `frozen_dtype`; the trained
    parameters are fp32 (autocast handles bf16 compute, `draftdata train --dtype`).
    """
    from draftdata.train.vocab import DraftVocab, load_draft_vocab

    if draft_vocab is not None and not isinstance(draft_vocab, DraftVocab):
        draft_vocab = load_draft_vocab(draft_vocab)
    cfg = check_base_model(base_dir, eagle, schema, draft_vocab)
    rows = None
    if draft_vocab is not None and cfg.draft_vocab_size < cfg.vocab_size:
        rows = draft_vocab.target_ids()
    parts = load_base_parts(base_dir, rows=rows, need_norm=cfg.final_hidden_prenorm)
    draft = Eagle3Draft(cfg)
    draft.set_embedding(parts["embed_tokens"].to(frozen_dtype))
    head = TargetHead(parts["lm_head"].to(frozen_dtype), parts.get("norm"), cfg.base_rms_norm_eps)
    with torch.no_grad():
        if cfg.train_lm_head:
            draft.lm_head.weight.copy_(parts["lm_head"].float())
        else:
            draft.lm_head.weight = head.weight      # the base lm_head itself, frozen (as ModelOpt)
        if draft_vocab is not None:
            draft.d2t.copy_(draft_vocab.d2t)
            draft.t2d.copy_(draft_vocab.t2d)
    return draft.to(device), head.to(device)


def save_draft(out_dir: str | Path, draft: Eagle3Draft) -> Path:
    """Write `draft.safetensors` (contract names, in the dtype trained) and `draft_config.json`,
    each under a temporary name renamed into place (config last)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in draft.draft_state_dict().items()}
    tmp = out_dir / (DRAFT_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": DRAFT_CONFIG_FORMAT})
    tmp.chmod(0o644)                       # safetensors creates 0600; serving jobs may run as others
    tmp.replace(out_dir / DRAFT_WEIGHTS)
    tmp = out_dir / (DRAFT_CONFIG + ".tmp")
    tmp.write_text(draft.config.to_json())
    tmp.replace(out_dir / DRAFT_CONFIG)
    return out_dir


def load_draft(path: str | Path, base_model: str | Path | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Eagle3Draft:
    """Load a draft from a checkpoint dir (draft.safetensors + draft_config.json).

    The frozen embedding is read from `base_model` (default: the base path recorded in
    draft_config.json). Raises DraftdataError naming the file when something is missing.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path = path / DRAFT_CONFIG
    if not cfg_path.exists():
        raise DraftdataError(f"{cfg_path} not found: expected a draftdata checkpoint directory "
                             f"({DRAFT_WEIGHTS} + {DRAFT_CONFIG})")
    cfg = DraftConfig.from_dict(json.loads(cfg_path.read_text()), source=str(cfg_path))
    base = Path(base_model) if base_model is not None else Path(cfg.base_model_path)
    if not base.is_dir():
        raise DraftdataError(f"{cfg_path}: the base model {str(base)!r} recorded at training time is not here; "
                             "pass base_model= (the frozen embedding is read from it)")
    draft = Eagle3Draft(cfg)
    state = load_file(str(path / DRAFT_WEIGHTS))
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("embed_tokens.")]
    if missing or unexpected:
        raise DraftdataError(f"{path / DRAFT_WEIGHTS}: missing tensors {missing}, unexpected {unexpected}")
    files = _tensor_files(base)
    embed_name = next((n for n in EMBED_NAMES if n in files), None)
    if embed_name is None:
        raise DraftdataError(f"{base}: no embedding tensor found (looked for {list(EMBED_NAMES)})")
    draft.set_embedding(_read_tensor(files, embed_name).to(dtype))
    return draft.to(device=device, dtype=dtype).eval()


def count_parameters(draft: Eagle3Draft) -> dict[str, int]:
    """Trainable and total saved parameter counts (for logs)."""
    saved = sum(v.numel() for k, v in draft.draft_state_dict().items() if v.is_floating_point())
    trainable = sum(p.numel() for p in draft.trainable_parameters())
    return {"trainable": trainable, "saved": saved}


__all__ = [
    "DRAFT_CONFIG", "DRAFT_WEIGHTS", "BaseModelConfig", "DraftConfig", "DraftStepOutput", "Eagle3Draft",
    "TargetHead", "build_draft", "count_parameters", "draft_step", "load_base_parts", "load_draft",
    "read_base_config", "resolve_draft_config", "save_draft",
]
