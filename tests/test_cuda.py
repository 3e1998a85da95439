"""The CUDA side of NSQ4 and NSQ3 (the ggml-cuda-nsq patch) without a GPU: every translation
unit the patches add or change compiles with nvcc for sm_80 and sm_90 with the flags of the real -DGGML_CUDA=ON build,
and the block quantizers those kernels run (ggml-cuda/nsq4.cuh, nsq3.cuh) are bit-exact with nsq_local/reference.py
when the same code runs on the host, as is the NSQ3 code unpacking of the flash-attention kernels.

Nothing here runs on a GPU: the device paths of nsq4.cuh and nsq3.cuh differ from the host path only in using the IEEE
round-to-nearest intrinsics (__fmul_rn, __fdiv_rn, __fsqrt_rn) where the host uses the IEEE operators.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import pytest

import helpers
from helpers import ROOT, missing_tool, require_tool
from nsq_local import reference

OUT = ROOT / "build" / "cuda-compile"

ARCHS = ("80", "90")
# everything the patch adds or changes, and every other unit that includes a header it changes (besides common.cuh)
UNITS = (
    "convert.cu",
    "getrows.cu",
    "set-rows.cu",
    "cpy.cu",
    "fattn.cu",
    "template-instances/fattn-vec-instance-nsq4-nsq4.cu",
    "template-instances/fattn-vec-instance-nsq3-nsq3.cu",
    "template-instances/fattn-vec-instance-nsq4-nsq3.cu",
    "lightning-indexer.cu",
    "ggml-cuda.cu",
)


def nvcc() -> str:
    return require_tool("nvcc", "the CUDA toolkit, CI's is 13.0 (apt-get install cuda-toolkit-13-0 from NVIDIA's "
                                "repository, or nvidia-cuda-toolkit from Debian non-free / Ubuntu multiverse)")


@pytest.fixture(scope="module")
def cublas_include() -> Path:
    """cuBLAS headers from the nvidia-cublas wheel (.ci/run installs it); the toolkit's own when it has them.
    Looked for before the CMake configure, which takes a minute and is of no use without them."""
    try:
        import nvidia
    except ImportError:
        nvidia = None
    for base in list(getattr(nvidia, "__path__", [])):
        for inc in sorted(Path(base).glob("*/include")):
            if (inc / "cublas_v2.h").is_file():
                return inc
    toolkit = Path(nvcc()).resolve().parent.parent
    for inc in [toolkit / "include", *toolkit.glob("targets/*/include")]:
        if (inc / "cublas_v2.h").is_file():
            return inc
    missing_tool("the cuBLAS headers (cublas_v2.h) are not installed", "nvidia-cublas (pip install nvidia-cublas)")


def run(cmd: list, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def llama_src(upstream_tree) -> Path:
    """llama.cpp's sources in the patched tree."""
    return upstream_tree / "vendor" / "llama.cpp"


