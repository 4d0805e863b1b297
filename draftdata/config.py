"""Configuration objects: the dataset schema (dataset.json) and the EAGLE draft config."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

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

    def differences(self, other: DatasetSchema) -> list[str]:
        """Human-readable list of identity fields where `other` differs from self (empty if compatible)."""
        out = []
        for name in self.IDENTITY_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: dataset has {a!r}, this run has {b!r}")
        return out
