"""nsq-selftest: checks NSQ4 and NSQ3 on every ggml device of this build and writes a report to send back.

    nsq-selftest                      # every device, the demo model; report in nsq-selftest.json
    nsq-selftest -m model.gguf -t 8 --json report.json

For each device ggml finds (the CPU always; CUDA, Metal, Vulkan, ... where the build has them):

  ops     NSQ4's and NSQ3's operations on random and adversarial data against nsq_local.reference, the numpy
          reference: set_rows and cpy f32 -> nsq4/nsq3 must give the reference's blocks bit for bit, get_rows and
          cpy nsq4/nsq3 -> f32 its values exactly, flash attention over an NSQ4 or NSQ3 cache (head sizes 64, 128,
          256, grouped-query, masked, decode and prefill, V of the same type or f16, K centered or not) the
          attention over the cache's values within the bound stated in the report. An op the device does not
          support is reported as such: ggml runs it on the CPU, which is not a failure.
  model   one KLD window of the model (f16 cache as the baseline, nsq4, nsq3 and q4_0 caches measured against it,
          as nsq-ppl measures) with every layer and the cache on the device, and the decode speed of f16, q4_0 and
          nsq4 caches after a prefill of --depth tokens.

The report (versions, devices, one line per check with its figures) goes to stdout and, as JSON, to --json; the
JSON is rewritten before each check, so after a crash it names the check that was running. Exit status: 0 when no
check failed, 1 when one did, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import numpy.typing as npt

from nsq_local import reference as ref
from nsq_local._common import (DEVICE_TYPES, EXIT_USAGE, GGML_PREC_F32, NSQ_TYPES, InitParams, UsageError,
                               ggml_graph_api, ggml_registry, type_id)

PASS, FAIL, UNSUPPORTED, SKIPPED = "pass", "fail", "unsupported", "skipped"
UNSUPPORTED_NOTE = "not supported on this device, runs on the CPU"
ROW = 128  # values per row in the store/read checks: two blocks, as a head of 128 is stored

# Flash attention's bounds on max|error|, in units of the case's largest |V|. The reference is the attention in
# float64 over exactly the values the cache holds (the reference's dequantization, plus the mean for centered K).
# float32 path: the CPU reads NSQ4 and NSQ3 K and V in float32 and accumulates in float32; its largest measured
# error over these cases is 4.3e-7 with NSQ4 (AVX2), 7.7e-7 with NSQ3 (generic C) (2026-12-02), and 1e-5 leaves a
# margin of 13.
FATTN_BOUND_F32 = 1e-5
# reduced-precision path: the CPU accumulates an f16 V in fp16 (upstream's code), measured at most 2.2e-3; GPU kernels
# round Q and V further: CUDA's decode kernel takes Q in q8_1 and V in fp16 (Metal's, Q, K and V in fp16), which,
# simulated in float64 on these cases, costs up to 5.1e-3. 2e-2 leaves a margin of 4 over that; a wrong row, head
# or centering misses by about max|V|, an ignored mask by a good part of it.
FATTN_BOUND_F16 = 2e-2

# what a working cache costs SmolLM2 on a window, against the f16 cache: mean KLD about 0.03 for nsq4
# (docs/quality.md), 0.08 for nsq3 as shipped and 0.14 for a flat nsq3 cache (the default window, 2026-12-02); a
# cache that stores or reads wrong blocks gives a KLD above 1
KLD_LIMIT = {"nsq4": 0.1, "nsq3": 0.3}
# a device's KLD of each type against the CPU's on the same window (its own f16 baseline each): GPU arithmetic moves
# logits a little, a wrong kernel by far more
KLD_DEVICE_RATIO = 1.5
KLD_DEVICE_SLACK = 0.01


@dataclass
class Check:
    device: str
    name: str
    status: str
    detail: str = ""
    figures: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NsqType:
    """One of nsq-local's cache types, with its tables and its numpy reference (nsq_local.reference)."""

    name: str
    block_bytes: int
    kvalues: npt.NDArray[np.int64]
    kscales: npt.NDArray[np.int64]
    quantize: Callable[[npt.ArrayLike], npt.NDArray[np.uint8]]
    dequantize: Callable[[npt.ArrayLike], npt.NDArray[np.float32]]


