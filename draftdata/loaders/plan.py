"""The epoch plan: which samples each rank and DataLoader worker reads, in which order, batched how.

Pure functions of the dataset's metadata (part sample counts and token lengths) and the settings;
no I/O. Every process computes the same plan independently, which is what makes the split
exactly-once and resume exact.

For one (seed, epoch):

1. Part order: the committed parts are permuted (`shuffle=True`) or kept in id order.
2. Epoch stream: the samples of the parts in that order, concatenated (N samples).
3. Ranks: rank r gets the contiguous slice [r*N//R, (r+1)*N//R) of the stream, so rank sample
   counts differ by at most one and nothing is repeated or dropped.
4. Windows: the rank's slice is cut, in stream order, into windows of at most `window_bytes`
   decoded bytes (and at most `window_samples` samples). A window is the unit of I/O (a few
   contiguous range reads, one per part it touches) and of shuffling: samples are shuffled
   inside a window, and the windows of a rank are visited in a shuffled order.
5. Items: inside a window the (shuffled) samples become the items the dataset yields: single
   samples, fixed-size batches, or token-budget batches built by sorting the window by length
   (bucketing) and packing greedily, then shuffling the batch order.
6. Workers: window k of the rank's (shuffled) window order belongs to DataLoader worker
   k % num_workers. A torch DataLoader takes items from its workers round-robin, skipping
   workers that are done, so the order a trainer sees is `interleave(...)` of the worker item
   lists; `worker_positions` inverts that for resuming from a count of consumed items.

The rank's set of items (and hence `len()`) does not depend on the number of workers; only the
interleaving does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# Tags that keep the random streams of the different shuffles independent.
_TAG_PARTS, _TAG_WINDOW_ORDER, _TAG_WINDOW = 1, 2, 3


def _rng(seed: int, epoch: int, tag: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), tag, *[int(k) for k in key]])


def part_order(num_parts: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order in which the parts are concatenated into the epoch stream."""
    if not shuffle:
        return np.arange(num_parts, dtype=np.int64)
    return _rng(seed, epoch, _TAG_PARTS).permutation(num_parts).astype(np.int64)


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of the index-th of `parts` contiguous slices of range(n); sizes differ by at most one."""
    if not 0 <= index < parts:
        raise ValueError(f"slice {index} out of range for {parts} slices")
    return index * n // parts, (index + 1) * n // parts


@dataclass
class Window:
    """A contiguous run [lo, hi) of the rank's stream, and the items made from it."""

    lo: int
    hi: int
    items: list[np.ndarray] = field(default_factory=list)  # each: rank-stream sample indices


@dataclass
class RankPlan:
    """What one rank reads in one epoch (all of its DataLoader workers together)."""

    epoch: int
    rank: int
    world_size: int
    stream_lo: int                 # position of the rank's first sample in the epoch stream
    part: np.ndarray               # [m] part index of each rank-stream sample
    row: np.ndarray                # [m] sample index inside that part
    length: np.ndarray             # [m] tokens after max_seq_len truncation
    stored: np.ndarray             # [m] tokens as stored (what a read decodes)
    windows: list[Window]          # in visiting order (shuffled when shuffle=True)
    batched: bool

    @property
    def num_samples(self) -> int:
        return len(self.part)

    @property
    def num_items(self) -> int:
        return sum(len(w.items) for w in self.windows)

    def worker_windows(self, worker: int, num_workers: int) -> list[Window]:
        """The windows DataLoader worker `worker` of `num_workers` reads, in order."""
        return self.windows[worker::max(1, num_workers)]

    def window_bytes(self, w: Window, token_bytes: int) -> int:
        """Decoded bytes of window `w` as read (stored lengths, before truncation)."""
        return int(self.stored[w.lo:w.hi].sum()) * token_bytes

    def worker_item_counts(self, num_workers: int) -> list[int]:
        return [sum(len(w.items) for w in self.worker_windows(i, num_workers)) for i in range(max(1, num_workers))]

    def padded_tokens(self, pad_to_multiple_of: int | None = None) -> tuple[int, int]:
        """(real tokens, tokens after right-padding every batch to its longest sample, rounded up to a
        multiple of `pad_to_multiple_of` as `collate_samples` does)."""
        real = int(self.length.sum())
        if not self.batched:
            return real, real
        padded = sum(len(it) * padded_length(int(self.length[it].max()), pad_to_multiple_of)
                     for w in self.windows for it in w.items)
        return real, padded


def padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    """A batch's padded length: its longest sample, rounded up to a multiple of `pad_to_multiple_of`
    (the rule `collate_samples` pads by and the token budget counts)."""
    m = int(pad_to_multiple_of or 1)
    return -(-longest // m) * m


def bytes_per_token(hidden_size: int, num_aux_slots: int) -> int:
    """Decoded bytes per token: int32 id, uint8 mask, bf16 final + k aux hidden states."""
    return 4 + 1 + 2 * hidden_size * (num_aux_slots + 1)


def rank_plan(counts: np.ndarray | list[int], lengths: list[np.ndarray], *, seed: int, epoch: int, shuffle: bool,
              rank: int, world_size: int, token_bytes: int, window_bytes: int, window_samples: int | None = None,
              batch_size: int | None = None, max_tokens_per_batch: int | None = None,
              max_seq_len: int | None = None, pad_to_multiple_of: int | None = None) -> RankPlan:
    """Plan one epoch of one rank. `counts[p]`/`lengths[p]`: samples / token lengths of part p."""
    counts = np.asarray(counts, dtype=np.int64)
    order = part_order(len(counts), seed=seed, epoch=epoch, shuffle=shuffle)
    starts = np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)
    n = int(starts[-1])
    lo, hi = split_range(n, world_size, rank)
    # Parts of the permuted stream that overlap [lo, hi), and the rows of each inside the slice.
    first = int(np.searchsorted(starts, lo, side="right") - 1) if hi > lo else 0
    part_ids, rows, lens = [], [], []
    pos = first
    while hi > lo and pos < len(order) and starts[pos] < hi:
        p = int(order[pos])
        a, b = max(lo, int(starts[pos])) - int(starts[pos]), min(hi, int(starts[pos + 1])) - int(starts[pos])
        if b > a:
            part_ids.append(np.full(b - a, p, dtype=np.int64))
            rows.append(np.arange(a, b, dtype=np.int64))
            lens.append(np.asarray(lengths[p][a:b], dtype=np.int64))
        pos += 1
    part = np.concatenate(part_ids) if part_ids else np.zeros(0, np.int64)
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    stored = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    length = np.minimum(stored, int(max_seq_len)) if max_seq_len is not None else stored

    unit = batch_size if (batch_size and not max_tokens_per_batch) else 1
    windows = _cut_windows(stored * token_bytes, part, window_bytes, window_samples, unit)
    for w in windows:
        w.items = _window_items(w, length, seed=seed, epoch=epoch, stream_lo=lo, shuffle=shuffle,
                                batch_size=batch_size, max_tokens=max_tokens_per_batch, multiple=pad_to_multiple_of)
    if shuffle and windows:
        perm = _rng(seed, epoch, _TAG_WINDOW_ORDER, rank, world_size).permutation(len(windows))
        windows = [windows[i] for i in perm]
    return RankPlan(epoch=epoch, rank=rank, world_size=world_size, stream_lo=lo, part=part, row=row,
                    length=length, stored=stored, windows=windows, batched=bool(batch_size or max_tokens_per_batch))


