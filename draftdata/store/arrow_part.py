"""Arrow parts: one IPC file per part, one record batch per token-row chunk.

Columns are the logical arrays (`input_ids`, `loss_mask`, the hidden arrays as fixed-size
lists of uint16 bf16 bits, fp8 bits and scales for `fp8`). The schema metadata key
`draftdata` holds JSON with the sample table (conversation ids, offsets), the chunk size and a
CRC-32C per array per record batch, checked on every read. Local files are read through a
memory map without copies; remote files by range reads or one whole-object GET.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from draftdata.errors import CorruptDataError
from draftdata.store.codecs import shuffle_rows, unshuffle_rows
from draftdata.store.fs import MISSING_ERRORS, describe_storage_error, is_local_fs
from draftdata.store.layout import crc32c, rows_per_chunk

FILE_NAME = "part.arrow"
META_KEY = b"draftdata"
ZSTD_LEVEL = 3


def _column(a: np.ndarray, codec: str) -> pa.Array:
    if a.ndim == 1:
        return pa.array(a)
    if codec == "zstd" and a.dtype == np.uint16:
        a = shuffle_rows(a)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def write_part(fs: fsspec.AbstractFileSystem, directory: str, arrays: dict[str, np.ndarray],
               attrs: dict[str, Any], codec: str) -> None:
    """Write the logical arrays (all but `offsets`, which goes into the metadata) as one IPC file."""
    rows = len(arrays["input_ids"])
    cols = {k: v for k, v in arrays.items() if k != "offsets"}
    widest = max(a.dtype.itemsize * (a.shape[1] if a.ndim == 2 else 1) for a in cols.values())
    r = rows_per_chunk(rows, widest)
    starts = list(range(0, rows, r)) or [0]
    meta = dict(attrs, offsets=arrays["offsets"].tolist(), rows_per_chunk=r,
                block_crc32c={k: [crc32c(a[s:s + r]) for s in starts] for k, a in cols.items()})
    batches = [pa.RecordBatch.from_pydict({k: _column(a[s:s + r], codec) for k, a in cols.items()}) for s in starts]
    schema = batches[0].schema.with_metadata({META_KEY: json.dumps(meta).encode()})
    # zstd level 3 (pyarrow's default is 1): stored/raw 0.71 instead of 0.78 on SmolLM2 states, same speed
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=ZSTD_LEVEL)
                                     if codec == "zstd" else None)
    path = f"{directory}/{FILE_NAME}"
    if is_local_fs(fs):
        fs.makedirs(directory, exist_ok=True)
        sink: Any = pa.OSFile(path, "wb")
    else:
        sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=options) as writer:
        for b in batches:
            writer.write_batch(b)
    if is_local_fs(fs):
        sink.close()
    else:
        fs.pipe_file(path, sink.getvalue().to_pybytes())


class _TrackedFile:
    """The remote file handed to `pa.PythonFile`, counting the reads that raised and keeping the last error.

    pyarrow raises OSError both for bytes it cannot decode and, unchanged, for errors of the file
    it reads from (possibly on its own I/O threads); comparing the failure count before and after
    a decode tells a failed read (storage, or a vanished object) from corrupt bytes.
    """

    def __init__(self, f: Any):
        self._f = f
        self.failures = 0
        self.error: BaseException | None = None

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            self.error = e
            self.failures += 1
            raise

    def read(self, *args: Any) -> Any:
        return self._call(self._f.read, *args)

    def readinto(self, *args: Any) -> Any:
        return self._call(self._f.readinto, *args)

    def seek(self, *args: Any) -> Any:
        return self._call(self._f.seek, *args)

    def tell(self) -> int:
        return self._call(self._f.tell)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class ArrowPartReader:
    """Reads rows of the arrays of one Arrow part, verifying each record batch's CRC-32C.

    Bad bytes (CRC, decode, shape) raise CorruptDataError, a missing file too; a failure to reach
    the storage raises StorageAccessError, so that skipping damaged samples never skips data
    during an outage. `whole=True` (remote only) downloads the file in one GET and holds it.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, directory: str, part_id: str, *, whole: bool = False):
        self.part_id = part_id
        path = f"{directory}/{FILE_NAME}"
        self.where = path if is_local_fs(fs) else fs.unstrip_protocol(path)  # for messages
        self._file: _TrackedFile | None = None
        try:
            if is_local_fs(fs):
                if os.path.exists(path) and not os.path.isfile(path):  # pyarrow says only "OSError"
                    raise CorruptDataError(f"part {part_id}: {FILE_NAME} is not a file ({self.where})")
                source: Any = pa.memory_map(path, "r")
            elif whole:
                source = pa.py_buffer(fs.cat_file(path))
            else:
                self._file = _TrackedFile(fs.open(path, "rb", block_size=4 << 20))
                source = pa.PythonFile(self._file, mode="r")
        except CorruptDataError:
            raise
        except Exception as e:
            raise self._read_error(e) from None
        try:
            self.reader = pa.ipc.open_file(source)
            self.meta = json.loads(self.reader.schema.metadata[META_KEY])
        except Exception as e:
            raise self._decode_error(e, f"{FILE_NAME} is unreadable", 0) from None
        self.rows_per_chunk = int(self.meta["rows_per_chunk"])
        self.codec = self.meta.get("codec", "bf16")

    def _read_error(self, e: BaseException) -> Exception:
        """The error for a failed read of the file: missing -> corruption, anything else -> storage."""
        if isinstance(e, MISSING_ERRORS):
            return CorruptDataError(f"part {self.part_id}: {FILE_NAME} is missing ({self.where})")
        return describe_storage_error(self.where, e)

    def _decode_error(self, e: BaseException, what: str, failures_before: int) -> Exception:
        """The error for a failed decode: a storage error if a read of the file failed meanwhile."""
        if self._file is not None and self._file.failures > failures_before and self._file.error is not None:
            return self._read_error(self._file.error)
        return CorruptDataError(f"part {self.part_id}: {what} ({type(e).__name__}: {e})")

    @property
    def attrs(self) -> dict[str, Any]:
        return self.meta

    def names(self) -> list[str]:
        return sorted([*self.reader.schema.names, "offsets"])

    def _batch(self, b: int) -> pa.RecordBatch:
        failures = self._file.failures if self._file is not None else 0
        try:
            return self.reader.get_batch(b)
        except Exception as e:
            raise self._decode_error(e, f"block {b} is unreadable", failures) from None

    def _column(self, batch: pa.RecordBatch, name: str, b: int) -> np.ndarray:
        try:
            col = batch.column(name)
            if isinstance(col, pa.FixedSizeListArray):
                a = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
                if self.codec == "zstd" and a.dtype == np.uint8 and name in ("aux_hidden_states", "hidden_states"):
                    a = unshuffle_rows(a)
            else:
                a = col.to_numpy(zero_copy_only=False)
        except Exception as e:  # the batch is in memory: only its bytes can be wrong
            raise CorruptDataError(f"part {self.part_id}: array {name} block {b} is unreadable "
                                   f"({type(e).__name__}: {e})") from None
        expected = self.meta["block_crc32c"][name][b]
        if crc32c(a) != expected:
            raise CorruptDataError(f"part {self.part_id}: array {name} block {b} fails its CRC-32C check")
        return a

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return self.read_columns([name], start, stop)[name]

    def read_columns(self, names: list[str], start: int | None = None,
                     stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of several arrays, reading each record batch once for all of them
        (a remote batch is one ranged GET; reading it per array multiplied the bytes fetched)."""
        out: dict[str, np.ndarray] = {}
        if "offsets" in names:
            out["offsets"] = np.asarray(self.meta["offsets"], dtype=np.int64)[start:stop]
        names = [n for n in names if n != "offsets"]
        if not names:
            return out
        rows = int(self.meta["offsets"][-1])
        start = 0 if start is None else max(0, start)
        stop = rows if stop is None else min(rows, stop)
        r = self.rows_per_chunk
        if stop <= start:
            batch = self._batch(0)
            return {**out, **{n: self._column(batch, n, 0)[:0] for n in names}}
        blocks: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for b in range(start // r, (stop - 1) // r + 1):
            batch = self._batch(b)
            for n in names:
                blocks[n].append(self._column(batch, n, b))
        first = (start // r) * r
        for n in names:                                  # free each array's blocks once joined
            parts = blocks.pop(n)
            a = parts[0] if len(parts) == 1 else np.concatenate(parts)
            out[n] = a[start - first: stop - first]
        return out
