"""One `draftdata collect` run: settings, schema, output checks, and the single-process pipeline.

The Ray job reuses the pieces: `settings_from_args`, `make_schema`, `open_output`,
`chat_tokenizer`, `backend_options` on the driver and in actors, then `runner.collect_records`
per work unit and `runner.write_reports` for the merged stats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from draftdata.collect.backends.base import BaseModelInfo
from draftdata.collect.conversations import (
    ChatTokenizer,
    Reject,
    read_conversations,
    tokenize_stream,
    warn_no_records,
)
from draftdata.config import DatasetSchema
from draftdata.errors import DatasetNotFoundError, DraftdataError, SchemaMismatchError, name_some
from draftdata.locks import DirectoryLock, ObjectLease, dataset_lock
from draftdata.progress import JobProgress

DEFAULT_FORMAT, DEFAULT_CODEC = "zarr", "bf16"

# Which flag controls each schema field, for mismatch messages.
FIELD_FLAGS = {
    "base_model_id": "--model", "base_model_revision": "--model", "base_model_hash": "--model",
    "hidden_size": "--model", "num_hidden_layers": "--model", "vocab_size": "--model",
    "tokenizer_hash": "--model / --chat-template", "aux_layer_ids": "--aux-layers", "loss_mask": "--loss-mask",
    "storage_format": "--format", "codec": "--codec", "final_hidden_prenorm": "--backend",
}


@dataclass
class CollectSettings:
    """Everything a collect run needs, resolved and picklable (the Ray job ships it to actors)."""

    model: str  # the --model spec as given
    model_path: str  # the resolved local HF directory
    input: str
    output: str
    aux_layer_ids: list[int]
    storage_options: dict[str, Any] = field(default_factory=dict)
    format: str | None = None  # None: the existing dataset's, else zarr
    codec: str | None = None  # None: the existing dataset's, else bf16
    max_seq_len: int = 3072
    on_long: str = "skip"
    loss_mask: str = "assistant"
    chat_template: str | None = None  # template text from --chat-template
    dtype: str = "auto"
    device: str = "cpu"
    backend: str = "hf"
    batch_tokens: int = 8192
    part_bytes: int = 512 * 2**20
    limit: int | None = None
    strict: bool = False
    rejects: str | None = None  # --rejects PATH, else <output>/_reports/...
    tensor_parallel_size: int | None = None  # trtllm only
    moe_expert_parallel_size: int | None = None  # trtllm only

    def report_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["storage_options"] = sorted(self.storage_options)  # keys only: values may be secrets
        d["chat_template"] = self.chat_template is not None
        return d


def settings_from_args(args: argparse.Namespace) -> CollectSettings:
    """Validate the collect flags and resolve the model (converting a GGUF once)."""
    from draftdata.collect.conversations import load_chat_template
    from draftdata.collect.runner import check_rejects_path
    from draftdata.models import local_device, parse_aux_layers, resolve_model
    from draftdata.store.fs import parse_storage_options

    for name in ("max_seq_len", "batch_tokens"):
        if getattr(args, name) < 1:
            raise DraftdataError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.part_size <= 0:
        raise DraftdataError("--part-size must be a positive number of MiB")
    if args.limit is not None and args.limit < 0:
        raise DraftdataError("--limit must be >= 0")
    tp, ep = getattr(args, "tensor_parallel_size", None), getattr(args, "moe_expert_parallel_size", None)
    if args.backend != "trtllm" and (tp or ep):
        raise DraftdataError("--tensor-parallel-size / --moe-expert-parallel-size apply to --backend trtllm only")
    for flag, v in (("--tensor-parallel-size", tp), ("--moe-expert-parallel-size", ep)):
        if v is not None and v < 1:
            raise DraftdataError(f"{flag} must be a positive integer")
    if tp and ep and tp % ep:
        raise DraftdataError(f"--moe-expert-parallel-size {ep} must divide --tensor-parallel-size {tp}")
    # Fail before the tokenizer load and before anything is written; with --ray only the GPU actors
    # import TensorRT-LLM (the driver may run on a CPU-only head node) and raise the same hint.
    if args.backend == "trtllm" and not getattr(args, "ray", False):
        from draftdata.collect.backends.trtllm import import_tensorrt_llm

        import_tensorrt_llm()
    check_rejects_path(args.rejects, args.input,  # before any model work: the rejects are written at the very end
                       storage_options=parse_storage_options(args.storage_option))
    model_path = resolve_model(args.model)
    info = BaseModelInfo.from_model_dir(model_path)
    return CollectSettings(
        model=args.model, model_path=str(model_path), input=args.input, output=args.output,
        aux_layer_ids=parse_aux_layers(args.aux_layers, info.num_hidden_layers),
        storage_options=parse_storage_options(args.storage_option), format=args.format, codec=args.codec,
        max_seq_len=args.max_seq_len, on_long=args.on_long, loss_mask=args.loss_mask,
        chat_template=load_chat_template(args.chat_template) if args.chat_template else None,
        dtype=args.dtype, device=args.device if args.ray else local_device(args.device), backend=args.backend, batch_tokens=args.batch_tokens,
        part_bytes=int(args.part_size * 2**20), limit=args.limit, strict=args.strict, rejects=args.rejects,
        tensor_parallel_size=tp, moe_expert_parallel_size=ep,
    )


def make_schema(settings: CollectSettings, info: BaseModelInfo) -> DatasetSchema:
    """The dataset schema this run writes (format/codec filled in by `open_output`)."""
    from draftdata import __version__
    from draftdata.models import tokenizer_hash

    tok_hash = tokenizer_hash(settings.model_path, settings.chat_template) if settings.chat_template \
        else info.tokenizer_hash
    return DatasetSchema(
        base_model_id=info.model_id, base_model_revision=info.revision, base_model_hash=info.model_hash,
        tokenizer_hash=tok_hash, hidden_size=info.hidden_size, num_hidden_layers=info.num_hidden_layers,
        vocab_size=info.vocab_size, aux_layer_ids=list(settings.aux_layer_ids), max_seq_len=settings.max_seq_len,
        final_hidden_prenorm=info.final_hidden_prenorm, loss_mask=settings.loss_mask,
        storage_format=settings.format or DEFAULT_FORMAT, codec=settings.codec or DEFAULT_CODEC,
        created_by=f"draftdata {__version__} collect --backend {settings.backend}",
    )


def check_output(settings: CollectSettings, schema: DatasetSchema) -> DatasetSchema:
    """Compare with a dataset already at the output URL (before any model work).

    Unset --format/--codec adopt the existing dataset's; any other difference is refused with
    a message naming each field, both values and the flag that controls it. An output that exists
    and holds something other than a dataset (no dataset.json) is refused unless it is empty; on
    object stores that check is one listing of the prefix.
    """
    from draftdata.store import open_dataset
    from draftdata.store.dataset import SCHEMA_FILE, list_entries
    from draftdata.store.fs import is_local, local_path

    if is_local(settings.output) and os.path.isfile(local_path(settings.output)):
        raise DraftdataError(f"--output {settings.output} is a file; collect writes a dataset directory: give a new or "
                             "empty directory (or one that holds a draftdata dataset, to resume it)")
    try:
        existing = open_dataset(settings.output, storage_options=settings.storage_options).schema
    except DatasetNotFoundError:
        names = list_entries(settings.output, settings.storage_options)
        if SCHEMA_FILE not in names:
            if names:
                raise DraftdataError(f"--output {settings.output}: the directory already holds {name_some(names)} "
                                     f"and no {SCHEMA_FILE}, so it is not a draftdata dataset; choose a new or empty "
                                     "directory") from None
            return schema
        # Created since the first read: another writer starting on the same new object-store output
        # (no lock there) wrote it in between; read it again (it said "no dataset here" before).
        existing = open_dataset(settings.output, storage_options=settings.storage_options).schema
    if settings.format is None:
        schema.storage_format = existing.storage_format
    if settings.codec is None:
        schema.codec = existing.codec
    if existing.base_model_hash:  # compare in the dataset's fingerprint scheme (older versions hashed less)
        from draftdata.models import model_hash

        schema.base_model_hash = model_hash(settings.model_path, like=existing.base_model_hash)
    diffs = existing.differing_fields(schema)
    if existing.same_model_elsewhere(schema):  # the same weights in another directory: keep the dataset's name
        schema.base_model_id = existing.base_model_id
    if diffs:
        lines = [f"{name}: dataset has {getattr(existing, name)!r}, this run has {getattr(schema, name)!r}"
                 + (f" (set by {FIELD_FLAGS[name]})" if name in FIELD_FLAGS else "") for name in diffs]
        raise SchemaMismatchError(
            f"{settings.output} already holds a dataset written with different settings, so this run would "
            f"mix incompatible samples; refusing. Differences: " + "; ".join(lines)
            + ". Rerun with the dataset's settings, or write to a new --output.")
    if schema.max_seq_len > existing.max_seq_len:  # dataset.json's value bounds every stored sample
        raise SchemaMismatchError(
            f"{settings.output} was collected with --max-seq-len {existing.max_seq_len}; this run's "
            f"{schema.max_seq_len} would store longer samples than its dataset.json allows. Resume with "
            f"--max-seq-len {existing.max_seq_len} or less, or write to a new --output.")
    return schema


def open_output(settings: CollectSettings, schema: DatasetSchema) -> Any:
    """Create the dataset (or open the compatible existing one) and return its writer."""
    from draftdata.store import create_dataset

    schema = check_output(settings, schema)
    return create_dataset(settings.output, schema, format=schema.storage_format, codec=schema.codec,
                          storage_options=settings.storage_options)


def chat_tokenizer(settings: CollectSettings) -> ChatTokenizer:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    except (OSError, ValueError) as e:
        raise DraftdataError(f"--model {settings.model}: cannot load its tokenizer: {e}") from None
    return ChatTokenizer(tokenizer, chat_template=settings.chat_template, loss_mask=settings.loss_mask,
                         max_seq_len=settings.max_seq_len, on_long=settings.on_long)


def backend_options(settings: CollectSettings) -> dict[str, Any]:
    """Constructor options of the chosen backend."""
    if settings.backend == "hf":
        return {"dtype": settings.dtype, "device": settings.device}
    opts: dict[str, Any] = {"aux_layer_ids": list(settings.aux_layer_ids), "max_seq_len": settings.max_seq_len,
                            "max_num_tokens": max(settings.batch_tokens, settings.max_seq_len)}
    if settings.tensor_parallel_size:
        opts["tensor_parallel_size"] = settings.tensor_parallel_size
    if settings.moe_expert_parallel_size:
        opts["moe_expert_parallel_size"] = settings.moe_expert_parallel_size
    return opts


def read_input(settings: CollectSettings):
    return read_conversations(settings.input, settings.storage_options, limit=settings.limit,
                              require_assistant=settings.loss_mask == "assistant")


def validate_input(settings: CollectSettings, chat: ChatTokenizer, total: int | None = None) -> int:
    """--strict: read and tokenize the whole input, fail on the first bad record; returns the count.

    This runs before the model loads and can take minutes on a large input, so it says so and
    shows progress like the collection itself. `total`: the records to expect, when counted."""
    from draftdata.collect.conversations import count_records

    if total is None:
        total = count_records(settings.input, settings.storage_options, settings.limit)
    print(f"draftdata collect: --strict: validating {total:,} records before loading the model", file=sys.stderr)
    bar = JobProgress(total=total, desc="validate", unit="record")
    n = 0
    try:
        for item in tokenize_stream(read_input(settings), chat):
            if isinstance(item, Reject):
                raise DraftdataError(f"{item} (--strict stops at the first bad record, before any model work)")
            n += 1
            bar.update(1, item.length)
    finally:
        bar.close()
    return n


class CommitLedger:
    """The dataset's committed parts and conversation ids, re-read incrementally.

    `refresh()` lists the commit records and reads only those it has not seen, so the driver can
    poll before every retry without rereading a large dataset.
    """

    def __init__(self, writer: Any):
        self._writer = writer
        self.parts: dict[str, Any] = {}
        self.where: dict[str, str] = {}  # conversation id -> first part holding it
        self.duplicates: dict[str, list[str]] = {}  # conversation id -> every part holding it
        self.refresh()

    def refresh(self) -> list[Any]:
        new = self._writer.committed_parts(known=self.parts.keys())
        for info in sorted(new, key=lambda p: p.id):
            self.parts[info.id] = info
            for cid in info.conversation_ids:
                if cid in self.where:
                    self.duplicates.setdefault(cid, [self.where[cid]]).append(info.id)
                else:
                    self.where[cid] = info.id
        return new

    def committed_since(self, parts_before: set[str]) -> set[str]:
        """Ids of the parts committed since `parts_before` (as of the last refresh)."""
        return {cid for cid, part in self.where.items() if part not in parts_before}


def compute_dtypes(parts: Any) -> dict[str, int]:
    """Parts per compute dtype, from the commit records' `producer` (parts written before it was
    recorded are left out)."""
    out: dict[str, int] = {}
    for info in parts:
        dtype = (info.producer or {}).get("compute_dtype")
        if dtype:
            out[dtype] = out.get(dtype, 0) + 1
    return out


def warn_mixed_compute(url: str, parts: Any, mine: str | None = None, *, after_ray_run: bool = False) -> None:
    """Warn when a dataset's parts were (or this run's, computing in `mine`, would be) computed in
    different dtypes: `--dtype auto` resolves per machine, and bf16 and fp32 states differ by
    about 1% relative. `after_ray_run`: the check after a --ray run, whose workers resolved it."""
    kinds = compute_dtypes(parts)
    held = ", ".join(f"{d} ({n:,} part{'s' if n != 1 else ''})" for d, n in sorted(kinds.items()))
    if mine is not None and kinds and set(kinds) != {mine}:
        print(f"draftdata collect: warning: {url} holds states computed in {held}; this run computes in {mine}, "
              f"so the dataset would mix numerics; pass --dtype {max(kinds, key=kinds.get)} to match",
              file=sys.stderr)
    elif after_ray_run and len(kinds) > 1:
        print(f"draftdata collect: warning: {url} now mixes states computed in {held} (workers resolved --dtype "
              "differently); pass an explicit --dtype to get one", file=sys.stderr)


def output_lock(url: str, storage_options: dict | None = None) -> DirectoryLock | ObjectLease:
    """Exclusive hold of a collect output for one run.

    Two runs on one output would each skip the ids committed when they started and then store
    the same conversations: the second stops with a one-line error. On a file system a POSIX
    lock (taken now when the directory exists); on an object store a lease object (`take()`,
    once the output exists). The duplicate check at the end of every run stays as the last guard.
    """
    return dataset_lock(url, "collect", "writing to it", storage_options,
                        unlocked_note="the duplicate check at the end still runs")


def run_local(settings: CollectSettings) -> int:
    """The single-process collect: returns the exit status (0, also when records were rejected)."""
    from draftdata.collect.backends import get_backend
    from draftdata.collect.conversations import count_records, input_files

    t_start = time.perf_counter()
    info = BaseModelInfo.from_model_dir(settings.model_path)
    schema = check_output(settings, make_schema(settings, info))
    lock = output_lock(settings.output, settings.storage_options)  # a resume while another run writes: refused before any other work
    try:  # the lock is released on every way out (an in-process caller may run again)
        input_files(settings.input, settings.storage_options)  # fail on a missing input before creating anything
        chat = chat_tokenizer(settings)
        total = count_records(settings.input, settings.storage_options, settings.limit)
        if total == 0:  # nothing would be written: load no model and leave --output as it is
            warn_no_records("collect", settings.input, settings.limit, "collect")
            return 0
        if settings.strict:
            total = validate_input(settings, chat, total)
        backend = get_backend(settings.backend, settings.model_path, **backend_options(settings))
        try:  # the model is released on every way out too (GPU memory of an in-process caller)
            return _collect_with(settings, schema, info, backend, lock, chat, total, t_start)
        finally:
            backend.close()
    finally:
        lock.release()


def _collect_with(settings: CollectSettings, schema: DatasetSchema, info: BaseModelInfo, backend: Any,
                  lock: DirectoryLock | ObjectLease, chat: ChatTokenizer, total: int, t_start: float) -> int:
    """run_local's part with the model loaded and the output lock held (or about to be)."""
    from draftdata.collect.runner import (
        CollectOptions,
        CollectStats,
        KeptFlags,
        RejectLog,
        all_rejected,
        collect_records,
        prepare_samples,
        write_reports,
    )

    for name in ("hidden_size", "num_hidden_layers", "final_hidden_prenorm"):
        if getattr(backend.info, name) != getattr(info, name):  # the schema was made from the files
            raise DraftdataError(f"--backend {settings.backend} reports {name}={getattr(backend.info, name)!r}, "
                                 f"the model files say {getattr(info, name)!r}")
    writer = open_output(settings, schema)  # after the model loaded: a failed load leaves nothing behind
    lock.take()  # before reading what is committed: no second run may skip the same ids
    ledger = CommitLedger(writer)
    parts_before = set(ledger.parts)
    committed = set(ledger.where)
    if committed:
        print(f"draftdata collect: {writer.url} already holds {len(committed):,} conversations; they are "
              "skipped", file=sys.stderr)
        warn_mixed_compute(writer.url, ledger.parts.values(), backend.producer().get("compute_dtype"))
    options = CollectOptions(aux_layer_ids=list(settings.aux_layer_ids), batch_tokens=settings.batch_tokens,
                             part_bytes=settings.part_bytes)
    stats = CollectStats()
    rejects = RejectLog(stats)
    flags = KeptFlags()
    bar = JobProgress(total=total, desc="collect", unit="conv")  # thread-safe: the reader thread reports too
    t_loop = time.perf_counter()
    interrupted = True
    try:
        samples = prepare_samples(read_input(settings), chat, skip_ids=committed, stats=stats,
                                  on_reject=rejects, flags=flags, progress=bar.update)
        collect_records(samples, backend, writer, options, progress=bar.update, stats=stats, on_reject=rejects)
        interrupted = False
    finally:
        bar.close()
        stats.collect_seconds = time.perf_counter() - t_loop
        stats.seconds = time.perf_counter() - t_start
        written = written_ids(ledger, parts_before)
        flags.count(stats, written)
        where = write_reports(writer.url, settings.storage_options, stats, rejects, settings.report_dict(),
                              settings.rejects)
        print(stats.format(writer.url, settings.input, where))
        if interrupted:
            print(STOPPED_EARLY, file=sys.stderr)
    if written is None:  # the commit records could not be read for the summary: their error, now
        ledger.refresh()
    rejected = all_rejected("collect", stats, rejects, where)
    return 1 if report_duplicates(ledger, writer.url, parts_before) or rejected else 0


