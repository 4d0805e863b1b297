"""Reading the windows of a plan: contiguous range reads per part, prefetched in a background thread.

A window's samples are a few contiguous runs of samples (segments), one per part it touches.
Each segment is read with one range read per array (a whole part uses the store's `read_part`),
checked against the commit record's offsets, and kept as whole arrays; samples are views into
them (no copy). A background thread reads windows ahead of the consumer while the decoded bytes
it holds stay within the prefetch budget.
"""

from __future__ import annotations

import atexit
import queue
import threading
import warnings
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from draftdata.errors import CorruptDataError, DraftdataError
from draftdata.loaders.plan import RankPlan, Window


@dataclass
class LoadedWindow:
    """The decoded arrays of one window and where each of its samples lies in them."""

    window: Window
    nbytes: int
    segments: list[dict[str, Any]] = field(default_factory=list)
    where: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # stream idx -> (segment, start, stop)
    skipped: dict[int, str] = field(default_factory=dict)                 # stream idx -> why (on_corrupt="skip")


IO_CHUNK_BYTES = 64 << 20


def segments_of(plan: RankPlan, w: Window, token_bytes: int,
                max_bytes: int = IO_CHUNK_BYTES) -> list[tuple[int, int, int, list[int]]]:
    """(part, first row, end row, stream indices) for each contiguous run of one part in the window.

    Runs are cut (at sample boundaries) into pieces of about `max_bytes`, so one window is read
    by several threads at once: range reads and CRC checks release the GIL, and on object
    storage the pieces are concurrent GETs.
    """
    out: list[list] = []
    size = 0
    for i in range(w.lo, w.hi):
        p, j = int(plan.part[i]), int(plan.row[i])
        nbytes = int(plan.stored[i]) * token_bytes
        if out and out[-1][0] == p and out[-1][2] == j and size < max_bytes:
            out[-1][2] = j + 1
            out[-1][3].append(i)
            size += nbytes
        else:
            out.append([p, j, j + 1, [i]])
            size = nbytes
    return [tuple(s) for s in out]


def _describe(store: Any, p: int, j: int) -> str:
    info = store.parts[p]
    return f"part {info.id}, sample {j} (conversation {info.conversation_ids[j]!r})"


def read_segment(store: Any, p: int, j0: int, j1: int, on_corrupt: str) -> tuple[dict[str, Any], dict[int, str]]:
    """Read samples [j0, j1) of part p. On a corrupt read, find the bad sample(s) and raise (or skip them).

    Returns (rows, {row j: reason} of skipped samples). After a failed range read the samples are
    re-read one by one; rows is then {"samples": {row j: that sample's rows}} (a failure that
    does not repeat is thereby recovered).
    """
    try:
        rows = store.read_samples(p, j0, j1)  # shapes checked against dataset.json there
        return rows, {}
    except CorruptDataError:
        pass
    except DraftdataError:
        raise  # storage access problems are not corruption
    except Exception as e:  # network failures after the filesystem's own retries, etc.
        info = store.parts[p]
        raise DraftdataError(f"{store.url}: reading part {info.id} samples {j0}..{j1 - 1} failed: "
                             f"{type(e).__name__}: {e}") from e
    # Locate the bad sample(s): re-read the segment sample by sample.
    good: dict[int, dict[str, Any]] = {}
    bad: dict[int, str] = {}
    for j in range(j0, j1):
        try:
            rows = store.read_samples(p, j, j + 1)
            good[j] = rows
        except CorruptDataError as e:
            reason = f"{_describe(store, p, j)} of {store.url} is corrupt: {e}"
            if on_corrupt == "raise":
                raise CorruptDataError(f"{reason} (verify lists every damaged part; a HiddenStateDataset with "
                                       "on_corrupt='skip' reads around them)") from None
            bad[j] = reason
    for reason in bad.values():
        warnings.warn(f"skipping {reason}", stacklevel=2)
    return {"samples": good}, bad


