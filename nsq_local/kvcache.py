"""The memory a llama.cpp KV cache really takes."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nsq_local._common import LogTap

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

    def read_log_line(self, line: str) -> None:
        """Counts a cache that a line of llama.cpp's log reports as allocated."""
        m = _KV_LINE.search(line)
        if m:
            self.type_k, self.type_v = m.group(1), m.group(3)
            self.k_mib += float(m.group(2))
            self.v_mib += float(m.group(4))
            self.caches += 1


def open_llama(verbose: bool = False, **kwargs: Any):
    """llama_cpp.Llama(**kwargs), and the KV cache's size read from llama.cpp's own allocation log."""
    import llama_cpp

    size = KVCacheSize()
    with LogTap(on_line=size.read_log_line):
        llm = llama_cpp.Llama(verbose=verbose, **kwargs)
    if not size.caches:
        raise RuntimeError("llama.cpp did not report its KV cache size; is this the patched llama_cpp?")
    return llm, size
