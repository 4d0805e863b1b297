"""Collect backend on Hugging Face transformers: one process, CPU or CUDA.

Only what the draft needs is kept: forward hooks on the chosen decoder layers copy their
outputs, minus padding, straight into one packed [sum(L), k*H] bf16 buffer per batch, and the
final (post-norm) hidden state is the base model's `last_hidden_state`. We never ask for
`output_hidden_states=True`, which would hold every layer's [B, T, H] output at once, and we
load the base model without its LM head (it is not run).

Batches are right-padded with an attention mask; a sequence's real tokens see only real tokens
(causal attention, positions 0..L-1), so its outputs equal those of running it alone up to
kernel rounding.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import SafetensorError

from draftdata.collect.backends.base import Backend, BaseModelInfo, count_nonfinite
from draftdata.errors import DraftdataError
from draftdata.models import check_device, compute_dtype, local_device

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_error(model_path: str | os.PathLike, error: Exception) -> DraftdataError:
    """The one-line error for a model transformers failed to load. A safetensors error does not
    say which file is broken: the weight files' headers are read to name it (a truncated or
    corrupt download is the usual cause)."""
    if isinstance(error, SafetensorError):
        from pathlib import Path

        from safetensors import safe_open

        for file in sorted(Path(model_path).glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                return DraftdataError(f"--model {model_path}: {file} is not a readable safetensors file ({e}); it is "
                                      "probably truncated or corrupt: download or save it again")
    message = " ".join(str(error).split())
    return DraftdataError(f"--model {model_path}: cannot load with transformers: {type(error).__name__}: {message}")


class HFBackend(Backend):
    """Runs an HF decoder-only model (AutoModel, no LM head) and captures aux + final hidden states."""

    def __init__(self, model_path: str | os.PathLike, *, dtype: str = "auto", device: str = "cpu",
                 attn_implementation: str | None = None):
        from transformers import AutoModel

        from draftdata.models import quiet_transformers

        device = local_device(device)  # "auto", as on the command line
        self.device = check_device(device)
        dtype = compute_dtype(dtype, self.device)
        if dtype not in DTYPES:
            raise DraftdataError(f"--dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
        self.dtype = dtype
        self.info = BaseModelInfo.from_model_dir(model_path)
        if self.device.type == "cuda" and device == "cuda" and torch.cuda.device_count() > 1:
            device_map: Any = "auto"  # spread a model too big for one GPU over all visible GPUs
        else:
            device_map = None if self.device.type == "cpu" else str(self.device)
        kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "device_map": device_map}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            with quiet_transformers():  # the load report lists lm_head.weight as unused: expected
                self.model = AutoModel.from_pretrained(str(model_path), **kwargs).eval()
        except (OSError, ValueError, SafetensorError) as e:
            raise load_error(model_path, e) from None
        self.model.requires_grad_(False)
        self.input_device = self.model.get_input_embeddings().weight.device
        self.layers = _decoder_layers(self.model, self.info.num_hidden_layers)
        self._hooks: dict[int, Any] = {}
        self._slot: dict[int, int] = {}  # layer id -> aux slot (ascending layer order)
        self._rows: torch.Tensor | None = None  # flat indices of the real tokens in [B*T]
        self._aux: torch.Tensor | None = None  # packed [sum(L), k*H] bf16 being filled by the hooks
        self._filled: set[int] = set()  # aux layer ids whose hook ran in this forward

    def _set_layers(self, aux_layer_ids: list[int]) -> None:
        ids = sorted(aux_layer_ids)
        if ids == sorted(self._hooks):
            return
        n = self.info.num_hidden_layers
        bad = [k for k in ids if not 0 <= k < n]
        if bad or len(set(ids)) != len(ids):
            raise DraftdataError(f"aux layer ids {aux_layer_ids}: need distinct ids in 0..{n - 1}")
        for h in self._hooks.values():
            h.remove()
        self._slot = {k: j for j, k in enumerate(ids)}
        self._hooks = {k: self.layers[k].register_forward_hook(self._capture(k)) for k in ids}

    def _capture(self, layer_id: int):
        h = self.info.hidden_size

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self._aux is None:  # the model run outside `forward`: capture nothing
                return
            out = output[0] if isinstance(output, tuple) else output
            j = self._slot[layer_id]
            rows = self._rows.to(out.device, non_blocking=True)
            self._aux[:, j * h:(j + 1) * h] = out.reshape(-1, h).index_select(0, rows)
            self._filled.add(layer_id)

        return hook

    def forward(self, batch: list[list[int]], aux_layer_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.forward_checked(batch, aux_layer_ids)[0]

    @torch.inference_mode()
    def forward_checked(self, batch: list[list[int]], aux_layer_ids: list[int]
                        ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
        """`forward` with the inf/NaN count per sequence, taken on the device before the copy."""
        if not batch:
            return [], []
        self._set_layers(aux_layer_ids)
        lengths = [len(s) for s in batch]
        if min(lengths) == 0:
            raise DraftdataError("cannot run an empty sequence (0 tokens)")
        b, t, h = len(batch), max(lengths), self.info.hidden_size
        ids = torch.zeros(b, t, dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : lengths[i]] = torch.as_tensor(seq, dtype=torch.long)
            mask[i, : lengths[i]] = 1
        bad = ids[(ids < 0) | (ids >= self.info.vocab_size)]
        if len(bad):
            raise DraftdataError(f"token id {int(bad[0])} is outside the model's vocabulary (size "
                                 f"{self.info.vocab_size}); was the input tokenized with another tokenizer?")
        dev = self.input_device
        self._rows = mask.reshape(-1).nonzero().squeeze(1).to(dev)
        self._aux = torch.empty(sum(lengths), len(self._slot) * h, dtype=torch.bfloat16, device=dev)
        self._filled = set()
        try:
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            if self._filled != set(self._slot):  # a hook on layers the text never runs (a vision tower's)
                raise DraftdataError(f"the hooks on decoder layers {sorted(set(self._slot) - self._filled)} of "
                                     f"{type(self.model).__name__} did not run on text input (layers it skips, "
                                     "such as Mllama's cross-attention layers, or not the text decoder's at all); "
                                     "choose --aux-layers among the layers text runs through")
            last = out.last_hidden_state
            final = last.reshape(-1, h).index_select(0, self._rows.to(last.device)).to(torch.bfloat16)
            nonfinite = count_nonfinite(self._aux, final, lengths)
            aux = self._aux.cpu()
            final = final.cpu()
        finally:
            self._aux = self._rows = None
        return list(zip(aux.split(lengths), final.split(lengths))), nonfinite

    def close(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks = {}
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# Where text decoder layers live: Llama-style models, then multimodal ones (Gemma 3, Llava, Qwen-VL).
LAYER_PATHS = ("layers", "language_model.layers", "language_model.model.layers", "text_model.layers", "model.layers")
# Module names of towers that are not the text decoder, whatever their layer count.
NOT_TEXT = ("vision", "visual", "image", "audio", "speech", "vit")


def _decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The text decoder's layer list: a known path first, else the one ModuleList of exactly
    `num_hidden_layers` modules outside vision/audio towers (a vision tower of the same depth was
    taken before, and its hooks never ran on text)."""
    for path in LAYER_PATHS:
        module: Any = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
             and len(m) == num_layers and not any(w in name.lower() for w in NOT_TEXT)]
    if len(found) == 1:
        return found[0][1]
    where = f" (candidates: {', '.join(name for name, _ in found)})" if found else ""
    raise DraftdataError(f"cannot find the {num_layers} text decoder layers of {type(model).__name__}{where}; "
                         "this architecture is not supported by the HF backend")
