"""Zarr v3 parts: one group per part, one sharded array per logical array.

Each array is a single shard (one object per array per part) of token-row chunks, so a sample
is a few range reads through the shard index. Every inner chunk carries a CRC-32C (Zarr's
`crc32c` codec), so a flipped byte is caught on read; the `zstd` codec adds Blosc-zstd with
byte shuffle.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from draftdata.errors import CorruptDataError
from draftdata.store.fs import is_local, local_path
from draftdata.store.layout import rows_per_chunk


def _store(url: str, storage_options: dict[str, Any] | None, read_only: bool) -> zarr.abc.store.Store:
    if is_local(url):
        return zarr.storage.LocalStore(local_path(url), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)


def write_part(url: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any], codec: str,
               storage_options: dict[str, Any] | None = None) -> None:
    """Write the logical arrays of one part as a Zarr group at `url` (the part directory)."""
    group = zarr.open_group(_store(url, storage_options, read_only=False), mode="w", zarr_format=3)
    group.attrs.update(attrs)
    rows = len(arrays["input_ids"])
    widest = max(a.dtype.itemsize * (a.shape[1] if a.ndim == 2 else 1) for a in arrays.values())
    r = rows_per_chunk(rows, widest)
    n_chunks = max(1, -(-rows // r))
    for name, a in arrays.items():
        if name == "offsets":
            chunks, shards = (max(1, len(a)),), None
        else:
            chunks = (r,) + a.shape[1:]
            shards = (r * n_chunks,) + a.shape[1:]
        compress = codec == "zstd" and a.dtype == np.uint16 and a.ndim == 2
        compressors = [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=2)] if compress else []
        arr = group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunks, shards=shards,
                                 compressors=[*compressors, Crc32cCodec()], fill_value=0)
        if a.size:
            arr[...] = a


class ZarrPartReader:
    """Reads rows of the arrays of one Zarr part (range reads; whole arrays on request)."""

    def __init__(self, url: str, part_id: str, storage_options: dict[str, Any] | None = None):
        self.part_id = part_id
        try:
            self.group = zarr.open_group(_store(url, storage_options, read_only=True), mode="r", zarr_format=3)
        except Exception as e:
            raise CorruptDataError(f"part {part_id}: cannot open Zarr group ({type(e).__name__}: {e})") from None
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def names(self) -> list[str]:
        return sorted(self.group.array_keys())

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except KeyError:
                raise CorruptDataError(f"part {self.part_id}: array {name} is missing") from None
        return self._arrays[name]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        try:
            return self.array(name)[start:stop]
        except CorruptDataError:
            raise
        except Exception as e:
            where = f"rows {start}:{stop}" if start is not None else "all rows"
            raise CorruptDataError(
                f"part {self.part_id}: array {name} ({where}) is unreadable: {type(e).__name__}: {e}") from None
