"""llama.cpp's KV cache in numpy: upstream's Hadamard rotation of a quantized cache, a cache type's store-and-read
round trip, and the attention that reads the cache. nsq-kv, the calibration's per-layer check and bench/ use them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import numpy.typing as npt

from nsq_local import cquant, reference


def hadamard(n: int) -> npt.NDArray[np.float32]:
    """ggml_gen_hadamard of llama-kv-cache.cpp: the orthonormal Sylvester matrix, built in float32 (H @ H = I)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block must be a power of two, not {n}")
    h = np.zeros((n, n), dtype=np.float32)
    h[0, 0] = np.float32(1.0) / np.sqrt(np.float32(n))
    s = 1
    while s < n:
        h[s:2 * s, :s] = h[:s, :s]
        h[:s, s:2 * s] = h[:s, :s]
        h[s:2 * s, s:2 * s] = -h[:s, :s]
        s *= 2
    return h


def rot_block_k(head_dim: int) -> Optional[int]:
    """build_input_k_rot: the largest power of two >= 64 dividing the head size; None when upstream does not rotate."""
    if head_dim % 64:
        return None
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


def rot_block_v(head_dim: int) -> Optional[int]:
    """build_input_v_rot: always 64 (upstream finds smaller V rotations better)."""
    return 64 if head_dim % 64 == 0 else None


def rotate(x: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
    """llama_mul_mat_hadamard: every run of n values along the last axis times H (its own inverse)."""
    h = hadamard(n)
    return (x.reshape(-1, n) @ h.T).reshape(x.shape).astype(np.float32)


def roundtrip(type_name: str, x: npt.NDArray[np.float32], rot: Optional[int]) -> npt.NDArray[np.float32]:
    """x (n_tokens, n_heads, head_dim) stored in a cache of type_name and read back, as llama.cpp does it."""
    rows = rotate(x, rot) if rot else x
    flat = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1)
    if type_name == "nsq4":
        back = reference.dequantize(reference.quantize(flat))
    else:
        back = cquant.dequantize(type_name, cquant.quantize(type_name, flat, path="cpu"))
    back = back.reshape(x.shape)
    return rotate(back, rot) if rot else back


def rel_err(x: npt.NDArray[np.float32], y: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Per head: sqrt(sum (y - x)^2 / sum x^2) over tokens and channels."""
    d = (y.astype(np.float64) - x) ** 2
    return np.sqrt(d.sum(axis=(0, 2)) / np.maximum((x.astype(np.float64) ** 2).sum(axis=(0, 2)), 1e-30))


def attention(q: npt.NDArray[np.float32], k: npt.NDArray[np.float32],
              v: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Causal softmax attention with grouped KV heads: q (T, H, d), k/v (T, H_kv, d) -> (T, H, d)."""
    t, n_head, d = q.shape
    group = n_head // k.shape[1]
    kk = np.repeat(k, group, axis=1).transpose(1, 2, 0)  # (H, d, T)
    vv = np.repeat(v, group, axis=1).transpose(1, 0, 2)  # (H, T, d)
    s = np.matmul(q.transpose(1, 0, 2), kk) * np.float32(1 / np.sqrt(d))  # (H, T, T)
    s[:, np.triu(np.ones((t, t), dtype=bool), 1)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.matmul(p, vv).transpose(1, 0, 2)


def cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-30)))
