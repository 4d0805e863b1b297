"""Create, write and read datasets: `dataset.json` + immutable parts + commit records.

Layout under the dataset URL:

    dataset.json            the schema, written once
    parts/<part_id>/...     a part's data (Zarr group or Arrow IPC file), written by one writer
    commits/<part_id>.json  the commit record, written last in one atomic step

A part exists for readers only once its commit record exists; everything under parts/ without
a commit record is a crashed or running writer's garbage (`draftdata verify --gc`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from draftdata import __version__
from draftdata.config import (
    CODECS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYER_ID_CONVENTION,
    STORAGE_FORMATS,
    DatasetSchema,
)
from draftdata.errors import (
    CorruptDataError,
    DatasetNotFoundError,
    DraftdataError,
    MissingPartsError,
    SchemaMismatchError,
    StorageAccessError,
    name_some,
)
from draftdata.store import arrow_part, zarr_part
from draftdata.store.codecs import bf16_to_bits, bits_to_bf16, fp8_decode, fp8_encode
from draftdata.store.fs import (
    describe_storage_error,
    get_fs,
    is_bucket_fs,
    is_local,
    is_local_fs,
    local_path,
    normalize_url,
    put_atomic,
    remove_tree,
)
from draftdata.store.layout import HIDDEN_ARRAYS, SCALE_OF, commit_path, crc32c, part_dir

SCHEMA_FILE = "dataset.json"


@dataclass
class PartInfo:
    """What a commit record says about one committed part."""

    id: str
    num_samples: int
    num_tokens: int
    conversation_ids: list[str]
    offsets: np.ndarray
    work_unit: str | None
    stored_bytes: int
    producer: dict[str, Any] | None = None        # how collect computed it (backend, compute dtype, device)
    checksums: dict[str, int] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> PartInfo:
        """Parse a commit record; KeyError/TypeError/ValueError when a field is missing or mistyped."""
        if not isinstance(rec, dict):
            raise TypeError(f"expected a JSON object, got {type(rec).__name__}")
        offsets = np.asarray(rec["offsets"], dtype=np.int64)
        if offsets.ndim != 1:
            raise ValueError("offsets is not a flat list of integers")
        ids = rec["conversation_ids"]
        if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
            raise TypeError("conversation_ids is not a list of strings")
        if not isinstance(rec["part_id"], str) or not isinstance(rec["arrays"], dict):
            raise TypeError("part_id must be a string and arrays an object")
        return cls(id=rec["part_id"], num_samples=int(rec["num_samples"]), num_tokens=int(rec["num_tokens"]),
                   conversation_ids=list(ids), offsets=offsets, work_unit=rec.get("work_unit"),
                   producer=rec["producer"] if isinstance(rec.get("producer"), dict) else None,
                   stored_bytes=int(rec.get("stored_bytes") or 0),
                   checksums={k: int(v["crc32c"]) for k, v in rec["arrays"].items()}, record=rec)


_SCHEMA_TYPES: dict[str, tuple[type, ...]] = {
    "base_model_id": (str,), "hidden_size": (int,), "num_hidden_layers": (int,), "vocab_size": (int,),
    "max_seq_len": (int,), "aux_layer_ids": (list,), "storage_format": (str,), "codec": (str,), "extra": (dict,),
    "num_aux_slots": (int,), "base_model_revision": (str, type(None)), "base_model_hash": (str, type(None)),
    "tokenizer_hash": (str, type(None)),
}
POSITIVE_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "max_seq_len")
# Fields with one set of allowed values (docs/FORMAT.md): a reader that guessed at another value
# would decode or label the states wrongly ("false" as a string read as pre-norm, and trained so).
_SCHEMA_VALUES: dict[str, tuple[Any, ...]] = {
    "final_hidden_prenorm": (True, False), "layer_id_convention": (LAYER_ID_CONVENTION,),
    "hidden_dtype": ("bfloat16",), "loss_mask": ("assistant", "all"), "storage_format": STORAGE_FORMATS,
    "codec": CODECS,
}


def parse_schema(d: dict[str, Any], where: str) -> DatasetSchema:
    """A DatasetSchema from the dict of a dataset.json at `where`; one-line errors for what is wrong."""
    fix = f"restore {SCHEMA_FILE} from a backup (docs/FORMAT.md lists its fields), or collect again into a new directory"
    version = d.get("format_version")
    if "format_version" in d and version != FORMAT_VERSION:
        raise DraftdataError(f"{where}: unsupported format_version {version!r} (draftdata {__version__} reads "
                             f"version {FORMAT_VERSION}); read it with the draftdata version that wrote it "
                             f"(created_by: {d.get('created_by') or 'not recorded'}), or collect again into a "
                             "new directory")
    required = [f.name for f in dataclasses.fields(DatasetSchema)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required + ["format_version"] if name not in d]
    if missing:
        raise CorruptDataError(f"{where}: missing field(s) {', '.join(missing)}; {fix}")
    wrong = schema_problems(d)
    if wrong:
        raise CorruptDataError(f"{where}: malformed field(s): {'; '.join(wrong)}; {fix}")
    return DatasetSchema.from_dict(d)


def schema_problems(d: dict[str, Any]) -> list[str]:
    """What in a dataset.json dict (all required fields present) docs/FORMAT.md does not allow."""
    wrong = [f"{k} is {d[k]!r}" for k, types in _SCHEMA_TYPES.items()
             if k in d and (not isinstance(d[k], types) or isinstance(d[k], bool))]
    wrong += [f"{k} is {d[k]!r} (expected {' or '.join(json.dumps(v) for v in allowed)})"
              for k, allowed in _SCHEMA_VALUES.items()
              if k in d and not any(d[k] is v if isinstance(v, bool) else (d[k] == v and type(d[k]) is type(v))
                                    for v in allowed)]
    aux = d["aux_layer_ids"]
    if isinstance(aux, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in aux):
        wrong.append(f"aux_layer_ids is {aux!r}")
    elif isinstance(aux, list) and (not aux or aux != sorted(set(aux)) or aux[0] < 0
                                    or (isinstance(d["num_hidden_layers"], int) and aux[-1] >= d["num_hidden_layers"])):
        wrong.append(f"aux_layer_ids is {aux!r} (expected distinct ascending layer ids in [0, num_hidden_layers))")
    elif isinstance(d.get("num_aux_slots"), int) and d["num_aux_slots"] != len(aux):
        wrong.append(f"num_aux_slots is {d['num_aux_slots']} but aux_layer_ids has {len(aux)} ids")
    wrong += [f"{k} is {d[k]!r} (expected a positive integer)" for k in POSITIVE_FIELDS
              if isinstance(d.get(k), int) and not isinstance(d[k], bool) and d[k] < 1]
    return wrong


_LAST_ID_MS = [0]
_ID_LOCK = threading.Lock()


def new_part_id() -> str:
    """Sortable by creation time, unique across machines. Within one process the millisecond
    prefix strictly increases, so parts opened one after another keep that order even when
    several are opened in the same millisecond (the random suffix would shuffle them)."""
    with _ID_LOCK:
        ms = max(time.time_ns() // 1_000_000, _LAST_ID_MS[0] + 1)
        _LAST_ID_MS[0] = ms
    return f"{ms:013d}-{uuid.uuid4().hex[:12]}"


class _Location:
    """A dataset URL and its storage options; opens the filesystem lazily, once per process."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None):
        self.url = normalize_url(url)
        self.storage_options = dict(storage_options or {})
        self._fs: tuple[int, Any, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options, "_fs": None}

    @property
    def fs(self):
        if self._fs is None or self._fs[0] != os.getpid():
            fs, root = get_fs(self.url, self.storage_options)
            self._fs = (os.getpid(), fs, root)
        return self._fs[1]

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - opens the filesystem and sets the root
        return self._fs[2]

    def read_schema(self) -> DatasetSchema | None:
        """The dataset.json schema, None when there is none; a one-line error when it is unusable."""
        path = f"{self.root}/{SCHEMA_FILE}"
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise self.not_a_directory() from None
        except Exception as e:
            raise describe_storage_error(self.url, e) from None
        try:
            d = json.loads(raw)
        except ValueError:
            raise DatasetNotFoundError(f"{self.url}: {SCHEMA_FILE} is not valid JSON; not a draftdata dataset") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise DatasetNotFoundError(f"{self.url}: {SCHEMA_FILE} is not a draftdata dataset schema")
        return parse_schema(d, f"{self.url}/{SCHEMA_FILE}")

    def not_a_directory(self) -> DraftdataError:
        """The error for a dataset URL whose local path is (or runs through) a file."""
        path = local_path(self.url) if is_local(self.url) else self.url
        while is_local(self.url) and path != os.path.dirname(path) and not os.path.exists(path):
            path = os.path.dirname(path)
        return DraftdataError(f"{path} is a file, not a dataset directory; give the directory that holds "
                              f"{SCHEMA_FILE} (`draftdata collect --output DIR` creates one in a new or empty DIR)")

    def entries(self) -> list[str]:
        """Names of the visible entries (not starting with '.') at the dataset URL; [] when it does not exist."""
        try:
            self.fs.invalidate_cache(self.root)
            paths = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise self.not_a_directory() from None
        except Exception as e:
            raise describe_storage_error(self.url, e) from None
        paths = [str(p).rstrip("/") for p in paths]
        if paths == [self.root] and self.fs.isfile(self.root):  # an object store lists an object as itself
            raise self.not_a_directory()
        paths = [p for p in paths if p != self.root]  # an S3 "folder" marker object (`prefix/`) is no entry
        names = (p.rsplit("/", 1)[-1] for p in paths)
        return sorted(n for n in names if n and not n.startswith("."))

    def list_commits(self) -> list[str]:
        """Ids of the committed parts, listed afresh (object-store filesystems cache listings, and a
        poller such as the collect driver must see parts other writers committed since)."""
        commits = f"{self.root}/commits"
        try:
            self.fs.invalidate_cache(commits)
            paths = self.fs.ls(commits, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise describe_storage_error(self.url, e) from None
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def read_commits(self, part_ids: list[str]) -> list[bytes]:
        """The raw commit records of `part_ids`, read concurrently where the filesystem can.

        `cat_ranges` reads each path as given; `fs.cat` would expand glob characters such as the
        `[` and `]` that a dataset path may contain.
        """
        if not part_ids:
            return []
        paths = [commit_path(self.root, p) for p in part_ids]
        try:
            out = list(self.fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="raise"))
        except Exception as e:
            raise describe_storage_error(self.url, e) from None
        # Async filesystems of fsspec < 2026.6 ignore on_error and return the exception in place.
        failed = next((r for r in out if isinstance(r, BaseException)), None)
        if failed is not None:
            raise describe_storage_error(self.url, failed)
        return out

    def read_parts(self, part_ids: list[str], bad_records: list[str] | None = None,
                   schema: DatasetSchema | None = None) -> list[PartInfo]:
        """Parse the commit records of `part_ids`.

        A record that is not valid JSON or lacks a field, or (given the `schema`) that was stored in
        another storage format or codec than dataset.json says, raises CorruptDataError naming the
        part and the record file; with a `bad_records` list it is described there and left out instead.
        """
        out = []
        for pid, raw in zip(part_ids, self.read_commits(part_ids)):
            path = commit_path(self.url, pid)
            try:
                info = PartInfo.from_record(json.loads(raw))
            except ValueError as e:
                problem = f"part {pid}: commit record {path} is malformed ({e})"
            except (KeyError, TypeError, AttributeError) as e:
                what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                problem = f"part {pid}: commit record {path} is malformed ({what})"
            else:
                stored = {"storage_format": info.record.get("format"), "codec": info.record.get("codec")}
                differ = [f"{k} {v!r} (dataset.json: {getattr(schema, k)!r})" for k, v in stored.items()
                          if schema is not None and v is not None and v != getattr(schema, k)]
                if info.id == pid and not differ:
                    out.append(info)
                    continue
                problem = (f"part {pid}: commit record {path} names part {info.id!r}" if info.id != pid else
                           f"part {pid}: commit record {path} says it is stored with {', '.join(differ)}; "
                           f"{self.url}/{SCHEMA_FILE} lacks or misstates the field")
            if bad_records is None:
                raise CorruptDataError(f"{problem}; run `draftdata verify {self.url}`, then restore or delete the "
                                       "record (deleting it drops the part from the dataset)")
            bad_records.append(problem)
        return out

    def part_url(self, part_id: str) -> str:
        base = self.url if "://" in self.url else self.url
        return f"{base}/parts/{part_id}"


