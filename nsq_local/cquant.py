"""ggml's own quantizers, called through ctypes from the shared libraries of the installed (patched) llama_cpp
(nsq_local._common opens them).

`quantize(..., path="ref")` runs the type's reference (`quantize_row_X_ref`, via ggml_quantize_chunk);
`path="cpu"` runs the CPU backend's `from_float`, the code set_rows uses when a token is stored in the cache.
"""
from __future__ import annotations

import ctypes
from typing import Literal

import numpy as np
import numpy.typing as npt

from nsq_local._common import ggml_base, ggml_cpu, type_id


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    return ggml_base(), ggml_cpu()  # ggml-cpu initialized, as the CPU backend's quantizers need


def block_info(name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    base, _ = _libs()
    t = base.ggml_get_type_traits(type_id(name)).contents
    return t.blck_size, t.type_size


def bits_per_value(name: str) -> float:
    """What a ggml type stores per value, its block's share included."""
    qk, size = block_info(name)
    return 8.0 * size / qk


def quantize(name: str, x: npt.ArrayLike, path: Literal["ref", "cpu"] = "ref") -> npt.NDArray[np.uint8]:
    base, cpu = _libs()
    tid = type_id(name)
    qk, size = block_info(name)
    xf = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if xf.size % qk:
        raise ValueError(f"{name} quantizes blocks of {qk} values; {xf.size} is not a multiple")
    out = np.zeros(xf.size // qk * size, dtype=np.uint8)
    src = xf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if path == "ref":
        base.ggml_quantize_init(tid)
        base.ggml_quantize_chunk(tid, src, out.ctypes.data, 0, 1, xf.size, None)
    elif path == "cpu":
        from_float = cpu.ggml_get_type_traits_cpu(tid).contents.from_float
        if not from_float:
            raise ValueError(f"the CPU backend has no from_float for {name}")
        from_float(src, out.ctypes.data, xf.size)
    else:
        raise ValueError(f"path must be 'ref' or 'cpu', not {path!r}")
    return out


def dequantize(name: str, raw: npt.ArrayLike) -> npt.NDArray[np.float32]:
    base, _ = _libs()
    qk, size = block_info(name)
    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if data.size % size:
        raise ValueError(f"{name} data is made of {size}-byte blocks; got {data.size} bytes")
    y = np.empty(data.size // size * qk, dtype=np.float32)
    base.ggml_get_type_traits(type_id(name)).contents.to_float(
        data.ctypes.data, y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), y.size)
    return y
