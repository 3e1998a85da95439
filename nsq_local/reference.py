"""NSQ4 and NSQ3 in numpy, bit-exact with ggml's `quantize_row_nsq4_ref` / `dequantize_row_nsq4` (the
ggml-nsq4-type-and-cpu-reference patch) and `quantize_row_nsq3_ref` / `dequantize_row_nsq3` (ggml-nsq3-type-and-cpu-
reference). NSQ4 is below; NSQ3 differs in its codes and its d, see `quantize_nsq3`.

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
_ZERO_CODE = 8
_FP16_MAX = np.float32(65504.0)
_TINY = np.float32(2.0**-24)


def _codes(xg: npt.NDArray[np.int64], kvalues: npt.NDArray[np.int64],
           scales: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Nearest entry of the sorted table kvalues to 8*xg/scale (a scale per block, or one for all), ties to the lower
    entry, as integer threshold counts."""
    mids2 = kvalues[:-1] + kvalues[1:]  # twice the midpoints between neighbouring entries
    return (16 * xg[..., None] > mids2 * np.reshape(scales, (-1, 1, 1))).sum(axis=-1)


def _search(xg: npt.NDArray[np.int64], kvalues: npt.NDArray[np.int64],
            kscales: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Step 3: each block's codes under the scale candidate of least integer squared error (the first on a tie)."""
    best = np.zeros(xg.shape[0], dtype=np.int64)
    best_err = np.full(xg.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
    for i, scale in enumerate(kscales):
        err = ((8 * xg - kvalues[_codes(xg, kvalues, scale)] * scale) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, i, best)
    return _codes(xg, kvalues, kscales[best])


def _grid(xb: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Steps 1 and 2, per block: which blocks are stored as zero, max|x| (1 for those), and the integer grid xg."""
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(xb).all(axis=1)
        amax = np.abs(np.where(np.isfinite(xb), xb, 0)).max(axis=1, initial=np.float32(0))
    special = ~finite | (amax < _TINY)
    amax = np.where(special, np.float32(1), amax).astype(np.float32)
    xs = np.where(special[:, None], np.float32(0), xb)
    inv = np.float32(GRID) / amax
    return special, amax, np.rint(xs * inv[:, None]).astype(np.int64)


def quantize(x: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Quantize float32 values (size a multiple of 64) to NSQ4 blocks; returns the raw bytes, 34 per block."""
    xf = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if xf.size % QK:
        raise ValueError(f"NSQ4 quantizes blocks of {QK} values; got {xf.size} values, not a multiple of {QK}")
    special, amax, xg = _grid(xf.reshape(-1, QK))
    nb = xg.shape[0]

    codes = _search(xg, KVALUES, KSCALES)
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


# --- NSQ3 -------------------------------------------------------------------------------------------------------------
NSQ3_BLOCK_BYTES = 2 + QK // 4 + QK // 8
NSQ3_BITS_PER_VALUE = 8 * NSQ3_BLOCK_BYTES / QK
# the tables of ggml-common.h (kvalues_nsq3: Lloyd-Max levels of a unit Gaussian scaled to 127; kscales_nsq3)
NSQ3_KVALUES = np.array([-127, -79, -45, -14, 14, 45, 79, 127], dtype=np.int64)
NSQ3_KSCALES = np.array([81, 85, 89, 93, 97, 102, 107, 112, 117, 122, 128, 134, 140, 147, 154, 161], dtype=np.int64)
_NSQ3_ZERO_CODE = 3  # the code of 0 (ties go to the lower entry)


def quantize_nsq3(x: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Quantize float32 values (size a multiple of 64) to NSQ3 blocks; returns the raw bytes, 26 per block.

    Format: `{ fp16 d; uint8 qs[16]; uint8 qh[8] }`. Value j is `d * NSQ3_KVALUES[code_j]`, code_j = low | high << 2
    with its 2 low bits at bits 2*(j//16) of qs[j % 16] and its high bit at bit j % 8 of qh[j // 8].
    Steps 1-3 are NSQ4's (same grid, 2047 steps of max|x|; same integer code and scale rules, with NSQ3's tables;
    the error sums fit uint32). Step 4 differs: d = (amax/2047) * (sum(xg*v) / sum(v*v)) in float32, v the codes'
    table values: the least-squares fit, not the norm.
    """
    xf = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if xf.size % QK:
        raise ValueError(f"NSQ3 quantizes blocks of {QK} values; got {xf.size} values, not a multiple of {QK}")
    special, amax, xg = _grid(xf.reshape(-1, QK))
    nb = xg.shape[0]

    codes = _search(xg, NSQ3_KVALUES, NSQ3_KSCALES)
    v = NSQ3_KVALUES[codes]
    ratio = (xg * v).sum(axis=1).astype(np.float32) / (v * v).sum(axis=1).astype(np.float32)
    d = (amax / np.float32(GRID)) * ratio
    d = np.minimum(d.astype(np.float32), _FP16_MAX).astype(np.float16)
    d = np.where(special, np.float16(0), d)
    codes = np.where(special[:, None], _NSQ3_ZERO_CODE, codes)

    lo, hi = codes & 3, codes >> 2
    out = np.empty((nb, NSQ3_BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(nb, 2)
    out[:, 2:18] = (lo.reshape(nb, 4, 16) << (2 * np.arange(4))[None, :, None]).sum(axis=1).astype(np.uint8)
    out[:, 18:] = (hi.reshape(nb, 8, 8) << np.arange(8)[None, None, :]).sum(axis=2).astype(np.uint8)
    return out.reshape(-1)


def nsq3_codes(blocks: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """The 3-bit codes of raw NSQ3 bytes, one row of 64 per block."""
    raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1)
    if raw.size % NSQ3_BLOCK_BYTES:
        raise ValueError(f"NSQ3 data is made of {NSQ3_BLOCK_BYTES}-byte blocks; got {raw.size} bytes")
    b = raw.reshape(-1, NSQ3_BLOCK_BYTES).astype(np.int64)
    lo = (b[:, None, 2:18] >> (2 * np.arange(4))[None, :, None]) & 3  # [block, j // 16, j % 16]
    hi = (b[:, 18:, None] >> np.arange(8)[None, None, :]) & 1        # [block, j // 8, j % 8]
    return lo.reshape(-1, QK) | (hi.reshape(-1, QK) << 2)


def dequantize_nsq3(blocks: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Dequantize raw NSQ3 bytes (26 per block) to float32."""
    codes = nsq3_codes(blocks)
    raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, NSQ3_BLOCK_BYTES)
    d = raw[:, :2].copy().view("<f2").astype(np.float32)
    return (d * NSQ3_KVALUES[codes].astype(np.float32)).reshape(-1)
