"""NSQ4's CPU kernels (SIMD where ggml-cpu has them) against nsq_local/reference.py, natively and for aarch64.

tests/c/nsq4_check.c runs the CPU backend's from_float and vec_dot on blocks written from here. The native run
links the libraries next to the tools (NSQ_TOOLS_DIR, built by tests/run.sh); the aarch64 run cross-builds
ggml-base and ggml-cpu from the patched tree (NSQ_UPSTREAM_TREE, default build/upstream) twice, with and without
the dot-product extension, and runs them under qemu-aarch64.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nsq_local import reference as ref
from conftest import ROOT, tools_dir
from test_reference import adversarial_blocks, random_blocks

CHECK_SRC = ROOT / "tests" / "c" / "nsq4_check.c"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
AARCH64_ARCHS = {"dotprod": "armv8.2-a+dotprod", "plain": "armv8-a"}
APT_HINT = "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user"


def upstream_tree() -> Path:
    return Path(os.environ.get("NSQ_UPSTREAM_TREE", ROOT / "build" / "upstream"))


def need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: {hint}")
    return path


def run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({r.returncode}); see {log}:\n{log.read_text()[-3000:]}")


def compile_check(cc: str, lib_dir: Path, out: Path) -> Path:
    include = upstream_tree() / "vendor" / "llama.cpp" / "ggml" / "include"
    if not include.is_dir():
        pytest.fail(f"{include} is missing: prepare the patched tree with `python3 ggml_patch/prepare.py "
                    f"--dest build/upstream` (or set NSQ_UPSTREAM_TREE)")
    exe = out / "nsq4_check"
    run([cc, "-O2", "-std=c11", str(CHECK_SRC), "-I", str(include), "-L", str(lib_dir), "-lggml-cpu", "-lggml-base",
         "-lm", f"-Wl,-rpath,{lib_dir}", "-o", str(exe)], out / "nsq4_check-build.log")
    return exe


@pytest.fixture(scope="session")
def native_check(tmp_path_factory) -> list[str]:
    lib_dir = tools_dir()
    if not (lib_dir / "libggml-cpu.so").is_file():
        pytest.fail(f"{lib_dir}/libggml-cpu.so is missing: build the tools with `bash tests/run.sh` "
                    f"(or set NSQ_TOOLS_DIR)")
    return [str(compile_check(need("cc", "install a C compiler"), lib_dir, tmp_path_factory.mktemp("native")))]


@pytest.fixture(scope="session", params=list(AARCH64_ARCHS))
def aarch64_check(request, tmp_path_factory) -> list[str]:
    cc = need("aarch64-linux-gnu-gcc", APT_HINT)
    cxx = need("aarch64-linux-gnu-g++", APT_HINT)
    qemu = need("qemu-aarch64", APT_HINT)
    out = tmp_path_factory.mktemp(f"aarch64-{request.param}")
    toolchain = out / "toolchain.cmake"
    toolchain.write_text("set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR aarch64)\n"
                         f"set(CMAKE_C_COMPILER {cc})\nset(CMAKE_CXX_COMPILER {cxx})\n")
    build = out / "build"
    run(["cmake", "-S", str(upstream_tree() / "vendor" / "llama.cpp"), "-B", str(build), "-G", "Ninja",
         f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
         f"-DGGML_CPU_ARM_ARCH={AARCH64_ARCHS[request.param]}", "-DGGML_OPENMP=OFF", "-DLLAMA_BUILD_TESTS=ON",
         "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF"], out / "configure.log")
    targets = ["ggml-base", "ggml-cpu"] + (["test-quantize-fns"] if request.param == "dotprod" else [])
    jobs = os.environ.get("NSQ_BUILD_JOBS", str(os.cpu_count() or 2))
    run(["cmake", "--build", str(build), "-j", jobs, "--target", *targets], out / "build.log")
    exe = compile_check(cc, build / "bin", out)
    return [qemu, "-L", str(AARCH64_SYSROOT), str(exe)]


def test_inputs() -> dict[str, np.ndarray]:
    """Blocks for the kernels: random, adversarial, and values exactly on the code thresholds and grid ties."""
    rng = np.random.default_rng(11)
    # xg = 16*xg > (kv[m]+kv[m+1])*S holds with equality when xg = mid*S/16; a block whose max is 2047 puts
    # every such integer xg on the grid exactly
    mids = (ref.KVALUES[:-1] + ref.KVALUES[1:])[None, :] * ref.KSCALES[:, None]
    on_thresholds = (mids[mids % 16 == 0] // 16).astype(np.float32)
    on_thresholds = on_thresholds[np.abs(on_thresholds) <= 2047]
    tie_blocks = []
    for _ in range(64):
        b = rng.choice(on_thresholds, 64).astype(np.float32)
        b[rng.integers(64)] = 2047 * rng.choice([-1, 1])
        tie_blocks.append(b * np.float32(2.0 ** rng.integers(-20, 20)))
    half_steps = rng.integers(-4094, 4095, (64, 64)).astype(np.float32) / 2  # x*inv = n + 0.5: round half even
    half_steps[:, 0] = 2047
    return {
        "random": random_blocks(3, 300),
        "adversarial": np.stack(list(adversarial_blocks().values())),
        "thresholds": np.stack(tie_blocks),
        "grid ties": half_steps,
    }


def reference_dot(qx: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row dot products of nsq4 rows with float32 rows, exact in float64, and the sum of |terms| as their scale."""
    xb = qx.reshape(-1, ref.BLOCK_BYTES)
    dx = xb[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
    codes = np.concatenate([xb[:, 2:] & 0xF, xb[:, 2:] >> 4], axis=1)
    # d*value is exact in float64, and so is each product with a float32 y (11 + 8 + 24 significant bits)
    terms = (dx[:, None] * ref.KVALUES[codes]).reshape(-1) * y.astype(np.float64)
    rows = terms.reshape(-1, k)
    return rows.sum(axis=1), np.abs(rows).sum(axis=1)


def check_kernels(cmd: list[str], tmp_path: Path, x: np.ndarray, k: int) -> None:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    rng = np.random.default_rng(x.size)
    y = rng.standard_normal(x.size).astype(np.float32)
    (tmp_path / "x.f32").write_bytes(x.tobytes())
    (tmp_path / "y.f32").write_bytes(y.tobytes())
    prefix = tmp_path / "out"
    run([*cmd, str(tmp_path / "x.f32"), str(tmp_path / "y.f32"), str(k), str(prefix)], tmp_path / "run.log")
    qx = np.fromfile(f"{prefix}.nsq4", dtype=np.uint8)
    qy = np.fromfile(f"{prefix}.y", dtype=np.float32)
    dot = np.fromfile(f"{prefix}.dot", dtype=np.float32)

    expected = ref.quantize(x)
    bad = np.flatnonzero((qx != expected).reshape(-1, ref.BLOCK_BYTES).any(axis=1))
    assert bad.size == 0, f"from_float differs from the reference in {bad.size} blocks, first {bad[:8]}"
    # vec_dot_type F32: Q reaches the dot product unrounded
    np.testing.assert_array_equal(qy, y)
    want, scale = reference_dot(qx, y, k)
    # float32 accumulation of at most 9*64 terms: every kernel's chain of roundings is far shorter than 128, so
    # the error stays below 128 float32 epsilons of the terms' magnitude (a q8_0-rounded Q would miss by ~1e-2)
    np.testing.assert_array_less(np.abs(dot.astype(np.float64) - want), 128 * 2.0**-24 * scale + 1e-37)


def test_tables_within_simd_bounds():
    """The SIMD quantizers' integer sums and int16 compares are exact for codebook values in [-127, 127] and scale
    candidates in [64, 160] (they need int8 values, 16*2047 <= INT16_MAX and int32 sums of 64 xg*v); a table
    change beyond these bounds must come with a review of arch/*/quants.c."""
    assert ref.KVALUES.min() >= -127 and ref.KVALUES.max() <= 127
    assert ref.KSCALES.min() >= 64 and ref.KSCALES.max() <= 160
    assert len(ref.KVALUES) == 16 and len(ref.KSCALES) == 16


@pytest.mark.parametrize("blocks_per_row", range(1, 10))
@pytest.mark.parametrize("kind", ["random", "adversarial", "thresholds", "grid ties"])
def test_native_kernels(native_check, tmp_path, kind, blocks_per_row):
    x = test_inputs()[kind]
    rows = x.shape[0] // blocks_per_row
    check_kernels(native_check, tmp_path, x[: rows * blocks_per_row], blocks_per_row * ref.QK)


@pytest.mark.parametrize("blocks_per_row", [1, 2, 7])
@pytest.mark.parametrize("kind", ["random", "adversarial", "thresholds", "grid ties"])
def test_aarch64_kernels(aarch64_check, tmp_path, kind, blocks_per_row):
    x = test_inputs()[kind]
    rows = x.shape[0] // blocks_per_row
    check_kernels(aarch64_check, tmp_path, x[: rows * blocks_per_row], blocks_per_row * ref.QK)


@pytest.mark.parametrize("aarch64_check", ["dotprod"], indirect=True)  # built there only, to keep CI time down
def test_aarch64_quantize_fns(aarch64_check):
    """ggml's own test-quantize-fns under qemu."""
    exe = Path(aarch64_check[-1]).parent / "build" / "bin" / "test-quantize-fns"
    r = subprocess.run([*aarch64_check[:-1], str(exe)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "nsq4" in r.stdout
