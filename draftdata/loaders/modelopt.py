"""NVIDIA ModelOpt drop-in: a draftdata dataset in the layout of ModelOpt's offline EAGLE training.

Mirrors `modelopt.torch.speculative.eagle.utils.OfflineSupervisedDataset` and
`EagleOfflineDataCollator` (nvidia-modelopt 0.47; contract written down in docs/LOADER.md):

per sample  input_ids int64 [L], base_model_hidden_states [L, H], aux_hidden_states [L, k*H],
            attention_mask int64 ones [L], loss_mask int64 [L] (all ones unless answer_only_loss),
            labels int64 [L] (input_ids shifted left, last = -100), base_hidden_prenorm bool
batch       input_ids / attention_mask / loss_mask / labels [B, train_len], each sample truncated or
            right-padded with zeros to train_len,
            base_model_outputs = {base_model_hidden_states [B, train_len, H],
                                  aux_hidden_states [B, train_len, k*H], base_hidden_prenorm bool}

so `Trainer(model=eagle_model, args=TrainingArguments(..., remove_unused_columns=False),
train_dataset=OfflineDataset(url), data_collator=EagleOfflineCollator(train_len))` trains a model
converted with `eagle_offline=True` exactly as ModelOpt's own .pt pipeline does, reading from
local disk or object storage. Nothing here imports modelopt.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from draftdata.errors import DraftdataError
from draftdata.loaders.dataset import HiddenStateDataset, HiddenStateMapDataset

IGNORE_TOKEN_ID = -100  # transformers' LabelSmoother.ignore_index, what ModelOpt uses
SAMPLE_KEYS = ("input_ids", "base_model_hidden_states", "aux_hidden_states", "attention_mask", "loss_mask",
               "labels", "base_hidden_prenorm")


def to_modelopt_sample(sample: dict[str, Any], *, answer_only_loss: bool, prenorm: bool) -> dict[str, Any]:
    """One store-layout sample -> the dict `OfflineSupervisedDataset.__getitem__` returns."""
    input_ids = sample["input_ids"].to(torch.int64)
    labels = torch.full_like(input_ids, IGNORE_TOKEN_ID)
    labels[..., :-1] = input_ids[..., 1:]
    loss_mask = sample["loss_mask"].to(torch.int64) if answer_only_loss else torch.ones_like(input_ids)
    return {
        "input_ids": input_ids,
        "base_model_hidden_states": sample["hidden_states"],
        "aux_hidden_states": sample["aux_hidden_states"],
        "attention_mask": torch.ones_like(input_ids),
        "loss_mask": loss_mask,
        "labels": labels,
        "base_hidden_prenorm": bool(prenorm),
    }


class OfflineDataset(Dataset):
    """Map-style drop-in for ModelOpt's `OfflineSupervisedDataset`, reading a draftdata dataset.

    `answer_only_loss` has ModelOpt's meaning: False (ModelOpt's default) trains on every token
    (loss_mask all ones); True uses the stored loss mask (e.g. assistant tokens only).
    `base_hidden_prenorm` comes from the dataset schema (`final_hidden_prenorm`).
    """

    def __init__(self, url: str, *, answer_only_loss: bool = False, storage_options: dict[str, Any] | None = None,
                 parts: list[str] | None = None):
        self.data = HiddenStateMapDataset(url, storage_options=storage_options, parts=parts)
        self.schema = self.data.schema
        self.answer_only_loss = answer_only_loss

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return to_modelopt_sample(self.data[i], answer_only_loss=self.answer_only_loss,
                                  prenorm=self.schema.final_hidden_prenorm)


class StreamingOfflineDataset(IterableDataset):
    """The same per-sample dicts streamed by `HiddenStateDataset` (exactly-once over ranks and workers,
    whole-segment reads, resumable). Batch it with `DataLoader(ds, batch_size=B, collate_fn=EagleOfflineCollator(...))`.
    Keyword arguments go to `HiddenStateDataset` (batching arguments are not accepted here).
    """

    def __init__(self, url: str, *, answer_only_loss: bool = False, **kwargs: Any):
        if kwargs.get("batch_size") or kwargs.get("max_tokens_per_batch"):
            raise DraftdataError("StreamingOfflineDataset yields samples; batch with the DataLoader and "
                                 "EagleOfflineCollator instead of batch_size/max_tokens_per_batch")
        self.data = HiddenStateDataset(url, **kwargs)
        self.schema = self.data.schema
        self.answer_only_loss = answer_only_loss

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        prenorm = self.schema.final_hidden_prenorm
        for s in self.data:
            yield to_modelopt_sample(s, answer_only_loss=self.answer_only_loss, prenorm=prenorm)


class EagleOfflineCollator:
    """Drop-in for ModelOpt's `EagleOfflineDataCollator`: truncate or zero-pad every sample to `train_len`.

    The fixed length is not optional: ModelOpt's HF EAGLE model caches its training-time-test
    attention masks per TTT step on the first forward, so every batch must have the same length.
    """

    def __init__(self, train_len: int):
        if int(train_len) < 1:
            raise DraftdataError(f"train_len must be a positive integer, got {train_len}")
        self.train_len = int(train_len)

    @staticmethod
    def _stack(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
        first = tensors[0]
        out = first.new_zeros((len(tensors), length, *first.shape[1:]))
        for i, x in enumerate(tensors):
            n = min(length, x.shape[0])
            out[i, :n] = x[:n]
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        length = self.train_len
        batch: dict[str, Any] = {k: self._stack([f[k] for f in features], length)
                                 for k in ("input_ids", "attention_mask", "loss_mask", "labels")}
        outputs: dict[str, Any] = {k: self._stack([f[k] for f in features], length)
                                   for k in ("base_model_hidden_states", "aux_hidden_states")}
        if "base_hidden_prenorm" in features[0]:
            flags = {bool(f["base_hidden_prenorm"]) for f in features}
            if len(flags) > 1:
                raise ValueError(f"base_hidden_prenorm is not constant across the batch (got {flags}); "
                                 "do not mix pre-norm and post-norm datasets")
            outputs["base_hidden_prenorm"] = flags.pop()
        batch["base_model_outputs"] = outputs
        return batch


def check_compatible(model: Any, schema: Any) -> None:
    """Raise if a ModelOpt EAGLE model (after `mtsp.convert`) cannot train on a dataset with `schema`.

    Checks what silently breaks training otherwise: the aux layer ids (both sides use 0-based
    decoder-layer outputs), their count (the draft's fc input is k*H), hidden size and vocab.
    """
    cfg = getattr(model, "eagle_config", None)
    if cfg is None:
        raise DraftdataError("the model has no eagle_config; convert it first with "
                             "mtsp.convert(model, [('eagle', {'eagle_offline': True, ...})])")
    problems = []
    ids = list(getattr(cfg, "eagle_aux_hidden_state_layer_ids", []) or [])
    if getattr(cfg, "use_aux_hidden_state", True) and ids != list(schema.aux_layer_ids):
        problems.append(f"aux layer ids: model {ids}, dataset {list(schema.aux_layer_ids)} (set "
                        "eagle_architecture_config['eagle_aux_hidden_state_layer_ids'] to the dataset's)")
    base = getattr(model, "config", None)
    for name, want in (("hidden_size", schema.hidden_size), ("vocab_size", schema.vocab_size)):
        have = getattr(base, name, None)
        if have is not None and int(have) != int(want):
            problems.append(f"{name}: model {have}, dataset {want}")
    if not getattr(model, "eagle_offline", False):
        problems.append("the model was converted without eagle_offline=True")
    if problems:
        raise DraftdataError("ModelOpt model and dataset disagree: " + "; ".join(problems))


def make_eagle_offline_data_module(url: str, *, train_len: int, answer_only_loss: bool = False,
                                   streaming: bool = False, **kwargs: Any) -> dict[str, Any]:
    """`{"train_dataset", "data_collator"}` for `transformers.Trainer(**module)`, like ModelOpt's
    `make_eagle_supervised_data_module` in offline mode. `streaming=True` uses the IterableDataset
    (then give each rank its own rank/world_size and do not let accelerate re-shard it, see docs)."""
    cls = StreamingOfflineDataset if streaming else OfflineDataset
    ds = cls(url, answer_only_loss=answer_only_loss, **kwargs)
    return {"train_dataset": ds, "data_collator": EagleOfflineCollator(train_len)}


__all__ = ["EagleOfflineCollator", "OfflineDataset", "StreamingOfflineDataset", "check_compatible",
           "make_eagle_offline_data_module", "to_modelopt_sample", "SAMPLE_KEYS"]
