"""Names and shapes shared by both part formats (the logical arrays of a part)."""

from __future__ import annotations

import math

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
