#!/usr/bin/env python3
"""The GPU kit: what bench/gpu.py's checks need on the lent GPU machine, which has nvcc, CMake, ninja and Python with
numpy but no network, no `gguf`, no models, and takes at most 64 MiB beside the working tree per call.

    python3 bench/gpu_kit.py --out gpu-kit          # here: prepare the kit, print its size and the device commands
    python3 bench/gpu_kit.py run --kit gpu-kit/1 --out $OUT     # there: part 1, then part 2 on the same machine
    python3 bench/gpu_kit.py --dry-run /tmp/kit-dry # here: both parts in a copy, network cut, a CPU build

The demo model, SmolLM2-135M-Instruct (Q4_1, 94 MiB), is carried as it is, in two halves: a smaller requantization
cannot go below 4.5 bits/weight (its 576-wide rows fit no 256-value k-quant block), 76 MB, still above one call's
limit; carried whole, the KLD figures are those of the model the quality table uses, with its calibration. So the
kit has two parts of at most 56 MiB each, one per `device run` call on the same warm machine:

  part 1: the prepared patched llama.cpp (sources the build needs, xz), the wheels the machine lacks (diskcache, for
          llama_cpp), the model's first half. It builds the tools and shared libraries (CUDA for sm_90 only, the
          default flash-attention instances: f16, q4_0, q8_0 and the NSQ pairs), runs test-backend-ops for every NSQ
          case on CUDA0 against the CPU, and llama-bench at depth on a model with Llama-3-8B's attention (32 query
          heads, 8 KV heads, head size 128, generated weights, 8 layers) made there.
  part 2: the model's second half and its calibration (nsq4 and nsq3 as shipped). It runs nsq-selftest on every
          device, the KLD runs (q4_0, nsq4, nsq3 vs f16; GPU batched, GPU one token per micro-batch, CPU) and
          llama-bench on SmolLM2, then writes the combined results.

Part 2 reads what part 1 left in gpu-kit-work/: its build, the first half and part1.json (the device keeps ignored
files between calls while the machine stays warm). Each part writes gpu-results.json/.md (the results so far), its logs and the selftest report under
$OUT. A step that fails is recorded and the rest goes on; the exit status is non-zero when a step failed that should
have run. On a machine without CUDA (the dry run) the CUDA steps are recorded as skipped and the rest run on the CPU
at a smaller scale (shorter windows, depths 0 and 256, one layer of the generated model): the dry run shows that
every step runs from the kit alone, not what the figures will be.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KIT_LIMIT = 56 * 2**20  # per part: a call carries at most 64 MiB, and the working tree travels beside the kit
WORK = "gpu-kit-work"  # on the device, in the repository root (ignored): kept between the two calls
WHEELS = ("diskcache==5.6.3",)  # llama_cpp imports it; the device has numpy, jinja2, typing-extensions, pyyaml, tqdm
CUDA_ARCH = "90"  # H100 and H200
# Llama-3-8B's attention: heads, KV heads, head size; its FFN is cut so that the cache, not the weights, dominates
# what a deep decode step reads
BENCH_SHAPE = {"n_head": 32, "n_head_kv": 8, "head_size": 128, "n_ff": 2048}
# parts of the vendored llama.cpp that no configured target builds from: docs, models, other backends, web UIs
TRIM = {"docs", "models", "media", "benches", "examples", "scripts", ".github", ".devops", "ci", "pocs", "skills",
        "grammars", "requirements", "conversion", "app", "licenses", ".git", ".gemini", ".pi", "tools/ui",
        "tools/server/public", "tools/server/webui", "gguf-py/tests"}
TRIM_BACKENDS = ("vulkan", "sycl", "opencl", "hexagon", "cann", "webgpu", "openvino", "et", "virtgpu", "metal",
                 "musa", "hip", "zdnn", "kompute", "blas", "zendnn")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trimmed(rel: str) -> bool:
    """Whether a path of the prepared tree (relative to its root) stays out of the kit."""
    if not rel.startswith("vendor/llama.cpp/"):
        return not (rel.startswith("llama_cpp/") or rel == "LICENSE.md")
    sub = rel[len("vendor/llama.cpp/"):]
    if any(sub == t or sub.startswith(t + "/") for t in TRIM):
        return True
    return any(sub.startswith(f"ggml/src/ggml-{b}/") for b in TRIM_BACKENDS)


def pack_sources(tree: Path, out: Path) -> int:
    files = 0
    with tarfile.open(out, "w:xz", preset=6) as tar:
        for f in sorted(tree.rglob("*")):
            rel = f.relative_to(tree).as_posix()
            if f.is_file() and not f.is_symlink() and not trimmed(rel) and "__pycache__" not in rel:
                tar.add(f, arcname=rel)
                files += 1
    return files


def commands(kit: Path) -> list[tuple[str, list[str]]]:
    """The device calls: (command, carry) for each part, in order."""
    rel = kit.resolve().relative_to(ROOT) if kit.resolve().is_relative_to(ROOT) else kit
    return [(f"PYTHONUNBUFFERED=1 python3 bench/gpu_kit.py run --kit {rel}/{p} --out $OUT", [f"{rel}/{p}"])
            for p in (1, 2)]


def prepare(out: Path) -> int:
    from nsq_local import calibrate, models

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)  # git tells a folder pattern ("gpu-kit/") only for a folder that exists
    if out.is_relative_to(ROOT):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(out)], cwd=ROOT).returncode == 0
        if not ignored:
            sys.exit(f"{out} is not ignored by git: the kit must not travel as part of the working tree "
                     "(use the default, gpu-kit/, which .gitignore names)")
    shutil.rmtree(out, ignore_errors=True)
    p1, p2 = out / "1", out / "2"
    p1.mkdir(parents=True)
    p2.mkdir(parents=True)

    tree = ROOT / "build" / "upstream"
    print(f"preparing the patched tree in {tree}", file=sys.stderr)
    subprocess.run([sys.executable, str(ROOT / "ggml_patch" / "prepare.py"), "--dest", str(tree)], check=True)
    n = pack_sources(tree, p1 / "src.tar.xz")
    print(f"sources: {n} files, {mib((p1 / 'src.tar.xz').stat().st_size)}", file=sys.stderr)

    (p1 / "wheels").mkdir()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "-d", str(p1 / "wheels"), *WHEELS], check=True)

    model = models.smollm2()
    calib = calibrate.cached(model)  # made here once per model file, and says so
    (p2 / "calibration").mkdir()
    shutil.copy2(calib, p2 / "calibration" / calib.name)
    data = model.read_bytes()
    half = len(data) // 2
    (p1 / "model.1").write_bytes(data[:half])
    (p2 / "model.2").write_bytes(data[half:])
    manifest = {"model": model.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "calibration": calib.name, "made": time.strftime("%Y-%m-%d")}
    for p in (p1, p2):
        (p / "manifest.json").write_text(json.dumps({**manifest, "part": int(p.name)}, indent=1) + "\n")

    sizes = {p.name: tree_size(p) for p in (p1, p2)}
    for name, size in sizes.items():
        print(f"part {name}: {mib(size)} (limit {mib(KIT_LIMIT)})")
    print(f"kit: {out} ({mib(sum(sizes.values()))} in all)")
    print("\nOn the device machine, two calls on the same warm machine (the second within its idle time):")
    for cmd, carry in commands(out):
        print(f"  device run  command={cmd!r}  carry={json.dumps(carry)}  timeout_s=600")
    over = [n for n, s in sizes.items() if s > KIT_LIMIT]
    if over:
        print(f"part {', '.join(over)} over the limit", file=sys.stderr)
        return 1
    return 0


# --- on the device --------------------------------------------------------------------------------------------------


def device_setup(work: Path, cuda: bool) -> gpu.Setup:
    src = work / "src"
    site = work / "site"
    py_path = [str(ROOT), str(src), str(src / "vendor" / "llama.cpp" / "gguf-py"), str(site)]
    s = gpu.Setup(work=work, jobs=os.cpu_count() or 4, cuda=cuda,
                  py_env={"PYTHONPATH": os.pathsep.join(py_path), "NSQ_CACHE_DIR": str(work / "cache")})
    # the vector kernels of the types the checks run (upstream's default adds bf16-bf16)
    s.cuda_fa_quants = ";".join(f"{t}-{t}" for t in ("f16", "q8_0", "q4_0", "nsq4", "nsq3")) + ";nsq4-nsq3"
    if not cuda:  # the dry run on a small CPU: the same steps, smaller
        s.ctx_size, s.chunks, s.depths, s.reps, s.n_prompt, s.n_gen = 256, 1, (0, 256), 1, 64, 16
    return s


def bench_model(s: gpu.Setup) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_gguf

    layers = 8 if s.cuda else 1
    path = s.work / f"llama3-8b-attention-{layers}l.gguf"
    if not path.is_file():
        tiny_gguf.write_llama_heads(path, s.work / "src" / "vendor" / "llama.cpp" / "gguf-py", n_layer=layers,
                                    context_length=max(s.depths) + s.n_prompt + s.n_gen, **BENCH_SHAPE)
    return path


def part1(kit: Path, s: gpu.Setup, steps: dict) -> None:
    def unpack() -> dict:
        shutil.rmtree(s.work / "src", ignore_errors=True)
        with tarfile.open(kit / "src.tar.xz") as tar:
            tar.extractall(s.work / "src", filter="data")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(s.work / "site"), "--upgrade", *map(str, (kit / "wheels").glob("*.whl"))],
                       check=True)
        shutil.copy2(kit / "model.1", s.work / "model.1")
        return {"sources": str(s.work / "src")}

    gpu.step(steps, "unpack", unpack)
    gpu.step(steps, "build", lambda: gpu.build(s, s.work / "src", CUDA_ARCH))
    gpu.step(steps, "test-backend-ops", lambda: gpu.backend_ops(s), needs_cuda=True, setup=s)
    # random weights have no K structure to calibrate: nsq4 and nsq3 run uncentered here (the same kernels)
    gpu.step(steps, "speed-llama3-8b-attention",
             lambda: gpu.speed(s, bench_model(s), ("f16", "q8_0", "q4_0", "nsq4", "nsq3")))


def part2(kit: Path, s: gpu.Setup, steps: dict) -> None:
    manifest = json.loads((kit / "manifest.json").read_text())
    model = s.work / "models" / manifest["model"]
    calib = s.work / "cache" / "calibration" / manifest["calibration"]
    text = ROOT / "tests" / "data" / "wikitext-2-test-head.txt"

    def assemble() -> dict:
        from nsq_local import models

        first = s.work / "model.1"
        if not first.is_file() or not (s.bin / "llama-perplexity").is_file():
            raise RuntimeError(f"{first} or the build is missing: part 2 runs after part 1 on the same machine "
                               "(a machine given back in between starts bare: run part 1 again)")
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(first.read_bytes() + (kit / "model.2").read_bytes())
        if model.stat().st_size != manifest["size"] or models.file_sha256(model) != manifest["sha256"]:
            raise RuntimeError(f"{model} does not match the kit's manifest (size or sha256)")
        calib.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kit / "calibration" / manifest["calibration"], calib)
        return {"model": str(model), "calibration": str(calib)}

    gpu.step(steps, "assemble", assemble)
    # the calibration is found in NSQ_CACHE_DIR under the name nsq_local.calibrate gives it, so nothing is recomputed
    os.environ.update(s.py_env)
    small = [] if s.cuda else ["-c", "128", "--depth", "256", "--decode-tokens", "8"]
    gpu.step(steps, "nsq-selftest", lambda: gpu.selftest(s, model, tuple(small)))
    gpu.step(steps, "kld-smollm2", lambda: gpu.kld(s, "smollm2", model, calib, text))
    gpu.step(steps, "speed-smollm2", lambda: gpu.speed(s, model))


def run(args) -> int:
    kit = args.kit.resolve()
    manifest = json.loads((kit / "manifest.json").read_text())
    work = ROOT / WORK
    work.mkdir(exist_ok=True)
    cuda = shutil.which("nvidia-smi") is not None and shutil.which("nvcc") is not None
    s = device_setup(work, cuda)
    part1_results = work / "part1.json"  # part 2's results start from part 1's
    results = json.loads(part1_results.read_text()) if manifest["part"] == 2 and part1_results.is_file() else {
        "device": gpu.gpu_name(), "date": time.strftime("%Y-%m-%d"), "steps": {}, "command": ""}
    results["command"] += ("; " if results["command"] else "") + f"part {manifest['part']}: " + shlex.join(
        ["python3", "bench/gpu_kit.py", *sys.argv[1:]])
    t0 = time.time()
    (part1 if manifest["part"] == 1 else part2)(kit, s, results["steps"])
    results[f"part{manifest['part']}_seconds"] = round(time.time() - t0, 1)
    if manifest["part"] == 1:
        part1_results.write_text(json.dumps(results, indent=1) + "\n")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(gpu.write(results, out / "gpu-results"))
    if (work / "selftest.json").is_file():
        shutil.copy2(work / "selftest.json", out / "selftest.json")
    with tarfile.open(out / f"logs-part{manifest['part']}.tar.xz", "w:xz") as tar:
        tar.add(work / "logs", arcname="logs")
    bad = gpu.failed(results["steps"])
    print(f"part {manifest['part']}: {time.time() - t0:.0f} s; " + (f"failed: {', '.join(bad)}" if bad else "no step failed"))
    return 1 if bad else 0


def dry_run(dest: Path, kit: Path) -> int:
    """Both parts as the device runs them, in a copy of the working tree and the kit, with the network cut."""
    kit = kit.resolve()
    if not (kit / "1" / "manifest.json").is_file():
        sys.exit(f"no kit in {kit}: make it first with `python3 bench/gpu_kit.py --out {kit}`")
    dest = dest.resolve()
    shutil.rmtree(dest, ignore_errors=True)
    repo = dest / "repo"
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    rel = kit.relative_to(ROOT) if kit.is_relative_to(ROOT) else Path("gpu-kit")
    shutil.copytree(kit, repo / rel)
    rc = 0
    for i, (cmd, _) in enumerate(commands(repo / rel), 1):
        out = dest / f"out-{i}"
        out.mkdir(parents=True)
        t0 = time.time()
        # no network, and nothing of this machine's nsq-local or llama_cpp setup: what the device has
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "NSQ_", "PYTHONPATH"))}
        proc = subprocess.run(["unshare", "-n", "bash", "-c", cmd], cwd=repo, env={**env, "OUT": str(out)})
        print(f"dry run, part {i}: exit {proc.returncode} in {time.time() - t0:.0f} s; results in {out}",
              file=sys.stderr)
        rc = rc or proc.returncode
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="on the device machine: run one part of the kit")
    r.add_argument("--kit", type=Path, required=True, help="the part's folder (gpu-kit/1 or gpu-kit/2)")
    r.add_argument("--out", type=Path, required=True, help="where the results go ($OUT)")
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-kit", help="where the kit is made (default: gpu-kit)")
    ap.add_argument("--dry-run", type=Path, metavar="DIR",
                    help="run both parts here, in DIR, from the kit in --out, with the network cut")
    args = ap.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.dry_run:
        return dry_run(args.dry_run, args.out)
    return prepare(args.out)


if __name__ == "__main__":
    sys.exit(main())
