"""nsq-selftest's op checks: NSQ4's and NSQ3's operations on one ggml device against nsq_local.reference, the
numpy reference. set_rows and cpy f32 -> nsq4/nsq3 must give the reference's blocks bit for bit, get_rows and cpy
nsq4/nsq3 -> f32 its values exactly, flash attention over an NSQ4 or NSQ3 cache the attention over the cache's values
within a bound. An op the device does not support is reported as such: ggml runs it on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import numpy.typing as npt

from nsq_local import reference as ref
from nsq_local._common import NSQ_TYPES
from nsq_local.ggml_ops import GGML_PREC_F32, Backend, OpGraph, ggml_graph_api
from nsq_local.selftest_report import FAIL, PASS, UNSUPPORTED, Check

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


@dataclass(frozen=True)
class NsqType:
    """One of nsq-local's cache types, with its numpy reference (nsq_local.reference)."""

    name: str
    block_bytes: int
    quantize: Callable[[npt.ArrayLike], npt.NDArray[np.uint8]]
    dequantize: Callable[[npt.ArrayLike], npt.NDArray[np.float32]]


# the reference's functions are looked up at each call: a test replaces one to see the checks fail
NSQ = {t.name: t for t in (
    NsqType("nsq4", ref.BLOCK_BYTES, lambda x: ref.quantize(x), lambda b: ref.dequantize(b)),
    NsqType("nsq3", ref.NSQ3_BLOCK_BYTES, lambda x: ref.quantize_nsq3(x), lambda b: ref.dequantize_nsq3(b)),
)}
assert tuple(NSQ) == NSQ_TYPES


# --- data -------------------------------------------------------------------------------------------------------------


def block_values(t: NsqType, seed: int = 1) -> tuple[npt.NDArray[np.float32], list[str]]:
    """Blocks of 64 values to store in type t (n, 64), and what each is: nsq_local.reference.sample_blocks' random
    ones, its special values, and values on t's code-search and the grid's rounding ties: the 464 blocks that earlier
    versions checked, bit for bit, so that the reports sent back stay comparable."""
    rng = np.random.default_rng(seed)
    parts = [ref.sample_blocks(rng, "random", 128), ref.sample_blocks(rng, "special"),
             ref.sample_blocks(rng, "code ties", 32, t.name), ref.sample_blocks(rng, "grid ties", 32)]
    blocks = np.concatenate([values for values, _ in parts])
    labels = [label for _, names in parts for label in names]
    if len(blocks) % 2:  # whole rows of ROW values
        blocks = np.concatenate([blocks, parts[0][0][:1]])
        labels.append(parts[0][1][0])
    return blocks, labels


def raw_blocks(t: NsqType) -> npt.NDArray[np.uint8]:
    """256 blocks of type t of random bytes with a finite d: every code and scale a cache can hold."""
    return ref.sample_raw_blocks(2, 256, t.name)


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