# The reader runs ahead of the model: a stopped run has read (and judged) records it did not collect.
STOPPED_EARLY = ("draftdata collect: stopped early; committed parts are kept, rerun the same command to resume "
                 "(`read` and `skipped` count records read ahead of the stop; the rerun reads them again)")


def written_ids(ledger: CommitLedger, parts_before: set[str]) -> set[str] | None:
    """Ids this run committed (refreshing `ledger`); None when the commit records cannot be read."""
    try:
        ledger.refresh()
    except Exception:  # noqa: BLE001 - the summary falls back to what was tokenized
        return None
    return ledger.committed_since(parts_before)


def report_duplicates(ledger: CommitLedger, url: str, parts_before: set[str]) -> bool:
    """Report conversation ids committed more than once; True when this run's parts are among
    them (two writers on one output: the run fails). Duplicates that were there before it
    started are a note, so that a dataset damaged once does not fail every later resume."""
    new = sorted(cid for cid, parts in ledger.duplicates.items() if not set(parts) <= parts_before)
    old = len(ledger.duplicates) - len(new)
    if new:
        print(f"  DUPLICATES {len(new)} conversation ids were committed more than once in this run (e.g. {new[:5]}); "
              f"was another collect writing to {url} at the same time? See 'One writer per output' in "
              "docs/COLLECT.md", file=sys.stderr)
    if old:
        print(f"  note       {old} conversation ids were already committed more than once before this run; "
              f"`draftdata verify {url}` lists them", file=sys.stderr)
    return bool(new)
