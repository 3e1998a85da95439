"""NSQ4 and NSQ3 in numpy, bit-exact with ggml's `quantize_row_nsq4_ref` / `dequantize_row_nsq4` and
`quantize_row_nsq3_ref` / `dequantize_row_nsq3` (the ggml-nsq-types-and-cpu-reference patch). NSQ4 is below; NSQ3
differs in its codes and its d, see `quantize_nsq3`.

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


def _grid(x: npt.ArrayLike, name: str) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Steps 1 and 2 for float32 values (a multiple of 64; name: the type, for the error), per block: which blocks
    are stored as zero, max|x| (1 for those), and the integer grid xg."""
    xf = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if xf.size % QK:
        raise ValueError(f"{name} quantizes blocks of {QK} values; got {xf.size} values, not a multiple of {QK}")
    xb = xf.reshape(-1, QK)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(xb).all(axis=1)
        amax = np.abs(np.where(np.isfinite(xb), xb, 0)).max(axis=1, initial=np.float32(0))
    special = ~finite | (amax < _TINY)
    amax = np.where(special, np.float32(1), amax).astype(np.float32)
    xs = np.where(special[:, None], np.float32(0), xb)
    inv = np.float32(GRID) / amax
    return special, amax, np.rint(xs * inv[:, None]).astype(np.int64)


