"""The Metal block functions of NSQ4 and NSQ3 (the ggml-metal-nsq patch) agree bit for bit
with the numpy reference, on the host.

No Mac is needed: the patched kernels/nsq4.h and kernels/nsq3.h, the NSQ family's own Metal headers, are compiled
verbatim (less their `#pragma once` and quoted includes, which the shim stands in for) with g++ against
tests/metal_shim (half = _Float16, address-space qualifiers empty, precise:: = IEEE ops) and the patched ggml-common.h
(the blocks and their tables, as NSQ4's Metal libraries see them). This checks the arithmetic of quantize_<type>,
dequantize_<type> and dequantize_<type>_t4, not the kernels around them, which only a Metal device can compile and
run; for those, the last tests check statically that the flash-attention instantiations mirror q4_0's and that the
kernels type-check, and tests/test_metal_sources.py that they follow upstream's templates. Nothing here is compiled
by a Metal compiler.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, adversarial_blocks, random_blocks
from nsq_local import reference as ref

SHIM = ROOT / "tests" / "metal_shim"
OUT = ROOT / "build" / "metal-shim"
KERNELS = "vendor/llama.cpp/ggml/src/ggml-metal/kernels"
LOCAL_INCLUDES = re.compile(r'^(#pragma once|#include ".*")\n', re.M)


# per type: the shim's quantize and dequantize ops, the numpy reference and the block size
TYPES = {
    "nsq4": (b"q", b"d", ref.quantize, ref.dequantize, ref.BLOCK_BYTES),
    "nsq3": (b"Q", b"D", ref.quantize_nsq3, ref.dequantize_nsq3, ref.NSQ3_BLOCK_BYTES),
}


def block_header(upstream: Path, name: str) -> str:
    text = (upstream / KERNELS / f"{name}.h").read_text()
    assert f"quantize_{name}" in text and f"dequantize_{name}_t4" in text, f"{KERNELS}/{name}.h lacks its block functions"
    return text


def extract_blocks(upstream: Path, nsq4: str | None = None, nsq3: str | None = None) -> str:
    """nsq4.h then nsq3.h (which uses nsq4.h's fp16 conversion), less their includes; either may be given instead."""
    texts = [nsq4 or block_header(upstream, "nsq4"), nsq3 or block_header(upstream, "nsq3")]
    return "".join(LOCAL_INCLUDES.sub("", t) for t in texts)


def compile_shim(upstream: Path, name: str, sources: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        pytest.fail(f"{cxx} is missing: the Metal shim test compiles the NSQ types' Metal code as C++")
    work = OUT / name
    work.mkdir(parents=True, exist_ok=True)
    for header, text in sources.items():
        (work / header).write_text(text)
    src = upstream / "vendor/llama.cpp/ggml/src"
    cmd = [cxx, "-std=c++17", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
           "-I", str(work), "-I", str(SHIM), "-I", str(src), "-I", str(src / "ggml-metal"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def build(upstream: Path, blocks: str, name: str) -> Path:
    exe = OUT / name / "nsq_shim"
    # no FMA contraction and no fast math: the host must do exactly the operations the kernel source spells out
    proc = compile_shim(upstream, name, {"nsq_metal_blocks.h": blocks},
                        "-O2", "-ffp-contract=off", str(SHIM / "nsq_shim.cpp"), "-o", str(exe))
    assert proc.returncode == 0, proc.stderr
    return exe


def type_check_kernels(upstream: Path, kernels: str, name: str) -> subprocess.CompletedProcess:
    # Metal's attributes ([[host_name]], [[thread_position_in_grid]], ...) mean nothing to g++
    return compile_shim(upstream, name, {"nsq_metal_blocks.h": extract_blocks(upstream),
                                         "nsq_metal_kernels.h": LOCAL_INCLUDES.sub("", kernels)},
                        "-fsyntax-only", "-Wno-attributes", str(SHIM / "nsq_kernels.cpp"))


def run(exe: Path, op: bytes, n: int, payload: bytes) -> bytes:
    proc = subprocess.run([str(exe)], input=op + struct.pack("<q", n) + payload, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def metal_quantize(exe: Path, x: np.ndarray, kind: str = "nsq4") -> np.ndarray:
    op, _, _, _, block_bytes = TYPES[kind]
    x = np.ascontiguousarray(x, dtype="<f4").reshape(-1, ref.QK)
    out = run(exe, op, len(x), x.tobytes())
    assert len(out) == len(x) * block_bytes
    return np.frombuffer(out, dtype=np.uint8)


def metal_dequantize(exe: Path, raw: np.ndarray, kind: str = "nsq4") -> dict[str, np.ndarray]:
    _, op, _, _, block_bytes = TYPES[kind]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.size // block_bytes
    out = run(exe, op, n, raw.tobytes())
    f32, f16 = 2 * ref.QK * 4, 2 * ref.QK * 2
    assert len(out) == n * (f32 + f16)
    per_block = np.frombuffer(out, dtype=np.uint8).reshape(n, f32 + f16)
    as_f32 = per_block[:, :f32].copy().view("<f4").reshape(n, 2, ref.QK)
    as_f16 = per_block[:, f32:].copy().view("<f2").reshape(n, 2, ref.QK)
    return {"float4x4": as_f32[:, 0].reshape(-1), "float4 (_t4)": as_f32[:, 1].reshape(-1),
            "half4x4": as_f16[:, 0].reshape(-1), "half4 (_t4)": as_f16[:, 1].reshape(-1)}


@pytest.fixture(scope="module")
def shim(upstream_tree) -> Path:
    return build(upstream_tree, extract_blocks(upstream_tree), "patched")


@pytest.mark.parametrize("kind", TYPES)
def test_quantize_random_blocks_bit_exact(shim, kind):
    quantize, block_bytes = TYPES[kind][2], TYPES[kind][4]
    x = np.concatenate([random_blocks(seed, 400) for seed in range(3)])
    got, want = metal_quantize(shim, x, kind), quantize(x)
    bad = np.flatnonzero((got != want).reshape(-1, block_bytes).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {len(x)} blocks differ, first at block {bad[0]}"


@pytest.mark.parametrize("kind,name", [(kind, name) for kind in TYPES for name in adversarial_blocks(kind)])
def test_quantize_adversarial_block_bit_exact(shim, kind, name):
    block = adversarial_blocks(kind)[name]
    got, want = metal_quantize(shim, block, kind), TYPES[kind][2](block)
    assert got.tobytes() == want.tobytes(), f"{name}: d {got[:2].view('<f2')} vs {want[:2].view('<f2')}"


@pytest.mark.parametrize("kind", TYPES)
def test_quantize_fp16_subnormal_and_rounding_edges_bit_exact(shim, kind):
    """d lands on fp16 subnormals, on the normal/subnormal boundary and on rounding ties of the conversion."""
    quantize, block_bytes = TYPES[kind][2], TYPES[kind][4]
    rng = np.random.default_rng(11)
    shape = rng.standard_normal((2000, ref.QK))
    scale = 2.0 ** rng.uniform(-24, -8, (2000, 1))
    x = (shape / np.abs(shape).max(axis=1, keepdims=True) * scale).astype(np.float32)
    got, want = metal_quantize(shim, x, kind), quantize(x)
    assert np.array_equal(got, want)
    d = want.reshape(-1, block_bytes)[:, :2].copy().view("<u2").reshape(-1)
    assert ((d > 0) & (d < 0x400)).sum() > 100, "the sweep must exercise fp16 subnormal scales"


def test_fp16_conversion_of_d_exact(shim):
    """nsq_fp16_bits against IEEE round-to-nearest-even for every float in [0, 65504] whose low 13 bits are a
    rounding edge (0, 1, just below / at / above the tie, all ones): every fp16 normal and subnormal step, ties
    included, which random blocks almost never reach."""
    top = np.uint32(np.float32(65504.0).view(np.uint32))
    high = np.arange(0, (top >> 13) + 1, dtype=np.uint32) << 13
    low = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF], dtype=np.uint32)
    bits = (high[:, None] | low[None, :]).reshape(-1)
    x = bits[bits <= top].view(np.float32)
    got = np.frombuffer(run(shim, b"h", x.size, x.astype("<f4").tobytes()), dtype="<u2")
    want = x.astype(np.float16).view(np.uint16)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} conversions differ, first {x[bad[0]]!r}: {got[bad[0]]:#x} vs {want[bad[0]]:#x}"


def dequantize_inputs(kind: str) -> np.ndarray:
    quantize, block_bytes = TYPES[kind][2], TYPES[kind][4]
    quantized = quantize(random_blocks(3, 100)).reshape(-1, block_bytes)
    return np.concatenate([quantized, ref.sample_raw_blocks(5, 500, kind)]).reshape(-1)


@pytest.mark.parametrize("kind", TYPES)
def test_dequantize_exact(shim, kind):
    raw = dequantize_inputs(kind)
    want = TYPES[kind][3](raw)
    with np.errstate(over="ignore"):
        want_half = want.astype(np.float16)  # the half forms round the float product, to Inf beyond fp16
    for form, got in metal_dequantize(shim, raw, kind).items():
        expect, as_bits = (want_half, np.uint16) if got.dtype == np.float16 else (want, np.uint32)
        bad = np.flatnonzero(got.view(as_bits) != expect.view(as_bits))
        assert bad.size == 0, f"dequantize_{kind} {form}: {bad.size} values differ, first at value {bad[0]}"


@pytest.mark.parametrize("kind", TYPES)
def test_shim_catches_a_wrong_kernel(upstream_tree, kind):
    """The comparison can fail: a one-character change to the type's Metal tie rule is detected."""
    header = block_header(upstream_tree, kind)
    assert header.count("c += 16*xg > ") == 1
    broken = build(upstream_tree, extract_blocks(upstream_tree, **{kind: header.replace("c += 16*xg > ", "c += 16*xg >= ")}),
                   f"broken-{kind}")
    x = np.concatenate([random_blocks(0, 200), ref.sample_blocks(0, "code thresholds", qtype=kind)[0]])
    assert not np.array_equal(metal_quantize(broken, x, kind), TYPES[kind][2](x))


def test_shim_catches_a_wrong_nsq3_bit_layout(upstream_tree):
    """The NSQ3 dequantizers can fail too: the _t4 form reading the high bits of the wrong half of qh is detected."""
    header = block_header(upstream_tree, "nsq3")
    assert header.count("xb->qh[il/2] >> (4*(il%2))") == 1
    broken = build(upstream_tree, extract_blocks(upstream_tree, nsq3=header.replace("xb->qh[il/2] >> (4*(il%2))",
                                                                                     "xb->qh[il/2] >> (4*(1 - il%2))")),
                   "broken-nsq3-layout")
    raw = dequantize_inputs("nsq3")
    forms = metal_dequantize(broken, raw, "nsq3")
    want = ref.dequantize_nsq3(raw)
    assert np.array_equal(forms["float4x4"].view(np.uint32), want.view(np.uint32))
    assert not np.array_equal(forms["float4 (_t4)"].view(np.uint32), want.view(np.uint32))


def host_names(text: str, prefix: str) -> dict[str, str]:
    """kernel name -> its template arguments, for the instantiations whose name starts with prefix."""
    pat = re.compile(r'host_name\("(' + prefix + r'[^"]*)"\s*\)\]\].*?<(.*)>;')
    return {m.group(1): re.sub(r"\s+", " ", m.group(2)) for m in pat.finditer(text)}


# the flash-attention K/V pairs NSQ4's libraries hold: the kernel name's type part, K's block, V's block
FA_PAIRS = {"nsq4": ("nsq4", "nsq4"), "nsq3": ("nsq3", "nsq3"), "nsq4_nsq3": ("nsq4", "nsq3")}


def expected_fa_kernels(q4: dict[str, str], pair: str, vec: bool) -> dict[str, str]:
    """q4_0's kernels at head sizes 64/128/256, renamed for the pair, with its blocks and their 16-value (nl = 4) or,
    for the vec kernels, 4-value (nl = 16) dequantizers, and the same remaining template arguments."""
    heads = re.compile(r"_dk(64|128|256)_dv\1(_|$)")
    nl, t4 = (16, "_t4") if vec else (4, "")
    k, v = FA_PAIRS[pair]
    want = {}
    for name, args in q4.items():
        if heads.search(name):
            q4_block = re.compile(r"block_q4_0, \d+, dequantize_q4_0(_t4)?")
            assert len(q4_block.findall(args)) == 2, args
            args = q4_block.sub(f"block_{k}, {nl}, dequantize_{k}{t4}", args, count=1)
            want[name.replace("_q4_0_", f"_{pair}_")] = q4_block.sub(f"block_{v}, {nl}, dequantize_{v}{t4}", args)
    return want


@pytest.mark.parametrize("vec", [False, True], ids=["fa", "fa_vec"])
def test_metal_instantiations_mirror_q4_0(upstream_tree, vec):
    """Every flash-attention kernel q4_0 has at head sizes 64/128/256 exists for nsq4/nsq4, nsq3/nsq3 and the mixed
    nsq4 K / nsq3 V pair (named nsq4_nsq3, as ggml_metal_library_get_pipeline_flash_attn_ext names it), with each
    side's block and dequantizer and the same remaining template arguments; nothing else is instantiated. A mixed
    kernel whose V side kept nsq4's block is caught (negative control)."""
    kernels = upstream_tree / "vendor/llama.cpp/ggml/src/ggml-metal/kernels"
    q4_file, nsq_file = ("fa_vec_q4_0.metal", "fa_vec_nsq.metal") if vec else ("fa_q4_0.metal", "fa_nsq.metal")
    q4 = host_names((kernels / q4_file).read_text(), "kernel_flash_attn_ext_")
    want = {}
    for pair in FA_PAIRS:
        want |= expected_fa_kernels(q4, pair, vec)
    assert len(want) == 3 * len(expected_fa_kernels(q4, "nsq4", vec)) > 0
    text = (kernels / nsq_file).read_text()
    assert host_names(text, "kernel_flash_attn_ext_") == want

    nl = 16 if vec else 4
    mixed = next(ln for ln in text.splitlines() if "_nsq4_nsq3_dk" in ln)
    wrong_v = mixed.replace(f"block_nsq3, {nl}, ", f"block_nsq4, {nl}, ")
    assert wrong_v != mixed
    assert host_names(text.replace(mixed, wrong_v), "kernel_flash_attn_ext_") != want


def test_metal_conversion_kernels_and_libraries(upstream_tree):
    """The set_rows/cpy/get_rows/F16-pre-conversion kernels of NSQ4 and NSQ3, CMake sources and library entries are
    all there, in NSQ4's own libraries."""
    metal = upstream_tree / "vendor/llama.cpp/ggml/src/ggml-metal"
    nsq4 = (metal / "kernels" / "nsq.metal").read_text()
    want_names, want_plain = {}, set()
    for t in ("nsq4", "nsq3"):
        want_names |= {f"kernel_set_rows_f32_i64_{t}": "int64_t", f"kernel_set_rows_f32_i32_{t}": "int32_t",
                       f"kernel_cpy_{t}_f32": "float4x4", f"kernel_cpy_{t}_f16": "half4x4"}
        want_plain |= {f"kernel_cpy_f32_{t}", f"kernel_get_rows_{t}", f"kernel_flash_attn_ext_kv_{t}_f16"}
    assert host_names(nsq4, "kernel_") == want_names
    templates = set(re.findall(r"^template\s*<.*>\nkernel void (\w+)\(", nsq4, re.M))
    plain = set(re.findall(r"^kernel void (\w+)\(", nsq4, re.M)) - templates
    assert plain == want_plain

    cmake = (metal / "CMakeLists.txt").read_text()
    nsq_sources = re.search(r"set\(METALLIB_NSQ_SOURCES\n(.*?)\)", cmake, re.S).group(1).split()
    device = (metal / "ggml-metal-device.m").read_text()
    for lib in ("nsq", "fa_nsq", "fa_vec_nsq"):
        assert f"kernels/{lib}.metal" in nsq_sources
        assert re.search(r"X\(\w+,\s+" + lib + r"\)", device)


def test_nsq_kernels_type_check_on_the_host(upstream_tree):
    """kernels/nsq.metal, NSQ4's and NSQ3's kernels, compiles as C++ against the shim: every name, argument-struct
    field and type its kernels use exists, and every template instantiation goes through. A misspelt field in an
    NSQ4 kernel and in an NSQ3 kernel are each caught (negative controls)."""
    kernels = (upstream_tree / KERNELS / "nsq.metal").read_text()
    proc = type_check_kernels(upstream_tree, kernels, "kernels")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    nsq3_start = kernels.index("kernel void kernel_set_rows_f32_nsq3(")
    assert kernels.count("args.nk0") == 6 and kernels[nsq3_start:].count("args.nk0") == 3
    for t, text in (("nsq4", kernels.replace("args.nk0", "args.nk1", 1)),
                    ("nsq3", kernels[:nsq3_start] + kernels[nsq3_start:].replace("args.nk0", "args.nk1", 1))):
        broken = type_check_kernels(upstream_tree, text, f"kernels-broken-{t}")
        assert broken.returncode != 0 and "nk1" in broken.stderr, t