@pytest.fixture(scope="module")
def compile_commands(llama_src) -> dict[str, list[str]]:
    """nvcc command lines of the real -DGGML_CUDA=ON build, from CMake's compile_commands.json.

    A machine without a GPU driver has no libcuda for the CUDA::cuda_driver link target, so CMake's generate step
    reports an error after it has written compile_commands.json; only compiling is asked of this machine."""
    nvcc()
    build = OUT / "configure"
    shutil.rmtree(build, ignore_errors=True)
    proc = run(["cmake", "-S", llama_src, "-B", build, "-G", "Ninja", "-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF",
                "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", f"-DCMAKE_CUDA_COMPILER={nvcc()}",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"])
    log = proc.stdout + proc.stderr
    db = build / "compile_commands.json"
    if "-- Configuring done" not in log or not db.is_file():
        pytest.fail(f"CMake could not configure the CUDA build:\n{log[-4000:]}")
    assert "FlashAttention K-V type combinations:" in log
    default_set = {p.strip() for p in log.split("FlashAttention K-V type combinations:")[1].splitlines()[0].split(";")}
    missing = [pair for pair in ("nsq4-nsq4", "nsq3-nsq3", "nsq4-nsq3") if pair not in default_set]
    assert not missing, f"not in the default FA set: {missing}"
    cuda_dir = llama_src / "ggml" / "src" / "ggml-cuda"
    commands = {}
    for entry in json.loads(db.read_text()):
        f = Path(entry["file"])
        if f.is_relative_to(cuda_dir):
            commands[f.relative_to(cuda_dir).as_posix()] = shlex.split(entry["command"])
    return commands


def nvcc_command(base: list[str], arch: str, obj: Path, include: Path) -> list[str]:
    """The build's command for one unit, for one real architecture instead of the build's list."""
    cmd, skip = [], False
    for arg in base:
        if skip:
            skip = False
            continue
        if arg == "-o":
            skip = True
            continue
        if arg.startswith("--generate-code") or arg.startswith("-gencode"):
            continue
        cmd.append(arg)
    # -c SOURCE stays last
    return [*cmd[:-2], f"--generate-code=arch=compute_{arch},code=sm_{arch}", "-isystem", str(include),
            "-o", str(obj), *cmd[-2:]]


def own_warnings(output: str, llama_src: Path) -> list[str]:
    """Warnings in ggml's sources; the CUDA toolkit's own headers warn under ggml's -Wextra and are not ours."""
    return [ln for ln in output.splitlines() if "warning" in ln.lower() and str(llama_src) in ln]


def test_cuda_units_compile(cublas_include, llama_src, compile_commands):
    missing = [u for u in UNITS if u not in compile_commands]
    assert not missing, f"not part of the CUDA build: {missing}"
    objdir = OUT / "obj"
    objdir.mkdir(parents=True, exist_ok=True)

    def build(job: tuple[str, str]) -> tuple[str, str, float, subprocess.CompletedProcess]:
        unit, arch = job
        obj = objdir / f"{unit.replace('/', '_')}.sm_{arch}.o"
        t0 = time.monotonic()
        proc = run(nvcc_command(compile_commands[unit], arch, obj, cublas_include))
        return unit, arch, time.monotonic() - t0, proc

    jobs = [(u, a) for u in UNITS for a in ARCHS]
    t0 = time.monotonic()
    jobs_at_once = int(os.environ.get("NSQ_BUILD_JOBS", str(os.cpu_count() or 2)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs_at_once) as pool:
        results = list(pool.map(build, jobs))
    total = time.monotonic() - t0

    report = [f"{unit:55s} sm_{arch}  {secs:6.1f} s" for unit, arch, secs, _ in results]
    report.append(f"{'total (wall, ' + str(jobs_at_once) + ' parallel)':55s}        {total:6.1f} s")
    (OUT / "timings.txt").write_text("\n".join(report) + "\n")
    print("\n" + "\n".join(report))

    failed = [f"{unit} sm_{arch}:\n{proc.stderr[-3000:]}" for unit, arch, _, proc in results if proc.returncode]
    assert not failed, "\n\n".join(failed)
    warned = {f"{unit} sm_{arch}": own_warnings(proc.stdout + proc.stderr, llama_src)
              for unit, arch, _, proc in results}
    warned = {k: v for k, v in warned.items() if v}
    assert not warned, json.dumps(warned, indent=1)[:4000]


# ---------------------------------------------------------------------------------------------------------------
# the quantizer and dequantizer of the CUDA kernels, and NSQ3's code unpacking of the flash-attention kernels, run on
# the host


class HostType(NamedTuple):
    quantize: Callable[[np.ndarray], np.ndarray]  # the numpy reference's
    dequantize: Callable[[np.ndarray], np.ndarray]
    block_bytes: int
    zero_codes: bytes  # the code bytes of a block stored as zero (d = 0, every code that of 0)


HOST_TYPES = {
    "nsq4": HostType(reference.quantize, reference.dequantize, reference.BLOCK_BYTES, bytes([0x88] * 32)),
    "nsq3": HostType(reference.quantize_nsq3, reference.dequantize_nsq3, reference.NSQ3_BLOCK_BYTES,
                     bytes([0xFF] * 16 + [0] * 8)),
}


@pytest.fixture(scope="module")
def host_exe(llama_src) -> Callable[[str], Path]:
    """tests/cuda/<type>_host.cu built for the host, once per type."""
    built: dict[str, Path] = {}

    def exe(qtype: str) -> Path:
        if qtype not in built:
            out = OUT / f"{qtype}_host"
            out.parent.mkdir(parents=True, exist_ok=True)
            proc = run([nvcc(), "-std=c++17", "-O2", "-x", "cu", "-I", llama_src / "ggml" / "src",
                        "-I", llama_src / "ggml" / "include", ROOT / "tests" / "cuda" / f"{qtype}_host.cu", "-o", out])
            assert proc.returncode == 0, proc.stderr[-4000:]
            built[qtype] = out
        return built[qtype]

    return exe


def host_quantize(exe: Path, qtype: str, x: np.ndarray,
                  tmp_path: Path) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The host program's blocks (block, bytes), their values (block, 64) and, for NSQ3, their codes as the
    flash-attention kernels unpack them ([block, 2, 64]: 4 and 2 codes at a time)."""
    outputs = ["blocks.bin", "values.f32"] + (["codes.bin"] if qtype == "nsq3" else [])
    src = tmp_path / "x.f32"
    np.ascontiguousarray(x, dtype=np.float32).tofile(src)
    proc = run([exe, src, *(tmp_path / o for o in outputs)])
    assert proc.returncode == 0, proc.stderr
    blocks = np.fromfile(tmp_path / outputs[0], dtype=np.uint8).reshape(-1, HOST_TYPES[qtype].block_bytes)
    values = np.fromfile(tmp_path / outputs[1], dtype=np.float32).reshape(-1, reference.QK)
    codes = np.fromfile(tmp_path / outputs[2], dtype=np.uint8).reshape(-1, 2, reference.QK) if qtype == "nsq3" else None
    return blocks, values, codes


def check_bit_exact(exe: Path, qtype: str, x: np.ndarray, names: list[str], tmp_path: Path) -> None:
    t = HOST_TYPES[qtype]
    got, values, codes = host_quantize(exe, qtype, x, tmp_path)
    want = t.quantize(x).reshape(-1, t.block_bytes)
    bad = np.flatnonzero((got != want).any(axis=1))
    assert not len(bad), f"{len(bad)} blocks differ from nsq_local.reference: " + ", ".join(
        f"{names[i]} (d {got[i, :2].view('<f2')[0]} vs {want[i, :2].view('<f2')[0]})" for i in bad[:8])
    want_values = t.dequantize(want.reshape(-1)).reshape(-1, reference.QK)
    bad = np.flatnonzero((values.view(np.uint32) != want_values.view(np.uint32)).any(axis=1))
    assert not len(bad), "dequantized values differ: " + ", ".join(names[i] for i in bad[:8])
    if codes is not None:
        want_codes = reference.nsq3_codes(want.reshape(-1))
        for k, ne in enumerate((4, 2)):
            bad = np.flatnonzero((codes[:, k] != want_codes).any(axis=1))
            assert not len(bad), f"nsq3_codes_packed<{ne}> unpacks other codes: " + ", ".join(names[i] for i in bad[:8])


@pytest.mark.parametrize("qtype", HOST_TYPES)
def test_cuda_quantizer_adversarial(host_exe, qtype, tmp_path):
    cases = helpers.adversarial_blocks(qtype)
    check_bit_exact(host_exe(qtype), qtype, np.stack(list(cases.values())), list(cases), tmp_path)


@pytest.mark.parametrize("qtype", HOST_TYPES)
def test_cuda_quantizer_random(host_exe, qtype, tmp_path):
    x = helpers.random_blocks(2026, 33334)  # 100,002 blocks
    check_bit_exact(host_exe(qtype), qtype, x, [f"random block {i}" for i in range(len(x))], tmp_path)


@pytest.mark.parametrize("qtype", HOST_TYPES)
def test_cuda_special_blocks_are_zero(host_exe, qtype, tmp_path):
    """The properties the adversarial cases are about, stated directly (not only 'same as the reference'): such
    blocks are stored as d = 0 with every code that of 0, and d saturates at the fp16 maximum instead of becoming
    Inf."""
    cases = helpers.adversarial_blocks(qtype)
    blocks, values, _ = host_quantize(host_exe(qtype), qtype, np.stack(list(cases.values())), tmp_path)
    d = blocks[:, :2].copy().view("<f2")[:, 0]
    names = list(cases)
    assert np.isfinite(values).all()
    for name in helpers.STORED_AS_ZERO:
        i = names.index(name)
        assert d[i] == 0 and blocks[i, 2:].tobytes() == HOST_TYPES[qtype].zero_codes, name
    for name in helpers.SATURATING:
        assert d[names.index(name)] == np.float16(65504.0), name


# What ggml_backend_cuda_device_supports_op claims for NSQ4 and NSQ3, each with the code that serves the claim: (claim
# in supports_op, file, code that must be there). Compiling proves the code builds; this proves each claim has code.
# Where the two types share a case or a condition, NSQ4's pattern lets NSQ3 follow it.
CUDA_CLAIMS = {
    "cpy f32 -> nsq4": (r"src0_type == GGML_TYPE_F32 && src1_type == GGML_TYPE_NSQ4",
                        "cpy.cu", r"src0->type == GGML_TYPE_F32 && src1->type == GGML_TYPE_NSQ4"),
    "cpy nsq4 -> f32": (r"src0_type == GGML_TYPE_NSQ4 && src1_type == GGML_TYPE_F32",
                        "cpy.cu", r"src0->type == GGML_TYPE_NSQ4 && src1->type == GGML_TYPE_F32"),
    "set_rows f32 -> nsq4": (r"op->type == GGML_TYPE_NSQ4(?: \|\| op->type == GGML_TYPE_NSQ3)?\) &&\s*"
                             r"op->src\[0\]->type == GGML_TYPE_F32",
                             "set-rows.cu", r"dst->type == GGML_TYPE_NSQ4\) \{\s*set_rows_cuda_quant<idx_t, block_nsq4"),
    "get_rows nsq4": (r"case GGML_TYPE_IQ4_XS:\s*case GGML_TYPE_NSQ4:\s*(?:case GGML_TYPE_NSQ3:\s*)?return true;",
                      "getrows.cu", r"case GGML_TYPE_NSQ4:\s*get_rows_cuda_q<QK_NSQ4, QR_NSQ4, dequantize_nsq4>"),
    # cuBLAS after dequantization: the mul_mat dispatch must route NSQ4 there, and convert.cu must dequantize it
    "mul_mat nsq4 (cuBLAS)": (r"case GGML_TYPE_NSQ4:\s*(?:case GGML_TYPE_NSQ3:\s*)?//[^\n]*\n\s*"
                              r"return op->op == GGML_OP_MUL_MAT;",
                              "ggml-cuda.cu", r"if \(bad_padding_clear \|\|[^{]*src0->type == GGML_TYPE_NSQ4[^{]*\{\s*"
                                              r"ggml_cuda_mul_mat_cublas"),
}

CUDA_CLAIMS_NSQ3 = {
    "cpy f32 -> nsq3": (r"src0_type == GGML_TYPE_F32 && src1_type == GGML_TYPE_NSQ3",
                        "cpy.cu", r"src0->type == GGML_TYPE_F32 && src1->type == GGML_TYPE_NSQ3\) \{\s*"
                                  r"ggml_cpy_f32_nsq3_cuda"),
    "cpy nsq3 -> f32": (r"src0_type == GGML_TYPE_NSQ3 && src1_type == GGML_TYPE_F32",
                        "cpy.cu", r"src0->type == GGML_TYPE_NSQ3 && src1->type == GGML_TYPE_F32\) \{\s*"
                                  r"ggml_cpy_nsq3_f32_cuda"),
    "set_rows f32 -> nsq3": (r"op->type == GGML_TYPE_NSQ3\) &&\s*op->src\[0\]->type == GGML_TYPE_F32",
                             "set-rows.cu", r"dst->type == GGML_TYPE_NSQ3\) \{\s*"
                                            r"set_rows_cuda_quant<idx_t, block_nsq3, QK_NSQ3, quantize_f32_nsq3_block>"),
    "get_rows nsq3": (r"case GGML_TYPE_NSQ4:\s*case GGML_TYPE_NSQ3:\s*return true;",
                      "getrows.cu", r"case GGML_TYPE_NSQ3:\s*get_rows_cuda_q<QK_NSQ3, QR_NSQ3, dequantize_nsq3>"),
    "mul_mat nsq3 (cuBLAS)": (r"case GGML_TYPE_NSQ3:\s*//[^\n]*\n\s*return op->op == GGML_OP_MUL_MAT;",
                              "ggml-cuda.cu", r"if \(bad_padding_clear \|\|[^{]*src0->type == GGML_TYPE_NSQ3[^{]*\{\s*"
                                              r"ggml_cuda_mul_mat_cublas"),
}


def cuda_claims(cuda_dir: Path, claims: dict, type_name: str) -> dict[str, str]:
    """Each claim of `claims` with what is wrong with it ('' when both the claim and its code are there), plus
    'unlisted' for lines of supports_op naming type_name (NSQ4, NSQ3) that no claim accounts for."""
    text = (cuda_dir / "ggml-cuda.cu").read_text()
    start = text.index("static bool ggml_backend_cuda_device_supports_op(")
    body = text[start:text.index("\n}\n", start)]
    found, accounted = {}, 0
    for name, (claim, path, code) in claims.items():
        m = re.search(claim, body)
        accounted += m.group(0).count(type_name) if m else 0
        found[name] = ("" if m else "not claimed") or ("" if re.search(code, (cuda_dir / path).read_text())
                                                        else f"no code in {path}")
    found["unlisted"] = "" if body.count(type_name) == accounted else \
        f"{body.count(type_name) - accounted} {type_name} mention(s) in supports_op that no claim accounts for"
    return found


def check_claims_and_controls(cuda_dir: Path, claims: dict, t: str, tmp_path: Path) -> None:
    """What the claims tests of NSQ4 and NSQ3 share: every claim of type t (e.g. "NSQ4") has its code and nothing else
    is claimed, convert.cu converts t for the f16 fallback; negative controls: a copy whose get_rows dispatch lost
    t's case, and one whose supports_op claims CPY t -> f16."""
    assert cuda_claims(cuda_dir, claims, t) == {name: "" for name in [*claims, "unlisted"]}
    convert = (cuda_dir / "convert.cu").read_text()
    assert convert.count(f"case GGML_TYPE_{t}:") == 6, "to_fp16/bf16/fp32, contiguous and not: the f16 fallback's"

    broken = tmp_path / "ggml-cuda"
    shutil.copytree(cuda_dir, broken, ignore=shutil.ignore_patterns("template-instances", "vendors"))
    getrows = (broken / "getrows.cu").read_text()
    (broken / "getrows.cu").write_text(getrows.replace(f"case GGML_TYPE_{t}:", "case GGML_TYPE_COUNT:"))
    assert cuda_claims(broken, claims, t)[f"get_rows {t.lower()}"] == "no code in getrows.cu"
    (broken / "ggml-cuda.cu").write_text((cuda_dir / "ggml-cuda.cu").read_text().replace(
        f"if (src0_type == GGML_TYPE_{t} && src1_type == GGML_TYPE_F32) {{",
        f"if (src0_type == GGML_TYPE_{t} && src1_type == GGML_TYPE_F16) {{\n                    return true;\n"
        f"                }}\n                if (src0_type == GGML_TYPE_{t} && src1_type == GGML_TYPE_F32) {{"))
    assert cuda_claims(broken, claims, t)["unlisted"].startswith(f"1 {t} mention")


def test_cuda_supports_op_claims_only_what_has_code(llama_src, tmp_path):
    """Every op supports_op claims for NSQ4 has a kernel (or the cuBLAS route) behind it, and nothing else is claimed;
    flash attention is upstream's own choice of kernel (ggml_cuda_get_best_fattn_kernel), which finds the nsq4-nsq4
    vector kernel or converts K and V to f16 (convert.cu). Negative control: the same check on a copy whose get_rows
    dispatch lost its NSQ4 case, and on one whose supports_op claims an extra pair."""
    cuda_dir = llama_src / "ggml" / "src" / "ggml-cuda"
    check_claims_and_controls(cuda_dir, CUDA_CLAIMS, "NSQ4", tmp_path)
    fattn = (cuda_dir / "fattn.cu").read_text()
    assert re.search(r"case GGML_TYPE_Q8_0:\s*case GGML_TYPE_NSQ4:\s*(?:case GGML_TYPE_NSQ3:\s*)?return true;", fattn)
    assert "FATTN_VEC_CASES_ALL_D(NSQ4, NSQ4)" in fattn
    assert (cuda_dir / "template-instances" / "fattn-vec-instance-nsq4-nsq4.cu").is_file()


def test_cuda_supports_op_claims_only_what_has_code_nsq3(llama_src, tmp_path):
    """The same for NSQ3: its claims (those of NSQ4) each have code, nothing else is claimed, and flash attention finds
    the nsq3-nsq3 and nsq4-nsq3 vector kernels (K and V converted to f16 for any other pair). Negative control: a copy
    whose get_rows dispatch lost its NSQ3 case, and one whose supports_op claims CPY nsq3 -> f16."""
    cuda_dir = llama_src / "ggml" / "src" / "ggml-cuda"
    check_claims_and_controls(cuda_dir, CUDA_CLAIMS_NSQ3, "NSQ3", tmp_path)
    fattn = (cuda_dir / "fattn.cu").read_text()
    assert re.search(r"case GGML_TYPE_NSQ4:\s*case GGML_TYPE_NSQ3:\s*return true;", fattn)
    common = (cuda_dir / "fattn-common.cuh").read_text()
    assert re.search(r"type_K == GGML_TYPE_NSQ3\) \{\s*return vec_dot_fattn_vec_KQ_nsq3<D, nthreads>;", common)
    assert re.search(r"type_V == GGML_TYPE_NSQ3\) \{\s*return dequantize_V_nsq3<T, ne>;", common)
    for k, v in (("NSQ3", "NSQ3"), ("NSQ4", "NSQ3")):
        assert f"FATTN_VEC_CASES_ALL_D({k}, {v})" in fattn
        instance = cuda_dir / "template-instances" / f"fattn-vec-instance-{k.lower()}-{v.lower()}.cu"
        assert all(f"DECL_FATTN_VEC_CASE({d:3d}, GGML_TYPE_{k}, GGML_TYPE_{v});" in instance.read_text()
                   for d in (64, 128, 256)), instance
