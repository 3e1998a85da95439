"""NSQ4's Metal block functions (the ggml-metal-nsq4 patch) agree bit for bit with the numpy reference, on the host.

No Mac is needed: the patched kernels/nsq4.h, NSQ4's own Metal header, is compiled verbatim (less its `#pragma once`
and quoted includes, which the shim stands in for) with g++ against tests/metal_shim (half = _Float16, address-space
qualifiers empty, precise:: = IEEE ops) and the patched ggml-common.h (block_nsq4 and its tables, as NSQ4's Metal
libraries see them). This checks the arithmetic of quantize_nsq4, dequantize_nsq4 and dequantize_nsq4_t4, not the
kernels around them, which only a Metal device can compile and run; for those, the last test checks statically that
the flash-attention instantiations mirror q4_0's, and tests/test_metal_sources.py that the other kernels follow
upstream's templates.
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


def extract_blocks(upstream: Path) -> str:
    text = (upstream / KERNELS / "nsq4.h").read_text()
    assert "quantize_nsq4" in text and "dequantize_nsq4_t4" in text, f"{KERNELS}/nsq4.h lacks NSQ4's block functions"
    return LOCAL_INCLUDES.sub("", text)


def compile_shim(upstream: Path, name: str, sources: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        pytest.fail(f"{cxx} is missing: the Metal shim test compiles NSQ4's Metal code as C++")
    work = OUT / name
    work.mkdir(parents=True, exist_ok=True)
    for header, text in sources.items():
        (work / header).write_text(text)
    src = upstream / "vendor/llama.cpp/ggml/src"
    cmd = [cxx, "-std=c++17", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
           "-I", str(work), "-I", str(SHIM), "-I", str(src), "-I", str(src / "ggml-metal"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def build(upstream: Path, blocks: str, name: str) -> Path:
    exe = OUT / name / "nsq4_shim"
    # no FMA contraction and no fast math: the host must do exactly the operations the kernel source spells out
    proc = compile_shim(upstream, name, {"nsq4_metal_blocks.h": blocks},
                        "-O2", "-ffp-contract=off", str(SHIM / "nsq4_shim.cpp"), "-o", str(exe))
    assert proc.returncode == 0, proc.stderr
    return exe


def type_check_kernels(upstream: Path, kernels: str, name: str) -> subprocess.CompletedProcess:
    # Metal's attributes ([[host_name]], [[thread_position_in_grid]], ...) mean nothing to g++
    return compile_shim(upstream, name, {"nsq4_metal_blocks.h": extract_blocks(upstream),
                                         "nsq4_metal_kernels.h": LOCAL_INCLUDES.sub("", kernels)},
                        "-fsyntax-only", "-Wno-attributes", str(SHIM / "nsq4_kernels.cpp"))


def run(exe: Path, op: bytes, n: int, payload: bytes) -> bytes:
    proc = subprocess.run([str(exe)], input=op + struct.pack("<q", n) + payload, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def metal_quantize(exe: Path, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype="<f4").reshape(-1, ref.QK)
    out = run(exe, b"q", len(x), x.tobytes())
    assert len(out) == len(x) * ref.BLOCK_BYTES
    return np.frombuffer(out, dtype=np.uint8)


def metal_dequantize(exe: Path, raw: np.ndarray) -> dict[str, np.ndarray]:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.size // ref.BLOCK_BYTES
    out = run(exe, b"d", n, raw.tobytes())
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


def test_quantize_random_blocks_bit_exact(shim):
    x = np.concatenate([random_blocks(seed, 400) for seed in range(3)])
    got, want = metal_quantize(shim, x), ref.quantize(x)
    bad = np.flatnonzero((got != want).reshape(-1, ref.BLOCK_BYTES).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {len(x)} blocks differ, first at block {bad[0]}"


@pytest.mark.parametrize("name,block", adversarial_blocks().items(), ids=list(adversarial_blocks()))
def test_quantize_adversarial_block_bit_exact(shim, name, block):
    got, want = metal_quantize(shim, block), ref.quantize(block)
    assert got.tobytes() == want.tobytes(), f"{name}: d {got[:2].view('<f2')} vs {want[:2].view('<f2')}"


def test_quantize_fp16_subnormal_and_rounding_edges_bit_exact(shim):
    """d lands on fp16 subnormals, on the normal/subnormal boundary and on rounding ties of the conversion."""
    rng = np.random.default_rng(11)
    shape = rng.standard_normal((2000, ref.QK))
    scale = 2.0 ** rng.uniform(-24, -8, (2000, 1))
    x = (shape / np.abs(shape).max(axis=1, keepdims=True) * scale).astype(np.float32)
    got, want = metal_quantize(shim, x), ref.quantize(x)
    assert np.array_equal(got, want)
    d = want.reshape(-1, ref.BLOCK_BYTES)[:, :2].copy().view("<u2").reshape(-1)
    assert ((d > 0) & (d < 0x400)).sum() > 100, "the sweep must exercise fp16 subnormal scales"


def test_fp16_conversion_of_d_exact(shim):
    """nsq4_fp16_bits against IEEE round-to-nearest-even for every float in [0, 65504] whose low 13 bits are a
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


