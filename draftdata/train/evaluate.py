"""Acceptance length of an exported EAGLE3 draft, measured with real speculative decoding.

Chain drafting, greedy verification, batch size 1, as vLLM / SGLang (topk=1) / TRT-LLM run it:

1. The base model (HF, KV cache) runs the prompt; forward hooks on the aux decoder layers
   capture their outputs (ModelOpt convention: id k = output of decoder layer k).
2. Draft catch-up: for every committed position j not yet in the draft's KV cache the draft
   reads the pair (token j+1, fc(aux_j)) at position j. Its output at the last position gives
   draft token d_1 and the state g that feeds the next step.
3. Chain: d_i comes from the pair (d_{i-1}, g) at the next position (vLLM: positions += 1);
   these K-1 entries are dropped from the draft cache afterwards (engines overwrite them).
4. One base forward verifies [last token, d_1..d_K]: the longest prefix of drafts equal to the
   base's argmax is accepted, plus the base's own next token (correction or bonus). The base
   cache is cropped to the committed tokens; the verify pass's aux states of the accepted
   positions feed the next catch-up.

So the output is, by construction, the base model's greedy output (up to floating-point
differences between a K+1-token forward and K+1 one-token forwards, which the report counts).

Metrics (docs/EXPORT.md): acceptance length = mean over verify passes of accepted drafts + 1
(tokens per base forward, prefill excluded); acceptance rate at position i = fraction of verify
passes whose first i drafts were all accepted (vLLM's per-position rate) and the conditional
rate given the first i-1 were; wall-clock speedup against transformers' greedy `generate` and
its prompt-lookup decoding (`prompt_lookup_num_tokens`), on the same prompts in the same run.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from draftdata.errors import DraftdataError

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "EAGLE3LlamaForCausalLM")


# ---------------------------------------------------------------------------------------------
# Loading an exported draft (ours, or any LlamaForCausalLMEagle3 directory)
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedDraft:
    model: Any                 # draftdata.train.model.Eagle3Draft
    aux_layer_ids: list[int]   # ModelOpt convention (output of decoder layer k, 0-based)
    config: dict[str, Any]     # the export's config.json
    path: Path


def resolve_aux_layer_ids(config: dict[str, Any], num_base_layers: int, num_slots: int,
                          source: str = "config.json") -> list[int]:
    """The aux layer ids of an export in ModelOpt convention.

    eagle_config.eagle_aux_hidden_state_layer_ids (ModelOpt/SGLang) wins; the top-level key is
    vLLM's (k+1) and is converted; both present must agree. Neither: the EAGLE3 default layers.
    """
    from draftdata.models import default_aux_layers

    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    top = config.get("eagle_aux_hidden_state_layer_ids")
    if nested and top and [i + 1 for i in nested] != list(top):
        raise DraftdataError(f"{source}: eagle_config.eagle_aux_hidden_state_layer_ids={nested} (0-based layer "
                             f"outputs) and eagle_aux_hidden_state_layer_ids={top} (vLLM, +1) disagree")
    if nested:
        ids = [int(i) for i in nested]
    elif top:
        ids = [int(i) - 1 for i in top]
    else:
        ids = default_aux_layers(num_base_layers)
        print(f"draftdata eval: {source} names no aux layers; using the EAGLE3 default {ids}", file=sys.stderr)
    if len(ids) != num_slots:
        raise DraftdataError(f"{source}: {len(ids)} aux layer ids {ids} but fc takes {num_slots} slots")
    bad = [i for i in ids if not 0 <= i < num_base_layers]
    if bad:
        raise DraftdataError(f"{source}: aux layer ids {bad} out of range for a base model with "
                             f"{num_base_layers} layers")
    return ids


def _rope_of(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = config.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    merged = {**params, **scaling}
    merged.pop("rope_theta", None)
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    if merged.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), merged


def read_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """config.json and the tensors of an exported one-layer EAGLE3 draft (ours or third-party;
    `layers.0.*` renamed to the trainer's `midlayer.*`): (config, tensors, weights file).
    Used by `eval` and by `train --init-draft`; the caller checks that config.json exists."""
    from draftdata.train.export import EXPORT_CONFIG, EXPORT_WEIGHTS
    from draftdata.train.model import read_draft_weights

    cfg_path, weights_path = path / EXPORT_CONFIG, path / EXPORT_WEIGHTS
    if not weights_path.exists() and (path / "pytorch_model.bin").exists():
        weights_path = path / "pytorch_model.bin"  # the EAGLE authors' released drafts
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DraftdataError(f"{cfg_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(config, dict):
        raise DraftdataError(f"{cfg_path}: holds a JSON {type(config).__name__}, not a model config (an object)")
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size") if k not in config]
    if missing:
        raise DraftdataError(f"{cfg_path}: no {', '.join(missing)}, which size the draft's layer; export the draft "
                             "again (or complete the file from the draft's training config)")
    if config.get("num_hidden_layers", 1) != 1:
        raise DraftdataError(f"{cfg_path}: num_hidden_layers={config['num_hidden_layers']}; draftdata reads "
                             "one-layer EAGLE3 drafts only")
    if not weights_path.exists():
        raise DraftdataError(f"{weights_path} not found (an exported draft holds config.json + model.safetensors, "
                             "or pytorch_model.bin)")
    state = {k.replace("layers.0.", "midlayer.", 1) if k.startswith("layers.0.") else k: v
             for k, v in read_draft_weights(weights_path).items()}
    if "fc.weight" not in state:
        raise DraftdataError(f"{weights_path}: no fc.weight (an EAGLE3 draft without aux hidden states?)")
    return config, state, weights_path


def load_exported_draft(export_dir: str | os.PathLike, base: Any, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> LoadedDraft:
    """Load `config.json` + `model.safetensors` of a LlamaForCausalLMEagle3 export into the trainer's
    draft module, sharing the base model's embedding (and lm_head when the export has none).

    Accepts `midlayer.*` or `layers.0.*` names (as the engines do), so third-party EAGLE3 drafts
    (SpecForge, ModelOpt exports) can be evaluated too.
    """
    from draftdata.train.export import EXPORT_CONFIG
    from draftdata.train.model import DraftConfig, Eagle3Draft

    path = Path(export_dir)
    cfg_path = path / EXPORT_CONFIG
    if not cfg_path.exists():
        hint = (f" (this is a training run: run `draftdata export {path} --out DIR` first and pass DIR)"
                if (path / "train_config.json").exists() or (path / "draft_config.json").exists() else "")
        raise DraftdataError(f"{cfg_path} not found: --draft must be an exported draft directory{hint}")
    config, state, weights_path = read_export(path)
    if not set(config.get("architectures") or []) & set(ARCHITECTURES):
        raise DraftdataError(f"{cfg_path}: architectures {config.get('architectures')} is not an EAGLE3 "
                             f"Llama draft ({ARCHITECTURES[0]})")
    try:  # numbers where config.json has other types: one line, not a traceback
        bcfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        hidden = int(config["hidden_size"])
        if int(config.get("target_hidden_size", hidden)) != hidden or hidden != bcfg.hidden_size:
            raise DraftdataError(f"{cfg_path}: draft hidden_size {hidden} / target_hidden_size "
                                 f"{config.get('target_hidden_size')} must both equal the base model's "
                                 f"hidden_size {bcfg.hidden_size}")
        vocab = int(config.get("vocab_size", bcfg.vocab_size))
        if vocab != bcfg.vocab_size:
            raise DraftdataError(f"{cfg_path}: vocab_size {vocab} differs from the base model's {bcfg.vocab_size}")
        num_slots = state["fc.weight"].shape[1] // hidden
        aux = resolve_aux_layer_ids(config, bcfg.num_hidden_layers, num_slots, str(cfg_path))
        n_heads = int(config["num_attention_heads"])
        draft_vocab = int(config.get("draft_vocab_size") or vocab)
        theta, scaling = _rope_of(config)
        dcfg = DraftConfig(
            eagle_config={}, base_model_id=str((config.get("draftdata") or {}).get("base_model_id", "")),
            base_model_path="", hidden_size=hidden, vocab_size=vocab,
            max_position_embeddings=int(config.get("max_position_embeddings", bcfg.max_position_embeddings)),
            draft_vocab_size=draft_vocab, intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=n_heads, num_key_value_heads=int(config.get("num_key_value_heads", n_heads)),
            head_dim=int(config.get("head_dim") or hidden // n_heads), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling, aux_layer_ids=aux,
            base_num_hidden_layers=bcfg.num_hidden_layers,
            base_tie_word_embeddings=bool(getattr(bcfg, "tie_word_embeddings", False)),
            base_rms_norm_eps=float(getattr(bcfg, "rms_norm_eps", 1e-6)),
            fc_norm=bool(config.get("fc_norm", False)), norm_output=bool(config.get("norm_output", False)),
            norm_before_residual=bool(config.get("norm_before_residual", False)),
            attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)),
        )
    except (TypeError, ValueError) as e:
        raise DraftdataError(f"{cfg_path}: a field has the wrong type ({e}); export the draft again") from None
    model = Eagle3Draft(dcfg)
    embed = state.pop("embed_tokens.weight", None)
    if "lm_head.weight" not in state:
        if draft_vocab != vocab:
            raise DraftdataError(f"{weights_path}: no lm_head.weight, and the draft vocabulary ({draft_vocab}) "
                                 "is not the base's, so the base lm_head cannot stand in")
        state["lm_head.weight"] = base.get_output_embeddings().weight
    if "d2t" not in state and draft_vocab != vocab:
        raise DraftdataError(f"{weights_path}: draft_vocab_size {draft_vocab} < vocab_size {vocab} but no d2t")
    if "d2t" in state and "t2d" not in state:  # some exports carry d2t only; t2d follows from it
        targets = torch.arange(len(state["d2t"])) + state["d2t"].long()
        if len(targets) != draft_vocab or targets.min() < 0 or targets.max() >= vocab:
            raise DraftdataError(f"{weights_path}: d2t does not map {draft_vocab} draft ids into the base "
                                 f"vocabulary of {vocab}")
        state["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill_(0, targets, True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # shapes the config does not describe (an edited config, another base's draft)
        sizes = [ln.strip().rstrip(".") for ln in str(e).splitlines() if "size mismatch" in ln]
        raise DraftdataError(f"{weights_path}: tensor shapes disagree with {cfg_path} ({'; '.join(sizes[:3]) or e}); "
                             "the config does not describe these weights: export the draft again") from None
    missing = [k for k in missing if not k.startswith("embed_tokens.") and k not in ("d2t", "t2d")]
    if missing or unexpected:
        raise DraftdataError(f"{weights_path}: missing tensors {missing}, unexpected {unexpected}")
    model.set_embedding(embed if embed is not None else base.get_input_embeddings().weight)
    return LoadedDraft(model.to(device=device, dtype=dtype).eval(), aux, config, path)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

class AuxCapture:
    """Forward hooks on the base model's aux decoder layers; `take()` returns their outputs of the
    last forward as [T, k*H], slots in the order of `layer_ids` (the order the draft's fc expects)."""

    def __init__(self, base: Any, layer_ids: list[int]) -> None:
        layers = base.get_decoder().layers
        self.layer_ids = list(layer_ids)
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [layers[k].register_forward_hook(self._hook(k)) for k in self.layer_ids]

    def _hook(self, k: int):
        def hook(module, args, output):
            self.outputs[k] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> torch.Tensor:
        out = torch.cat([self.outputs[k][0] for k in self.layer_ids], dim=-1)
        self.outputs.clear()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class DecodeResult:
    tokens: list[int]                       # generated tokens (EOS included when produced)
    base_forwards: int                      # prefill included
    accepted: list[int] = field(default_factory=list)  # per verify pass: accepted drafts (0..K)
    seconds: float = 0.0


def _causal_mask(start: int, length: int, device: torch.device) -> torch.Tensor:
    """bool [length, start+length]: query i (position start+i) sees keys 0..start+i."""
    keys = torch.arange(start + length, device=device)
    return keys[None, :] <= (start + torch.arange(length, device=device))[:, None]


class DraftRunner:
    """The draft side of chain speculative decoding, with its own KV cache (one sequence).

    Positions 0..p-1 of the cache hold context pairs (token j+1, fc(aux_j)) at position j;
    `propose` adds K-1 chain entries on a copy, so they vanish after the round (as in vLLM,
    where the next catch-up overwrites them).
    """

    def __init__(self, draft: LoadedDraft) -> None:
        self.model = draft.model
        self.device = self.model.fc.weight.device
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def _last(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
              past: list | None) -> tuple[int, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Eagle3Draft.forward, with lm_head applied to the last position only (a catch-up over a
        long prompt would otherwise project every position onto the vocabulary).
        Returns (target id of the argmax, state for the next step [1, 1, H], this call's kv)."""
        m = self.model
        cos, sin = m.rotary(positions)
        h, kv = m.midlayer(embeds.to(hidden.dtype), hidden, cos, sin, mask, past)
        h = h[:, -1:]
        normed = m.norm(h)
        token = int(m.to_target_ids(m.lm_head(normed)[0, -1].argmax()))
        return token, normed if m.config.norm_output else h, kv

    @torch.no_grad()
    def catch_up(self, next_tokens: list[int], aux: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Append context positions length..length+T-1: `next_tokens[i]` is the token after position
        length+i, `aux` [T, k*H] its base aux states. Returns (first draft token, its state g)."""
        m, t = self.model, len(next_tokens)
        tok = torch.tensor([next_tokens], device=self.device)
        pos = torch.arange(self.length, self.length + t, device=self.device)[None]
        first, g, kv = self._last(m.embed(tok), m.combine_aux(aux[None].to(m.fc.weight.dtype)), pos,
                                  _causal_mask(self.length, t, self.device), [self.kv] if self.kv else None)
        self.kv = kv if self.kv is None else (torch.cat([self.kv[0], kv[0]], 2), torch.cat([self.kv[1], kv[1]], 2))
        self.length += t
        return first, g

    @torch.no_grad()
    def propose(self, first: int, g: torch.Tensor, steps: int) -> list[int]:
        """d_1 = `first`; d_i from the pair (d_{i-1}, g) at the next position. Returns K target ids."""
        m, drafts, kv = self.model, [first], self.kv
        for i in range(1, steps):
            token, g, new = self._last(m.embed(torch.tensor([[drafts[-1]]], device=self.device)), g,
                                       torch.tensor([[self.length + i - 1]], device=self.device),
                                       torch.ones(1, self.length + i, dtype=torch.bool, device=self.device), [kv])
            kv = (torch.cat([kv[0], new[0]], 2), torch.cat([kv[1], new[1]], 2))
            drafts.append(token)
        return drafts


@torch.no_grad()
def eagle_generate(base: Any, draft: LoadedDraft, capture: AuxCapture, prompt: list[int], steps: int,
                   max_new_tokens: int, eos_ids: set[int]) -> DecodeResult:
    """Chain speculative decoding, greedy (see the module docstring). Batch size 1."""
    runner = DraftRunner(draft)
    device = runner.device
    from transformers import DynamicCache

    # A cache of every position: the base's own may keep only a sliding window (Mistral, Gemma),
    # which cannot be cropped back to the accepted tokens; attention masks still apply the window.
    cache = DynamicCache()
    out = base(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    pending_aux = capture.take()                     # aux of the positions not yet in the draft cache
    ctx = list(prompt) + [int(out.logits[0, -1].argmax())]
    result = DecodeResult(tokens=[ctx[-1]], base_forwards=1)
    while len(result.tokens) < max_new_tokens and result.tokens[-1] not in eos_ids:
        m = len(ctx) - 1                             # ctx[m]: the newest token, not yet seen by the base
        first, g = runner.catch_up(ctx[runner.length + 1:m + 1], pending_aux)
        drafts = runner.propose(first, g, steps)
        # Verify [ctx[m], d_1..d_K] in one base forward.
        out = base(input_ids=torch.tensor([[ctx[m]] + drafts], device=device), past_key_values=cache,
                   use_cache=True)
        result.base_forwards += 1
        cache = out.past_key_values
        preds = out.logits[0].argmax(-1).tolist()
        n = 0
        while n < steps and drafts[n] == preds[n] and drafts[n] not in eos_ids:
            n += 1
        if n < steps and drafts[n] == preds[n]:      # an accepted EOS ends the sequence there
            n += 1
            new = drafts[:n]
        else:
            new = drafts[:n] + [preds[n]]
        result.accepted.append(n)
        pending_aux = capture.take()[:n + 1]          # positions m..m+n now hold committed tokens
        cache.crop(m + n + 1)
        for t in new:
            ctx.append(t)
            result.tokens.append(t)
            if t in eos_ids or len(result.tokens) >= max_new_tokens:
                break
    return result


_GENERATE_LOCK = threading.Lock()
# Shipped generation settings that change how generate runs, not which tokens it picks.
_TOKEN_NEUTRAL_SETTINGS = ("bos_token_id", "eos_token_id", "pad_token_id", "cache_implementation", "cache_config")


def _generation_config(base: Any, max_new_tokens: int, eos_ids: set[int], pad_id: int | None,
                       prompt_lookup_num_tokens: int | None = None) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                            pad_token_id=pad_id if pad_id is not None else min(eos_ids),
                            prompt_lookup_num_tokens=prompt_lookup_num_tokens)


@torch.no_grad()
def hf_generate(base: Any, prompt: list[int], max_new_tokens: int, eos_ids: set[int], pad_id: int | None,
                prompt_lookup_num_tokens: int | None = None) -> DecodeResult:
    """transformers' greedy `generate` (or its prompt-lookup decoding); counts base forwards.

    The model's own generation_config.json (e.g. a shipped `repetition_penalty` or
    `no_repeat_ngram_size`) is set aside for the call: `generate` fills every setting not given
    from it, and those processors would make the reference something other than greedy decoding."""
    from transformers import GenerationConfig

    device = base.get_input_embeddings().weight.device
    ids = torch.tensor([prompt], device=device)
    calls = [0]
    handle = base.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with _GENERATE_LOCK:   # the swap below must not interleave with another call on the same model
        shipped = base.generation_config
        kept = {k: getattr(shipped, k, None) for k in _TOKEN_NEUTRAL_SETTINGS}
        base.generation_config = GenerationConfig(**{k: v for k, v in kept.items() if v is not None})
        try:
            seq = base.generate(ids, attention_mask=torch.ones_like(ids),
                                generation_config=_generation_config(base, max_new_tokens, eos_ids, pad_id,
                                                                     prompt_lookup_num_tokens))
        finally:
            base.generation_config = shipped
            handle.remove()
    return DecodeResult(tokens=seq[0, len(prompt):].tolist(), base_forwards=calls[0])


def _timed(fn, device: torch.device) -> DecodeResult:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    res = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res.seconds = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------
# Prompts and the evaluation run
# ---------------------------------------------------------------------------------------------

@dataclass
class PromptConversation:
    conversation_id: str
    system: list[dict[str, str]]
    user_turns: list[str]
    category: str | None = None
    source: str = ""  # file:line
    # system messages the file places between user turns: {turn index: messages just before it}
    later_system: dict[int, list[dict[str, str]]] = field(default_factory=dict)


def read_prompts(path: str, limit: int | None = None) -> list[PromptConversation]:
    """User turns (and system prompts) of a chat JSONL file; assistant turns are ignored, since the
    base model answers each turn itself. Bad records are reported and skipped."""
    from draftdata.collect.conversations import Reject, read_conversations

    out, rejects = [], 0
    for item in read_conversations(path, require_assistant=False, flag="--prompts"):
        if isinstance(item, Reject):
            rejects += 1
            print(f"draftdata eval: skipping {item}", file=sys.stderr)
            continue
        users = [m["content"] for m in item.messages if m["role"] == "user"]
        if not users:
            rejects += 1
            print(f"draftdata eval: skipping {item.source}: no user turn", file=sys.stderr)
            continue
        leading: list[dict[str, str]] = []
        later: dict[int, list[dict[str, str]]] = {}
        turn = 0  # user turns before this message
        for m in item.messages:  # each system message stays where the file puts it
            if m["role"] == "user":
                turn += 1
            elif m["role"] == "system":
                (later.setdefault(turn, []) if turn else leading).append(m)
        out.append(PromptConversation(item.conversation_id, leading, users, item.category, item.source,
                                      {t: ms for t, ms in later.items() if t < len(users)}))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DraftdataError(f"--prompts {path}: no usable conversation ({rejects} skipped)")
    return out


def pick_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype as torch objects; an unusable device (cuda without CUDA, a typo) is a
    one-line DraftdataError, as in collect."""
    from draftdata.models import check_device, local_device

    dev = check_device(local_device(device))
    names = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in names:
        raise DraftdataError(f"--dtype {dtype!r}: expected auto or one of {sorted(names)}")
    return dev, names[dtype]


def load_base(model: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Path]:
    """The base model (HF, eval mode) and its tokenizer from a model spec (draftdata.models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftdata.models import quiet_transformers, resolve_model

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    with quiet_transformers():
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return base, tok, path


def base_model_warnings(config: dict[str, Any], base_path: str | os.PathLike, num_hidden_layers: int,
                        source: str = "config.json") -> list[str]:
    """Ways the --model base differs from the base the draft was trained for, per the export's
    `draftdata` section (third-party exports record nothing: no warnings).

    Compares `base_model_hash` (draftdata.models.model_hash, as collect records it: config.json,
    weight file names and sizes, and windows of the weight bytes, so cheap at any model size),
    else `base_model_id` when it is a hub or GGUF id rather than a local path (paths move); and
    always the base's layer count. These are warnings, not
    errors: a quantized or fine-tuned variant of the base may be intended.
    """
    from draftdata.models import model_hash, model_identity

    prov = config.get("draftdata") or {}
    want_id, want_hash = str(prov.get("base_model_id") or ""), prov.get("base_model_hash")
    got_id = model_identity(base_path)[0]
    out = []
    if want_hash:
        try:
            got_hash = model_hash(base_path, like=want_hash)
        except OSError:
            got_hash = None
        if got_hash is not None and got_hash != want_hash:
            out.append(f"--model {got_id} (model hash {got_hash}) is not the base the draft was trained for "
                       f"({want_id or 'unknown id'}, hash {want_hash} in {source})")
    elif want_id and not Path(want_id).is_absolute() and want_id != got_id:
        out.append(f"--model {got_id} is not the base the draft was trained for ({want_id} in {source})")
    layers = prov.get("base_num_hidden_layers")
    if layers is not None and int(layers) != num_hidden_layers:
        out.append(f"--model has {num_hidden_layers} decoder layers; the draft's base had {layers} ({source})")
    return out


def eos_token_ids(base: Any, tokenizer: Any) -> set[int]:
    """EOS ids: the generation config's (may be a list) and the tokenizer's."""
    ids: set[int] = set()
    for v in (getattr(base.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if v is None:
            continue
        ids.update(v if isinstance(v, (list, tuple)) else [v])
    if not ids:
        raise DraftdataError("the base model defines no EOS token; generation would never stop early")
    return {int(i) for i in ids}


def _rates(accepted: list[int], steps: int) -> tuple[list[float | None], list[float | None]]:
    """Per draft position i: P(first i drafts accepted), and P(draft i accepted | first i-1 were);
    None where undefined (no verify pass, or position i never reached)."""
    n = len(accepted)
    reach = [sum(1 for a in accepted if a >= i) for i in range(steps + 1)]
    uncond = [reach[i] / n if n else None for i in range(1, steps + 1)]
    cond = [reach[i] / reach[i - 1] if reach[i - 1] else None for i in range(1, steps + 1)]
    return uncond, cond


def evaluate(base: Any, tokenizer: Any, draft: LoadedDraft, conversations: list[PromptConversation], *,
             steps: int = 5, max_new_tokens: int = 256, prompt_lookup_num_tokens: int = 10,
             methods: tuple[str, ...] = ("greedy", "eagle", "prompt_lookup"), max_turns: int | None = None,
             warmup: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run every method on every user turn (multi-turn: later turns see the base's greedy answers)
    and return the report dict (see `format_report` and docs/EXPORT.md)."""
    from draftdata.collect.conversations import ChatTokenizer

    if steps < 1:
        raise DraftdataError(f"--steps must be >= 1, got {steps}")
    if max_new_tokens < 1:
        raise DraftdataError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if "greedy" not in methods:
        raise DraftdataError("the greedy baseline is required: it is the reference output")
    chat = ChatTokenizer(tokenizer)
    eos = eos_token_ids(base, tokenizer)
    pad = tokenizer.pad_token_id
    device = base.get_input_embeddings().weight.device
    capture = AuxCapture(base, draft.aux_layer_ids)
    runs = {
        "greedy": lambda p, n: hf_generate(base, p, n, eos, pad),
        "prompt_lookup": lambda p, n: hf_generate(base, p, n, eos, pad, prompt_lookup_num_tokens),
        "eagle": lambda p, n: eagle_generate(base, draft, capture, p, steps, n, eos),
    }
    totals = {m: {"tokens": 0, "seconds": 0.0, "base_forwards": 0} for m in methods}
    accepted: list[int] = []
    by_category: dict[str, list[int]] = {}
    covered = 0  # greedy output tokens the draft vocabulary holds
    in_vocab = draft.model.t2d.cpu()
    matches = {m: 0 for m in methods if m != "greedy"}
    mismatched: dict[str, list[str]] = {m: [] for m in matches}
    per_prompt: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []  # turns the chat template refused (and the turns after them)
    bar = None
    stopped = False

    def encode(messages: list[dict[str, str]]) -> list[int]:
        return tokenizer(chat.render(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    def skip(conv: PromptConversation, i: int, error: str) -> None:
        skipped.append({"conversation_id": conv.conversation_id, "turn": i + 1, "source": conv.source, "error": error})
        if bar is not None:
            bar.update(1, 0)

    try:
        turns = [(c, i) for c in conversations for i in range(min(len(c.user_turns), max_turns or 10**9))]
        if warmup:
            prompt, errors = None, []
            for c in conversations:  # the first prompt the template renders
                try:
                    prompt = encode(c.system + [{"role": "user", "content": c.user_turns[0]}])
                    break
                except Exception as e:  # noqa: BLE001 - jinja's TemplateError, or anything the template calls
                    errors.append(f"{c.source or c.conversation_id}: {type(e).__name__}: {e}")
            if prompt is None:
                raise DraftdataError(f"the chat template renders none of the {len(conversations)} prompts "
                                     f"({'; '.join(errors[:3])}{'; ...' if len(errors) > 3 else ''}); fix the "
                                     "records or the template")
            for m in methods:
                runs[m](prompt, min(8, max_new_tokens))
        history: dict[str, list[dict[str, str]]] = {c.conversation_id: list(c.system) for c in conversations}
        broken: set[str] = set()
        if progress:
            from draftdata.progress import JobProgress

            bar = JobProgress(total=len(turns), desc="eval", unit="turn",
                              extra=lambda: f"acceptance {_mean_plus_one(accepted):.3f}" if accepted else "")
            bar.start()
        for conv, i in turns:
            if conv.conversation_id in broken:  # a later turn would follow an answer never written
                skip(conv, i, "an earlier turn of the conversation was skipped")
                continue
            messages = (history[conv.conversation_id] + conv.later_system.get(i, [])
                        + [{"role": "user", "content": conv.user_turns[i]}])
            try:
                prompt = encode(messages)
            except Exception as e:  # noqa: BLE001 - a record the template refuses (Gemma: no system role)
                broken.add(conv.conversation_id)
                skip(conv, i, f"{type(e).__name__}: {e}")
                continue
            try:
                results = {m: _timed(lambda m=m, p=prompt: runs[m](p, max_new_tokens), device) for m in methods}
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report the turns finished so far
                if not per_prompt:
                    raise
                stopped = True
                break
            ref = results["greedy"].tokens
            for m, r in results.items():
                totals[m]["tokens"] += len(r.tokens)
                totals[m]["seconds"] += r.seconds
                totals[m]["base_forwards"] += r.base_forwards
                if m != "greedy":
                    if r.tokens == ref:
                        matches[m] += 1
                    else:
                        mismatched[m].append(f"{conv.conversation_id}#turn{i + 1}")
            covered += int(in_vocab[torch.tensor(ref, dtype=torch.long)].sum()) if ref else 0
            if "eagle" in results:
                accepted.extend(results["eagle"].accepted)
                if conv.category is not None:
                    by_category.setdefault(conv.category, []).extend(results["eagle"].accepted)
            answer = tokenizer.decode([t for t in ref if t not in eos], skip_special_tokens=True)
            history[conv.conversation_id] = messages + [{"role": "assistant", "content": answer}]
            per_prompt.append({
                "conversation_id": conv.conversation_id, **({"category": conv.category} if conv.category else {}),
                "turn": i + 1, "prompt_tokens": len(prompt),
                "new_tokens": len(ref),
                **({"acceptance_length": _mean_plus_one(results["eagle"].accepted)} if "eagle" in results else {}),
                "seconds": {m: round(r.seconds, 4) for m, r in results.items()},
            })
            if bar is not None:
                bar.update(1, len(ref))
    finally:
        if bar is not None:
            bar.close()
        capture.close()
    report: dict[str, Any] = {
        "steps": steps, "max_new_tokens": max_new_tokens, "prompt_lookup_num_tokens": prompt_lookup_num_tokens,
        "device": str(device), "dtype": str(base.dtype).replace("torch.", ""),
        "conversations": len(conversations), "turns": len(per_prompt),
        "draft_aux_layer_ids": draft.aux_layer_ids,
    }
    if stopped:
        report["stopped_early"] = {"turns_done": len(per_prompt), "turns_planned": len(turns)}
    if skipped:
        report["skipped_turns"] = skipped
    for m in methods:
        t = totals[m]
        report[m] = {**t, "tokens_per_second": t["tokens"] / t["seconds"] if t["seconds"] else None,
                     "tokens_per_base_forward": t["tokens"] / t["base_forwards"] if t["base_forwards"] else None}
    if "eagle" in methods:
        uncond, cond = _rates(accepted, steps)
        report["eagle"].update({
            "acceptance_length": _mean_plus_one(accepted), "verify_passes": len(accepted),
            "acceptance_rate_per_position": uncond, "conditional_acceptance_rate_per_position": cond,
            "draft_vocab_coverage": covered / totals["greedy"]["tokens"] if totals["greedy"]["tokens"] else None,
        })
        if by_category:
            report["eagle"]["per_category"] = {
                c: {"turns": sum(1 for p in per_prompt if p.get("category") == c),
                    "verify_passes": len(a), "acceptance_length": _mean_plus_one(a)}
                for c, a in by_category.items()}
    report["speedup"] = {
        f"{a}_vs_{b}": report[b]["seconds"] / report[a]["seconds"] if report[a]["seconds"] else None
        for a, b in (("eagle", "greedy"), ("eagle", "prompt_lookup"), ("prompt_lookup", "greedy"))
        if a in methods and b in methods
    }
    report["output_matches_greedy"] = {m: {"equal": matches[m], "total": len(per_prompt),
                                           "mismatched": mismatched[m]} for m in matches}
    report["per_prompt"] = per_prompt
    return report


def _mean_plus_one(accepted: list[int]) -> float | None:
    return 1.0 + sum(accepted) / len(accepted) if accepted else None


def format_report(r: dict[str, Any]) -> str:
    """Human-readable summary of an `evaluate` report."""
    lines = [f"turns {r['turns']} ({r['conversations']} conversations), K={r['steps']}, "
             f"max_new_tokens={r['max_new_tokens']}, {r['device']} {r['dtype']}"]
    if r.get("stopped_early"):
        s = r["stopped_early"]
        lines.append(f"stopped early: {s['turns_done']} of {s['turns_planned']} turns measured (the figures cover those)")
    if r.get("skipped_turns"):
        sk = r["skipped_turns"]
        shown = "; ".join(f"{x['source'] or x['conversation_id']} turn {x['turn']}: {x['error']}" for x in sk[:3])
        lines.append(f"skipped {len(sk)} turn(s) the chat template could not render: {shown}"
                     + ("; ..." if len(sk) > 3 else ""))
    if "eagle" in r:
        e = r["eagle"]
        al = e["acceptance_length"]
        lines.append(f"acceptance length        {al:.3f} tokens per base forward ({e['verify_passes']} verify passes)"
                     if al is not None else "acceptance length        n/a (no verify pass)")
        for name, key in (("acceptance per position ", "acceptance_rate_per_position"),
                          ("conditional per position", "conditional_acceptance_rate_per_position")):
            lines.append(f"{name} " + " ".join("-" if x is None else f"{x:.3f}" for x in e[key]))
        if e.get("draft_vocab_coverage") is not None:
            lines.append(f"draft vocabulary holds {100 * e['draft_vocab_coverage']:.1f}% of the greedy output tokens")
        if e.get("per_category"):
            lines.append("acceptance length by category")
        for c, v in (e.get("per_category") or {}).items():
            al_c = "n/a" if v["acceptance_length"] is None else f"{v['acceptance_length']:.3f}"
            lines.append(f"  {c:<22} {al_c} ({v['turns']} turns, {v['verify_passes']} verify passes)")
    for m in ("greedy", "prompt_lookup", "eagle"):
        if m in r:
            x = r[m]
            tps = f"{x['tokens_per_second']:.1f} tok/s" if x["tokens_per_second"] else "n/a"
            lines.append(f"{m:<14} {x['tokens']:>7} tokens  {x['seconds']:8.2f} s  {tps:>14}  "
                         f"{x['tokens_per_base_forward']:.3f} tokens/forward (prefill included)")
    for k, v in r["speedup"].items():
        lines.append(f"speedup {k:<26} {v:.3f}x" if v else f"speedup {k:<26} n/a")
    for m, v in r["output_matches_greedy"].items():
        lines.append(f"{m} output == greedy on {v['equal']}/{v['total']} turns"
                     + (f" (differs: {', '.join(v['mismatched'][:5])})" if v["mismatched"] else ""))
    return "\n".join(lines)


__all__ = ["AuxCapture", "DecodeResult", "DraftRunner", "LoadedDraft", "PromptConversation", "base_model_warnings",
           "eagle_generate", "evaluate", "format_report", "hf_generate", "load_base", "load_exported_draft",
           "pick_device_dtype", "read_prompts", "resolve_aux_layer_ids"]
