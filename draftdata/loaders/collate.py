"""Right-padded batches in the Loader-batch layout (docs/LOADER.md, "A batch").

```
input_ids int64 [B, T], attention_mask int64 [B, T] (1 = real token), loss_mask float32 [B, T],
hidden_states bf16 [B, T, H], aux_hidden_states bf16 [B, T, k*H], lengths int64 [B], conversation_id list[str]
```
`loss_mask[b, t]` is the stored mask (1 = token t is a training target, e.g. an assistant token)
and 0 on padding; any shift for next-token targets is the trainer's business.

Each output tensor is allocated once and every sample is copied into it exactly once (large
outputs in the main process on transparent huge pages, where page faults are several times cheaper). Inside a
DataLoader worker the tensors are allocated in shared memory, so handing the batch to the main
process costs no further copy; with `pin=True` (main process only) they are allocated pinned.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from draftdata.loaders.plan import padded_length
from draftdata.store.layout import HUGE_PAGE, empty_array

_PIN_WARNED = False


def empty(shape: tuple[int, ...], dtype: torch.dtype, *, shared: bool = False, pin: bool = False) -> torch.Tensor:
    """Uninitialized tensor, allocated in shared memory (DataLoader worker) or pinned memory."""
    if shared:
        numel = math.prod(shape)
        storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    if pin and _can_pin():
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    # Large batches in their own anonymous mapping advised for transparent huge pages: first-touch
    # page faults are the main cost of filling a fresh batch, and 2 MiB pages cut them several-fold.
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE:  # (also every empty shape)
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(empty_array((nbytes,), np.uint8)).view(dtype).view(shape)


def _can_pin() -> bool:
    global _PIN_WARNED
    if torch.cuda.is_available():
        return True
    if not _PIN_WARNED:
        import warnings

        warnings.warn("pin_memory=True but no CUDA device is available; batches are not pinned", stacklevel=3)
        _PIN_WARNED = True
    return False


def collate_samples(samples: list[dict[str, Any]], *, pad_to_multiple_of: int | None = None,
                    pin_memory: bool = False) -> dict[str, Any]:
    """Right-pad sample dicts (store layout) into one Loader batch. Usable as a DataLoader collate_fn."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    b, t = len(samples), padded_length(max(lengths), pad_to_multiple_of)
    h = int(samples[0]["hidden_states"].shape[-1])
    kh = int(samples[0]["aux_hidden_states"].shape[-1])
    shared = get_worker_info() is not None
    pin = pin_memory and not shared
    out = {
        "input_ids": empty((b, t), torch.int64, shared=shared, pin=pin),
        "attention_mask": empty((b, t), torch.int64, shared=shared, pin=pin),
        "loss_mask": empty((b, t), torch.float32, shared=shared, pin=pin),
        "hidden_states": empty((b, t, h), torch.bfloat16, shared=shared, pin=pin),
        "aux_hidden_states": empty((b, t, kh), torch.bfloat16, shared=shared, pin=pin),
    }
    # Copies go through numpy (bf16 as its int16 bits): single-threaded memcpy, which stays fast
    # when the trainer's intra-op threads already occupy every core (torch's parallel copy does not).
    dst = {k: _np(v) for k, v in out.items()}
    for i, (s, n) in enumerate(zip(samples, lengths)):
        dst["input_ids"][i, :n] = _np(s["input_ids"])
        dst["loss_mask"][i, :n] = _np(s["loss_mask"])
        dst["attention_mask"][i, :n] = 1
        dst["hidden_states"][i, :n] = _np(_bf16(s["hidden_states"]))
        dst["aux_hidden_states"][i, :n] = _np(_bf16(s["aux_hidden_states"]))
        if n < t:
            for a in dst.values():
                a[i, n:] = 0
    out["lengths"] = torch.tensor(lengths, dtype=torch.int64)
    out["conversation_id"] = [str(s["conversation_id"]) for s in samples]
    return out


def empty_batch(hidden_size: int, aux_width: int) -> dict[str, Any]:
    """A batch with no rows (B = 0, T = 0) in the Loader-batch layout: what a streaming dataset
    with `empty_batches=True` yields for a batch whose samples were all damaged."""
    return {
        "input_ids": torch.zeros((0, 0), dtype=torch.int64),
        "attention_mask": torch.zeros((0, 0), dtype=torch.int64),
        "loss_mask": torch.zeros((0, 0), dtype=torch.float32),
        "hidden_states": torch.zeros((0, 0, hidden_size), dtype=torch.bfloat16),
        "aux_hidden_states": torch.zeros((0, 0, aux_width), dtype=torch.bfloat16),
        "lengths": torch.zeros((0,), dtype=torch.int64),
        "conversation_id": [],
    }


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """Hidden states as bf16 (the store's own are already; fp32/fp16 from elsewhere are converted,
    not reinterpreted, since the batch holds them as bf16 bits)."""
    return t if t.dtype == torch.bfloat16 else torch.as_tensor(t).to(torch.bfloat16)


def _np(t: torch.Tensor):
    """numpy view of a CPU tensor (bf16 as int16 bits; no copy)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def padding_efficiency(batch: dict[str, Any]) -> float:
    """Real tokens / padded tokens of one collated batch (1.0 = no padding)."""
    b, t = batch["input_ids"].shape
    return float(batch["lengths"].sum()) / max(1, b * t)