def _d_bytes(d: npt.NDArray[np.float32], special: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """Each block's d as its fp16 bytes (blocks, 2): saturated at the fp16 maximum instead of becoming Inf, 0 for the
    blocks stored as zero."""
    d = np.minimum(d.astype(np.float32), _FP16_MAX).astype(np.float16)
    return np.where(special, np.float16(0), d).astype("<f2").view(np.uint8).reshape(-1, 2)


def quantize(x: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Quantize float32 values (size a multiple of 64) to NSQ4 blocks; returns the raw bytes, 34 per block."""
    special, amax, xg = _grid(x, "NSQ4")
    nb = xg.shape[0]

    codes = _search(xg, KVALUES, KSCALES)
    sxx = (xg * xg).sum(axis=1)
    sqq = (KVALUES[codes] ** 2).sum(axis=1)
    d = (amax / np.float32(GRID)) * np.sqrt(sxx.astype(np.float32) / sqq.astype(np.float32))
    codes = np.where(special[:, None], _ZERO_CODE, codes)

    out = np.empty((nb, BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = _d_bytes(d, special)
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
    special, amax, xg = _grid(x, "NSQ3")
    nb = xg.shape[0]

    codes = _search(xg, NSQ3_KVALUES, NSQ3_KSCALES)
    v = NSQ3_KVALUES[codes]
    ratio = (xg * v).sum(axis=1).astype(np.float32) / (v * v).sum(axis=1).astype(np.float32)
    d = (amax / np.float32(GRID)) * ratio
    codes = np.where(special[:, None], _NSQ3_ZERO_CODE, codes)

    lo, hi = codes & 3, codes >> 2
    out = np.empty((nb, NSQ3_BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = _d_bytes(d, special)
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


# --- blocks to check a quantizer with ---------------------------------------------------------------------------------
# One generator for every bit-exactness check (tests/test_reference.py, the CUDA and Metal host tests, the CPU
# kernels' and sanitizer checks through tests/helpers.py, nsq-selftest): what one of them finds hard, all of them get.

_TABLES = {"nsq4": (KVALUES, KSCALES), "nsq3": (NSQ3_KVALUES, NSQ3_KSCALES)}
_F32_MAX = np.finfo(np.float32).max


def _random(rng: np.random.Generator, n: int) -> dict[str, npt.NDArray]:
    gauss = rng.standard_normal((n, QK))
    heavy = rng.standard_t(2, (n, QK))
    # one outlier value in each row, at a channel of its own: a real K cache's outlier channels, as one block sees
    # them
    outlier = rng.standard_normal((n, QK))
    outlier[np.arange(n), rng.integers(0, QK, n)] *= 50
    # norms over many decades: d from fp16 subnormals to thousands
    return {"random": np.concatenate([gauss, heavy, outlier]) * rng.lognormal(0, 3, (3 * n, 1))}


def _special(rng: np.random.Generator) -> dict[str, npt.NDArray]:
    """Special values: what is stored as zero, what saturates d, what has no direction."""
    base = rng.standard_normal(QK)
    ch = np.arange(QK)
    return {
        "all zero": np.zeros(QK),
        "constant": np.full(QK, 0.5),
        "constant negative": np.full(QK, -3.0),
        "one huge among tiny": np.where(ch == 5, 1e4, 1e-3),
        "one value only": np.where(ch == 63, -3.0, 0.0),
        "1e-30 values": np.full(QK, 1e-30),
        "float32 denormals": np.full(QK, 1e-40) * np.sign(base),
        "just above the zero threshold": base / np.abs(base).max() * 2.0**-24,
        "fp16 subnormal d": base * 1e-6,
        "near fp16 max": 65000.0 * np.sign(base),
        "beyond fp16 range": base * 1e6,
        "near float32 max": np.full(QK, 3e38) * np.sign(base),
        "NaN": np.where(ch == 9, np.nan, base),
        "+Inf": np.where(ch == 0, np.inf, base),
        "-Inf": np.where(ch == 63, -np.inf, base),
    }


def _edge(rng: np.random.Generator) -> dict[str, npt.NDArray]:
    """Edges of the arithmetic: the zero threshold itself, the largest floats, sign patterns, integer and half-integer
    grids, and the largest error sums."""
    base = rng.standard_normal(QK)
    tiny = np.float32(2.0**-24)
    return {
        "negative zeros": np.full(QK, -0.0),
        "just below 2^-24": np.full(QK, np.nextafter(tiny, np.float32(0))),
        "exactly 2^-24": np.full(QK, tiny),
        "subnormal with normal": np.concatenate([[1.0], np.full(QK - 1, 1e-40)]),
        "float32 max": np.full(QK, _F32_MAX),
        "huge of both signs": rng.uniform(-3e38, 3e38, QK),
        "d saturates": np.full(QK, 1e9),
        "NaN and huge": np.where(np.arange(QK) == 9, np.nan, 3e38),
        "one huge negative value": np.concatenate([base[1:], [-5e5]]),
        "all negative": -np.abs(base),
        "alternating": np.tile([1.0, -1.0], QK // 2),
        "eighths": np.round(base * 8) / 8,
        "integer grid": np.concatenate([[GRID], rng.integers(-GRID, GRID + 1, QK - 1)]),
        "rint ties": np.concatenate([[GRID], np.arange(QK - 1) - 31.5]),
        # 63 values at max|x|: at NSQ3's clipping scale 81 the error sum passes INT32_MAX (the reference sums in
        # uint32); a wrapped int32 sum would choose that scale, which gives the last value another code
        "error sum past INT32_MAX": np.concatenate([np.tile([1.0, -1.0], QK // 2)[:QK - 1], [900 / GRID]]),
    }


def _on_thresholds(qtype: str) -> npt.NDArray[np.int64]:
    """The grid values xg on a code-search threshold of qtype, 16*xg == (kv[m] + kv[m+1])*S for a scale S (the
    search's ties, which go to the lower code), once per (S, m): a value on several thresholds comes more often."""
    kvalues, kscales = _TABLES[qtype]
    mids = (kvalues[:-1] + kvalues[1:])[None, :] * kscales[:, None]
    on = mids[mids % 16 == 0] // 16
    return on[np.abs(on) <= GRID]


def _code_thresholds(qtype: str) -> dict[str, npt.NDArray]:
    """Every threshold once, in blocks whose max is GRID, so that each lands on the grid exactly."""
    on = np.unique(_on_thresholds(qtype)).astype(np.float64)
    out = {}
    for i in range(0, len(on), QK - 1):
        chunk = on[i:i + QK - 1]
        out[f"code thresholds {i}"] = np.concatenate([[GRID], chunk, np.zeros(QK - 1 - len(chunk))])
    return out


def _code_ties(rng: np.random.Generator, n: int, qtype: str) -> dict[str, npt.NDArray]:
    """n blocks of threshold values with one value at +-GRID (so each lands on the grid exactly), scaled by random
    powers of 2."""
    ties = rng.choice(_on_thresholds(qtype).astype(np.float64), (n, QK))
    ties[np.arange(n), rng.integers(0, QK, n)] = GRID * rng.choice([-1, 1], n)
    return {"code-search ties": ties * 2.0 ** rng.integers(-20, 20, (n, 1))}


def _grid_ties(rng: np.random.Generator, n: int) -> dict[str, npt.NDArray]:
    """n blocks whose x*GRID/max is k + 0.5: the grid's round-half-to-even."""
    half = rng.integers(-2 * GRID, 2 * GRID + 1, (n, QK)) / 2
    half[:, 0] = GRID
    return {"grid rounding ties": half}


def sample_blocks(rng: np.random.Generator | int, kind: str, n: int = 0,
                  qtype: str = "nsq4") -> tuple[npt.NDArray[np.float32], list[str]]:
    """Blocks of 64 float32 values to quantize, (blocks, 64), and the name of each, drawn from rng (a numpy Generator,
    which a caller takes kind after kind from, or a seed). The kinds:

      random           3n blocks: n Gaussian, n heavy-tailed (Student t, 2 degrees of freedom), n with one outlier
                       value each; their norms spread over many decades
      special          named special values: zeros, constants, one value among tiny ones, denormals, fp16 subnormal
                       d, fp16 max and beyond, float32 max, NaN, +-Inf
      edge             named edges: the zero threshold, float32 max, sign patterns, integer and half-integer grids,
                       an error sum past INT32_MAX
      code thresholds  every code-search threshold of qtype's tables, once
      code ties        n blocks of qtype's code-search thresholds at random powers of 2
      grid ties        n blocks on the grid's rounding ties
    """
    rng = np.random.default_rng(rng)
    makers = {"random": lambda: _random(rng, n), "special": lambda: _special(rng), "edge": lambda: _edge(rng),
              "code thresholds": lambda: _code_thresholds(qtype), "code ties": lambda: _code_ties(rng, n, qtype),
              "grid ties": lambda: _grid_ties(rng, n)}
    if kind not in makers:
        raise ValueError(f"no kind of blocks named {kind!r}: {', '.join(makers)}")
    made = makers[kind]()
    blocks = [np.reshape(v, (-1, QK)) for v in made.values()]
    labels = [name for name, b in zip(made, blocks) for _ in range(len(b))]
    return np.concatenate(blocks).astype(np.float32), labels


def sample_raw_blocks(rng: np.random.Generator | int, n: int, qtype: str = "nsq4") -> npt.NDArray[np.uint8]:
    """n blocks of qtype of random bytes with a finite d of either sign (zero, the smallest and largest fp16
    subnormals and 65504 among them), (n, block bytes): every code and scale a cache can hold, not only those the
    quantizer makes."""
    rng = np.random.default_rng(rng)
    block_bytes = {"nsq4": BLOCK_BYTES, "nsq3": NSQ3_BLOCK_BYTES}[qtype]
    d_bits = rng.integers(0, 0x7C00, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    d_bits[:4] = [0x0000, 0x0001, 0x03FF, 0x7BFF]
    out = rng.integers(0, 256, (n, block_bytes), dtype=np.uint8)
    out[:, :2] = d_bits.astype("<u2").view(np.uint8).reshape(n, 2)
    return out
