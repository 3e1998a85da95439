"""What nsq-local's modules share, each fact once: cache-type names, the flash-attention switch and the native ggml
libraries.

It imports nothing else of nsq_local. The ggml type names and ids are the binding's (`llama_cpp.llama.GGML_TYPE_NAMES`
and `ggml_type_from_name`, patch 0006); this module is the only one that opens the ggml libraries.
"""
from __future__ import annotations

import ctypes
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

# --- cache types ------------------------------------------------------------------------------------------------

# llama.cpp's `-ctk/-ctv` choices, plus ours; any other ggml type name is accepted by llama_cpp as well
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "nsq4")
# nsq4 as shipped centers K by a calibration (nsq_local.calibrate); the measuring tools take this name for the same
# K cache without centering, to show what centering is worth
UNCENTERED = "nsq4-uncentered"


def storage_type(name: str) -> str:
    """The ggml type a measured cache-type name stores its values in."""
    return "nsq4" if name == UNCENTERED else name


def type_id(name: Union[str, int]) -> int:
    """The GGML_TYPE_* value of a ggml type name (any case); a ValueError lists the valid names."""
    from llama_cpp.llama import ggml_type_from_name

    return ggml_type_from_name(name)


def is_quantized(name: Union[str, int]) -> bool:
    """Whether a ggml type is quantized: upstream rotates only these, and a V cache of one needs flash attention."""
    from llama_cpp import llama

    # the binding's set, as Llama() decides whether V needs flash attention
    return type_id(name) not in llama._GGML_UNQUANTIZED_TYPES


# --- flash attention ----------------------------------------------------------------------------------------------

# the -fa/--flash-attn choices, as llama.cpp's tools spell them, and what llama_cpp.Llama's flash_attn takes for each
FLASH_ATTN = {"on": True, "off": False, "auto": None}


def flash_attn_type(flash_attn: Optional[bool]) -> int:
    """llama_context_params.flash_attn_type for FLASH_ATTN's values (None: llama.cpp decides)."""
    import llama_cpp

    return {True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]


# --- the native ggml libraries ------------------------------------------------------------------------------------


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
    # the file libllama itself links: the loader hands back the library already in the process
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


@lru_cache(maxsize=None)
def ggml_base() -> ctypes.CDLL:
    """ggml-base, with the signatures of the functions nsq-local calls: type traits, quantization, tensors."""
    base = _load("ggml-base")
    base.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    base.ggml_type_name.restype = ctypes.c_char_p
    base.ggml_type_name.argtypes = [ctypes.c_int]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    base.ggml_quantize_init.argtypes = [ctypes.c_int]
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_nbytes.argtypes = [ctypes.c_void_p]
    base.ggml_backend_tensor_get.restype = None
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return base


@lru_cache(maxsize=None)
def ggml_cpu() -> ctypes.CDLL:
    """ggml-cpu, initialized, with the signature of its type traits (the CPU backend's from_float)."""
    ggml_base()  # loaded first: ggml-cpu links it
    cpu = _load("ggml-cpu")
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()
    return cpu
