"""Names and shapes shared by both part formats (the logical arrays of a part)."""

from __future__ import annotations

import math
import mmap

import google_crc32c
import numpy as np

# Logical arrays of a part, in the order they are written. Hidden arrays are 2-D [T, cols].
TOKEN_ARRAYS = ("input_ids", "loss_mask")
HIDDEN_ARRAYS = ("aux_hidden_states", "hidden_states")
SCALE_OF = {"aux_hidden_states": "aux_scale", "hidden_states": "hidden_scale"}

CHUNK_TARGET_BYTES = 1 << 20  # ~1 MiB per chunk of the widest array


def rows_per_chunk(num_rows: int, row_bytes: int) -> int:
    """Token rows per chunk: about CHUNK_TARGET_BYTES, balanced so the last chunk is nearly full.

    Equal-sized chunks keep the padded edge chunk (stored whole by Zarr) below one row per chunk,
    so raw storage stays within a fraction of a percent of the tensor bytes.
    """
    target = max(16, min(8192, CHUNK_TARGET_BYTES // max(1, row_bytes)))
    if num_rows <= 0:
        return target
    n_chunks = math.ceil(num_rows / target)
    return math.ceil(num_rows / n_chunks)


def crc32c(a: np.ndarray) -> int:
    """CRC-32C of an array's C-order bytes (the checksum recorded for every stored array)."""
    return int(google_crc32c.value(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))


def part_dir(root: str, part_id: str) -> str:
    return f"{root}/parts/{part_id}"


def commit_path(root: str, part_id: str) -> str:
    return f"{root}/commits/{part_id}.json"


HUGE_PAGE = 2 << 20


def empty_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty, but arrays of 2 MiB and more get transparent huge pages where the OS offers them.

    Filling fresh 4 KiB pages costs a page fault each, which caps copies into new memory at about
    1 GB/s on VMs; huge pages cut that several-fold. The array owns its anonymous mapping.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    return np.frombuffer(m, dtype=dtype).reshape(shape)