def _cut_windows(sample_bytes: np.ndarray, part: np.ndarray, window_bytes: int, window_samples: int | None,
                 unit: int) -> list[Window]:
    """Greedy cut of the rank stream into windows within the byte and sample caps.

    Windows end at part boundaries where they can, so most parts are read whole (the store's
    fastest path) and a part is split only when it is larger than a window. With fixed-size
    batches (`unit` > 1) windows hold whole batches instead, so a batch never straddles two.
    """
    m = len(sample_bytes)
    csum = np.concatenate([[0], np.cumsum(sample_bytes)]).astype(np.int64)
    if unit > 1:
        cap = max(unit, (window_samples // unit) * unit) if window_samples else None
        bounds = np.arange(0, m, unit, dtype=np.int64)[1:]  # allowed cut points: whole batches
    else:
        cap = window_samples
        bounds = np.flatnonzero(np.diff(part) != 0) + 1  # part boundaries
    bounds = np.concatenate([bounds, [m]]).astype(np.int64)
    windows, lo = [], 0
    while lo < m:
        hi_max = int(np.searchsorted(csum, csum[lo] + window_bytes, side="right")) - 1
        if cap:
            hi_max = min(hi_max, lo + cap)
        hi_max = min(m, max(hi_max, lo + 1))
        k = int(np.searchsorted(bounds, hi_max, side="right")) - 1  # last allowed cut <= hi_max
        if k >= 0 and bounds[k] > lo:
            hi = int(bounds[k])
        elif unit > 1:
            hi = min(m, lo + unit)  # one batch larger than the window: it is read alone
        else:
            hi = hi_max  # a part larger than the window is split
        windows.append(Window(lo, hi))
        lo = hi
    return windows


def _window_items(w: Window, length: np.ndarray, *, seed: int, epoch: int, stream_lo: int, shuffle: bool,
                  batch_size: int | None, max_tokens: int | None, multiple: int | None = None) -> list[np.ndarray]:
    idx = np.arange(w.lo, w.hi, dtype=np.int64)
    rng = _rng(seed, epoch, _TAG_WINDOW, stream_lo + w.lo)
    if shuffle:
        idx = rng.permutation(idx)
    if max_tokens:
        # Bucketing: sort by length (ties keep the shuffled order), pack greedily under the padded
        # budget (samples x longest, rounded up to `multiple` as the collator pads), then shuffle the
        # batch order so lengths do not trend.
        idx = idx[np.argsort(length[idx], kind="stable")]
        batches, cur, longest = [], [], 0
        for i in idx.tolist():
            li = int(length[i])
            full = batch_size is not None and len(cur) >= batch_size
            if cur and (full or (len(cur) + 1) * padded_length(max(longest, li), multiple) > max_tokens):
                batches.append(np.array(cur, dtype=np.int64))
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, li)
        if cur:
            batches.append(np.array(cur, dtype=np.int64))
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches
    if batch_size:
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [idx[i:i + 1] for i in range(len(idx))]


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """(worker, item index) in the order a DataLoader yields them: round-robin, skipping finished workers."""
    out, rnd = [], 0
    while True:
        step = [(w, rnd) for w, c in enumerate(counts) if rnd < c]
        if not step:
            return out
        out.extend(step)
        rnd += 1


def worker_positions(counts: list[int], consumed: int) -> list[int]:
    """Items each worker has produced once a DataLoader has yielded `consumed` items in total."""
    if consumed < 0 or consumed > sum(counts):
        raise ValueError(f"{consumed} items consumed, but this rank has {sum(counts)} items in the epoch")
    pos = [0] * len(counts)
    # Whole rounds first (every worker still active gives one item per round), then the rest.
    left, rnd = consumed, 0
    while left:
        active = [w for w, c in enumerate(counts) if c > rnd]
        full = min(counts[w] for w in active) - rnd
        if left >= full * len(active):
            for w in active:
                pos[w] += full
            left -= full * len(active)
            rnd += full
        else:
            whole, extra = divmod(left, len(active))
            for i, w in enumerate(active):
                pos[w] += whole + (1 if i < extra else 0)
            left = 0
    return pos


def fingerprint(part_ids: list[str], counts: list[int], settings: dict) -> str:
    """Short hash of the parts and the plan-relevant settings, stored with resume states."""
    h = hashlib.sha256()
    for pid, c in zip(part_ids, counts):
        h.update(f"{pid}:{c};".encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()[:16]
