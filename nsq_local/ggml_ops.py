"""ggml's devices, and one ggml op at a time on one of them, through ctypes on the installed libraries (which
nsq_local._common opens): the op's tensors are described in a no-alloc context, the device is asked whether it
supports the op, and only then are they allocated on it, filled, computed and read back. nsq-selftest runs its op
checks with it; capture.model_params names devices with it.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np
import numpy.typing as npt

from nsq_local._common import ggml_base, ggml_registry, type_id


class InitParams(ctypes.Structure):
    """ggml.h's struct ggml_init_params, which ggml_init takes by value."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


GGML_PREC_F32 = 10  # ggml.h's enum ggml_prec: accumulate in float32, as llama.cpp asks of its flash attention

# ggml-backend.h's enum ggml_backend_dev_type
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}

_P = ctypes.c_void_p
# the graph and backend functions of ggml-base called here: name -> (restype, argtypes)
_GRAPH_API = {
    "ggml_version": (ctypes.c_char_p, []),
    "ggml_tensor_overhead": (ctypes.c_size_t, []),
    "ggml_graph_overhead": (ctypes.c_size_t, []),
    "ggml_init": (_P, [InitParams]),
    "ggml_free": (None, [_P]),
    "ggml_new_tensor_1d": (_P, [_P, ctypes.c_int, ctypes.c_int64]),
    "ggml_new_tensor_2d": (_P, [_P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
    "ggml_new_tensor_3d": (_P, [_P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
    "ggml_set_rows": (_P, [_P, _P, _P, _P]),
    "ggml_get_rows": (_P, [_P, _P, _P]),
    "ggml_cpy": (_P, [_P, _P, _P]),
    "ggml_flash_attn_ext": (_P, [_P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float, ctypes.c_float]),
    "ggml_prec_set_acc": (ctypes.c_bool, [_P, ctypes.c_int]),
    "ggml_new_graph": (_P, [_P]),
    "ggml_build_forward_expand": (None, [_P, _P]),
    "ggml_backend_dev_name": (ctypes.c_char_p, [_P]),
    "ggml_backend_dev_description": (ctypes.c_char_p, [_P]),
    "ggml_backend_dev_type": (ctypes.c_int, [_P]),
    "ggml_backend_dev_memory": (None, [_P, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]),
    "ggml_backend_dev_backend_reg": (_P, [_P]),
    "ggml_backend_dev_init": (_P, [_P, ctypes.c_char_p]),
    "ggml_backend_dev_supports_op": (ctypes.c_bool, [_P, _P]),
    "ggml_backend_reg_get_proc_address": (_P, [_P, ctypes.c_char_p]),
    "ggml_backend_alloc_ctx_tensors": (_P, [_P, _P]),
    "ggml_backend_buffer_free": (None, [_P]),
    "ggml_backend_tensor_set": (None, [_P, _P, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_graph_compute": (ctypes.c_int, [_P, _P]),
    "ggml_backend_free": (None, [_P]),
}


@lru_cache(maxsize=None)
def ggml_graph_api() -> ctypes.CDLL:
    """ggml-base with the signatures of what building and running one op on a backend device takes: contexts,
    tensors, the ops nsq-selftest checks, graphs, devices, buffers."""
    base = ggml_base()
    for name, (restype, argtypes) in _GRAPH_API.items():
        fn = getattr(base, name)
        fn.restype, fn.argtypes = restype, argtypes
    return base


# --- devices ----------------------------------------------------------------------------------------------------------


@dataclass
class Device:
    ptr: int
    name: str
    description: str
    kind: str  # DEVICE_TYPES' name: CPU, GPU, IGPU, ACCEL
    memory_total_mib: int

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "type": self.kind,
                "memory_total_mib": self.memory_total_mib}


def devices() -> list[Device]:
    """Every ggml backend device of this build, in ggml's order (the CPU's place included)."""
    reg, api = ggml_registry(), ggml_graph_api()
    out = []
    for i in range(reg.ggml_backend_dev_count()):
        dev = reg.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        api.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(dev, api.ggml_backend_dev_name(dev).decode(), api.ggml_backend_dev_description(dev).decode(),
                          DEVICE_TYPES.get(api.ggml_backend_dev_type(dev), "?"), total.value >> 20))
    return out


class Backend:
    """A ggml backend on one device, running one op at a time (`run`)."""

    _set_n_threads_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)

    def __init__(self, dev: Device, threads: int):
        api = ggml_graph_api()
        self.dev = dev
        self.ptr = api.ggml_backend_dev_init(dev.ptr, None)
        if not self.ptr:
            raise RuntimeError(f"ggml could not start a backend on {dev.name} ({dev.description})")
        fn = api.ggml_backend_reg_get_proc_address(api.ggml_backend_dev_backend_reg(dev.ptr),
                                                   b"ggml_backend_set_n_threads")
        if fn:  # the CPU backend (and others that use CPU threads)
            self._set_n_threads_t(fn)(self.ptr, threads)

    def close(self) -> None:
        if self.ptr:
            ggml_graph_api().ggml_backend_free(self.ptr)
            self.ptr = None

    def run(self, build: Callable[["OpGraph"], int]) -> Optional[npt.NDArray[np.uint8]]:
        """The bytes of the op that build() makes in an OpGraph (its inputs given there), computed on this device;
        None when the device does not support the op."""
        g = OpGraph()
        try:
            out = build(g)
            return g.compute(self, out)
        finally:
            g.close()


class OpGraph:
    """A no-alloc ggml context holding one op and its inputs: tensors are described first, the device is asked
    whether it supports the op, and only then are they allocated on it, filled and computed."""

    def __init__(self, n_tensors: int = 8):
        api = ggml_graph_api()
        self.ctx = api.ggml_init(InitParams(api.ggml_tensor_overhead() * n_tensors + api.ggml_graph_overhead(),
                                            None, True))
        self.inputs: list[tuple[int, npt.NDArray]] = []

    def tensor(self, type_name: str, shape: Sequence[int], data: Optional[npt.NDArray] = None) -> int:
        """A tensor of ggml shape (ne0, ne1[, ne2]) whose content will be `data`'s bytes."""
        api = ggml_graph_api()
        make = {1: api.ggml_new_tensor_1d, 2: api.ggml_new_tensor_2d, 3: api.ggml_new_tensor_3d}[len(shape)]
        t = make(self.ctx, type_id(type_name), *shape)
        if data is not None:
            self.inputs.append((t, np.ascontiguousarray(data)))
        return t

    def compute(self, backend: Backend, out: int) -> Optional[npt.NDArray[np.uint8]]:
        api = ggml_graph_api()
        if not api.ggml_backend_dev_supports_op(backend.dev.ptr, out):
            return None
        buf = api.ggml_backend_alloc_ctx_tensors(self.ctx, backend.ptr)
        if not buf:
            raise RuntimeError(f"ggml could not allocate the tensors on {backend.dev.name}")
        try:
            for t, data in self.inputs:
                size = api.ggml_nbytes(t)
                if data.nbytes != size:
                    raise ValueError(f"input of {data.nbytes} bytes for a tensor of {size}")
                api.ggml_backend_tensor_set(t, data.ctypes.data, 0, size)
            gf = api.ggml_new_graph(self.ctx)
            api.ggml_build_forward_expand(gf, out)
            status = api.ggml_backend_graph_compute(backend.ptr, gf)
            if status != 0:
                raise RuntimeError(f"ggml_backend_graph_compute returned status {status}")
            got = np.empty(api.ggml_nbytes(out), dtype=np.uint8)
            api.ggml_backend_tensor_get(out, got.ctypes.data, 0, got.size)
            return got
        finally:
            api.ggml_backend_buffer_free(buf)

    def close(self) -> None:
        if self.ctx:
            ggml_graph_api().ggml_free(self.ctx)
            self.ctx = None
