"""`HiddenStateDataset` (streaming, exactly-once, resumable) and `HiddenStateMapDataset` (random access).

See docs/LOADER.md for usage, the partition rules and resume; draftdata/loaders/plan.py for the
plan itself.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from draftdata.errors import DraftdataError
from draftdata.loaders import plan as planning
from draftdata.loaders.collate import collate_samples, empty_batch
from draftdata.loaders.reader import Prefetcher, load_window, read_segment, sample_view

STATE_FORMAT = "draftdata.loader/1"
TRACKED_WORKERS = 1024  # DataLoader worker ids whose use of a loaded state is remembered (8 KiB shared)
DEFAULT_PREFETCH_BYTES = 2 << 30


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The data-parallel slot: as given, else torch.distributed's, else the launcher's RANK and
    WORLD_SIZE (torchrun sets them before the script creates its process group: without them a
    dataset made first gave every rank the whole dataset)."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        elif os.environ.get("RANK", "").isdigit() and os.environ.get("WORLD_SIZE", "").isdigit():
            rank = int(os.environ["RANK"]) if rank is None else rank
            world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    rank, world_size = (0 if rank is None else int(rank)), (1 if world_size is None else int(world_size))
    if world_size < 1 or not 0 <= rank < world_size:
        raise DraftdataError(f"rank {rank} is not in range for world_size {world_size}")
    return rank, world_size


def rank0_part_ids(part_ids: list[str]) -> list[str]:
    """Rank 0's snapshot of the committed parts (`ds.part_ids`), on every rank of the
    torch.distributed group: ranks that listed a growing dataset at different moments would split
    different sample sets, losing or repeating samples. A collective call."""
    import torch.distributed as dist

    chosen = [part_ids]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def _open(url: str, storage_options: dict[str, Any] | None, parts: list[str] | None):
    """(the store, restricted to `parts` when given; the number of committed parts it leaves out)."""
    from draftdata.store import open_dataset

    store = open_dataset(url, storage_options=storage_options)
    committed = len(store.parts)
    if parts is not None:
        store = store.subset(parts)
    if store.num_samples == 0:
        raise DraftdataError(f"{store.url}: the dataset has no committed samples yet "
                             "(is `draftdata collect` still running, or did every part fail?)")
    return store, committed - len(store.parts)


class HiddenStateDataset(IterableDataset):
    """Streams a hidden-state dataset (local or object storage) into a training loop.

    Every sample is yielded exactly once per epoch across all ranks and DataLoader workers; the
    order is a deterministic function of (seed, epoch, world_size, DataLoader num_workers).
    Yields sample dicts (store layout), or collated Loader batches when `batch_size` or
    `max_tokens_per_batch` is given (use `DataLoader(ds, batch_size=None)` then).

    Args:
        url: dataset URL (path, file://, s3://, gs://, ...).
        shuffle: permute the part order, samples inside each window and the window order.
        seed: shuffle seed; the same on every rank.
        rank, world_size: this process's data-parallel slot; default from torch.distributed.
        max_seq_len: truncate longer samples to their first `max_seq_len` tokens.
        storage_options: fsspec options (e.g. S3 key/secret/endpoint).
        batch_size: fixed batch size; with `max_tokens_per_batch`, the cap on samples per batch.
        max_tokens_per_batch: token budget per batch, counted padded (samples x longest sample);
            samples are bucketed by length inside each window. A sample longer than the budget
            forms a batch of its own (set `max_seq_len` <= the budget to rule that out).
        shuffle_window: at most this many samples per shuffle window (the window is also
            bounded to prefetch_bytes / 2 decoded bytes).
        prefetch_bytes: decoded bytes each reading process (main, or each DataLoader worker)
            holds: the window being consumed plus the windows read ahead.
        pin_memory: allocate batches in pinned memory (main process only; in DataLoader workers
            use `DataLoader(pin_memory=True)`).
        io_threads: threads reading a window's ~64 MiB pieces in parallel (reads and CRCs release the GIL).
        parts: restrict to these committed part ids (pin a snapshot of a growing dataset).
        on_corrupt: "raise" (default) names the part and sample; "skip" warns and leaves it out
            (a batch that lost samples lists them in `batch["skipped"]`). Storage access errors
            (network, permissions) are never skipped: they raise StorageAccessError either way.
        empty_batches: with on_corrupt="skip" and batching, yield a batch whose samples were all
            damaged as a 0-row batch (with its `skipped` list) instead of leaving it out, so every
            rank yields exactly `len(ds)` items: what a DDP loop with a fixed step count and a
            global items_consumed cursor need (see docs/LOADER.md, Errors).
        pad_to_multiple_of: round each batch's padded length up to a multiple of this (the token
            budget counts the rounded length).
    """

    def __init__(self, url: str, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, max_seq_len: int | None = None,
                 storage_options: dict[str, Any] | None = None, batch_size: int | None = None,
                 max_tokens_per_batch: int | None = None, shuffle_window: int | None = None,
                 prefetch_bytes: int = DEFAULT_PREFETCH_BYTES, pin_memory: bool = False, io_threads: int = 4,
                 parts: list[str] | None = None, on_corrupt: str = "raise", empty_batches: bool = False,
                 pad_to_multiple_of: int | None = None):
        super().__init__()
        for name, v in (("batch_size", batch_size), ("max_tokens_per_batch", max_tokens_per_batch),
                        ("max_seq_len", max_seq_len), ("shuffle_window", shuffle_window),
                        ("pad_to_multiple_of", pad_to_multiple_of)):
            if v is not None and int(v) < 1:
                raise DraftdataError(f"{name} must be a positive integer, got {v}")
        if on_corrupt not in ("raise", "skip"):
            raise DraftdataError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        if empty_batches and batch_size is None and max_tokens_per_batch is None:
            raise DraftdataError("empty_batches=True needs batching (batch_size or max_tokens_per_batch)")
        if prefetch_bytes < 1:
            raise DraftdataError(f"prefetch_bytes must be positive, got {prefetch_bytes}")
        self.rank, self.world_size = _distributed(rank, world_size)
        self.store, self.parts_left_out = _open(url, storage_options, parts)  # committed, not in `parts`
        if parts is None and rank is None and world_size is None and self.world_size > 1 \
                and torch.distributed.is_available() and torch.distributed.is_initialized():
            agreed = rank0_part_ids(self.part_ids)
            if agreed != self.part_ids:
                self.store, self.parts_left_out = _open(url, storage_options, agreed)
        self.schema = self.store.schema
        self.shuffle, self.seed, self.max_seq_len = bool(shuffle), int(seed), max_seq_len
        self.batch_size, self.max_tokens_per_batch = batch_size, max_tokens_per_batch
        self.shuffle_window, self.prefetch_bytes = shuffle_window, int(prefetch_bytes)
        self.pin_memory, self.io_threads, self.on_corrupt = pin_memory, max(1, int(io_threads)), on_corrupt
        self.pad_to_multiple_of, self.empty_batches = pad_to_multiple_of, bool(empty_batches)
        self.token_bytes = planning.bytes_per_token(self.schema.hidden_size, self.schema.num_aux_slots)
        # The epoch lives in shared memory so that DataLoader workers started earlier (persistent_workers=True)
        # see set_epoch / load_state_dict from the main process at their next iteration.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._worker_epoch = torch.full((), -1, dtype=torch.int64).share_memory_()  # last epoch workers iterated
        self._chosen_epoch = torch.full((), -1, dtype=torch.int64).share_memory_()  # the last set_epoch(e), -1: none
        self._counts = [p.num_samples for p in self.store.parts]
        self._lengths = [p.lengths for p in self.store.parts]
        self._resume: dict[str, Any] | None = None
        self._resume_id = 0  # a fresh random id per load_state_dict
        # Per DataLoader worker id: the id of the loaded state its iterator has applied. A loaded state
        # applies to one iteration: the next iteration of a worker (a new one too) starts normally.
        self._resume_used = torch.zeros(TRACKED_WORKERS, dtype=torch.int64).share_memory_()
        self._yielded = 0
        self._iter_worker: tuple[int, int, int] | None = None  # (worker id, logical worker, num_workers)
        self._iter_epoch = -1  # the epoch _iter_worker's iteration reads
        self._iter_pid: int | None = None  # process whose iterator _iter_worker describes
        self.stats: dict[str, int] = {}
        if max_tokens_per_batch:
            longest = max(int(x.max()) for x in self._lengths)
            if max_seq_len:
                longest = min(longest, max_seq_len)
            padded = planning.padded_length(longest, pad_to_multiple_of)
            if padded > max_tokens_per_batch:
                shape = f"{longest} tokens" + (f" ({padded} padded to a multiple of {pad_to_multiple_of})"
                                               if padded != longest else "")
                warnings.warn(f"{self.store.url}: samples of up to {shape} exceed max_tokens_per_batch="
                              f"{max_tokens_per_batch}; each forms a batch of its own. Set max_seq_len (rounded "
                              "up to pad_to_multiple_of) at most the budget to cap them.", stacklevel=2)

    # ------------------------------------------------------------------ plan and metadata
    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads (shared with DataLoader workers, persistent ones too)."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))

    @property
    def part_ids(self) -> list[str]:
        return [p.id for p in self.store.parts]

    @property
    def num_samples(self) -> int:
        """Samples in the whole dataset (all ranks)."""
        return self.store.num_samples

    def _settings(self) -> dict[str, Any]:
        out = {"shuffle": self.shuffle, "seed": self.seed, "max_seq_len": self.max_seq_len,
               "batch_size": self.batch_size, "max_tokens_per_batch": self.max_tokens_per_batch,
               "shuffle_window": self.shuffle_window, "prefetch_bytes": self.prefetch_bytes}
        if self.pad_to_multiple_of and self.max_tokens_per_batch:  # it shapes the batches (absent: older plans)
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return out

    def fingerprint(self) -> str:
        return planning.fingerprint(self.part_ids, self._counts, self._settings())

    def plan(self, epoch: int | None = None, rank: int | None = None) -> planning.RankPlan:
        """The epoch plan of a rank (default: this rank, the current epoch). Pure metadata, no I/O."""
        return planning.rank_plan(
            self._counts, self._lengths, seed=self.seed, epoch=self.epoch if epoch is None else epoch,
            shuffle=self.shuffle, rank=self.rank if rank is None else rank, world_size=self.world_size,
            token_bytes=self.token_bytes, window_bytes=max(1, self.prefetch_bytes // 2),
            window_samples=self.shuffle_window, batch_size=self.batch_size,
            max_tokens_per_batch=self.max_tokens_per_batch, max_seq_len=self.max_seq_len,
            pad_to_multiple_of=self.pad_to_multiple_of)

    def __len__(self) -> int:
        """Items (samples, or batches when batching) this rank yields in the current epoch."""
        return self.plan().num_items

    def items_per_rank(self, epoch: int | None = None) -> list[int]:
        """Items every rank yields in an epoch; ranks may differ (see docs/LOADER.md, remainder)."""
        return [self.plan(epoch, r).num_items for r in range(self.world_size)]

    def padding_efficiency(self, epoch: int | None = None) -> float:
        """Real tokens / padded tokens over this rank's batches of an epoch (from the plan, no I/O),
        counting `pad_to_multiple_of` as iteration pads."""
        real, padded = self.plan(epoch).padded_tokens(self.pad_to_multiple_of)
        return real / max(1, padded)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next (before creating the DataLoader iterator, or before the
        next `iter(loader)` of a DataLoader with persistent workers)."""
        self.epoch = int(epoch)
        self._chosen_epoch.fill_(int(epoch))
        if self._resume is not None and self._resume["epoch"] != self.epoch:
            self._resume = None

    def _unused_resume(self, wid: int | None) -> dict[str, Any] | None:
        """The loaded state, unless an iterator already applied it: DataLoader worker `wid` (in a
        worker), or any worker (`wid` None: the main process, whose copy the workers do not update)."""
        state = self._resume
        if state is None:
            return None
        used = self._resume_used if wid is None else self._resume_used[wid:wid + 1]
        if bool((used == self._resume_id).any()):
            return None
        return state

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Position of this process's iterator (a DataLoader worker's, under StatefulDataLoader).

        Before this process has started iterating (e.g. a DataLoader worker that has yielded
        nothing yet when the trainer checkpoints), it is the position the next iteration starts from.
        """
        if self._iter_worker is not None and self._iter_pid == os.getpid() and self._iter_epoch == self.epoch:
            wid, logical, nw = self._iter_worker
            yielded = self._yielded
        else:  # nothing iterated yet in this process, or an earlier epoch (set_epoch since, persistent workers)
            info = get_worker_info()
            if info is None and int(self._worker_epoch) == self.epoch:
                warnings.warn(f"{self.store.url}: state_dict() in the main process while DataLoader workers iterate "
                              f"epoch {self.epoch}: it is where the next iteration would start, not where the "
                              "workers are; use torchdata's StatefulDataLoader, or count the items your loop "
                              "consumed and resume with {'epoch': e, 'items_consumed': n} (docs/LOADER.md, Resume)",
                              stacklevel=2)
            state = self._unused_resume(None if info is None else info.id)
            if state is not None and state["epoch"] == self.epoch and "items_consumed" not in state:
                return dict(state)
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
            yielded, logical = 0, wid
            if state is not None and state["epoch"] == self.epoch:
                yielded, logical = self._cursor_point(self.plan(), int(state["items_consumed"]), wid, nw)
        return {"format": STATE_FORMAT, "epoch": self.epoch, "rank": self.rank, "world_size": self.world_size,
                "worker_id": wid, "logical_worker": logical, "num_workers": nw, "items_yielded": yielded,
                "fingerprint": self.fingerprint(), "settings": self._settings(), "parts": len(self.part_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where a state left off (the next iteration of that epoch skips what was seen).

        Accepts `state_dict()` output (also what StatefulDataLoader saves per worker), or a global
        cursor `{"epoch": e, "items_consumed": n}`: the number of items this rank's DataLoader
        had yielded in epoch e (count them in your training loop; needs the same num_workers: add
        `"num_workers": w` to have a different one refused instead of resuming at wrong items).
        A loaded state applies to the next iteration only (of each DataLoader worker). The end of an
        epoch before the one `set_epoch` selected is ignored (a checkpoint at the end of epoch e with
        set_epoch(e + 1), in either order, starts e + 1); any other state is applied and sets the epoch.

        The global cursor assumes `DataLoader(ds, batch_size=None)` (the dataset batches, or
        yields samples one by one), where the DataLoader takes one item from each worker in turn.
        With `DataLoader(batch_size=B)` and several workers a batch holds B items of one worker,
        so the cursor would resume at the wrong items (undetectable here): use torchdata's
        StatefulDataLoader then (docs/LOADER.md, Resume).
        """
        if "items_consumed" not in state and state.get("format") != STATE_FORMAT:
            raise DraftdataError(f"not a HiddenStateDataset state (format {state.get('format')!r})")
        for key in ("rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise DraftdataError(f"cannot resume: the state was saved with {key}={state[key]}, this dataset "
                                     f"has {key}={getattr(self, key)}; exact resume needs the same world size")
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint():
            raise DraftdataError(f"cannot resume: {self._state_differences(state)}; open the same parts (parts=...) "
                                 "with the same settings")
        self._check_cursor(state)
        if int(state["epoch"]) < int(self._chosen_epoch) and self._finished_epoch(state):
            # The end of an epoch before the one set_epoch chose: StatefulDataLoader hands its saved
            # states over only when the iterator starts, after the trainer's set_epoch(e + 1) for a
            # checkpoint taken at the end of epoch e; applying it rewound to e (replayed, or empty).
            return
        self.epoch = int(state["epoch"])
        self._resume = dict(state)
        # Not the `random` module: StatefulDataLoader seeds it per worker before loading a state, so
        # reloading a checkpoint would draw the same id and be taken as already applied.
        self._resume_id = int.from_bytes(os.urandom(8), "little") >> 2 | 1
        self._iter_worker = None  # state_dict() now reports the loaded position

    def _check_cursor(self, state: dict[str, Any]) -> None:
        """Refuse a cursor that points outside its epoch now, not at the first item of the next
        iteration (a bare ValueError from inside the plan)."""
        def whole(x: Any) -> int | None:  # ints and numpy integers; not floats, strings or bools
            try:
                return None if isinstance(x, bool) else operator.index(x)
            except TypeError:
                return None

        epoch, consumed = whole(state.get("epoch")), whole(state.get("items_consumed", 0))
        if epoch is None or epoch < 0:
            raise DraftdataError(f"cannot resume: the state's epoch is {state.get('epoch')!r}; expected an integer >= 0")
        if "items_consumed" not in state:
            return
        total = self.plan(epoch).num_items
        if consumed is None or not 0 <= consumed <= total:
            consumed = state["items_consumed"]
            raise DraftdataError(f"cannot resume: the state says {consumed!r} items consumed in epoch {epoch}, but "
                                 f"this rank has {total} items in it (rank {self.rank} of {self.world_size}); count "
                                 "the items this rank's DataLoader yielded, or resume from state_dict()")

    def _finished_epoch(self, state: dict[str, Any]) -> bool:
        """Whether `state` is the end of its epoch (every item of its worker, or of the rank, yielded)."""
        plan = self.plan(int(state["epoch"]))
        if "items_consumed" in state:
            return int(state["items_consumed"]) >= plan.num_items
        counts = plan.worker_item_counts(int(state.get("num_workers", 1)))
        logical = int(state.get("logical_worker", state.get("worker_id", 0)))
        return logical < len(counts) and int(state.get("items_yielded", 0)) >= counts[logical]

    def _state_differences(self, state: dict[str, Any]) -> str:
        """What differs from when `state` was saved, as far as the state says (older states: only
        that something does)."""
        then, now = state.get("settings"), self._settings()
        diffs = [f"{k}={then.get(k)!r} when saved, {now.get(k)!r} now" for k in sorted(set(then) | set(now))
                 if then.get(k) != now.get(k)] if isinstance(then, dict) else []
        if "parts" in state and state["parts"] != len(self.part_ids):
            diffs.append(f"{state['parts']} committed parts when saved, {len(self.part_ids)} now (a dataset still "
                         "being written: pin its parts)")
        if diffs:
            return "the loader settings or the dataset differ from when the state was saved: " + "; ".join(diffs)
        if isinstance(then, dict):
            return "the dataset's committed parts differ from when the state was saved (same count, other parts)"
        return "the dataset's committed parts or the loader settings differ from when the state was saved"

    def _resume_point(self, plan: planning.RankPlan, wid: int, nw: int) -> tuple[int, int]:
        """(items to skip, logical worker) for DataLoader worker `wid` of `nw` starting this iteration.

        Worker w normally reads the plan's worker-w windows. After a global-cursor resume the
        DataLoader restarts its round-robin at worker 0 while the interrupted run would have
        continued at some worker w*, so worker ids are rotated by w* (the round-robin order of
        the remaining items is then the same).
        """
        in_worker = get_worker_info() is not None
        state = self._unused_resume(wid if in_worker else None)
        if not in_worker:
            self._resume = None  # a resume applies to one iteration only
        elif state is not None and wid < TRACKED_WORKERS:
            self._resume_used[wid] = self._resume_id
        if state is None or state["epoch"] != self.epoch:
            return 0, wid
        if "items_consumed" in state:
            if "num_workers" in state and max(1, int(state["num_workers"])) != nw:  # 0 workers read as 1
                have = nw if in_worker else 0
                raise DraftdataError(f"cannot resume: the cursor was counted with num_workers={state['num_workers']}, "
                                     f"this DataLoader has {have}; the items consumed depend on it, so use the "
                                     "same num_workers")
            return self._cursor_point(plan, int(state["items_consumed"]), wid, nw)
        if state["num_workers"] != nw or state["worker_id"] != wid:
            raise DraftdataError(f"cannot resume: the state is worker {state['worker_id']} of {state['num_workers']}, "
                                 f"this iterator is worker {wid} of {nw}; use the same DataLoader num_workers")
        return int(state["items_yielded"]), int(state.get("logical_worker", wid))

    @staticmethod
    def _cursor_point(plan: planning.RankPlan, consumed: int, wid: int, nw: int) -> tuple[int, int]:
        """(items to skip, logical worker) of worker `wid` of `nw` after a global cursor of `consumed` items."""
        counts = plan.worker_item_counts(nw)
        order = planning.interleave(counts)
        rotation = order[consumed][0] if consumed < len(order) else 0
        logical = (wid + rotation) % nw
        return planning.worker_positions(counts, consumed)[logical], logical

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            self._worker_epoch.fill_(self.epoch)
        plan = self.plan()
        skip, logical = self._resume_point(plan, wid, nw)
        self._iter_worker, self._iter_pid, self._yielded = (wid, logical, nw), os.getpid(), skip
        self._iter_epoch = self.epoch
        windows = plan.worker_windows(logical, nw)
        # Windows whose items were all yielded before the resume point are not read at all.
        while windows and skip >= len(windows[0].items):
            skip -= len(windows[0].items)
            windows = windows[1:]
        self.stats = {"samples": 0, "tokens": 0, "padded_tokens": 0, "items": 0, "skipped_samples": 0,
                      "peak_prefetch_bytes": 0}
        if not windows:
            return
        pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="draftdata-io") if self.io_threads > 1 else None

        def load(w: planning.Window):
            return load_window(self.store, plan, w, token_bytes=self.token_bytes, on_corrupt=self.on_corrupt,
                               pool=pool)

        sizes = [plan.window_bytes(w, self.token_bytes) for w in windows]
        prefetch = Prefetcher(load, windows, sizes, self.prefetch_bytes)
        try:
            for lw, size in zip(prefetch, sizes):
                for item in lw.window.items[skip:]:
                    samples = [sample_view(self.store, plan, lw, int(i)) for i in item if int(i) in lw.where]
                    skipped = [lw.skipped[int(i)] for i in item if int(i) not in lw.where]
                    self.stats["skipped_samples"] += len(skipped)
                    self._yielded += 1
                    if not samples and not self.empty_batches:
                        continue
                    out = self._emit(samples)
                    if skipped:  # batching only: a lone sample that is damaged was left out above
                        out["skipped"] = skipped
                    self.stats["peak_prefetch_bytes"] = prefetch.peak_held
                    yield out
                skip = 0
                prefetch.release(size)
        finally:
            prefetch.close()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _emit(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            return empty_batch(self.schema.hidden_size, self.schema.hidden_size * self.schema.num_aux_slots)
        n = sum(int(s["input_ids"].shape[0]) for s in samples)
        self.stats["samples"] += len(samples)
        self.stats["tokens"] += n
        self.stats["items"] += 1
        if self.batch_size is None and self.max_tokens_per_batch is None:
            self.stats["padded_tokens"] += n
            return samples[0]
        batch = collate_samples(samples, pad_to_multiple_of=self.pad_to_multiple_of, pin_memory=self.pin_memory)
        self.stats["padded_tokens"] += int(batch["input_ids"].numel())
        return batch


class HiddenStateMapDataset(Dataset):
    """Random access to samples by global index (`len`, `[i]`): for HF Trainer and DistributedSampler.

    Each `[i]` is a few range reads of the chunks holding sample i (no whole-part reads); order,
    sharding and epochs are the sampler's job. Items are sample dicts in the store layout;
    `collate_samples` turns a list of them into a Loader batch.
    """

    def __init__(self, url: str, *, max_seq_len: int | None = None, storage_options: dict[str, Any] | None = None,
                 parts: list[str] | None = None):
        if max_seq_len is not None and max_seq_len < 1:
            raise DraftdataError(f"max_seq_len must be a positive integer, got {max_seq_len}")
        self.store, _ = _open(url, storage_options, parts)
        self.schema = self.store.schema
        self.max_seq_len = max_seq_len
        self._starts = np.concatenate([[0], np.cumsum([p.num_samples for p in self.store.parts])]).astype(np.int64)

    def __len__(self) -> int:
        return self.store.num_samples

    def lengths(self) -> np.ndarray:
        """Token length of every sample (after truncation), e.g. for a length-grouped sampler."""
        lengths = self.store.sample_lengths()
        return np.minimum(lengths, self.max_seq_len) if self.max_seq_len else lengths

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (dataset has {len(self)})")
        p = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - int(self._starts[p])
        rows, _ = read_segment(self.store, p, j, j + 1, "raise")
        rows = rows["samples"][j] if "samples" in rows else rows
        info = self.store.parts[p]
        n = int(info.offsets[j + 1] - info.offsets[j])
        e = min(n, self.max_seq_len) if self.max_seq_len else n
        return {
            "conversation_id": info.conversation_ids[j],
            "input_ids": torch.from_numpy(rows["input_ids"][:e]),
            "loss_mask": torch.from_numpy(rows["loss_mask"][:e]),
            "aux_hidden_states": rows["aux_hidden_states"][:e],
            "hidden_states": rows["hidden_states"][:e],
        }


__all__ = ["HiddenStateDataset", "HiddenStateMapDataset"]
