#!/usr/bin/env python3
"""Fuzzes the NSQ4 quantizer: numpy reference, ggml's quantize_row_nsq4_ref and the CPU backend's from_float.

    python tests/fuzz/nsq4_fuzz.py -max_total_time=60 CORPUS_DIR [SEED_DIR...]   # atheris (libFuzzer flags)

Every input is turned into 1 to 8 blocks of float32 values (see `blocks_from_bytes`); `check` then requires the
three quantizers to agree bit for bit, d to be finite and non-negative, dequantization to give no NaN or Inf, and
a block holding NaN or Inf to be stored as zeros. A failing input is written as crash-<sha1> by libFuzzer; replay it
with `python tests/fuzz/nsq4_fuzz.py crash-...` (or add it to tests/fuzz/corpus/, which tests/test_fuzz.py replays).
The expected output is always the reference's, never a stored one, so the corpus outlives changes to the format.
"""
from __future__ import annotations

import struct
import sys

import numpy as np

QK = 64
MAX_BLOCKS = 8
# values that sit on the quantizer's edges: signed zeros, NaN, infinities, float32 and fp16 denormals, the 2^-24
# zero threshold, fp16's largest finite values and the first beyond, float32's largest
PALETTE = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, 1e-40, 2.0**-24, 2.0**-24 * (1 - 2.0**-24),
                    6.0e-8, 65504.0, 65520.0, 1e6, 3e38, 3.4028235e38, 1.0], dtype=np.float32)


def blocks_from_bytes(data: bytes) -> np.ndarray:
    """1 to 8 blocks of float32 from raw bytes; the first byte's low 7 bits pick how the rest is read."""
    with np.errstate(over="ignore", invalid="ignore"):  # inf * 0 and overflow are inputs we want
        return _blocks(data)


def _blocks(data: bytes) -> np.ndarray:
    if not data:
        return np.zeros(QK, dtype=np.float32)
    mode, flag, body = (data[0] & 0x7F) % 5, data[0] & 0x80, data[1:]
    if mode == 0:  # raw float32 bit patterns: every NaN payload, denormal and infinity
        n = len(body) // 4
        x = np.frombuffer(body[: 4 * n], dtype="<f4").astype(np.float32)
    elif mode == 1:  # raw fp16 bit patterns, widened: fp16's own edges
        n = len(body) // 2
        x = np.frombuffer(body[: 2 * n], dtype="<f2").astype(np.float32)
    elif mode == 2:  # edge values with a sign and a power-of-two scale each
        b = np.frombuffer(body, dtype=np.uint8).astype(np.int32)
        x = PALETTE[b & 15] * np.where(b & 16, np.float32(-1), np.float32(1)) * np.float32(2.0) ** ((b >> 5) * 4 - 12)
    elif mode == 3:  # int8 values times one scale (denormal to near float max), plus one huge channel per block
        if len(body) < 4:
            body = body + bytes(4 - len(body))
        exp, channel, huge = body[0], body[1] % QK, body[2]
        x = np.frombuffer(body[3:], dtype=np.int8).astype(np.float32) * np.float32(2.0 ** (exp - 140))
        x = np.resize(x, max(QK, -(-x.size // QK) * QK)) if x.size else np.zeros(QK, dtype=np.float32)
        x.reshape(-1, QK)[:, channel] *= np.float32(2.0 ** (huge % 48))
    else:  # grid-aligned integers: values on the rounding ties and code thresholds after scaling to +-2047
        v = np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.float32)
        x = np.clip(v, -2047, 2047) / np.float32(2.0 if flag else 1.0)
        if x.size:
            x[0] = np.float32(2047)
    nb = min(MAX_BLOCKS, max(1, -(-x.size // QK)))
    out = np.zeros(nb * QK, dtype=np.float32)
    take = min(x.size, out.size)
    out[:take] = x[:take]
    if 0 < take < out.size:  # pad by repetition, so a short input still fills its block with its own values
        out[take:] = np.resize(x[:take], out.size - take)
    return out


def check(x: np.ndarray) -> None:
    """The quantizers agree bit for bit and never write a non-finite value into the cache."""
    from nsq_local import cquant
    from nsq_local import reference as ref

    want = ref.quantize(x)
    for path in ("ref", "cpu"):
        got = cquant.quantize("nsq4", x, path)
        bad = np.flatnonzero((got != want).reshape(-1, ref.BLOCK_BYTES).any(axis=1))
        if bad.size:
            i = bad[0]
            raise AssertionError(f"ggml {path} quantizer differs from the numpy reference in blocks {bad.tolist()}; "
                                 f"block {i}: input {x.reshape(-1, QK)[i].tolist()}, ggml "
                                 f"{got.reshape(-1, ref.BLOCK_BYTES)[i].tolist()}, reference "
                                 f"{want.reshape(-1, ref.BLOCK_BYTES)[i].tolist()}")
    blocks = want.reshape(-1, ref.BLOCK_BYTES)
    d = blocks[:, :2].copy().view("<f2")[:, 0]
    if not (np.isfinite(d).all() and (d >= 0).all()):
        raise AssertionError(f"d must be finite and non-negative, got {d.tolist()}")
    y = cquant.dequantize("nsq4", want)
    if not np.isfinite(y).all():
        raise AssertionError(f"dequantized blocks hold NaN/Inf: {np.flatnonzero(~np.isfinite(y)).tolist()}")
    if not np.array_equal(y, ref.dequantize(want)):
        raise AssertionError("ggml's dequantize_row_nsq4 differs from the numpy reference")
    nonfinite = ~np.isfinite(x.reshape(-1, QK)).all(axis=1)
    if y.reshape(-1, QK)[nonfinite].any():
        raise AssertionError("a block holding NaN or Inf must be stored as zeros")


def test_one_input(data: bytes) -> None:
    check(blocks_from_bytes(data))


def main() -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("nsq4_fuzz: atheris is not installed: pip install atheris")
    # Coverage feedback: the input modes only. The C code is not instrumented and the reference is branch-free numpy;
    # instrumenting it (or `check`) makes atheris trace every array comparison, which costs ~20 kB per input.
    atheris.instrument_func(_blocks)
    # 8 blocks of float32 plus the mode byte; longer inputs only repeat what these cover
    argv = list(sys.argv)
    if not any(a.startswith("-max_len") for a in argv):
        argv.append(f"-max_len={1 + 4 * QK * MAX_BLOCKS}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