# ----------------------------------------------------------------------------------------- writing


class PartWriter:
    """Buffers the samples of one part; `commit()` writes the arrays, then the commit record.

    One writer per part; any number may run at once (threads, processes, machines) because
    they share nothing but the dataset.json they only read.
    """

    def __init__(self, loc: _Location, schema: DatasetSchema, work_unit: str | None,
                 producer: dict[str, Any] | None = None):
        self._loc, self.schema, self.work_unit, self.producer = loc, schema, work_unit, producer
        self.part_id = new_part_id()
        self._ids: list[str] = []
        self._cols: dict[str, list[np.ndarray]] = {"input_ids": [], "loss_mask": [], **{k: [] for k in HIDDEN_ARRAYS}}
        self.num_tokens = 0
        self.nbytes = 0
        self._closed = False

    @property
    def num_samples(self) -> int:
        return len(self._ids)

    def add(self, sample: dict[str, Any]) -> None:
        """Append one sample (docs/FORMAT.md: conversation_id, input_ids, loss_mask, two hidden arrays)."""
        if self._closed:
            raise DraftdataError(f"part {self.part_id} is already committed or aborted")
        cid = str(sample["conversation_id"])
        ids = np.asarray(_np(sample["input_ids"]), dtype=np.int32).reshape(-1)
        mask = np.asarray(_np(sample["loss_mask"]), dtype=np.uint8).reshape(-1)
        n = len(ids)
        h, k = self.schema.hidden_size, self.schema.num_aux_slots
        expect = {"aux_hidden_states": (n, k * h), "hidden_states": (n, h)}
        hidden = {}
        for name in HIDDEN_ARRAYS:
            bits = bf16_to_bits(sample[name])
            if bits.shape != expect[name]:
                raise SchemaMismatchError(f"sample {cid}: {name} has shape {tuple(bits.shape)}, the dataset schema "
                                          f"needs {expect[name]} (hidden_size={h}, aux slots={k}, {n} tokens)")
            hidden[name] = bits
        if len(mask) != n:
            raise SchemaMismatchError(f"sample {cid}: loss_mask has {len(mask)} entries for {n} input_ids")
        if n == 0:
            raise DraftdataError(f"sample {cid}: empty sample (0 tokens)")
        self._ids.append(cid)
        self._cols["input_ids"].append(ids)
        self._cols["loss_mask"].append(mask)
        for name, bits in hidden.items():
            self._cols[name].append(np.array(bits, copy=True))  # detach from the caller's buffer
        self.num_tokens += n
        self.nbytes += n * (4 + 1) + sum(b.nbytes for b in hidden.values())

    def _logical_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "input_ids": np.concatenate(self._cols["input_ids"]),
            "loss_mask": np.concatenate(self._cols["loss_mask"]),
        }
        slots = {"aux_hidden_states": self.schema.num_aux_slots, "hidden_states": 1}
        for name in HIDDEN_ARRAYS:
            bits = np.concatenate(self._cols[name])
            if self.schema.codec == "fp8":
                arrays[name], arrays[SCALE_OF[name]] = fp8_encode(bits, slots[name])
            else:
                arrays[name] = bits
        lengths = [len(x) for x in self._cols["input_ids"]]
        arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return arrays

    def commit(self) -> PartInfo | None:
        """Write the part and then its commit record; returns None (and writes nothing) when empty."""
        if self._closed:
            raise DraftdataError(f"part {self.part_id} is already committed or aborted")
        self._closed = True
        if not self._ids:
            return None
        arrays = self._logical_arrays()
        self._cols = {}
        loc, schema = self._loc, self.schema
        directory = part_dir(loc.root, self.part_id)
        attrs = {"part_id": self.part_id, "conversation_ids": self._ids, "codec": schema.codec}
        try:
            if schema.storage_format == "zarr":
                zarr_part.write_part(loc.part_url(self.part_id), arrays, attrs, schema.codec, loc.storage_options)
            else:
                arrow_part.write_part(loc.fs, directory, arrays, attrs, schema.codec)
            stored = int(loc.fs.du(directory, total=True))
        except DraftdataError:
            raise
        except Exception as e:
            raise describe_storage_error(loc.url, e) from None
        record = {
            "part_id": self.part_id, "format": schema.storage_format, "codec": schema.codec,
            "num_samples": len(self._ids), "num_tokens": int(arrays["offsets"][-1]),
            "conversation_ids": self._ids, "offsets": arrays["offsets"].tolist(),
            "work_unit": self.work_unit, "stored_bytes": stored, "producer": self.producer,
            "arrays": {k: {"dtype": str(a.dtype), "shape": list(a.shape), "crc32c": crc32c(a)} for k, a in arrays.items()},
            "created_by": f"draftdata {__version__}", "committed_at": time.time(),
        }
        put_atomic(loc.fs, commit_path(loc.root, self.part_id), json.dumps(record).encode())
        return PartInfo.from_record(record)

    def abort(self) -> None:
        """Drop the buffered samples and remove anything already written for this part."""
        self._closed, self._cols, self._ids = True, {}, []
        try:
            remove_tree(self._loc.fs, part_dir(self._loc.root, self.part_id))
        except Exception:  # noqa: BLE001 - nothing written yet, or the store is unreachable (botocore's
            pass           # errors are no OSError): best effort, `verify --gc` removes what is left