def load_window(store: Any, plan: RankPlan, w: Window, *, token_bytes: int, on_corrupt: str,
                pool: ThreadPoolExecutor | None) -> LoadedWindow:
    """Read every segment of window `w` (in parallel on `pool`) and index its samples."""
    segs = segments_of(plan, w, token_bytes)
    nbytes = plan.window_bytes(w, token_bytes)
    jobs = [(p, j0, j1) for p, j0, j1, _ in segs]
    if pool is not None and len(jobs) > 1:
        results = list(pool.map(lambda a: read_segment(store, *a, on_corrupt), jobs))
    else:
        results = [read_segment(store, *a, on_corrupt) for a in jobs]
    out = LoadedWindow(window=w, nbytes=nbytes)
    for (p, j0, _j1, idx), (rows, bad) in zip(segs, results):
        info = store.parts[p]
        for i in idx:
            j = int(plan.row[i])
            if j in bad:
                out.skipped[i] = bad[j]
                continue
            if "samples" in rows:
                out.segments.append(rows["samples"][j])
                out.where[i] = (len(out.segments) - 1, 0, int(info.offsets[j + 1] - info.offsets[j]))
            else:
                base = int(info.offsets[j0])
                out.where[i] = (len(out.segments), int(info.offsets[j]) - base, int(info.offsets[j + 1]) - base)
        if "samples" not in rows:
            out.segments.append(rows)
    return out


def sample_view(store: Any, plan: RankPlan, lw: LoadedWindow, i: int) -> dict[str, Any]:
    """Sample `i` of the rank stream as views into the window's arrays, truncated to the plan length."""
    seg, s, e = lw.where[i]
    rows = lw.segments[seg]
    e = min(e, s + int(plan.length[i]))
    p, j = int(plan.part[i]), int(plan.row[i])
    return {
        "conversation_id": store.parts[p].conversation_ids[j],
        "input_ids": torch.from_numpy(rows["input_ids"][s:e]),
        "loss_mask": torch.from_numpy(rows["loss_mask"][s:e]),
        "aux_hidden_states": rows["aux_hidden_states"][s:e],
        "hidden_states": rows["hidden_states"][s:e],
    }


_LIVE: weakref.WeakSet = weakref.WeakSet()  # prefetchers whose thread may still run, stopped at exit


@atexit.register
def _stop_all() -> None:
    """Stop every reader thread before the interpreter finalizes: a daemon thread caught inside
    torch or zarr code then is killed in C++ frames ("terminate called without an active
    exception", exit status 134), e.g. after `break` ends a loop over the loader in a script."""
    for prefetcher in list(_LIVE):
        prefetcher.close()


class Prefetcher:
    """Reads windows in order on a background thread, holding at most `budget` decoded bytes.

    The consumer calls `release(window)` when it is done with a window; the reader only starts
    the next window when it fits in the budget next to the windows still held (a window larger
    than the whole budget is read alone).
    """

    _END = object()

    def __init__(self, load: Any, windows: list[Window], sizes: list[int], budget: int):
        self._load, self._windows, self._sizes, self._budget = load, windows, sizes, budget
        self._held = 0
        self.peak_held = 0
        self._cond = threading.Condition()
        self._stop = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="draftdata-prefetch", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def _run(self) -> None:
        try:
            for w, size in zip(self._windows, self._sizes):
                with self._cond:
                    while not self._stop and self._held and self._held + size > self._budget:
                        self._cond.wait()
                    if self._stop:
                        return
                    self._held += size
                    self.peak_held = max(self.peak_held, self._held)
                self._queue.put(self._load(w))
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[LoadedWindow]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, size: int) -> None:
        with self._cond:
            self._held -= size
            self._cond.notify_all()

    def close(self) -> None:
        """Stop reading ahead and wait for the thread: it finishes the window it is reading, if any
        (so closing costs at most one window read), and never starts another."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        _LIVE.discard(self)