def dequantize_inputs() -> np.ndarray:
    rng = np.random.default_rng(5)
    quantized = ref.quantize(random_blocks(3, 100)).reshape(-1, ref.BLOCK_BYTES)
    arbitrary = rng.integers(0, 256, (500, ref.BLOCK_BYTES), dtype=np.uint8)
    d_bits = rng.integers(0, 0x7c00, 500).astype("<u2")  # every finite non-negative fp16, subnormals included
    d_bits[:4] = [0, 1, 0x3ff, 0x7bff]
    arbitrary[:, :2] = d_bits.view(np.uint8).reshape(-1, 2)
    arbitrary[:250, 1] |= 0x80  # negative d
    return np.concatenate([quantized, arbitrary]).reshape(-1)


def test_dequantize_exact(shim):
    raw = dequantize_inputs()
    want = ref.dequantize(raw)
    with np.errstate(over="ignore"):
        want_half = want.astype(np.float16)  # the half forms round the float product, to Inf beyond fp16
    for form, got in metal_dequantize(shim, raw).items():
        expect, as_bits = (want_half, np.uint16) if got.dtype == np.float16 else (want, np.uint32)
        bad = np.flatnonzero(got.view(as_bits) != expect.view(as_bits))
        assert bad.size == 0, f"dequantize_nsq4 {form}: {bad.size} values differ, first at value {bad[0]}"


def test_shim_catches_a_wrong_kernel(upstream_tree):
    """The comparison can fail: a one-character change to the Metal tie rule is detected."""
    blocks = extract_blocks(upstream_tree)
    assert blocks.count("c += 16*xg > ") == 1
    broken = build(upstream_tree, blocks.replace("c += 16*xg > ", "c += 16*xg >= "), "broken")
    x = np.concatenate([random_blocks(0, 200), adversarial_blocks()["ties on the grid"].reshape(1, -1)])
    assert not np.array_equal(metal_quantize(broken, x), ref.quantize(x))


def host_names(text: str, prefix: str) -> dict[str, str]:
    """kernel name -> its template arguments, for the instantiations whose name starts with prefix."""
    pat = re.compile(r'host_name\("(' + prefix + r'[^"]*)"\s*\)\]\].*?<(.*)>;')
    return {m.group(1): re.sub(r"\s+", " ", m.group(2)) for m in pat.finditer(text)}


def test_metal_instantiations_mirror_q4_0(upstream_tree):
    """Every flash-attention kernel q4_0 has at head sizes 64/128/256 exists for nsq4, with nsq4's block, its
    16-value (nl = 4) and 4-value (nl = 16) dequantizers, and the same remaining template arguments; and the
    set_rows/cpy/get_rows/F16-pre-conversion kernels, CMake sources and library entries are all there, in NSQ4's
    own libraries."""
    metal = upstream_tree / "vendor/llama.cpp/ggml/src/ggml-metal"
    heads = re.compile(r"_dk(64|128|256)_dv\1(_|$)")
    for q4_file, nsq4_file, deq, nl in (("fa_q4_0.metal", "fa_nsq4.metal", "dequantize_nsq4", 4),
                                        ("fa_vec_q4_0.metal", "fa_vec_nsq4.metal", "dequantize_nsq4_t4", 16)):
        q4 = host_names((metal / "kernels" / q4_file).read_text(), "kernel_flash_attn_ext_")
        ours = host_names((metal / "kernels" / nsq4_file).read_text(), "kernel_flash_attn_ext_")
        want = {name.replace("_q4_0_", "_nsq4_"): re.sub(r"block_q4_0, \d+, dequantize_q4_0(_t4)?",
                                                           f"block_nsq4, {nl}, {deq}", args)
                for name, args in q4.items() if heads.search(name)}
        assert ours == want, nsq4_file

    nsq4 = (metal / "kernels" / "nsq4.metal").read_text()
    assert host_names(nsq4, "kernel_") == {
        "kernel_set_rows_f32_i64_nsq4": "int64_t", "kernel_set_rows_f32_i32_nsq4": "int32_t",
        "kernel_cpy_nsq4_f32": "float4x4", "kernel_cpy_nsq4_f16": "half4x4"}
    templates = set(re.findall(r"^template\s*<.*>\nkernel void (\w+)\(", nsq4, re.M))
    plain = set(re.findall(r"^kernel void (\w+)\(", nsq4, re.M)) - templates
    assert plain == {"kernel_cpy_f32_nsq4", "kernel_get_rows_nsq4", "kernel_flash_attn_ext_kv_nsq4_f16"}

    cmake = (metal / "CMakeLists.txt").read_text()
    nsq4_sources = re.search(r"set\(METALLIB_NSQ4_SOURCES\n(.*?)\)", cmake, re.S).group(1).split()
    device = (metal / "ggml-metal-device.m").read_text()
    for lib in ("nsq4", "fa_nsq4", "fa_vec_nsq4"):
        assert f"kernels/{lib}.metal" in nsq4_sources
        assert re.search(r"X\(\w+,\s+" + lib + r"\)", device)


def test_nsq4_kernels_type_check_on_the_host(upstream_tree):
    """kernels/nsq4.metal compiles as C++ against the shim: every name, argument-struct field and type its kernels
    use exists, and every template instantiation goes through. A misspelt field is caught (negative control)."""
    kernels = (upstream_tree / KERNELS / "nsq4.metal").read_text()
    proc = type_check_kernels(upstream_tree, kernels, "kernels")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert kernels.count("args.nk0") == 3
    broken = type_check_kernels(upstream_tree, kernels.replace("args.nk0", "args.nk1", 1), "kernels-broken")
    assert broken.returncode != 0 and "nk1" in broken.stderr