def _writable(a: np.ndarray) -> np.ndarray:
    """torch cannot wrap read-only memory (memory-mapped Arrow blocks): copy those."""
    return a if a.flags.writeable else a.copy()


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class DatasetWriter:
    """Opens part writers for one dataset; made by `create_dataset`."""

    def __init__(self, loc: _Location, schema: DatasetSchema):
        self._loc, self.schema = loc, schema
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._loc.url

    def open_part(self, work_unit: str | None = None, producer: dict[str, Any] | None = None) -> PartWriter:
        """A new part; `work_unit` and `producer` (how it was computed) go into its commit record."""
        return PartWriter(self._loc, self.schema, work_unit, producer)

    def committed_parts(self, known: Collection[str] = ()) -> list[PartInfo]:
        """Committed parts; ids in `known` (parts the caller already read) are not read again,
        so polling a dataset of many parts costs one listing plus the new commit records."""
        new = [p for p in self._loc.list_commits() if p not in known]
        return self._loc.read_parts(new, schema=self.schema)

    def committed_ids(self) -> set[str]:
        return {cid for p in self.committed_parts() for cid in p.conversation_ids}


def create_dataset(url: str, schema: DatasetSchema, *, format: str = "zarr", codec: str = "bf16",
                   storage_options: dict[str, Any] | None = None) -> DatasetWriter:
    """Create a dataset (or open an existing one with the same schema) and return its writer.

    Raises SchemaMismatchError naming every field that differs from an existing dataset.json.
    """
    if format not in STORAGE_FORMATS:
        raise DraftdataError(f"unknown format {format!r}; choose one of {', '.join(STORAGE_FORMATS)}")
    if codec not in CODECS:
        raise DraftdataError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    schema = DatasetSchema.from_dict({**schema.to_dict(), "storage_format": format, "codec": codec,
                                      "created_by": schema.created_by or f"draftdata {__version__}"})
    wrong = schema_problems(schema.to_dict())  # before it is written: a bad dataset.json would stay
    if wrong:
        raise DraftdataError(f"{url}: cannot create a dataset with this schema: {'; '.join(wrong)}")
    loc = _Location(url, storage_options)
    existing = loc.read_schema()
    if existing is not None:
        diffs = existing.differences(schema)
        if diffs:
            raise SchemaMismatchError(f"{loc.url} already holds a dataset with a different schema: " + "; ".join(diffs)
                                      + ". Write to a new URL, or rerun with the dataset's settings.")
        return DatasetWriter(loc, existing)
    try:
        if not is_bucket_fs(loc.fs):  # on S3 a "directory" under a missing bucket would create the bucket
            loc.fs.makedirs(loc.root, exist_ok=True)
        # Exclusive (a hard link locally, a conditional PUT on S3): of two creators racing, exactly
        # one writes dataset.json.
        put_atomic(loc.fs, f"{loc.root}/{SCHEMA_FILE}", schema.to_json().encode(), exclusive=True)
    except DraftdataError:
        raise
    except Exception as e:
        raise describe_storage_error(loc.url, e) from None
    # Two creators racing: whoever lost reads the winner's schema and must agree with it (on a store
    # without conditional PUTs a later PUT can still replace an earlier one unseen).
    stored = loc.read_schema()
    if stored is not None and stored.differences(schema):
        raise SchemaMismatchError(f"{loc.url}: another writer created the dataset with a different schema: "
                                  + "; ".join(stored.differences(schema)))
    return DatasetWriter(loc, stored or schema)


