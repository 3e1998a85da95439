"""NSQ4 in numpy, bit-exact with ggml's `quantize_row_nsq4_ref` / `dequantize_row_nsq4` (the
ggml-nsq4-type-and-cpu-reference patch).

Format (version 1): blocks of 64 values, each `{ fp16 d; uint8 qs[32] }` = 34 bytes = 4.25 bits/value.
Value j of a block is `d * KVALUES[code_j]`; byte `qs[j]` holds code j in its low nibble and code j+32 in its high.

Quantizer, per block x:
  1. amax = max|x|. A block holding NaN or +-Inf, or with amax < 2**-24 (its d would round to fp16 zero anyway),
     is stored as d = 0 with every code 8: it dequantizes to zeros, never to NaN.
  2. The direction is searched on the integer grid xg = rint(x * (2047 / amax)) (float32 ops, round half to even).
  3. For each candidate S in KSCALES, code_j = the nearest table entry to 8*xg_j/S (ties to the lower entry), found
     with integer thresholds; the S with the least integer squared error sum((8*xg - KVALUES[code]*S)**2) wins
     (the first one on a tie).
  4. Norm separation: d = (amax/2047) * sqrt(sum(xg**2) / sum(KVALUES[code]**2)) in float32, so the block keeps
     the norm of x; d saturates at the fp16 maximum instead of becoming Inf.
Integer search means the result cannot depend on summation order or FMA contraction: every backend matches it.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

QK = 64
BLOCK_BYTES = 2 + QK // 2
BITS_PER_VALUE = 8 * BLOCK_BYTES / QK
GRID = 2047

# the tables of ggml-common.h (kvalues_nsq4, kscales_nsq4); tests check they match the C ones
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int64)
KSCALES = np.array([100, 104, 108, 112, 116, 120, 123, 126, 129, 132, 135, 138, 141, 144, 148, 152], dtype=np.int64)
_MIDS2 = KVALUES[:-1] + KVALUES[1:]  # twice the midpoints between neighbouring entries
_ZERO_CODE = 8
_FP16_MAX = np.float32(65504.0)
_TINY = np.float32(2.0**-24)


def _codes(xg: npt.NDArray[np.int64], scale: int) -> npt.NDArray[np.int64]:
    """Nearest table entry to 8*xg/scale, ties to the lower entry, as integer threshold counts."""
    return (16 * xg[..., None] > _MIDS2 * scale).sum(axis=-1)


def quantize(x: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Quantize float32 values (size a multiple of 64) to NSQ4 blocks; returns the raw bytes, 34 per block."""
    xf = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if xf.size % QK:
        raise ValueError(f"NSQ4 quantizes blocks of {QK} values; got {xf.size} values, not a multiple of {QK}")
    xb = xf.reshape(-1, QK)
    nb = xb.shape[0]

    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(xb).all(axis=1)
        amax = np.abs(np.where(np.isfinite(xb), xb, 0)).max(axis=1, initial=np.float32(0))
    special = ~finite | (amax < _TINY)
    amax = np.where(special, np.float32(1), amax).astype(np.float32)
    xs = np.where(special[:, None], np.float32(0), xb)

    inv = np.float32(GRID) / amax
    xg = np.rint(xs * inv[:, None]).astype(np.int64)

    best = np.zeros(nb, dtype=np.int64)
    best_err = np.full(nb, np.iinfo(np.int64).max, dtype=np.int64)
    for i, scale in enumerate(KSCALES):
        err = ((8 * xg - KVALUES[_codes(xg, int(scale))] * scale) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, i, best)

    codes = (16 * xg[..., None] > _MIDS2 * KSCALES[best][:, None, None]).sum(axis=-1)
    sxx = (xg * xg).sum(axis=1)
    sqq = (KVALUES[codes] ** 2).sum(axis=1)
    d = (amax / np.float32(GRID)) * np.sqrt(sxx.astype(np.float32) / sqq.astype(np.float32))
    d = np.minimum(d.astype(np.float32), _FP16_MAX).astype(np.float16)
    d = np.where(special, np.float16(0), d)
    codes = np.where(special[:, None], _ZERO_CODE, codes)

    out = np.empty((nb, BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(nb, 2)
    out[:, 2:] = (codes[:, : QK // 2] | (codes[:, QK // 2 :] << 4)).astype(np.uint8)
    return out.reshape(-1)


def dequantize(blocks: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Dequantize raw NSQ4 bytes (34 per block) to float32."""
    raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1)
    if raw.size % BLOCK_BYTES:
        raise ValueError(f"NSQ4 data is made of {BLOCK_BYTES}-byte blocks; got {raw.size} bytes")
    b = raw.reshape(-1, BLOCK_BYTES)
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    qs = b[:, 2:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    return (d * KVALUES[codes].astype(np.float32)).reshape(-1)
