"""Storage codecs for hidden states.

Neither Zarr nor Arrow has a bf16 type, so hidden states are stored as their 16 raw bits
(uint16) and viewed back as bf16 on read without a copy. Three codecs:

- ``bf16``: the raw bits.
- ``zstd``: the same bits, losslessly compressed with zstd after a byte shuffle (the high
  byte of bf16 activations, sign + exponent, is highly repetitive; the shuffle groups those).
- ``fp8``: lossy float8-e4m3 bits plus one float32 scale per token row and aux slot
  (scale = amax / 448), decoded to bf16 on read.
"""

from __future__ import annotations

import numpy as np
import torch

from draftdata.store.layout import empty_array

FP8_MAX = 448.0  # largest finite float8_e4m3fn value


def bf16_to_bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """bf16 tensor (or uint16 bits already) -> numpy uint16 array of its bits (no copy for CPU tensors)."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint16:
            raise TypeError(f"expected uint16 bf16 bits, got numpy {x.dtype}")
        return x
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    return x.detach().cpu().contiguous().view(torch.uint16).numpy()


def bits_to_bf16(bits: np.ndarray) -> torch.Tensor:
    """numpy uint16 bits -> bf16 tensor sharing the same memory."""
    if not bits.flags.writeable:
        bits = bits.copy()  # torch cannot wrap read-only memory; only hit for read-only maps
    return torch.from_numpy(bits).view(torch.bfloat16)


def fp8_encode(bits: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits [T, slots*H] -> (fp8 bits uint8 [T, slots*H], scales float32 [T, slots])."""
    t = bits_to_bf16(np.ascontiguousarray(bits)).float()
    rows = t.shape[0]
    t = t.view(rows, slots, -1)
    amax = t.abs().amax(dim=2).clamp_min(1e-12)
    scale = amax / FP8_MAX
    q = (t / scale.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).reshape(rows, -1).numpy(), scale.numpy().astype(np.float32)


FP8_DECODE_CHUNK = 1 << 20  # elements decoded at a time: the float32 scratch stays ~4 MiB, cache-sized


def fp8_decode(q: np.ndarray, scale: np.ndarray, chunk: int = FP8_DECODE_CHUNK) -> torch.Tensor:
    """(fp8 bits uint8 [T, slots*H], scales [T, slots]) -> bf16 [T, slots*H].

    Decoded `chunk` elements at a time into the bf16 output, so a read of many rows costs its
    output plus a few MiB, not two float32 copies of it (4x the output each)."""
    rows, slots = scale.shape
    width = q.shape[1] if q.ndim == 2 else -1
    if q.shape[0] != rows or width < 0 or width % slots:
        raise ValueError(f"fp8 bits of shape {q.shape} do not fit {rows} rows of {slots} scales")
    q, scale = np.array(q, copy=not q.flags.writeable), np.array(scale, copy=not scale.flags.writeable)
    bits = torch.from_numpy(np.ascontiguousarray(q)).view(torch.float8_e4m3fn)
    scales = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).unsqueeze(2)
    # An own anonymous mapping for a large output (as the bf16 reads get): freed, it goes back to the
    # OS; from malloc, glibc's raised mmap threshold kept it in the reader threads' arenas (RSS held
    # 2-4x the loader's prefetch bound, also after the epoch).
    out = torch.from_numpy(empty_array((rows, width), np.uint16)).view(torch.bfloat16)
    step = max(1, min(rows, chunk // max(width, 1)))
    scratch = torch.from_numpy(empty_array((step, width), np.float32))  # (mapped too, for the same reason)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        x = scratch[: b - a]
        x.copy_(bits[a:b])
        x.view(b - a, slots, width // slots).mul_(scales[a:b])
        out[a:b] = x  # the same float32 product, rounded to bf16
    return out


def shuffle_rows(bits: np.ndarray) -> np.ndarray:
    """uint16 [R, C] -> uint8 [R, 2C]: per row, all low bytes then all high bytes (byte shuffle)."""
    r, c = bits.shape
    return np.ascontiguousarray(bits.view(np.uint8).reshape(r, c, 2).transpose(0, 2, 1)).reshape(r, 2 * c)


def unshuffle_rows(planes: np.ndarray) -> np.ndarray:
    """Inverse of shuffle_rows: uint8 [R, 2C] -> uint16 [R, C]."""
    r, c2 = planes.shape
    c = c2 // 2
    return np.ascontiguousarray(planes.reshape(r, 2, c).transpose(0, 2, 1)).view(np.uint16).reshape(r, c)