# ----------------------------------------------------------------------------------------- reading


class Dataset:
    """A read-only view of the committed parts of a dataset (picklable; reopens storage per process)."""

    def __init__(self, loc: _Location, schema: DatasetSchema, parts: list[PartInfo]):
        self._loc, self.schema, self.parts = loc, schema, parts
        self._starts = np.concatenate([[0], np.cumsum([p.num_samples for p in parts])]).astype(np.int64)
        self._readers: dict[int, Any] = {}
        self._reader_pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_readers"] = {}
        return d

    @property
    def url(self) -> str:
        return self._loc.url

    @property
    def storage_options(self) -> dict[str, Any]:
        return self._loc.storage_options

    @property
    def num_samples(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    @property
    def stored_bytes(self) -> int:
        return sum(p.stored_bytes for p in self.parts)

    def __len__(self) -> int:
        return self.num_samples

    def sample_lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths for p in self.parts]) if self.parts else np.zeros(0, np.int64)

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample index -> (part index, index inside the part)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range (dataset has {self.num_samples})")
        p = int(np.searchsorted(self._starts, i, side="right") - 1)
        return p, i - int(self._starts[p])

    def reader(self, p: int, *, whole: bool = False):
        """The format reader of part p, for range reads or (`whole=True`) reading all of it.

        Range readers hold a part's metadata and file handle (a remote Arrow one also fsspec's
        read-ahead: up to 4 MiB and the last range read) and are cached per process, up to 65. A
        whole reader of a remote Arrow part holds the downloaded file, so it is never cached:
        caching it would keep every part read so far in memory, beyond the loader's prefetch bound.
        """
        if self._reader_pid != os.getpid():
            self._readers, self._reader_pid = {}, os.getpid()
        if whole and self.schema.storage_format == "arrow" and not is_local_fs(self._loc.fs):
            return self._open_reader(p, whole=True)
        if p not in self._readers:
            r = self._open_reader(p, whole=False)
            if len(self._readers) > 64:
                self._readers.clear()
            self._readers[p] = r
        return self._readers[p]

    def _open_reader(self, p: int, *, whole: bool) -> Any:
        info = self.parts[p]
        try:
            if self.schema.storage_format == "zarr":
                return zarr_part.ZarrPartReader(self._loc.part_url(info.id), info.id, self._loc.storage_options)
            return arrow_part.ArrowPartReader(self._loc.fs, part_dir(self._loc.root, info.id), info.id, whole=whole)
        except DraftdataError:
            raise
        except Exception as e:
            raise describe_storage_error(self.url, e) from None

    def _rows(self, p: int, start: int | None, stop: int | None, whole: bool = False) -> dict[str, Any]:
        r = self.reader(p, whole=whole)
        fp8 = self.schema.codec == "fp8"
        names = ["input_ids", "loss_mask", *HIDDEN_ARRAYS, *([SCALE_OF[n] for n in HIDDEN_ARRAYS] if fp8 else [])]
        got = r.read_columns(names, start, stop)
        out: dict[str, Any] = {
            "input_ids": _writable(np.asarray(got["input_ids"], dtype=np.int32)),
            "loss_mask": _writable(np.asarray(got["loss_mask"], dtype=np.uint8)),
        }
        info = self.parts[p]
        try:
            for name in HIDDEN_ARRAYS:
                out[name] = fp8_decode(got[name], got[SCALE_OF[name]]) if fp8 else bits_to_bf16(got[name])
        except (ValueError, RuntimeError) as e:  # e.g. scales that do not fit their rows
            raise CorruptDataError(f"part {info.id}: {name} cannot be decoded ({e})") from None
        # the arrays must be what dataset.json and the commit record describe, whatever their own metadata says
        n = (int(info.offsets[-1]) if stop is None else min(stop, int(info.offsets[-1]))) - (start or 0)
        h, k = self.schema.hidden_size, self.schema.num_aux_slots
        expect = {"input_ids": (n,), "loss_mask": (n,), "hidden_states": (n, h), "aux_hidden_states": (n, k * h)}
        for name, shape in expect.items():
            got_shape = tuple(out[name].shape)
            if got_shape == shape:
                continue
            recorded = ((info.record or {}).get("arrays") or {}).get(name, {}).get("shape")
            if isinstance(recorded, list) and tuple(recorded[1:]) == got_shape[1:] != shape[1:]:
                raise CorruptDataError(
                    f"part {info.id}: array {name} has rows {got_shape[1]} wide, as its commit record says, but "
                    f"dataset.json implies {shape[1]} (hidden_size {h}, {k} aux layer(s)): dataset.json does not "
                    "describe this dataset (edited or replaced?); restore it from a backup")
            raise CorruptDataError(f"part {info.id}: array {name} has shape {got_shape} for rows "
                                   f"{start or 0}..{n + (start or 0) - 1}; dataset.json says {shape}"
                                   + (f" and the commit record {tuple(recorded)} for the whole part"
                                      if isinstance(recorded, list) else ""))
        return out

    def _read_rows(self, p: int, start: int | None, stop: int | None, whole: bool, context: str) -> dict[str, Any]:
        """`_rows`, with errors saying which samples were being read and what to do."""
        try:
            return self._rows(p, start, stop, whole=whole)
        except CorruptDataError as err:
            raise CorruptDataError(f"{err} ({context}); run `draftdata verify {self.url}`") from None
        except StorageAccessError as err:
            raise StorageAccessError(f"{err} (part {self.parts[p].id}, {context})") from None

    def read_sample(self, p: int, j: int) -> dict[str, Any]:
        """Sample j of part p, read with range reads of the chunks that hold it."""
        info = self.parts[p]
        s, e = int(info.offsets[j]), int(info.offsets[j + 1])
        rows = self._read_rows(p, s, e, False, f"reading sample {j}, conversation {info.conversation_ids[j]!r}")
        return _sample(info.conversation_ids[j], rows, 0, e - s)

    def sample(self, i: int) -> dict[str, Any]:
        return self.read_sample(*self.locate(i))

    def read_part(self, p: int) -> dict[str, Any]:
        """All arrays of part p at once (one sequential read per array): the fast path for loaders."""
        info = self.parts[p]
        rows = self._read_rows(p, None, None, True, f"the whole part: {name_some(info.conversation_ids, 3)}")
        rows["offsets"] = info.offsets
        rows["conversation_ids"] = info.conversation_ids
        return rows

    def read_samples(self, p: int, j0: int, j1: int) -> dict[str, Any]:
        """Arrays of samples [j0, j1) of part p (token rows offsets[j0]:offsets[j1]), range reads only."""
        info = self.parts[p]
        if j0 == 0 and j1 == info.num_samples:
            return self.read_part(p)
        s, e = int(info.offsets[j0]), int(info.offsets[j1])
        rows = self._read_rows(p, s, e, False, f"samples {j0}..{j1 - 1}: {name_some(info.conversation_ids[j0:j1], 3)}")
        rows["offsets"] = info.offsets[j0:j1 + 1] - s
        rows["conversation_ids"] = info.conversation_ids[j0:j1]
        return rows

    def subset(self, part_ids: list[str]) -> Dataset:
        """A view of only the named committed parts (a pinned snapshot of a growing dataset)."""
        by_id = {p.id: p for p in self.parts}
        missing = [pid for pid in part_ids if pid not in by_id]
        if missing:
            raise MissingPartsError(f"{self.url}: {len(missing)} requested part(s) are not committed there, "
                                 f"e.g. {missing[0]}")
        return Dataset(self._loc, self.schema, [by_id[pid] for pid in sorted(set(part_ids))])

    def iter_part(self, p: int) -> Iterator[dict[str, Any]]:
        rows = self.read_part(p)
        off = rows["offsets"]
        for j, cid in enumerate(rows["conversation_ids"]):
            yield _sample(cid, rows, int(off[j]), int(off[j + 1]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for p in range(len(self.parts)):
            yield from self.iter_part(p)


def _sample(cid: str, rows: dict[str, Any], s: int, e: int) -> dict[str, Any]:
    return {
        "conversation_id": cid,
        "input_ids": torch.from_numpy(rows["input_ids"][s:e]),
        "loss_mask": torch.from_numpy(rows["loss_mask"][s:e]),
        "aux_hidden_states": rows["aux_hidden_states"][s:e],
        "hidden_states": rows["hidden_states"][s:e],
    }


def list_entries(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of what a dataset URL already holds (one listing, also on object stores); [] when it does
    not exist. Hidden names (a crashed writer's temporary files) are left out; a file raises DraftdataError."""
    return _Location(url, storage_options).entries()


def open_dataset(url: str, *, storage_options: dict[str, Any] | None = None,
                 bad_records: list[str] | None = None) -> Dataset:
    """Open the committed parts of a dataset for reading.

    A malformed commit record raises CorruptDataError naming it; with a `bad_records` list (what
    `draftdata verify` passes) it is described there and its part left out, so the rest can be checked.
    """
    loc, schema = open_location(url, storage_options)
    return Dataset(loc, schema, loc.read_parts(loc.list_commits(), bad_records, schema=schema))


def open_location(url: str, storage_options: dict[str, Any] | None = None) -> tuple[_Location, DatasetSchema]:
    """The dataset's location and schema, without reading any commit record (what garbage
    collection needs: a listing of the commits, not their contents)."""
    loc = _Location(url, storage_options)
    schema = loc.read_schema()
    if schema is None:
        entries = loc.entries()  # a file given as the dataset is named as such here
        bucket = loc.root.split("/", 1)[0]
        if not entries and is_bucket_fs(loc.fs) and bucket and not _exists(loc.fs, bucket):
            raise StorageAccessError(f"{loc.url}: the bucket {bucket} does not exist (or these credentials cannot "
                                     "see it); create it first, or check the URL (draftdata never creates buckets)")
        from draftdata.locks import lock_holder

        holder = lock_holder(url, storage_options)
        if holder:
            raise DatasetNotFoundError(f"{loc.url}: no dataset here yet ({SCHEMA_FILE} not found): a draftdata "
                                       f"{holder} holds it and writes {SCHEMA_FILE} once its model has loaded; "
                                       "try again shortly")
        raise DatasetNotFoundError(f"{loc.url}: no dataset here ({SCHEMA_FILE} not found); "
                                   "create one with `draftdata collect --output URL`")
    return loc, schema


def _exists(fs: Any, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception:  # noqa: BLE001 - unknown: say what is known, that there is no dataset.json
        return True
