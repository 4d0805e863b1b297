"""Draft vocabulary compression: pick the N most frequent assistant tokens, write d2t / t2d.

The draft predicts over N ids; `d2t[i] = target_id(i) - i` maps draft id i back to the base
vocabulary (the offset-table convention of EAGLE3, vLLM and SGLang), and `t2d[v]` says whether
base token v is in the draft vocabulary. The chosen ids are the N most frequent tokens under
loss_mask == 1 (ties broken by smaller id), sorted by id; when fewer than N distinct tokens
occur, the remaining slots are filled with unseen ids in ascending order.

File format (`draftdata vocab --out FILE`, a safetensors file):
    d2t           int64 [N]   offsets, target_id = i + d2t[i]
    t2d           bool  [V]   membership mask over the base vocabulary
    token_counts  int64 [V]   how often each base token was counted
    metadata      format="draftdata-draft-vocab", format_version, vocab_size, draft_vocab_size,
                  tokens_counted, distinct_tokens, coverage, dataset, base_model_id, counted,
                  tokenizer_hash (the dataset's, when it records one)
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from draftdata.errors import CorruptDataError, DraftdataError

VOCAB_FORMAT = "draftdata-draft-vocab"


@dataclass
class DraftVocab:
    """d2t/t2d of a compressed (or identity) draft vocabulary, plus the counts it came from."""

    d2t: torch.Tensor
    t2d: torch.Tensor
    token_counts: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def vocab_size(self) -> int:
        return int(self.t2d.numel())

    def target_ids(self) -> torch.Tensor:
        """Base-vocabulary id of each draft id, ascending."""
        return torch.arange(self.draft_vocab_size, dtype=torch.int64) + self.d2t

    def draft_ids(self) -> torch.Tensor:
        """For every base id, its draft id, or -1 when it is not in the draft vocabulary."""
        out = torch.full((self.vocab_size,), -1, dtype=torch.int64)
        out[self.target_ids()] = torch.arange(self.draft_vocab_size)
        return out


def select_draft_vocab(token_counts: torch.Tensor | np.ndarray, draft_vocab_size: int) -> DraftVocab:
    """Top-`draft_vocab_size` ids by count (ties: smaller id first), sorted by id -> d2t, t2d."""
    counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.int64)
    vocab = counts.numel()
    if not 1 <= draft_vocab_size <= vocab:
        raise DraftdataError(f"--draft-vocab-size must be between 1 and the vocabulary size {vocab}, "
                             f"got {draft_vocab_size}")
    # Stable sort by descending count keeps ascending id order among equal counts (incl. unseen).
    order = torch.sort(-counts, stable=True).indices
    chosen = torch.sort(order[:draft_vocab_size]).values
    d2t = chosen - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    total = int(counts.sum())
    meta = {
        "format": VOCAB_FORMAT, "format_version": "1", "vocab_size": str(vocab),
        "draft_vocab_size": str(draft_vocab_size), "tokens_counted": str(total),
        "distinct_tokens": str(int((counts > 0).sum())),
        "coverage": f"{(int(counts[chosen].sum()) / total) if total else 0.0:.6f}",
    }
    return DraftVocab(d2t=d2t, t2d=t2d, token_counts=counts, metadata=meta)


def count_tokens(url: str, storage_options: dict[str, Any] | None = None, *, all_tokens: bool = False,
                 workers: int = 8, progress: bool = True) -> tuple[torch.Tensor, Any]:
    """Count stored input_ids with loss_mask == 1 (every token if `all_tokens`) over all parts.

    Reads only the input_ids and loss_mask arrays of each part: Zarr and local Arrow never touch
    the hidden states; a remote Arrow part is one GET of the whole file (its record batches hold
    every column, so ranged reads would fetch the same bytes in more requests).
    Returns (counts int64 [vocab_size], dataset).
    """
    from tqdm import tqdm

    from draftdata.store import open_dataset

    ds = open_dataset(url, storage_options=storage_options)
    vocab = int(ds.schema.vocab_size)

    def count_part(p: int) -> np.ndarray:
        reader = ds.reader(p, whole=True)
        ids = np.asarray(reader.read("input_ids", None, None)).astype(np.int64, copy=False)
        if not all_tokens:
            mask = np.asarray(reader.read("loss_mask", None, None))
            if mask.shape != ids.shape:
                raise CorruptDataError(f"{url}: part {ds.parts[p].id}: loss_mask has {mask.shape[0]} rows, "
                                       f"input_ids {ids.shape[0]}; run `draftdata verify {url}`")
            ids = ids[mask.astype(bool)]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise CorruptDataError(f"{url}: part {ds.parts[p].id} holds token id {int(ids.max())} outside the "
                                   f"vocabulary (vocab_size {vocab}); run `draftdata verify {url}`")
        return np.bincount(ids, minlength=vocab)

    counts = np.zeros(vocab, dtype=np.int64)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        bar = tqdm(total=len(ds.parts), desc="counting tokens", unit="part", disable=None if progress else True)
        for c in pool.map(count_part, range(len(ds.parts))):
            counts += c
            bar.update(1)
        bar.close()
    return torch.from_numpy(counts), ds


def build_draft_vocab(url: str, draft_vocab_size: int, storage_options: dict[str, Any] | None = None, *,
                      all_tokens: bool = False, workers: int = 8, progress: bool = True) -> DraftVocab:
    """Count a dataset's assistant tokens and select the draft vocabulary."""
    from draftdata.store.dataset import open_location

    vocab_size = open_location(url, storage_options)[1].vocab_size   # a bad size fails before the count
    if not 1 <= draft_vocab_size <= vocab_size:
        raise DraftdataError(f"--draft-vocab-size must be between 1 and the vocabulary size {vocab_size}, "
                             f"got {draft_vocab_size}")
    counts, ds = count_tokens(url, storage_options, all_tokens=all_tokens, workers=workers, progress=progress)
    if int(counts.sum()) == 0:
        why = ("the dataset holds no samples" if not ds.num_samples else
               f"{ds.num_samples} samples; loss_mask is all 0{'' if all_tokens else ', try --all-tokens'}")
        raise DraftdataError(f"{url}: no tokens to count ({why})")
    vocab = select_draft_vocab(counts, draft_vocab_size)
    vocab.metadata.update({"dataset": str(url), "base_model_id": str(ds.schema.base_model_id),
                           "counted": "all" if all_tokens else "loss_mask==1"})
    if ds.schema.tokenizer_hash:  # train compares it: another tokenizer's ids name other tokens
        vocab.metadata["tokenizer_hash"] = str(ds.schema.tokenizer_hash)
    return vocab


