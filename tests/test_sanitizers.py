"""NSQ4's and NSQ3's C code under AddressSanitizer and UndefinedBehaviorSanitizer.

ggml-base and ggml-cpu are built from the patched tree with -fsanitize=address,undefined into build/asan (only
those two libraries: 30 compile steps at -O1), then tests/c/nsq4_check.c (the CPU backend's NSQ4 and NSQ3
from_float and vec_dot, against the numpy reference, on random, adversarial, threshold and fuzz-corpus blocks) and ggml's own
test-quantize-fns are compiled against them with the same flags and run. Every UBSan check halts at its first
report except the alignment check, which is recoverable only so that a suppressions file can exempt the
upstream kernels listed in UBSAN_SUPPRESSIONS; halt_on_error still stops at any other alignment report.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import KV_TYPES, ROOT, check_kernels, kernel_inputs, need, run_logged

SAN_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fsanitize-recover=alignment",
             "-fno-omit-frame-pointer"]
# Upstream kernels that UBSan flags, none of them NSQ4's, one function at a time. q1_0's AVX2 dot product reads its
# 2-byte-aligned bit planes as uint32_t (harmless on x86, where unaligned loads are legal).
UBSAN_SUPPRESSIONS = "alignment:ggml_vec_dot_q1_0_q8_0\n"


@pytest.fixture(scope="session")
def asan_libs(upstream_tree, tmp_path_factory) -> Path:
    build = ROOT / "build" / "asan"
    logs = tmp_path_factory.mktemp("asan")
    flags = " ".join(SAN_FLAGS)
    link = "-fsanitize=address,undefined"
    run_logged(["cmake", "-S", str(upstream_tree / "vendor" / "llama.cpp"), "-B", str(build), "-G", "Ninja",
                "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_C_FLAGS_DEBUG=-O1 -g", "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g",
                f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_EXE_LINKER_FLAGS={link}",
                f"-DCMAKE_SHARED_LINKER_FLAGS={link}", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"], logs / "configure.log")
    jobs = os.environ.get("NSQ_BUILD_JOBS", str(os.cpu_count() or 2))
    run_logged(["cmake", "--build", str(build), "-j", jobs, "--target", "ggml-base", "ggml-cpu"], logs / "build.log")
    lib_dir = build / "bin"
    cpu = (lib_dir / "libggml-cpu.so").read_bytes()
    assert b"__asan_report_load" in cpu and b"__ubsan_handle_" in cpu, "libggml-cpu.so is not instrumented"
    return lib_dir


def compile_sanitized(compiler: str, src: Path, lib_dir: Path, upstream_tree: Path, out: Path, std: str) -> Path:
    exe = out / src.stem
    run_logged([need(compiler, "install gcc and g++"), f"-std={std}", "-O1", "-g", *SAN_FLAGS, str(src),
                "-I", str(upstream_tree / "vendor" / "llama.cpp" / "ggml" / "include"), "-L", str(lib_dir),
                "-lggml-cpu", "-lggml-base", "-lm", f"-Wl,-rpath,{lib_dir}", "-o", str(exe)],
               out / f"{src.stem}-build.log")
    return exe


@pytest.fixture
def sanitizer_env(monkeypatch, tmp_path):
    supp = tmp_path / "ubsan.supp"
    supp.write_text(UBSAN_SUPPRESSIONS)
    # detect_leaks=0: the programs free at exit only what they must; this is about memory errors, not leaks
    monkeypatch.setenv("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
    monkeypatch.setenv("UBSAN_OPTIONS", f"halt_on_error=1:print_stacktrace=1:suppressions={supp}")


@pytest.fixture(scope="session")
def nsq4_check_asan(asan_libs, upstream_tree, tmp_path_factory) -> list[str]:
    src = ROOT / "tests" / "c" / "nsq4_check.c"
    return [str(compile_sanitized("cc", src, asan_libs, upstream_tree, tmp_path_factory.mktemp("check"), "c11"))]


def sanitizer_inputs(qtype: str) -> dict[str, np.ndarray]:
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
    import nsq4_fuzz

    corpus = sorted((ROOT / "tests" / "fuzz" / "corpus").iterdir())
    x = np.concatenate([nsq4_fuzz.blocks_from_bytes(p.read_bytes()) for p in corpus])
    return {**kernel_inputs(qtype), "fuzz corpus": x.reshape(-1, 64)}


@pytest.mark.parametrize("blocks_per_row", [1, 3, 8])
@pytest.mark.parametrize("kind", ["random", "adversarial", "thresholds", "grid ties", "fuzz corpus"])
@pytest.mark.parametrize("qtype", list(KV_TYPES))
def test_kernels_under_sanitizers(nsq4_check_asan, sanitizer_env, tmp_path, kind, blocks_per_row, qtype):
    x = sanitizer_inputs(qtype)[kind]
    rows = x.shape[0] // blocks_per_row
    check_kernels(nsq4_check_asan, tmp_path, x[: rows * blocks_per_row], blocks_per_row * 64, qtype)


def test_quantize_fns_under_sanitizers(asan_libs, upstream_tree, sanitizer_env, tmp_path):
    src = upstream_tree / "vendor" / "llama.cpp" / "tests" / "test-quantize-fns.cpp"
    exe = compile_sanitized("c++", src, asan_libs, upstream_tree, tmp_path, "c++17")
    r = subprocess.run([str(exe), "-v"], capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "runtime error" not in out and "AddressSanitizer" not in out, out[-4000:]
    checks = re.findall(r"nsq4 (absolute quantization error|reference implementation error|dot product error):"
                        r"\s+(\w+)", r.stdout)
    assert len(checks) == 3 and all(result == "ok" for _, result in checks), r.stdout[-3000:]
    assert "0 tests failed" in r.stdout
