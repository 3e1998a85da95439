"""What nsq-local's modules share, each fact once: cache-type names, the flash-attention switch, the environment
llama.cpp reads, llama.cpp's log, the native ggml libraries and the command-line tools' conventions.

It imports nothing else of nsq_local. The ggml type names and ids, and the set of unquantized types, are the
binding's (`llama_cpp.llama.GGML_TYPE_NAMES`, `ggml_type_from_name`, `GGML_UNQUANTIZED_TYPES`, from the
python-nsq-types-and-calibration patch). This module is the only one that reaches into llama_cpp's private
`_logger` (the log callback that prints what the verbosity lets through and keeps the error the binding's exceptions
quote), and the only one that opens the ggml libraries.
"""
from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

# --- cache types ------------------------------------------------------------------------------------------------------

# nsq-local's types: as shipped, a K cache of one is centered by a calibration (nsq_local.calibrate)
NSQ_TYPES = ("nsq4", "nsq3")
# llama.cpp's `-ctk/-ctv` choices, plus ours; any other ggml type name is accepted by llama_cpp as well
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", *NSQ_TYPES)
# the measuring tools take these names for the same K caches without centering, to show what centering is worth
_UNCENTERED_SUFFIX = "-uncentered"
UNCENTERED = tuple(t + _UNCENTERED_SUFFIX for t in NSQ_TYPES)


def storage_type(name: str) -> str:
    """The ggml type a measured cache-type name stores its values in."""
    return name[:-len(_UNCENTERED_SUFFIX)] if name in UNCENTERED else name


def centers_k(type_k: Union[str, int]) -> bool:
    """Whether llama.cpp centers a K cache of this ggml type (name or GGML_TYPE_* value) by a calibration."""
    return type_id(type_k) in {type_id(t) for t in NSQ_TYPES}


def type_id(name: Union[str, int]) -> int:
    """The GGML_TYPE_* value of a ggml type name (any case); a ValueError lists the valid names."""
    from llama_cpp.llama import ggml_type_from_name

    return ggml_type_from_name(name)


def is_quantized(name: Union[str, int]) -> bool:
    """Whether a ggml type is quantized: upstream rotates only these, and a V cache of one needs flash attention."""
    from llama_cpp import llama

    # the binding's set, as Llama() decides whether V needs flash attention
    return type_id(name) not in llama.GGML_UNQUANTIZED_TYPES


# --- flash attention --------------------------------------------------------------------------------------------------

# the -fa/--flash-attn choices, as llama.cpp's tools spell them, and what llama_cpp.Llama's flash_attn takes for each
FLASH_ATTN = {"on": True, "off": False, "auto": None}


def flash_attn_type(flash_attn: Optional[bool]) -> int:
    """llama_context_params.flash_attn_type for FLASH_ATTN's values (None: llama.cpp decides)."""
    import llama_cpp

    return {True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]


# --- the environment llama.cpp reads ----------------------------------------------------------------------------------

ROT_DISABLE_ENV = "LLAMA_ATTN_ROT_DISABLE"  # "1": no Hadamard rotation of a quantized cache (read as it is created)


@contextmanager
def scoped_env(values: dict[str, Optional[str]]) -> Iterator[None]:
    """Sets environment variables for a `with` block (None: unset) and puts back what was there before."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(saved)


def _set_env(values: dict[str, Optional[str]]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --- llama.cpp's log --------------------------------------------------------------------------------------------------


class LogTap:
    """llama.cpp's log while installed (a `with` block): each line is kept (the last `keep`) and given to `on_line`,
    then handed on to llama_cpp's own callback, which prints what its verbosity lets through and keeps the error
    that the binding's exceptions quote. Leaving the block puts back the callback it found; a tap can be installed
    again and again (and inside itself)."""

    def __init__(self, on_line: Optional[Callable[[str], None]] = None, keep: int = 2000) -> None:
        import llama_cpp

        self.lines: deque[str] = deque(maxlen=keep)
        self.on_line = on_line
        self._callback = llama_cpp.llama_log_callback(self._log)
        self._found: list[tuple[object, ctypes.c_void_p]] = []

    def _log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        from llama_cpp import _logger

        line = text.decode("utf-8", "replace")
        self.lines.append(line)
        if self.on_line is not None:
            self.on_line(line)
        _logger.llama_log_callback(level, text, user_data)

    def __enter__(self) -> "LogTap":
        import llama_cpp

        found, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(found), ctypes.byref(data))
        self._found.append((found, data))
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        import llama_cpp

        found, data = self._found.pop()
        llama_cpp.llama_log_set(found, data)

    def tail(self, n: int = 8) -> str:
        return "".join(list(self.lines)[-n:]).strip()


@contextmanager
def log_verbosity(verbose: bool) -> Iterator[None]:
    """llama_cpp's log verbosity for a `with` block (quiet: errors only), then the one found before."""
    from llama_cpp import _logger

    level = _logger.logger.level
    _logger.set_verbose(verbose)
    try:
        yield
    finally:
        _logger.logger.setLevel(level)


# --- the native ggml libraries ----------------------------------------------------------------------------------------


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
def ggml_registry() -> ctypes.CDLL:
    """ggml (the backend registry), after llama.cpp has registered its backends (llama_backend_init loads them in a
    build with loadable backends), with the signatures of the device list."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    reg = _load("ggml")
    reg.ggml_backend_dev_count.restype = ctypes.c_size_t
    reg.ggml_backend_dev_count.argtypes = []
    reg.ggml_backend_dev_get.restype = ctypes.c_void_p
    reg.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    reg.ggml_backend_dev_by_name.restype = ctypes.c_void_p
    reg.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
    return reg


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


# --- the command-line tools -------------------------------------------------------------------------------------------

EXIT_USAGE = 2  # the exit status of a usage error, as argparse's


class UsageError(ValueError):
    """A tool's arguments or input files do not make a run: the message says what to change."""


def nsq_calib_arg(value: Optional[str]) -> Union[None, bool, Path]:
    """--nsq-calib FILE|none as llama_cpp.Llama's nsq_calib takes it: None (the default), False (none) or a file."""
    return None if value is None else False if value == "none" else Path(value)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install matplotlib (or nsq-local's `plots` extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
