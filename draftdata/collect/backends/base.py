"""The interface every collect backend implements (HF transformers, TensorRT-LLM)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from draftdata.errors import DraftdataError


@dataclass(frozen=True)
class BaseModelInfo:
    """What the dataset schema records about the base model a backend runs."""

    model_id: str
    revision: str | None
    model_hash: str
    tokenizer_hash: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    final_hidden_prenorm: bool = False

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, *, final_hidden_prenorm: bool = False,
                       hash_like: str | None = None) -> BaseModelInfo:
        """Read it from an HF directory's files without loading weights (cheap; used to check a
        dataset's schema before spending minutes loading the model). `hash_like`: a recorded
        `base_model_hash` whose scheme the model hash follows (see `models.model_hash`)."""
        from draftdata.models import model_hash, model_identity, tokenizer_hash

        d = Path(model_dir)
        try:
            config = json.loads((d / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise DraftdataError(f"{d / 'config.json'}: cannot read the model config ({e})") from None
        text = config.get("text_config") or config  # multimodal configs nest the language model's
        missing = [k for k in ("num_hidden_layers", "hidden_size", "vocab_size") if k not in text]
        if missing:
            raise DraftdataError(f"{d / 'config.json'}: missing {missing}; not a decoder-only language model?")
        model_id, revision = model_identity(d)
        return cls(model_id=model_id, revision=revision, model_hash=model_hash(d, like=hash_like), tokenizer_hash=tokenizer_hash(d),
                   num_hidden_layers=int(text["num_hidden_layers"]), hidden_size=int(text["hidden_size"]),
                   vocab_size=int(text["vocab_size"]), final_hidden_prenorm=final_hidden_prenorm)


class Backend:
    """Runs the frozen base model over token sequences and returns the hidden states to store.

    Aux layer id k is the output of decoder layer k (0-based), i.e. HF `hidden_states[k + 1]`.
    """

    info: BaseModelInfo

    def forward(self, batch: list[list[int]], aux_layer_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each sequence: (aux [L, k*H] bf16 cpu, final [L, H] bf16 cpu); no padding in outputs.

        The k aux slots are concatenated in ascending layer order.
        """
        raise NotImplementedError

    def forward_checked(self, batch: list[list[int]], aux_layer_ids: list[int]
                        ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
        """`forward`, and for each sequence the number of its tokens whose states hold inf or NaN
        (a base that overflows, e.g. in fp16). Here on the host; a backend that can count on its
        device before the copy (the HF backend) overrides it."""
        results = self.forward(batch, aux_layer_ids)
        return results, [count_nonfinite(aux, final, [aux.shape[0]])[0] for aux, final in results]

    def producer(self) -> dict[str, Any]:
        """How this backend computes, recorded in every part's commit record (`producer`): two
        runs that resolve `--dtype auto` differently (a GPU, a CPU with or without native bf16)
        store hidden states that differ by about 1% relative, and resumes say so."""
        device = getattr(self, "device", None)
        return {"backend": type(self).__name__.removesuffix("Backend").lower(),
                "compute_dtype": getattr(self, "dtype", None),
                "device": getattr(device, "type", None) if device is not None else None}

    def close(self) -> None:
        """Release the model (GPU memory, worker processes)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count_nonfinite(aux: torch.Tensor, final: torch.Tensor, lengths: list[int]) -> list[int]:
    """For rows [sum(lengths), ...] of aux and final states, split into sequences of `lengths`: how
    many tokens of each sequence have an inf or NaN in either (one device sync when all are finite)."""
    bad = _nonfinite_rows(aux)
    bad |= _nonfinite_rows(final).to(bad.device)    # final may sit on another GPU (device_map="auto")
    if not bool(bad.any()):
        return [0] * len(lengths)
    return [int(part.sum()) for part in bad.split(lengths)]


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x holding an inf or NaN. On a CPU: a row's float32 sum is non-finite when it holds one,
    and summing is ~5x faster than isfinite (1% of a CPU collect's time otherwise); the few
    rows whose sum overflowed from finite values are checked value by value."""
    if x.device.type != "cpu":  # on a GPU isfinite is cheap, and each any() below would be a sync
        return ~torch.isfinite(x).all(1)
    suspect = ~torch.isfinite(x.sum(1, dtype=torch.float32))
    if bool(suspect.any()):
        suspect[suspect.clone()] = ~torch.isfinite(x[suspect]).all(1)
    return suspect
