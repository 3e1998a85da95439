"""The memory a llama.cpp KV cache really takes."""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from typing import Any

_KV_LINE = re.compile(r"llama_kv_cache: size = .*?K \((\w+)\):\s*([0-9.]+) MiB, V \((\w+)\):\s*([0-9.]+) MiB")


def bits_per_value(type_name: str) -> float:
    from nsq_local import cquant

    qk, size = cquant.block_info(type_name)
    return 8.0 * size / qk


@dataclass
class KVCacheSize:
    """Sizes reported by llama.cpp's KV cache(s) as they were allocated (a sliding-window model has two)."""

    type_k: str = "f16"
    type_v: str = "f16"
    k_mib: float = 0.0
    v_mib: float = 0.0
    caches: int = 0

    @property
    def mib(self) -> float:
        return self.k_mib + self.v_mib

    @property
    def f16_mib(self) -> float:
        """The same cache with f16 K and V: the same number of values at 16 bits each."""
        return self.k_mib * 16 / bits_per_value(self.type_k) + self.v_mib * 16 / bits_per_value(self.type_v)


@dataclass
class _LogTap:
    size: KVCacheSize = field(default_factory=KVCacheSize)

    def __call__(self, level: int, text: bytes, user_data: Any) -> None:
        line = text.decode("utf-8", "replace")
        m = _KV_LINE.search(line)
        if m:
            self.size.type_k, self.size.type_v = m.group(1), m.group(3)
            self.size.k_mib += float(m.group(2))
            self.size.v_mib += float(m.group(4))
            self.size.caches += 1
        from llama_cpp import _logger

        # llama_cpp's own callback prints when verbose and keeps the error that a failing call is explained by
        _logger.llama_log_callback(level, text, user_data)


def open_llama(verbose: bool = False, **kwargs: Any):
    """llama_cpp.Llama(**kwargs), and the KV cache's size read from llama.cpp's own allocation log."""
    import llama_cpp
    from llama_cpp import _logger

    tap = _LogTap()
    callback = llama_cpp.llama_log_callback(tap)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(verbose=verbose, **kwargs)
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if not tap.size.caches:
        raise RuntimeError("llama.cpp did not report its KV cache size; is this the patched llama_cpp?")
    return llm, tap.size