def save_draft_vocab(path: str | Path, vocab: DraftVocab) -> Path:
    """Write the safetensors file described in the module docstring (atomically)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"d2t": vocab.d2t.to(torch.int64).contiguous(), "t2d": vocab.t2d.to(torch.bool).contiguous()}
    if vocab.token_counts is not None:
        tensors["token_counts"] = vocab.token_counts.to(torch.int64).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in vocab.metadata.items()})
        tmp.replace(path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):   # a partly written temporary file
            tmp.unlink(missing_ok=True)
        raise DraftdataError(f"cannot write {path} ({' '.join(str(e).split())}); choose a writable path") from None
    return path


def is_vocab_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file with d2t and t2d (one `draftdata vocab` may replace)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {"d2t", "t2d"} <= set(f.keys())
    except Exception:  # noqa: BLE001 - not safetensors at all (a model's .bin, a JSONL file, ...)
        return False


def load_draft_vocab(path: str | Path) -> DraftVocab:
    """Read a `draftdata vocab` file and check d2t and t2d agree."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise DraftdataError(f"draft vocabulary file {path} not found (build it with `draftdata vocab`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            if not {"d2t", "t2d"} <= names:
                has = sorted(names)
                listed = ", ".join(has[:5]) + (f", ... ({len(has)} tensors)" if len(has) > 5 else "")
                raise DraftdataError(f"{path}: not a draft vocabulary file (needs d2t and t2d, has {listed or 'none'}); "
                                     "build one with `draftdata vocab`")
            d2t, t2d = f.get_tensor("d2t").to(torch.int64), f.get_tensor("t2d").to(torch.bool)
            counts = f.get_tensor("token_counts") if "token_counts" in names else None
    except DraftdataError:
        raise
    except Exception as e:
        raise DraftdataError(f"{path}: cannot read as safetensors ({e})") from None
    vocab = DraftVocab(d2t=d2t, t2d=t2d, token_counts=counts, metadata=meta)
    target = vocab.target_ids()
    if target.numel() and int(target.min()) < 0:
        bad = int((target < 0).nonzero()[0, 0])
        raise DraftdataError(f"{path}: d2t maps draft id {bad} to base id {int(target[bad])} (negative; "
                             "corrupt or hand-edited file); rebuild it with `draftdata vocab`")
    if int(t2d.sum()) != vocab.draft_vocab_size or (target.numel() and (
            target.max() >= vocab.vocab_size or not bool(t2d[target].all()) or bool((target.diff() <= 0).any()))):
        raise DraftdataError(f"{path}: d2t and t2d disagree (corrupt or hand-edited file); rebuild it")
    return vocab


def identity_vocab(vocab_size: int) -> DraftVocab:
    """No compression: draft id == base id."""
    return DraftVocab(d2t=torch.zeros(vocab_size, dtype=torch.int64), t2d=torch.ones(vocab_size, dtype=torch.bool))