# the reference's functions are looked up at each call: a test replaces one to see the checks fail
NSQ = {t.name: t for t in (
    NsqType("nsq4", ref.BLOCK_BYTES, ref.KVALUES, ref.KSCALES, lambda x: ref.quantize(x), lambda b: ref.dequantize(b)),
    NsqType("nsq3", ref.NSQ3_BLOCK_BYTES, ref.NSQ3_KVALUES, ref.NSQ3_KSCALES, lambda x: ref.quantize_nsq3(x),
            lambda b: ref.dequantize_nsq3(b)),
)}
assert tuple(NSQ) == NSQ_TYPES


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


# --- data -------------------------------------------------------------------------------------------------------------


def block_values(t: NsqType, seed: int = 1) -> tuple[npt.NDArray[np.float32], list[str]]:
    """Blocks of 64 values to store in type t (n, 64), and what each is: random, adversarial, and values on t's
    code-search ties."""
    rng = np.random.default_rng(seed)
    n = 128
    gauss = rng.standard_normal((n, 64))
    heavy = rng.standard_t(2, (n, 64))
    outlier = rng.standard_normal((n, 64))
    outlier[np.arange(n), rng.integers(0, 64, n)] *= 50
    # norms over many decades, fp16's range of d and beyond
    random = np.concatenate([gauss, heavy, outlier]) * rng.lognormal(0, 3, (3 * n, 1))

    base = rng.standard_normal(64)
    ch = np.arange(64)
    adversarial = {
        "all zero": np.zeros(64),
        "constant": np.full(64, 0.5),
        "constant negative": np.full(64, -3.0),
        "one huge among tiny": np.where(ch == 5, 1e4, 1e-3),
        "one value only": np.where(ch == 63, -3.0, 0.0),
        "1e-30 values": np.full(64, 1e-30),
        "float32 denormals": np.full(64, 1e-40) * np.sign(base),
        "just above the zero threshold": base / np.abs(base).max() * 2.0**-24,
        "fp16 subnormal d": base * 1e-6,
        "near fp16 max": 65000.0 * np.sign(base),
        "beyond fp16 range": base * 1e6,
        "near float32 max": np.full(64, 3e38) * np.sign(base),
        "NaN": np.where(ch == 9, np.nan, base),
        "+Inf": np.where(ch == 0, np.inf, base),
        "-Inf": np.where(ch == 63, -np.inf, base),
    }

    # 16*xg > (kv[m]+kv[m+1])*S holds with equality when xg = mid*S/16: a block whose max is 2047 puts each such
    # integer on the grid exactly, so the nearest-entry search meets its ties
    mids = (t.kvalues[:-1] + t.kvalues[1:])[None, :] * t.kscales[:, None]
    on_ties = (mids[mids % 16 == 0] // 16).astype(np.float64)
    on_ties = on_ties[np.abs(on_ties) <= ref.GRID]
    ties = rng.choice(on_ties, (32, 64))
    ties[np.arange(32), rng.integers(0, 64, 32)] = ref.GRID * rng.choice([-1, 1], 32)
    ties *= 2.0 ** rng.integers(-20, 20, (32, 1))
    # x*2047/max = k + 0.5: the grid's round-half-to-even
    half = rng.integers(-2 * ref.GRID, 2 * ref.GRID + 1, (32, 64)) / 2
    half[:, 0] = ref.GRID

    blocks = np.concatenate([random, np.stack(list(adversarial.values())), ties, half]).astype(np.float32)
    labels = (["random"] * len(random) + list(adversarial) + ["code-search ties"] * len(ties)
              + ["grid rounding ties"] * len(half))
    if len(blocks) % 2:  # whole rows of ROW values
        blocks = np.concatenate([blocks, random[:1].astype(np.float32)])
        labels.append("random")
    return blocks, labels


def raw_blocks(t: NsqType, seed: int = 2, n: int = 256) -> npt.NDArray[np.uint8]:
    """Blocks of type t of random bytes with a finite d (fp16 subnormals, zero and 65504 among them): every code and
    scale a cache can hold, not only those the quantizer makes."""
    rng = np.random.default_rng(seed)
    d_bits = rng.integers(0, 0x7C00, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    d_bits[:4] = [0x0000, 0x0001, 0x03FF, 0x7BFF]  # zero, smallest and largest subnormal, fp16 max
    out = rng.integers(0, 256, (n, t.block_bytes), dtype=np.uint8)
    out[:, :2] = d_bits.astype("<u2").view(np.uint8).reshape(n, 2)
    return out


# --- comparisons ------------------------------------------------------------------------------------------------------


def differing_blocks(got: npt.NDArray[np.uint8], want: npt.NDArray[np.uint8],
                     block_bytes: int) -> npt.NDArray[np.intp]:
    """Indices of the blocks (block_bytes each) in which got and want differ in any bit."""
    g = np.asarray(got, dtype=np.uint8).reshape(-1, block_bytes)
    w = np.asarray(want, dtype=np.uint8).reshape(-1, block_bytes)
    if g.shape != w.shape:
        raise ValueError(f"{g.shape[0]} blocks to compare with {w.shape[0]}")
    return np.flatnonzero((g != w).any(axis=1))


def differing_values(got: npt.NDArray[np.float32], want: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
    """Indices of the float32 values that differ (a NaN differs from everything; +0 and -0 are equal)."""
    g, w = np.asarray(got, dtype=np.float32).reshape(-1), np.asarray(want, dtype=np.float32).reshape(-1)
    if g.shape != w.shape:
        raise ValueError(f"{g.size} values to compare with {w.size}")
    return np.flatnonzero(~(g == w))


def attention_f64(q: npt.NDArray, k: npt.NDArray, v: npt.NDArray, mask: npt.NDArray, scale: float) -> npt.NDArray:
    """q (heads, n_q, DK), k (kv heads, n_kv, DK), v (kv heads, n_kv, DV), mask (n_q, n_kv), float64 ->
    (n_q, heads, DV), ggml's layout of flash attention's result."""
    group = q.shape[0] // k.shape[0]
    out = np.empty((q.shape[1], q.shape[0], v.shape[2]))
    for h in range(q.shape[0]):
        s = q[h] @ k[h // group].T * scale + mask
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[h // group]
    return out


# --- op checks --------------------------------------------------------------------------------------------------------


def _store_checks(backend: Backend, t: NsqType) -> list[Check]:
    """set_rows and cpy f32 -> t against the reference's blocks."""
    dev = backend.dev.name
    values, labels = block_values(t)
    rows = values.reshape(-1, ROW)
    n_rows = len(rows)
    want = t.quantize(values)
    row_bytes = ROW // ref.QK * t.block_bytes
    checks = []

    # set_rows writes each source row to the cache cell its index names; the cells not named keep what they held
    rng = np.random.default_rng(3)
    n_cells = n_rows + 9
    cells = rng.permutation(n_cells)[:n_rows].astype(np.int64)
    before = np.full((n_cells, row_bytes), 0xA5, dtype=np.uint8)

    def set_rows(g: OpGraph) -> int:
        dst = g.tensor(t.name, (ROW, n_cells), before)
        src = g.tensor("f32", (ROW, n_rows), rows)
        idx = g.tensor("i64", (n_rows,), cells)
        return ggml_graph_api().ggml_set_rows(g.ctx, dst, src, idx)

    def cpy(g: OpGraph) -> int:
        src = g.tensor("f32", (ROW, n_rows), rows)
        dst = g.tensor(t.name, (ROW, n_rows), np.zeros((n_rows, row_bytes), dtype=np.uint8))
        return ggml_graph_api().ggml_cpy(g.ctx, src, dst)

    for name, build in ((f"set_rows f32 -> {t.name}", set_rows), (f"cpy f32 -> {t.name}", cpy)):
        got = backend.run(build)
        if got is None:
            checks.append(Check(dev, name, UNSUPPORTED, UNSUPPORTED_NOTE))
            continue
        got = got.reshape(-1, row_bytes)
        if name.startswith("set_rows"):
            untouched = np.setdiff1d(np.arange(n_cells), cells)
            overwritten = int((got[untouched] != 0xA5).any(axis=1).sum())
            got = got[cells]
        else:
            overwritten = 0
        bad = differing_blocks(got, want, t.block_bytes)
        figures = {"blocks": int(want.size // t.block_bytes), "blocks_differing": int(bad.size),
                   "cells_overwritten": overwritten}
        if bad.size or overwritten:
            what = sorted({labels[i] for i in bad})
            detail = (f"{bad.size} of {figures['blocks']} blocks differ from the reference ({', '.join(what[:4])})"
                      if bad.size else "") + (f"; {overwritten} cells not named by an index were written"
                                              if overwritten else "")
            checks.append(Check(dev, name, FAIL, detail.lstrip("; "), figures))
        else:
            checks.append(Check(dev, name, PASS, f"{figures['blocks']} blocks bit-exact", figures))
    return checks


def _read_checks(backend: Backend, t: NsqType) -> list[Check]:
    """get_rows and cpy t -> f32 against the reference's dequantization: exact, since d (fp16) times a table
    entry (int8) is exact in float32."""
    dev = backend.dev.name
    values, _ = block_values(t)
    blocks = np.concatenate([t.quantize(values).reshape(-1, t.block_bytes), raw_blocks(t)])
    row_bytes = ROW // ref.QK * t.block_bytes
    src = blocks[: len(blocks) // 2 * 2].reshape(-1, row_bytes)
    n_rows = len(src)
    rng = np.random.default_rng(4)
    picks = rng.integers(0, n_rows, n_rows + 17).astype(np.int32)  # repeats included
    checks = []

    def get_rows(g: OpGraph) -> int:
        a = g.tensor(t.name, (ROW, n_rows), src)
        idx = g.tensor("i32", (len(picks),), picks)
        return ggml_graph_api().ggml_get_rows(g.ctx, a, idx)

    def cpy(g: OpGraph) -> int:
        a = g.tensor(t.name, (ROW, n_rows), src)
        dst = g.tensor("f32", (ROW, n_rows), np.zeros((n_rows, ROW), dtype=np.float32))
        return ggml_graph_api().ggml_cpy(g.ctx, a, dst)

    for name, build, want in ((f"get_rows {t.name} -> f32", get_rows, t.dequantize(src[picks])),
                              (f"cpy {t.name} -> f32", cpy, t.dequantize(src))):
        got = backend.run(build)
        if got is None:
            checks.append(Check(dev, name, UNSUPPORTED, UNSUPPORTED_NOTE))
            continue
        bad = differing_values(got.view(np.float32), want)
        figures = {"values": int(want.size), "values_differing": int(bad.size)}
        if bad.size:
            i = bad[0]
            checks.append(Check(dev, name, FAIL, f"{bad.size} of {want.size} values differ from the reference, first "
                                                 f"value {i}: {got.view(np.float32)[i]!r} for {want[i]!r}", figures))
        else:
            checks.append(Check(dev, name, PASS, f"{want.size} values exact", figures))
    return checks


@dataclass(frozen=True)
class FattnCase:
    type_k: str  # "nsq4" or "nsq3"
    dk: int
    n_q: int  # 1: a decode; more: a prefill
    type_v: str  # type_k or "f16"
    centered: bool  # K stored minus its mean, as a cache calibrated by nsq-calibrate stores it
    n_kv: int = 256
    n_head: int = 8
    n_head_kv: int = 2

    @property
    def name(self) -> str:
        # every case has the same heads (GQA, 4 query heads per KV head): the figures name them
        return (f"flash_attn d{self.dk} {'decode' if self.n_q == 1 else f'prefill {self.n_q}'} "
                f"K {self.type_k}{' centered' if self.centered else ''} V {self.type_v}")


FATTN_CASES = [FattnCase(tk, dk, n_q, tv, centered) for tk in NSQ_TYPES for dk in (64, 128, 256) for n_q in (1, 48)
               for tv in (tk, "f16") for centered in (False, True)]


def fattn_data(case: FattnCase, seed: int) -> dict:
    """A case's inputs and references: keys with a large shared mean and two outlier channels, as real K caches
    have; queries that make logits spread over a few units, as a model's do; a mask."""
    rng = np.random.default_rng(seed)
    dk, n_kv, n_q = case.dk, case.n_kv, case.n_q
    k = rng.standard_normal((case.n_head_kv, n_kv, dk)) + 3 * rng.standard_normal(dk)
    k[..., :2] *= 8
    k = k.astype(np.float32)
    v = rng.standard_normal((case.n_head_kv, n_kv, dk)).astype(np.float32)
    q = rng.standard_normal((case.n_head, n_q, dk)).astype(np.float32)
    # causal over the last n_q cells, a quarter of the rest at random and a run of cells (a sliding window's gap)
    mask = np.where(rng.random((n_q, n_kv)) < 0.25, -np.inf, 0.0)
    mask[:, n_kv // 8: n_kv // 4] = -np.inf
    mask[np.arange(n_q)[:, None] < np.arange(n_kv)[None, :] - (n_kv - n_q)] = -np.inf
    mask[:, n_kv - n_q] = 0.0
    mask = mask.astype(np.float16)

    t = NSQ[case.type_k]
    mean = k.mean(axis=1, keepdims=True) if case.centered else np.zeros((case.n_head_kv, 1, dk), dtype=np.float32)
    k_blocks = t.quantize(k - mean)
    k_stored = t.dequantize(k_blocks).reshape(k.shape).astype(np.float64)
    if case.type_v == t.name:
        v_data = t.quantize(v)
        v_stored = t.dequantize(v_data).reshape(v.shape).astype(np.float64)
    else:
        v_data = v.astype(np.float16)
        v_stored = v_data.astype(np.float64)
    scale = float(np.float32(1 / np.sqrt(dk)))
    m64 = mask.astype(np.float64)
    # the stored keys plus the mean: the keys this attention stands for; softmax cancels q.mean exactly
    want = attention_f64(q.astype(np.float64), k_stored + mean, v_stored, m64, scale)
    unquantized = attention_f64(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), m64, scale)
    return {"q": q, "k": k_blocks, "v": v_data, "mask": mask, "scale": scale, "want": want,
            "v_max": float(np.abs(v_stored).max()), "unquantized": unquantized}


def fattn_bound(case: FattnCase, kind: str) -> float:
    """The bound of a case on a kind of device, in units of max|V| (see FATTN_BOUND_F32)."""
    return FATTN_BOUND_F32 if kind == "CPU" and case.type_v in NSQ else FATTN_BOUND_F16


def _fattn_check(backend: Backend, case: FattnCase, seed: int) -> Check:
    data = fattn_data(case, seed)

    def build(g: OpGraph) -> int:
        api = ggml_graph_api()
        q = g.tensor("f32", (case.dk, case.n_q, case.n_head), data["q"])
        k = g.tensor(case.type_k, (case.dk, case.n_kv, case.n_head_kv), data["k"])
        v = g.tensor(case.type_v, (case.dk, case.n_kv, case.n_head_kv), data["v"])
        mask = g.tensor("f16", (case.n_kv, case.n_q), data["mask"])
        out = api.ggml_flash_attn_ext(g.ctx, q, k, v, mask, data["scale"], 0.0, 0.0)
        api.ggml_prec_set_acc(out, GGML_PREC_F32)  # as llama.cpp asks
        return out

    got = backend.run(build)
    if got is None:
        return Check(backend.dev.name, case.name, UNSUPPORTED, UNSUPPORTED_NOTE)
    check = judge_attention(backend.dev.name, case.name, got.view(np.float32), data,
                            fattn_bound(case, backend.dev.kind))
    check.figures.update(heads=case.n_head, kv_heads=case.n_head_kv, cells=case.n_kv)
    return check


def nmse(got: npt.NDArray, want: npt.NDArray) -> float:
    return float(((got - want) ** 2).sum() / (want**2).sum())


def judge_attention(device: str, name: str, got: npt.NDArray[np.float32], data: dict, bound: float) -> Check:
    """Flash attention's result (ggml's layout, flat) against the case's reference: max|error| <= bound * max|V|."""
    want = data["want"]
    got = got.astype(np.float64).reshape(want.shape)
    limit = bound * data["v_max"]
    err = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
    figures = {"max_err": err, "bound": limit, "v_max": data["v_max"], "nmse": nmse(got, want),
               # what the cache type itself costs this attention (centering's gain shows here): against the keys
               # and values before quantization
               "nmse_vs_unquantized": nmse(got, data["unquantized"])}
    status = PASS if err <= limit else FAIL
    return Check(device, name, status, f"max error {err:.3g} (bound {limit:.3g})", figures)


def op_checks(backend: Backend, progress: Callable[[str], None]) -> list[Check]:
    """Every op check on one device; an error in one (ggml's status, an allocation) fails that one, and the others
    still run."""
    groups: list[tuple[str, Callable[[], list[Check]]]] = []
    for t in NSQ.values():
        groups += [(f"set_rows / cpy f32 -> {t.name}", lambda t=t: _store_checks(backend, t)),
                   (f"get_rows / cpy {t.name} -> f32", lambda t=t: _read_checks(backend, t))]
    groups += [(case.name, lambda case=case, seed=100 + i: [_fattn_check(backend, case, seed)])
               for i, case in enumerate(FATTN_CASES)]
    checks = []
    for name, run in groups:
        progress(name)
        try:
            checks += run()
        except Exception as e:
            checks.append(Check(backend.dev.name, name, FAIL, f"{type(e).__name__}: {e}"))
    return checks


# --- model checks -----------------------------------------------------------------------------------------------------

# tokens of the built-in text: the calibration reads its first two 2048-token windows, so the KLD window starts after
# them; the decode-speed prefill reads the text from its start
KLD_OFFSET = 4096


@dataclass
class ModelRun:
    path: Path
    tokens: npt.NDArray[np.int32]
    add_bos: bool
    bos: int


def load_text(model: Path, need: int, verbose: bool) -> ModelRun:
    from nsq_local import calibrate
    from nsq_local.capture import Model

    with Model(model, verbose=verbose, device="CPU") as m:
        tokens = m.tokenize(calibrate.builtin_text())
        run = ModelRun(model, tokens, m.add_bos, m.bos)
        if len(tokens) < need:
            raise UsageError(f"the built-in text has {len(tokens)} tokens of this model, {need} are needed: use a "
                             "smaller --depth or -c")
        if need > m.n_ctx_train:
            raise UsageError(f"--depth plus --decode-tokens ({need}) exceeds the model's training context "
                             f"{m.n_ctx_train}")
    return run


def kld_check(dev: Device, run: ModelRun, n_ctx: int, threads: int, verbose: bool,
              cpu: Optional[Check]) -> Check:
    """One window, as nsq-ppl measures it: nsq4, nsq3 and q4_0 caches against an f16 cache, every context on the
    device."""
    from nsq_local import ppl

    window = run.tokens[KLD_OFFSET:KLD_OFFSET + n_ctx]
    types = (*NSQ, "q4_0")
    res = ppl.evaluate(run.path, window, n_ctx, 1, [(t, t) for t in types], True, True, threads, 512,
                       run.add_bos, run.bos, verbose, None, device=dev.name)
    by_type = dict(zip(types, res["results"]))
    figures = {"window": f"tokens {KLD_OFFSET}..{KLD_OFFSET + n_ctx - 1} of the built-in text", "n_ctx": n_ctx,
               "tokens_scored": res["tokens_scored"], "ppl_f16": res["baseline"]["ppl"]}
    for t, r in by_type.items():
        figures.update({f"kld_{t}": r["kld_mean"], f"kld_{t}_se": r["kld_se"], f"top1_{t}": r["top1_agree"]})
    # one calibration centers every nsq type's K
    calib = by_type["nsq4"]["nsq_calib"]
    figures["nsq_calib"] = Path(calib).name if calib else None
    detail = ("KLD " + ", ".join(f"{t} {r['kld_mean']:.4f}" for t, r in by_type.items())
              + f" (f16 PPL {res['baseline']['ppl']:.3f})")
    problems = []
    for t in NSQ:
        kld = by_type[t]["kld_mean"]
        if not kld < KLD_LIMIT[t]:
            problems.append(f"{t}'s KLD is not below {KLD_LIMIT[t]}")
        if cpu is not None and cpu.status == PASS:
            limit = KLD_DEVICE_RATIO * cpu.figures[f"kld_{t}"] + KLD_DEVICE_SLACK
            figures[f"kld_{t}_cpu"] = cpu.figures[f"kld_{t}"]
            if not kld <= limit:
                problems.append(f"{t}'s KLD is above {limit:.4f} ({KLD_DEVICE_RATIO}x the CPU's + {KLD_DEVICE_SLACK})")
    if problems:
        return Check(dev.name, "KLD window", FAIL, detail + ": " + "; ".join(problems), figures)
    return Check(dev.name, "KLD window", PASS, detail, figures)


def speed_check(dev: Device, run: ModelRun, depth: int, n_decode: int, threads: int, verbose: bool,
                progress: Callable[[str], None]) -> Check:
    """Decode tokens/s of f16, q4_0 and nsq4 caches (flash attention on) after a prefill of `depth` tokens. The
    three contexts decode in turns, one token each, and the speed is that of the median token: a busy machine
    slows the three alike, and a stall of one token does not count."""
    from nsq_local.calibrate import Decoder

    types = ("f16", "q4_0", "nsq4")
    decoders = []
    per_token: dict[str, list[float]] = {t: [] for t in types}
    try:
        for t in types:
            progress(f"prefill of {depth} tokens, {t} cache")
            d = Decoder(run.path, n_ctx=depth + n_decode + 1, type_k=t, type_v=t, flash_attn=True,
                        n_threads=threads, verbose=verbose, device=dev.name)
            decoders.append(d)
            d.decode(run.tokens[:depth], 0, logits=False)
            d.decode(run.tokens[depth:depth + 1], depth, logits=True)  # warm-up: the first decode-sized graph
        progress(f"decoding {n_decode} tokens per cache type")
        for pos in range(depth + 1, depth + 1 + n_decode):
            for t, d in zip(types, decoders):
                t0 = time.perf_counter()
                d.decode(run.tokens[pos:pos + 1], pos, logits=True)
                per_token[t].append(time.perf_counter() - t0)
    finally:
        for d in decoders:
            d.close()
    tps = {t: 1 / float(np.median(dt)) for t, dt in per_token.items()}
    figures = {"depth": depth, "tokens": n_decode, **{f"tps_{t}": tps[t] for t in types},
               "nsq4_over_f16": tps["nsq4"] / tps["f16"], "nsq4_over_q4_0": tps["nsq4"] / tps["q4_0"]}
    return Check(dev.name, f"decode speed at depth {depth}", PASS,
                 f"nsq4 {tps['nsq4']:.1f} t/s (f16 {tps['f16']:.1f}, q4_0 {tps['q4_0']:.1f}): "
                 f"{figures['nsq4_over_f16']:.2f}x f16, {figures['nsq4_over_q4_0']:.2f}x q4_0", figures)


# --- the report -------------------------------------------------------------------------------------------------------


def versions() -> dict:
    import llama_cpp

    try:
        nsq_local = importlib.metadata.version("nsq-local")
    except importlib.metadata.PackageNotFoundError:
        nsq_local = "not installed (run from a checkout)"
    return {"nsq_local": nsq_local, "llama_cpp": llama_cpp.__version__,
            "ggml": ggml_graph_api().ggml_version().decode(), "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "system_info": llama_cpp.llama_print_system_info().decode().strip()}


class Report:
    """The report as it grows: written to its JSON file before each check (naming the check that is running)
    and at the end."""

    def __init__(self, path: Optional[Path], settings: dict):
        self.path = path
        self.data: dict = {"tool": "nsq-selftest", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "versions": versions(), "settings": settings, "devices": [], "checks": [],
                           "running": None}

    def running(self, what: Optional[str]) -> None:
        self.data["running"] = what
        self.write()

    def add(self, check: Check) -> None:
        self.data["checks"].append(asdict(check))

    def finish(self) -> None:
        counts = {s: sum(c["status"] == s for c in self.data["checks"]) for s in (PASS, FAIL, UNSUPPORTED, SKIPPED)}
        self.data["summary"] = counts
        self.data["ok"] = counts[FAIL] == 0
        self.data.pop("running")
        self.write()

    def write(self) -> None:
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
            tmp.replace(self.path)

    def table(self) -> str:
        v = self.data["versions"]
        lines = [f"nsq-selftest: nsq-local {v['nsq_local']}, llama_cpp {v['llama_cpp']}, ggml {v['ggml']}, "
                 f"Python {v['python']}, {v['platform']}"]
        for d in self.data["devices"]:
            lines.append(f"device {d['name']}: {d['description']} ({d['type']}, {d['memory_total_mib']} MiB)")
        st = self.data["settings"]
        lines.append(f"model {st['model'] or 'none'}, {st['threads']} threads, KLD window -c {st['ctx_size']}, decode speed at depth "
                     f"{st['depth']} over {st['decode_tokens']} tokens")
        width = max([len(c["name"]) for c in self.data["checks"]] + [5])
        result = max([len(c["status"]) for c in self.data["checks"]] + [6])
        lines.append("")
        lines.append(f"{'device':<8} {'check':<{width}} {'result':<{result}} figures")
        for c in self.data["checks"]:
            lines.append(f"{c['device']:<8} {c['name']:<{width}} {c['status']:<{result}} {c['detail']}")
        s = self.data["summary"]
        lines.append("")
        lines.append(f"{s[PASS]} passed, {s[FAIL]} failed, {s[UNSUPPORTED]} not supported on their device (run on the "
                     f"CPU), {s[SKIPPED]} skipped")
        return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nsq-selftest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", metavar="FILE",
                    help="GGUF model for the model checks (default: the demo model, SmolLM2-135M-Instruct)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--device", action="append", metavar="NAME",
                    help="check only this ggml device (repeat for more; default: every device)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512,
                    help="tokens in the KLD window (default: 512; the second half is scored)")
    ap.add_argument("--depth", type=int, default=4096, help="prefill before the decode speed (default: 4096)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per cache type (default: 32)")
    ap.add_argument("--ops-only", action="store_true", help="only the op checks, no model")
    ap.add_argument("--json", metavar="FILE", default="nsq-selftest.json",
                    help="the report as JSON (default: nsq-selftest.json; '-' for none)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return ap


def _demo_model() -> tuple[Optional[Path], str]:
    from nsq_local import models

    try:
        return models.smollm2(), ""
    except models.ModelNotInstalled as e:
        return None, str(e)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads or os.cpu_count() or 1

    def progress(what: str) -> None:
        print(f"nsq-selftest: {what}", file=sys.stderr, flush=True)

    try:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"-t {args.threads}: give at least 1 thread")
        if args.ctx_size < 8 or args.ctx_size % 2:
            raise UsageError(f"-c {args.ctx_size}: the KLD window must be an even number of tokens, at least 8")
        if args.depth < 1 or args.decode_tokens < 4:
            raise UsageError("--depth must be at least 1 and --decode-tokens at least 4")
        found = devices()
        if args.device:
            names = {d.name for d in found}
            unknown = [n for n in args.device if n not in names]
            if unknown:
                raise UsageError(f"no device named {', '.join(unknown)}; this build has: "
                                 f"{', '.join(d.name for d in found)}")
            found = [d for d in found if d.name in args.device]
        model, missing = (Path(args.model), "") if args.model else _demo_model()
        if model is not None and not model.is_file():
            raise UsageError(f"model file {model} does not exist")
        run = None
        if model is not None and not args.ops_only:
            run = load_text(model, max(KLD_OFFSET + args.ctx_size, args.depth + args.decode_tokens + 2),
                            args.verbose)
    except UsageError as e:
        print(f"nsq-selftest: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    # file names only: the report is sent to a public tracker, and paths name the user's folders
    settings = {"threads": threads, "model": model.name if model else None, "ctx_size": args.ctx_size,
                "depth": args.depth, "decode_tokens": args.decode_tokens, "ops_only": args.ops_only,
                "fattn_bound": f"max|error| <= {FATTN_BOUND_F32:g} * max|V| on the CPU with V nsq4 or nsq3 "
                               f"(float32), {FATTN_BOUND_F16:g} * max|V| otherwise (fp16 or q8_1 arithmetic)"}
    report = Report(None if args.json == "-" else Path(args.json), settings)
    report.data["devices"] = [d.as_dict() for d in found]
    cpu_kld: Optional[Check] = None
    # the CPU first: the other devices' KLD is compared with its
    for dev in sorted(found, key=lambda d: d.kind != "CPU"):
        def step(what: str, dev: Device = dev) -> None:
            progress(f"{dev.name}: {what}")
            report.running(f"{dev.name}: {what}")

        try:
            backend = Backend(dev, threads)
        except RuntimeError as e:
            report.add(Check(dev.name, "backend", FAIL, str(e)))
            continue
        try:
            for c in op_checks(backend, step):
                report.add(c)
        finally:
            backend.close()

        if args.ops_only:
            continue
        if dev.kind not in ("CPU", "GPU", "IGPU"):
            report.add(Check(dev.name, "model", SKIPPED, f"a {dev.kind} device holds no model: llama.cpp uses it "
                                                         "beside the CPU"))
            continue
        if run is None:
            report.add(Check(dev.name, "model", SKIPPED, missing))
            continue
        for what, fn in (("KLD window",
                          lambda: kld_check(dev, run, args.ctx_size, threads, args.verbose, cpu_kld)),
                         (f"decode speed at depth {args.depth}",
                          lambda: speed_check(dev, run, args.depth, args.decode_tokens, threads, args.verbose,
                                              step))):
            step(what)
            try:
                c = fn()
            except Exception as e:
                c = Check(dev.name, what, FAIL, f"{type(e).__name__}: {e}")
            report.add(c)
            if dev.kind == "CPU" and c.name == "KLD window":
                cpu_kld = c
    report.finish()
    print(report.table())
    if report.path is not None:
        print(f"json: {report.path}")
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
