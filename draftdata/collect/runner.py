"""The collection loop: tokenized conversations -> token-budget batches -> backend -> parts.

Pipeline (one process; a Ray actor runs the same `collect_records` on its share):

    reader thread: read + validate ─► skip committed ids ─► tokenize (chunks)
        ─► window of samples, sorted by length
        ─► batches filled to --batch-tokens (padded size) ─► backend.forward
        ─► bounded queue ─► writer thread: PartWriter.add, roll over at --part-size
        ─► commit thread: PartWriter.commit (arrays, then the commit record), one at a time

Sorting a window by length keeps padding small; padding never reaches storage (backends return
unpadded tensors). The reader thread (input parsing, tokenization) and the writer and commit
threads (storage I/O) overlap the forward passes; bounded queues keep host memory to the
read-ahead token ids, a few batches of states and two parts. A crash loses at most the
uncommitted parts; a rerun skips every committed conversation id, so nothing is duplicated.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from draftdata.collect.backends.base import Backend
from draftdata.collect.conversations import (
    ChatTokenizer,
    Conversation,
    Reject,
    TokenizedSample,
    tokenize_stream,
)
from draftdata.collect.stats import RunStats, write_run_reports
from draftdata.errors import DraftdataError

Progress = Callable[[int, int], None]  # (conversations done, tokens done) since the last call


@dataclass
class CollectOptions:
    """How `collect_records` batches and writes."""

    aux_layer_ids: list[int]
    batch_tokens: int = 8192  # budget per forward batch, counted with padding (B * longest)
    part_bytes: int = 512 * 2**20  # roll a part over once it buffers this many raw bytes
    window_tokens: int | None = None  # samples sorted by length together; default 32 batches
    queue_batches: int = 4  # finished batches waiting for the writer thread
    max_padding: float = 0.125  # largest share of padding in a batch (see token_batches)
    prefetch_samples: int = 8192  # tokenized samples read ahead on a thread while the model runs

    def __post_init__(self) -> None:
        if self.batch_tokens < 1:
            raise DraftdataError(f"--batch-tokens {self.batch_tokens}: must be positive")
        if self.part_bytes < 1:
            raise DraftdataError(f"--part-size must be positive (got {self.part_bytes} bytes)")
        if self.window_tokens is None:
            self.window_tokens = 32 * self.batch_tokens


@dataclass
class CollectStats(RunStats):
    """Counts for the collect summary; `truncated`: written after cutting to --max-seq-len
    (--on-long truncate); `tokens`, `written` count committed data only."""

    empty_answers: int = 0  # conversations written with an empty assistant message (kept: see docs/COLLECT.md)
    stored_bytes: int = 0  # bytes of the committed parts
    raw_bytes: int = 0  # raw bytes (bf16 + ids + mask) of the committed parts
    parts: int = 0
    forward_seconds: float = 0.0
    collect_seconds: float = 0.0  # wall clock of the collection loop, after the model loaded (0: not measured)

    def rates(self) -> str:
        """Tokens/s while collecting (what the progress line shows) and over the whole run, which
        includes the model load and so reads much lower on short runs: both, labelled."""
        overall = self.tokens / self.seconds if self.seconds > 0 else 0.0
        if self.collect_seconds <= 0:
            return f"{overall:,.0f} tokens/s overall, incl. model load"
        return (f"{self.tokens / self.collect_seconds:,.0f} tokens/s collecting, "
                f"{overall:,.0f} overall incl. model load")

    def format(self, output: str, input: str | None = None, rejects: str | None = None) -> str:
        """The human-readable summary printed at the end of a run."""
        lines = self.summary_lines("collect", [
            f"  written    {self.written:,} conversations, {self.tokens:,} tokens in {self.parts:,} "
            f"part{'' if self.parts == 1 else 's'} ({self.rates()})",
            f"  bytes      {_size(self.stored_bytes)} stored, {_size(self.raw_bytes)} raw"], input)
        if self.truncated:
            lines.append(f"  truncated  {self.truncated:,} (cut to --max-seq-len, kept)")
        if self.empty_answers:
            lines.append(f"  empty      {self.empty_answers:,} conversations with an empty assistant message (kept; "
                         "it trains the end-of-turn token alone)")
        return "\n".join(lines + self.where_lines(output, rejects))


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n):,} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:,.1f} {unit}"


class RejectLog:
    """Collects rejects during a run; counted in the stats and written as JSONL at the end."""

    def __init__(self, stats: CollectStats, strict: bool = False):
        self.stats, self.strict = stats, strict
        self.rejects: list[Reject] = []

    def __call__(self, reject: Reject) -> None:
        if self.strict:
            raise DraftdataError(f"{reject} (--strict stops at the first bad record; see docs/COLLECT.md)")
        self.stats.skipped[reject.reason] += 1
        self.rejects.append(reject)

    def to_jsonl(self) -> bytes:
        return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in self.rejects).encode()


def all_rejected(command: str, stats: CollectStats, rejects: RejectLog, where: str | None) -> bool:
    """Say so, and return True (the run fails), when every record read was rejected: a JSON array
    instead of JSON Lines, another schema, a template that cannot render them. The reasons were
    only in the rejects file, and the run ended with exit 0 and an empty dataset."""
    if stats.written or not rejects.rejects or len(rejects.rejects) < stats.read:
        return False
    print(f"draftdata {command}: error: all {stats.read:,} records read were rejected, nothing was written; the "
          f"first: {rejects.rejects[0]}" + (f" (all of them: {where})" if where else ""), file=sys.stderr)
    return True


@dataclass
class KeptFlags:
    """Ids of the samples cut to --max-seq-len and of those with an empty answer, noted when they
    are tokenized and counted in the summary once the run knows which it wrote: the reader runs
    thousands of samples ahead, so a run that stops early did not write all it tokenized."""

    truncated: set[str] = field(default_factory=set)
    empty: set[str] = field(default_factory=set)

    def count(self, stats: CollectStats, written: Collection[str] | None) -> None:
        """Set stats.truncated / empty_answers to the flagged ids among `written` (None: all of them,
        when what was written cannot be read back)."""
        def among(ids: set[str]) -> int:
            return len(ids) if written is None else sum(cid in written for cid in ids)
        stats.truncated, stats.empty_answers = among(self.truncated), among(self.empty)


def prepare_samples(items: Iterable[Conversation | Reject], chat: ChatTokenizer, *, skip_ids: set[str],
                    stats: CollectStats, on_reject: Callable[[Reject], None], flags: KeptFlags | None = None,
                    progress: Progress | None = None, chunk: int = 256) -> Iterator[TokenizedSample]:
    """Read results -> tokenized samples still to collect.

    Conversations whose id is in `skip_ids` (already committed) are counted as skipped and
    never tokenized; rejects go to `on_reject`; truncated samples and empty answers are noted
    in `flags` (for the summary). Every record advances `progress` exactly once: here when it
    is skipped or rejected, in `collect_records` when it is written.
    """

    empty: set[str] = set()  # ids of conversations with an empty answer

    def fresh() -> Iterator[Conversation | Reject]:
        for item in items:
            stats.read += 1
            if isinstance(item, Conversation):
                if item.conversation_id in skip_ids:
                    stats.skipped["already_committed"] += 1
                    if progress:
                        progress(1, 0)
                    continue
                if any(m["role"] == "assistant" and not m["content"].strip() for m in item.messages):
                    empty.add(item.conversation_id)
            yield item

    for item in tokenize_stream(fresh(), chat, chunk=chunk):
        if isinstance(item, Reject):
            on_reject(item)
            if progress:
                progress(1, 0)
            continue
        if item.truncated and flags is not None:
            flags.truncated.add(item.conversation_id)
        if item.conversation_id in empty:
            empty.discard(item.conversation_id)
            if flags is not None:
                flags.empty.add(item.conversation_id)
        yield item


def token_batches(samples: list[TokenizedSample], batch_tokens: int,
                  max_padding: float = 0.125) -> Iterator[list[TokenizedSample]]:
    """Longest first; a batch grows while it fits `batch_tokens` padded to its longest sample and
    its padding stays within `max_padding` of it or 16 tokens a row (a sample longer than the
    budget runs alone).

    The padding cap matters where lengths are spread (small inputs, the tails of a window): a
    padded token costs as much compute as a real one and is thrown away.
    """
    ordered = sorted(samples, key=lambda s: s.length, reverse=True)
    i = 0
    while i < len(ordered):
        longest = ordered[i].length
        n, real = 1, longest
        while i + n < len(ordered) and (n + 1) * longest <= batch_tokens:
            nxt = ordered[i + n].length
            padding = (n + 1) * longest - (real + nxt)
            if padding > max(max_padding * (n + 1) * longest, 16 * (n + 1)):
                break
            n, real = n + 1, real + nxt
        yield ordered[i:i + n]
        i += n


def _windows(samples: Iterable[TokenizedSample], window_tokens: int) -> Iterator[list[TokenizedSample]]:
    window: list[TokenizedSample] = []
    tokens = 0
    for s in samples:
        window.append(s)
        tokens += s.length
        if tokens >= window_tokens:
            yield window
            window, tokens = [], 0
    if window:
        yield window


def _forward(backend: Backend, batch: list[TokenizedSample], aux_layer_ids: list[int]
             ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """backend.forward_checked (states, inf/NaN token counts), splitting the batch in halves on GPU
    out-of-memory.

    The halves run after the `except` block: inside it, the live exception's traceback would
    keep the failed forward's activations allocated, so each half would start with less memory
    than the whole batch had and run out again.
    """
    try:
        return backend.forward_checked([s.input_ids.tolist() for s in batch], aux_layer_ids)
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise DraftdataError(f"out of GPU memory on one sequence of {batch[0].length} tokens "
                                 f"({batch[0].source}); lower --max-seq-len or use a bigger GPU") from None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"draftdata collect: out of memory on a batch of {len(batch)} sequences; splitting it "
          "(lower --batch-tokens to avoid this)", file=sys.stderr)
    half = len(batch) // 2
    (r1, n1), (r2, n2) = _forward(backend, batch[:half], aux_layer_ids), _forward(backend, batch[half:], aux_layer_ids)
    return r1 + r2, n1 + n2


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _prefetched(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Iterate `items` on a thread, up to `depth` ahead: reading and tokenizing the input overlap
    the forward passes. The producer's exceptions are re-raised here; closing stops it."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))

    thread = threading.Thread(target=produce, name="draftdata-reader", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, _Failure):
                raise x.error
            yield x
    finally:
        stop.set()
        thread.join()


class BackgroundWriter:
    """Adds finished samples to parts on a writer thread and commits full parts on a commit thread.

    `put` blocks while `queue_batches` batches wait (bounding memory) and re-raises a writer
    failure in the caller. One commit runs at a time, while the next part fills.
    """

    def __init__(self, writer: Any, *, part_bytes: int, work_unit: str | None, queue_batches: int,
                 stats: CollectStats, producer: dict[str, Any] | None = None):
        self._writer, self._part_bytes, self._work_unit, self._stats = writer, part_bytes, work_unit, stats
        self._producer = producer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_batches))
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draftdata-commit")
        self._pending: Future | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._row_bytes = 2 * (writer.schema.num_aux_slots + 1) * writer.schema.hidden_size + 5
        self._thread = threading.Thread(target=self._run, name="draftdata-writer", daemon=True)
        self._thread.start()

    def put(self, samples: list[dict[str, Any]]) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(samples, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Commit what is buffered, wait for all commits, re-raise any writer failure."""
        self.put(None)  # type: ignore[arg-type]
        self._thread.join()
        self._commits.shutdown(wait=True)
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without committing the part being filled (parts already committing finish)."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join()
        self._commits.shutdown(wait=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        part = None
        try:
            while True:
                item = self._queue.get()
                if item is None or self._stop.is_set():
                    break
                for sample in item:
                    if part is None:
                        part = self._writer.open_part(self._work_unit, self._producer)
                    part.add(sample)
                    if part.nbytes >= self._part_bytes:
                        self._commit(part)
                        part = None
            if part is not None and not self._stop.is_set():
                self._commit(part)
                part = None
            self._wait_commit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self._error = e
        finally:
            if part is not None:
                part.abort()
            if self._error is not None:  # unblock a producer waiting on a full queue
                while not self._queue.empty():
                    self._queue.get_nowait()

    def _commit(self, part: Any) -> None:
        self._wait_commit()
        self._pending = self._commits.submit(self._do_commit, part)

    def _wait_commit(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _do_commit(self, part: Any) -> None:
        info = part.commit()
        if info is not None:
            s = self._stats
            s.written += info.num_samples
            s.tokens += info.num_tokens
            s.stored_bytes += info.stored_bytes
            s.raw_bytes += info.num_tokens * self._row_bytes
            s.parts += 1


def collect_records(samples: Iterable[TokenizedSample], backend: Backend, writer: Any, options: CollectOptions, *,
                    work_unit: str | None = None, progress: Progress | None = None,
                    stats: CollectStats | None = None, skip_ids: Collection[str] = (),
                    on_reject: Callable[[Reject], None] | None = None) -> CollectStats:
    """Run `backend` over `samples` and write them into parts of the open dataset `writer`.

    Returns (and updates) `stats`; `written`/`tokens`/`parts` count committed data only. On any
    error the part being filled is dropped (nothing half-written becomes visible) and the error
    propagates; parts committed before it stay and a rerun skips them.

    `skip_ids` (used by a retried Ray work unit: ids an earlier attempt committed) are batched
    as usual but not written, so the other samples see exactly the batches, and thus the
    tensors, of the first attempt; a batch of skipped ids only is not run. They count in
    `progress` but not in `stats` (the caller accounts for them).

    A sample whose states hold inf or NaN (the base overflowed) is not written: it goes to
    `on_reject` with reason `non_finite` (without `on_reject` it stops the run).
    """
    stats = stats if stats is not None else CollectStats()
    t0 = time.perf_counter()
    out = BackgroundWriter(writer, part_bytes=options.part_bytes, work_unit=work_unit,
                           queue_batches=options.queue_batches, stats=stats, producer=backend.producer())
    try:
        for window in _windows(_prefetched(samples, options.prefetch_samples), options.window_tokens):
            for batch in token_batches(window, options.batch_tokens, options.max_padding):
                keep = [s.conversation_id not in skip_ids for s in batch]
                if not any(keep):
                    if progress:
                        progress(len(batch), 0)
                    continue
                f0 = time.perf_counter()
                results, nonfinite = _forward(backend, batch, options.aux_layer_ids)
                stats.forward_seconds += time.perf_counter() - f0
                for s, k, n in zip(batch, keep, nonfinite):
                    if k and n:
                        reject = Reject(s.source, "non_finite", f"{n} of its {s.length} tokens have inf/NaN hidden "
                                        "states (the base overflowed; collect with --dtype bf16 or fp32)",
                                        s.conversation_id)
                        if on_reject is None:
                            raise DraftdataError(str(reject))
                        on_reject(reject)
                out.put([_store_sample(s, aux, final) for s, k, n, (aux, final) in zip(batch, keep, nonfinite, results)
                         if k and not n])
                if progress:
                    progress(len(batch), sum(s.length for s in batch))
        out.close()
    except BaseException:
        out.abort()
        raise
    finally:
        stats.seconds += time.perf_counter() - t0
    return stats


def _store_sample(s: TokenizedSample, aux: torch.Tensor, final: torch.Tensor) -> dict[str, Any]:
    if aux.shape[0] != s.length or final.shape[0] != s.length:
        raise DraftdataError(f"{s.source}: the backend returned {aux.shape[0]} rows for {s.length} tokens")
    return {"conversation_id": s.conversation_id, "input_ids": torch.from_numpy(s.input_ids),
            "loss_mask": torch.from_numpy(s.loss_mask), "aux_hidden_states": aux, "hidden_states": final}


def check_rejects_path(path: str | None, input: str | None = None, output: str | None = None,
                       storage_options: dict | None = None) -> None:
    """--rejects PATH must be a file this run can create or overwrite, and none of its input files
    or its output file (it is overwritten at the end of the run: the data there would be lost), nor
    a JSONL file the input directory or pattern would list (the next run would read it as input).
    Checked before any model work."""
    from draftdata.collect.conversations import input_files, input_reads
    from draftdata.store.fs import canonical_location, check_writable_file, is_local

    if path is None:
        return
    if output is not None and canonical_location(output) == canonical_location(path):
        raise DraftdataError(f"--rejects {path} is the --output file; write the rejects to another path")
    if input is not None and is_local(input) == is_local(path):  # a local rejects file is no remote input
        try:
            files = input_files(input, storage_options)
        except Exception:  # noqa: BLE001 - a missing or unreachable input is reported when the run reads it
            files = []
        reads = input_reads(input, path, files)
        if reads is not None and reads[0] == "file":
            raise DraftdataError(f"--rejects {path} is an input file ({reads[1]}); write the rejects to another path")
        if reads is not None:
            raise DraftdataError(f"--rejects {path} would be read back as input (--input {input} lists it), so "
                                 "the next run would take the rejects for conversations; write them elsewhere")
    check_writable_file(path, "--rejects", "rejects.jsonl")


def write_reports(output_url: str, storage_options: dict | None, stats: CollectStats, rejects: RejectLog,
                  settings: dict[str, Any], rejects_path: str | None = None) -> str | None:
    """Write summary.json (always) and rejects.jsonl (when there are rejects) for this run.

    They go to `<output>/_reports/collect-<UTC time>-<pid>/` so they travel with the dataset
    (also on object storage); readers and `verify` ignore `_reports/`. `rejects_path` writes the
    rejects to that file instead. Returns where the rejects are, if they were written. A failure
    to write the rejects is a warning and never keeps summary.json from being written.
    """
    return write_run_reports("collect", f"{output_url.rstrip('/')}/_reports/collect-{{stamp}}-{{pid}}",
                             "summary.json", "rejects.jsonl", stats, settings, rejects, rejects_path, storage_options)
