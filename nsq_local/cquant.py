"""ggml's own quantizers, called through ctypes from the shared libraries of the installed (patched) llama_cpp.

`quantize(..., path="ref")` runs the type's reference (`quantize_row_X_ref`, via ggml_quantize_chunk);
`path="cpu"` runs the CPU backend's `from_float`, the code set_rows uses when a token is stored in the cache.
"""
from __future__ import annotations

import ctypes
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from nsq_local._common import type_id

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_from_float_t = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", _to_float_t),
        ("from_float_ref", _from_float_t),
    ]


class _TypeTraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", _from_float_t)]  # leading field of ggml-cpu.h's ggml_type_traits_cpu


def lib_dir() -> Path:
    """Where the shared libraries are: $LLAMA_CPP_LIB_PATH (as llama_cpp itself honours), else llama_cpp/lib."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama_cpp is not installed: install nsq-local (pip install .)")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _load(name: str) -> ctypes.CDLL:
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    prefix = "" if sys.platform == "win32" else "lib"
    path = lib_dir() / f"{prefix}{name}{suffix}"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is the patched llama_cpp installed (pip install .)?")
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


@lru_cache(maxsize=None)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    base = _load("ggml-base")
    cpu = _load("ggml-cpu")
    base.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    base.ggml_type_name.restype = ctypes.c_char_p
    base.ggml_type_name.argtypes = [ctypes.c_int]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    base.ggml_quantize_init.argtypes = [ctypes.c_int]
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()
    return base, cpu


def block_info(name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    base, _ = _libs()
    t = base.ggml_get_type_traits(type_id(name)).contents
    return t.blck_size, t.type_size


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
