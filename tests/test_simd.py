"""NSQ4's and NSQ3's CPU kernels (SIMD where ggml-cpu has them) against nsq_local/reference.py, natively and for
aarch64.

tests/c/nsq4_check.c runs the CPU backend's from_float and vec_dot of either type on blocks written from here, and
tests/c/nsq4_fattn.c its flash attention over a K and V cache of either type (the two may differ). The native run
links the libraries next to the tools (NSQ_TOOLS_DIR, built by tests/run.sh); the aarch64 run cross-builds
ggml-base and ggml-cpu from the patched tree (NSQ_UPSTREAM_TREE, default build/upstream) twice, with and without
the dot-product extension, and runs them under qemu-aarch64. The AVX-512 kernels, which the default build
(AVX2/FMA/F16C) leaves out, get their own -DGGML_AVX512=ON build of the two libraries, and the generic C code that
x86 without AVX2, POWER, RISC-V, s390x and LoongArch run gets an x86 build with every SIMD option off.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import KV_TYPES, ROOT, check_kernels, kernel_inputs, need, require_tool, run_logged, tools_dir
from nsq_local import reference as ref

CHECK_SRC = ROOT / "tests" / "c" / "nsq4_check.c"
FATTN_SRC = ROOT / "tests" / "c" / "nsq4_fattn.c"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
AARCH64_ARCHS = {"dotprod": "armv8.2-a+dotprod", "plain": "armv8-a"}
APT_HINT = "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user"


def compile_check(cc: str, lib_dir: Path, out: Path, tree: Path) -> Path:
    """Builds nsq4_check and, beside it, nsq4_fattn (see fattn_cmd) against the ggml libraries in lib_dir and the
    headers of the patched tree."""
    include = tree / "vendor" / "llama.cpp" / "ggml" / "include"
    if not include.is_dir():
        pytest.fail(f"{include} is missing: prepare the patched tree with `python3 ggml_patch/prepare.py "
                    f"--dest build/upstream` (or set NSQ_UPSTREAM_TREE)")
    for src in (CHECK_SRC, FATTN_SRC):
        run_logged([cc, "-O2", "-std=c11", str(src), "-I", str(include), "-L", str(lib_dir), "-lggml-cpu",
                    "-lggml-base", "-lm", f"-Wl,-rpath,{lib_dir}", "-o", str(out / src.stem)],
                   out / f"{src.stem}-build.log")
    return out / CHECK_SRC.stem


def fattn_cmd(check_cmd: list[str]) -> list[str]:
    """The nsq4_fattn that compile_check built beside a check command's nsq4_check, with the same runner."""
    return [*check_cmd[:-1], str(Path(check_cmd[-1]).with_name(FATTN_SRC.stem))]


@pytest.fixture(scope="session")
def native_check(upstream_tree, tmp_path_factory) -> list[str]:
    lib_dir = tools_dir()
    if not (lib_dir / "libggml-cpu.so").is_file():
        pytest.fail(f"{lib_dir}/libggml-cpu.so is missing: build the tools with `bash tests/run.sh` "
                    f"(or set NSQ_TOOLS_DIR)")
    return [str(compile_check(need("cc", "install a C compiler"), lib_dir, tmp_path_factory.mktemp("native"),
                              upstream_tree))]


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def build_x86_variant(upstream_tree: Path, out: Path, options: list[str]) -> Path:
    """ggml-base and ggml-cpu of the patched tree with other x86 instruction-set options, and the checks against
    them."""
    build = out / "build"
    run_logged(["cmake", "-S", str(upstream_tree / "vendor" / "llama.cpp"), "-B", str(build), "-G", "Ninja",
                "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", *options, "-DGGML_OPENMP=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"], out / "configure.log")
    jobs = os.environ.get("NSQ_BUILD_JOBS", str(os.cpu_count() or 2))
    run_logged(["cmake", "--build", str(build), "-j", jobs, "--target", "ggml-base", "ggml-cpu"], out / "build.log")
    return compile_check(need("cc", "install a C compiler"), build / "bin", out, upstream_tree)


@pytest.fixture(scope="session")
def generic_check(upstream_tree, tmp_path_factory) -> list[str]:
    """The generic C kernels: no SSE4.2, AVX, AVX2, FMA, F16C or BMI2, so arch/x86/quants.c falls back to them."""
    if os.uname().machine != "x86_64":
        pytest.skip("the generic build turns off x86 options; elsewhere the native build covers its own kernels")
    options = [f"-DGGML_{o}=OFF" for o in ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")]
    return [str(build_x86_variant(upstream_tree, tmp_path_factory.mktemp("generic"), options))]


@pytest.fixture(scope="session")
def avx512_check(upstream_tree, tmp_path_factory) -> list[str]:
    exe = build_x86_variant(upstream_tree, tmp_path_factory.mktemp("avx512"), ["-DGGML_AVX512=ON"])
    # the build compiles everywhere; running it needs the instructions ggml's AVX512 option turns on
    missing = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"} - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}: the AVX-512 build compiled but cannot run here")
    return [str(exe)]


@pytest.fixture(scope="session", params=list(AARCH64_ARCHS))
def aarch64_check(request, upstream_tree, tmp_path_factory) -> list[str]:
    cc = require_tool("aarch64-linux-gnu-gcc", f"gcc-aarch64-linux-gnu ({APT_HINT})")
    cxx = require_tool("aarch64-linux-gnu-g++", f"g++-aarch64-linux-gnu ({APT_HINT})")
    qemu = require_tool("qemu-aarch64", f"qemu-user ({APT_HINT})")
    out = tmp_path_factory.mktemp(f"aarch64-{request.param}")
    toolchain = out / "toolchain.cmake"
    toolchain.write_text("set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR aarch64)\n"
                         f"set(CMAKE_C_COMPILER {cc})\nset(CMAKE_CXX_COMPILER {cxx})\n")
    build = out / "build"
    run_logged(["cmake", "-S", str(upstream_tree / "vendor" / "llama.cpp"), "-B", str(build), "-G", "Ninja",
                f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
                f"-DGGML_CPU_ARM_ARCH={AARCH64_ARCHS[request.param]}", "-DGGML_OPENMP=OFF", "-DLLAMA_BUILD_TESTS=ON",
                "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF"], out / "configure.log")
    targets = ["ggml-base", "ggml-cpu"] + (["test-quantize-fns"] if request.param == "dotprod" else [])
    jobs = os.environ.get("NSQ_BUILD_JOBS", str(os.cpu_count() or 2))
    run_logged(["cmake", "--build", str(build), "-j", jobs, "--target", *targets], out / "build.log")
    exe = compile_check(cc, build / "bin", out, upstream_tree)
    return [qemu, "-L", str(AARCH64_SYSROOT), str(exe)]


def test_tables_within_simd_bounds():
    """The SIMD quantizers' integer sums and int16 compares are exact for codebook values in [-127, 127] and scale
    candidates in [64, 160] (they need int8 values, 16*2047 <= INT16_MAX and int32 sums of 64 xg*v); a table
    change beyond these bounds must come with a review of arch/*/quants.c."""
    assert ref.KVALUES.min() >= -127 and ref.KVALUES.max() <= 127
    assert ref.KSCALES.min() >= 64 and ref.KSCALES.max() <= 160
    assert len(ref.KVALUES) == 16 and len(ref.KSCALES) == 16


def test_nsq3_tables_within_simd_bounds():
    """NSQ3's SIMD quantizers take int8 codebook values (16 scale candidates, 8 values) and search the candidates in
    int64 where the reference sums its errors in uint32: they agree only while no candidate's error wraps, i.e.
    64 times the largest |8*xg - v*S| (clipping at the smallest S, or half the widest gap at the largest) squared
    stays below 2**32."""
    kv, ks = ref.NSQ3_KVALUES, ref.NSQ3_KSCALES
    assert kv.min() >= -127 and kv.max() <= 127 and len(kv) == 8 and len(ks) == 16
    worst = max(8 * ref.GRID - min(kv.max(), -kv.min()) * ks.min(),
                int(np.diff(kv).max()) * ks.max() // 2 + 1)
    assert 64 * worst**2 < 2**32


def check_rows(cmd: list[str], tmp_path: Path, kind: str, blocks_per_row: int, qtype: str) -> None:
    """check_kernels on one kind of input for qtype, cut into rows of blocks_per_row blocks."""
    x = kernel_inputs(qtype)[kind]
    rows = x.shape[0] // blocks_per_row
    check_kernels(cmd, tmp_path, x[: rows * blocks_per_row], blocks_per_row * ref.QK, qtype)


@pytest.mark.parametrize("blocks_per_row", range(1, 10))
@pytest.mark.parametrize("kind", ["random", "adversarial", "thresholds", "grid ties"])
@pytest.mark.parametrize("qtype", list(KV_TYPES))
def test_native_kernels(native_check, tmp_path, kind, blocks_per_row, qtype):
    check_rows(native_check, tmp_path, kind, blocks_per_row, qtype)


@pytest.mark.parametrize("blocks_per_row", [1, 2, 7])
@pytest.mark.parametrize("kind", ["random", "adversarial", "thresholds", "grid ties"])
@pytest.mark.parametrize("qtype", list(KV_TYPES))
def test_generic_kernels(generic_check, tmp_path, kind, blocks_per_row, qtype):
    check_rows(generic_check, tmp_path, kind, blocks_per_row, qtype)


@pytest.mark.parametrize("blocks_per_row", [1, 2, 7])
@pytest.mark.parametrize("kind", ["random", "adversarial", "thresholds", "grid ties"])
@pytest.mark.parametrize("qtype", list(KV_TYPES))
def test_avx512_kernels(avx512_check, tmp_path, kind, blocks_per_row, qtype):
    check_rows(avx512_check, tmp_path, kind, blocks_per_row, qtype)


@pytest.mark.parametrize("blocks_per_row", [1, 2, 7])
@pytest.mark.parametrize("kind", ["random", "adversarial", "thresholds", "grid ties"])
@pytest.mark.parametrize("qtype", list(KV_TYPES))
def test_aarch64_kernels(aarch64_check, tmp_path, kind, blocks_per_row, qtype):
    check_rows(aarch64_check, tmp_path, kind, blocks_per_row, qtype)


@pytest.mark.parametrize("aarch64_check", ["dotprod"], indirect=True)  # built there only, to keep CI time down
def test_aarch64_quantize_fns(aarch64_check):
    """ggml's own test-quantize-fns under qemu."""
    exe = Path(aarch64_check[-1]).parent / "build" / "bin" / "test-quantize-fns"
    r = subprocess.run([*aarch64_check[:-1], str(exe)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "nsq4" in r.stdout


# Flash attention over an NSQ4 or NSQ3 cache: (DK, DV, query rows, KV cells, heads, KV heads, softcap, threads).
# Every batch takes one path (ops.cpp): cells in chunks of 256, each in tiles of 64; up to 64 query rows per KV head
# (a decode) share the chunks out between threads and merge after, more take tiles of 64 rows; tiles of up to 8 rows
# accumulate V with the heads kernel, larger ones with a GEMM. GQA shapes check the query-to-KV head map.
# check_fattn masks about a third of the cells. K and V of each type, and NSQ3 caches' mixes (K in NSQ4 where
# per-layer precision keeps it there, or by choice), take the same paths.
FATTN_CASES = {
    "decode-gqa4-d256": (256, 256, 1, 2048, 4, 1, 0.0, 2),
    "decode-gqa3-d64-3threads": (64, 64, 1, 2048, 9, 3, 0.0, 3),
    "decode-mha-d64": (64, 64, 1, 2048, 2, 2, 0.0, 2),
    "decode-gqa4-softcap": (128, 128, 1, 2048, 8, 2, 30.0, 2),
    "window-gqa4-d256": (256, 256, 1, 1024, 4, 1, 0.0, 2),
    "short-gqa2-d64": (64, 64, 1, 256, 4, 2, 0.0, 2),
    # fewer chunks than threads: a thread with none
    "tiny-gqa4-3threads": (64, 64, 1, 4, 4, 1, 0.0, 3),
    "rows-mha-d64": (64, 64, 3, 256, 4, 4, 0.0, 2),
    "prefill-d64": (64, 64, 80, 512, 4, 2, 0.0, 2),
    "prefill-gqa4-d128-softcap": (128, 128, 20, 700, 8, 2, 30.0, 3),
}


def attention_f64(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float,
                  softcap: float) -> np.ndarray:
    """q (heads, n_q, DK), k (kv heads, n_kv, DK), v (kv heads, n_kv, DV) in float64 -> (n_q, heads, DV)."""
    group = q.shape[0] // k.shape[0]
    out = np.empty((q.shape[1], q.shape[0], v.shape[2]))
    for h in range(q.shape[0]):
        s = q[h] @ k[h // group].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = s + mask
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[h // group]
    return out


KV_PAIRS = ["nsq4/nsq4", "nsq3/nsq3", "nsq4/nsq3", "nsq3/nsq4"]


def fattn_inputs(case: str, kv: str):
    """q, K and V (quantized to the kv pair's types), the mask and the scale of a FATTN_CASES case."""
    dk, dv, n_q, n_kv, n_head, n_head_kv, softcap, threads = FATTN_CASES[case]
    rng = np.random.default_rng(len(case))
    # keys with a shared offset and two outlier channels, as real K caches have; queries strong enough that the
    # softmax is far from uniform
    k = (rng.standard_normal((n_head_kv, n_kv, dk)) + rng.standard_normal(dk)).astype(np.float32)
    k[..., :2] *= 8
    v = rng.standard_normal((n_head_kv, n_kv, dv)).astype(np.float32)
    q = (2 * rng.standard_normal((n_head, n_q, dk))).astype(np.float32)
    # causal over the last n_q cells, a quarter of the rest masked at random, and a masked run of cells (what a
    # sliding window leaves)
    mask = np.where(rng.random((n_q, n_kv)) < 0.25, -np.inf, 0.0).astype(np.float32)
    mask[:, n_kv // 8: n_kv // 4] = -np.inf
    mask[np.arange(n_q)[:, None] < np.arange(n_kv)[None, :] - (n_kv - n_q)] = -np.inf
    mask[:, n_kv - n_q] = 0.0
    ktype, vtype = kv.split("/")
    return q, KV_TYPES[ktype].quantize(k.reshape(-1)), KV_TYPES[vtype].quantize(v.reshape(-1)), mask, 1 / np.sqrt(dk)


def run_fattn(cmd: list[str], tmp_path: Path, case: str, kv: str, q: np.ndarray, qk: np.ndarray, qv: np.ndarray,
              mask: np.ndarray, scale: float, threads: int) -> np.ndarray:
    """nsq4_fattn on the query rows in q (heads, rows, DK) with their mask rows: (rows, heads, DV)."""
    dk, dv, _, n_kv, n_head, n_head_kv, softcap, _ = FATTN_CASES[case]
    (tmp_path / "q.f32").write_bytes(np.ascontiguousarray(q).tobytes())
    (tmp_path / "k.bin").write_bytes(qk.tobytes())
    (tmp_path / "v.bin").write_bytes(qv.tobytes())
    (tmp_path / "mask.f32").write_bytes(np.ascontiguousarray(mask).tobytes())
    n_q = q.shape[1]
    run_logged([*cmd, str(tmp_path), *map(str, (dk, dv, n_q, n_kv, n_head, n_head_kv, scale, softcap, threads)),
                *kv.split("/")], tmp_path / "run.log")
    return np.fromfile(tmp_path / "out.f32", dtype=np.float32).reshape(n_q, n_head, dv)


def check_fattn(cmd: list[str], tmp_path: Path, case: str, kv: str = "nsq4/nsq4") -> None:
    softcap, threads = FATTN_CASES[case][6:]
    q, qk, qv, mask, scale = fattn_inputs(case, kv)
    got = run_fattn(cmd, tmp_path, case, kv, q, qk, qv, mask, scale, threads)

    ktype, vtype = kv.split("/")
    n_head_kv = FATTN_CASES[case][5]
    kd = KV_TYPES[ktype].dequantize(qk).reshape(n_head_kv, -1, q.shape[2]).astype(np.float64)
    vd = KV_TYPES[vtype].dequantize(qv).reshape(n_head_kv, kd.shape[1], -1).astype(np.float64)
    want = attention_f64(q.astype(np.float64), kd, vd, mask.astype(np.float64), float(np.float32(scale)), softcap)
    # float32 logits, softmax and accumulation over the cells: errors of at most ~1e-6 of V's largest value; a
    # wrong row, head or mask would miss by about V's size
    err = np.abs(got.astype(np.float64) - want).max()
    assert err < 2e-5 * np.abs(vd).max(), f"max error {err:.3g} (V up to {np.abs(vd).max():.3g})"


def check_batch_invariance(cmd: list[str], tmp_path: Path, case: str, kv: str) -> None:
    """Each query row's result is the same to the bit alone (a decode, on one thread), with a few other rows (on
    three threads) and in the whole batch: a 3- or 4-bit cache turns a last-bit difference in one layer's attention
    into other codes in the next layer's K, so prefill and decode must not differ at all (docs/quality.md)."""
    q, qk, qv, mask, scale = fattn_inputs(case, kv)
    n_q = q.shape[1]
    whole = run_fattn(cmd, tmp_path, case, kv, q, qk, qv, mask, scale, FATTN_CASES[case][7])
    parts = [(range(i, i + 1), 1) for i in (0, n_q // 2, n_q - 1)] + [(range(n_q // 3, min(n_q, n_q // 3 + 3)), 3)]
    for rows, threads in parts:
        sel = list(rows)
        got = run_fattn(cmd, tmp_path, case, kv, q[:, sel], qk, qv, mask[sel], scale, threads)
        differ = got.view(np.uint32) != whole[sel].view(np.uint32)
        assert not differ.any(), (f"rows {sel[0]}..{sel[-1]} on {threads} thread(s) differ from the batch in "
                                  f"{differ.sum()} of {differ.size} values, by up to "
                                  f"{np.abs(got - whole[sel]).max():.3g}")


@pytest.mark.parametrize("kv", KV_PAIRS)
@pytest.mark.parametrize("case", list(FATTN_CASES))
def test_native_flash_attention(native_check, tmp_path, case, kv):
    check_fattn(fattn_cmd(native_check), tmp_path, case, kv)


@pytest.mark.parametrize("kv", KV_PAIRS)
@pytest.mark.parametrize("case", list(FATTN_CASES))
def test_generic_flash_attention(generic_check, tmp_path, case, kv):
    check_fattn(fattn_cmd(generic_check), tmp_path, case, kv)


@pytest.mark.parametrize("kv", KV_PAIRS)
@pytest.mark.parametrize("case", list(FATTN_CASES))
def test_avx512_flash_attention(avx512_check, tmp_path, case, kv):
    check_fattn(fattn_cmd(avx512_check), tmp_path, case, kv)


@pytest.mark.parametrize("kv", KV_PAIRS)
@pytest.mark.parametrize("case", ["decode-gqa4-d256", "short-gqa2-d64", "rows-mha-d64", "prefill-d64"])
def test_aarch64_flash_attention(aarch64_check, tmp_path, case, kv):
    check_fattn(fattn_cmd(aarch64_check), tmp_path, case, kv)


# batches of rows in tiles of 64, some of up to 8 rows (V by the heads kernel), over partial chunks and tiles
INVARIANCE_CASES = ["prefill-d64", "prefill-gqa4-d128-softcap", "rows-mha-d64"]


@pytest.mark.parametrize("kv", KV_PAIRS[:3])
@pytest.mark.parametrize("case", INVARIANCE_CASES)
def test_native_flash_attention_batch_invariant(native_check, tmp_path, case, kv):
    check_batch_invariance(fattn_cmd(native_check), tmp_path, case, kv)


@pytest.mark.parametrize("case", INVARIANCE_CASES)
def test_generic_flash_attention_batch_invariant(generic_check, tmp_path, case):
    check_batch_invariance(fattn_cmd(generic_check), tmp_path, case, "nsq4/nsq3")


@pytest.mark.parametrize("case", INVARIANCE_CASES)
def test_avx512_flash_attention_batch_invariant(avx512_check, tmp_path, case):
    check_batch_invariance(fattn_cmd(avx512_check), tmp_path, case, "nsq4/nsq3")


@pytest.mark.parametrize("case", ["prefill-gqa4-d128-softcap"])
def test_aarch64_flash_attention_batch_invariant(aarch64_check, tmp_path, case):
    check_batch_invariance(fattn_cmd(aarch64_check), tmp_path, case, "nsq4/nsq3")
