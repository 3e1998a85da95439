"""CPU speed of the NSQ4 and NSQ3 KV caches against f16, q8_0 and q4_0: llama-bench prefill and decode with flash
attention at depth 0 and a deep context, plus from_float (set_rows) throughput of nsq4, nsq3 and q4_0, against the speed targets
(GOALS below), and the decode attention op alone (one ggml_flash_attn_ext call at the models' shapes,
tests/c/nsq4_fattn.c --bench), whose median over many calls is steadier than end-to-end t/s on a shared machine.

    python3 bench/cpu_bench.py --bin build/tools/bin --tree build/upstream [-m M.gguf ...] [--json out.json]

llama-bench crosses every -ctk with every -ctv, so the matched pairs (K and V of one type) run as one llama-bench
call per type, back to back (a type `K/V`, e.g. nsq4/nsq3, is K in one type and V in another); with --rounds N the types take turns N times, so that a change of load on a shared
machine reaches every type alike, and the tables take each type's best round. Default models: SmolLM2-135M (head
size 64) and Gemma 3 270M (head size 256).
The type `nsq4+calib` is nsq4 with the K centering nsq-chat uses (llama-bench --nsq-calib; the file comes from
nsq_local.calibrate's cache, calibrating once per model if need be).

An aarch64 build runs under qemu with `--exec-prefix "qemu-aarch64 -L /usr/aarch64-linux-gnu" --cc
aarch64-linux-gnu-gcc`: that checks the NEON kernels run in every path llama-bench takes; the speeds it prints
are the emulator's and mean nothing.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK_SRC = ROOT / "tests" / "c" / "nsq4_check.c"
FATTN_SRC = ROOT / "tests" / "c" / "nsq4_fattn.c"

# decode attention at depth 4096 as llama-bench runs it (cells padded to 256, K and V of one head size): label, head
# size, cells, cells the mask lets through, query heads, KV heads
ATTN_SHAPES = [
    ("SmolLM2 layer", 64, 4352, 4096, 9, 3),
    ("Gemma 3 270M global layer", 256, 4352, 4096, 4, 1),
    ("Gemma 3 270M sliding-window layer", 256, 1024, 512, 4, 1),
]

# The speed targets, as the ratio of nsq4 to a baseline type at the deep context: decode ("tg") at least as fast as
# q4_0 and f16, prefill ("pp") at least 0.9x q4_0's; the quantizer, which runs on every stored token, at least half
# of q4_0's throughput. A cache with NSQ3 in it decodes within 10% of nsq4's speed.
GOALS = [("tg", "q4_0", 1.0), ("tg", "f16", 1.0), ("pp", "q4_0", 0.9)]
NSQ3_GOALS = [("tg", "nsq4", 0.9)]
QUANT_GOAL = 0.5


CALIB = "+calib"


def llama_bench(prefix: list[str], bin_dir: Path, model: Path, cache_type: str, depths: list[int], threads: int,
                reps: int, n_prompt: int, n_gen: int) -> list[dict]:
    """llama-bench's records for one cache type, each labelled with it as "cache" ("nsq4+calib" runs centered)."""
    k_type, _, v_type = cache_type.removesuffix(CALIB).partition("/")
    calib = []
    if cache_type.endswith(CALIB):
        from nsq_local import calibrate
        calib = ["--nsq-calib", str(calibrate.cached(model))]
    cmd = [*prefix, str(bin_dir / "llama-bench"), "-m", str(model), "-fa", "1", "-t", str(threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-d", ",".join(map(str, depths)), "-ctk", k_type,
           "-ctv", v_type or k_type, "-r", str(reps), "-o", "json", *calib]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = json.loads(proc.stdout)
    for r in records:
        r["cache"] = cache_type
    return records


def compile_c(src: Path, cc: str, bin_dir: Path, tree: Path, out_dir: str) -> Path:
    """src built against the ggml libraries in bin_dir and the headers of the patched tree."""
    include = tree / "vendor" / "llama.cpp" / "ggml" / "include"
    if not include.is_dir():
        sys.exit(f"{include} is missing: pass the patched tree with --tree (python3 ggml_patch/prepare.py --dest DIR)")
    exe = Path(out_dir) / src.stem
    subprocess.run([cc, "-O2", "-std=c11", str(src), "-I", str(include), "-L", str(bin_dir), "-lggml-cpu",
                    "-lggml-base", "-lm", f"-Wl,-rpath,{bin_dir}", "-o", str(exe)], check=True)
    return exe


def run_bench(prefix: list[str], exe: Path, *args) -> float:
    """A --bench run's figure: it prints its type's name and one number."""
    r = subprocess.run([*prefix, str(exe), "--bench", *map(str, args)], check=True, capture_output=True, text=True)
    return float(r.stdout.split()[1])


def quantize_throughput(prefix: list[str], exe: Path, types: list[str], n: int, reps: int) -> dict[str, float]:
    """GB/s of float32 input through the CPU backend's from_float, best of reps (tests/c/nsq4_check.c --bench)."""
    return {t: run_bench(prefix, exe, t, n, reps) for t in types}


def attention_op(prefix: list[str], exe: Path, types: list[str], threads: int,
                 reps: int) -> dict[str, dict[str, float]]:
    """Median microseconds of one decode attention call per shape and type (tests/c/nsq4_fattn.c --bench)."""
    out: dict[str, dict[str, float]] = {}
    for label, d, n_kv, n_live, n_head, n_head_kv in ATTN_SHAPES:
        out[label] = {t: run_bench(prefix, exe, t, d, n_kv, n_live, n_head, n_head_kv, threads, reps) for t in types}
    return out


def attention_table(us: dict[str, dict[str, float]], types: list[str], threads: int) -> str:
    shapes = {label: (d, n_kv, n_live, n_head, n_head_kv) for label, d, n_kv, n_live, n_head, n_head_kv in ATTN_SHAPES}
    # speed of the first type of each pair relative to the second
    pairs = [("nsq4", "q4_0"), ("nsq4", "f16")] + [(t, "nsq4") for t in nsq3_types(types)]
    rows = [f"| decode attention, {threads} threads | head size | cells (live) | heads (KV) | "
            + " | ".join(f"{t} us" for t in types) + " | " + " | ".join(f"{t} vs {b}" for t, b in pairs) + " |",
            "|---|---:|---:|---:|" + "---:|" * (len(types) + len(pairs))]
    for label, by_type in us.items():
        d, n_kv, n_live, n_head, n_head_kv = shapes[label]
        speedups = [by_type[b] / by_type[t] if b in by_type else float("nan") for t, b in pairs]
        rows.append(f"| {label} | {d} | {n_kv} ({n_live}) | {n_head} ({n_head_kv}) | "
                    + " | ".join(f"{by_type[t]:.1f}" for t in types)
                    + " | " + " | ".join(f"{v:.2f}x" for v in speedups) + " |")
    return "\n".join(rows)


def test_kind(r: dict) -> str:
    return "pp" if r["n_prompt"] else "tg"


def test_name(r: dict) -> str:
    return f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"


def best_ts(results: list[dict]) -> dict[tuple[str, int, str], float]:
    """Best t/s per (test, depth, type) over the rounds: other work on the machine only ever slows a run down."""
    acc: dict[tuple[str, int, str], list[float]] = {}
    for r in results:
        acc.setdefault((test_name(r), r["n_depth"], r["cache"]), []).append(r["avg_ts"])
    return {key: max(v) for key, v in acc.items()}


def nsq4_types(types: list[str]) -> list[str]:
    return [t for t in types if t.startswith("nsq4") and "nsq3" not in t]


def nsq3_types(types: list[str]) -> list[str]:
    """The caches with NSQ3 on either side."""
    return [t for t in types if "nsq3" in t]


def model_table(results: list[dict], types: list[str]) -> str:
    ts = best_ts(results)
    pairs = [(t, b) for t in nsq4_types(types) for b in ("q4_0", "f16")] + [(t, "nsq4") for t in nsq3_types(types)]
    rows = ["| test | depth | " + " | ".join(f"{t} t/s" for t in types) + " | "
            + " | ".join(f"{t}/{b}" for t, b in pairs) + " |",
            "|---|---:|" + "---:|" * (len(types) + len(pairs))]
    for test, depth in dict.fromkeys((test_name(r), r["n_depth"]) for r in results):
        row = [ts.get((test, depth, t), float("nan")) for t in types]
        ratios = [ts.get((test, depth, t), float("nan")) / ts.get((test, depth, b), float("nan")) for t, b in pairs]
        rows.append(f"| {test} | {depth} | " + " | ".join(f"{v:.2f}" for v in row)
                    + " | " + " | ".join(f"{v:.2f}x" for v in ratios) + " |")
    return "\n".join(rows)


def goal_rows(name: str, results: list[dict], types: list[str], depth: int) -> list[tuple[str, float, float]]:
    ts = best_ts(results)
    out = []
    for t, goals in [(t, GOALS) for t in nsq4_types(types)] + [(t, NSQ3_GOALS) for t in nsq3_types(types)]:
        for kind, base, goal in goals:
            test = next((test_name(r) for r in results if test_kind(r) == kind), None)
            ratio = ts.get((test, depth, t), float("nan")) / ts.get((test, depth, base), float("nan"))
            out.append((f"{name}: {test} @ d{depth}, {t}/{base}", ratio, goal))
    return out


def goal_table(rows: list[tuple[str, float, float]]) -> str:
    lines = ["| speed target | measured | target | met |", "|---|---:|---:|---|"]
    for what, ratio, goal in rows:
        lines.append(f"| {what} | {ratio:.2f}x | >= {goal:.1f}x | {'yes' if ratio >= goal else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=ROOT / "build" / "tools" / "bin", help="llama-bench and ggml libs")
    ap.add_argument("--tree", type=Path, default=ROOT / "build" / "upstream", help="patched tree (ggml headers)")
    ap.add_argument("-m", "--model", type=Path, action="append",
                    help="GGUF model, repeatable (default: SmolLM2 and Gemma 3 270M from nsq_local.models)")
    ap.add_argument("--types", default="f16,q8_0,q4_0,nsq4,nsq4+calib,nsq3,nsq4/nsq3",
                    help="KV cache types (K and V alike, or K/V), comma separated; nsq4+calib is nsq4 centered")
    ap.add_argument("-d", "--depths", default="0,4096", help="context depths, comma separated; the last is the "
                    "deep context of the goals")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=1, help="llama-bench repetitions per call")
    ap.add_argument("--rounds", type=int, default=1, help="times the types take turns")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--quant-values", type=int, default=1 << 20, help="values per from_float call")
    ap.add_argument("--attn-reps", type=int, default=2000, help="calls per attention-op figure (0: skip)")
    ap.add_argument("--json", type=Path, default=Path("cpu_bench.json"), help="where the results go")
    ap.add_argument("--exec-prefix", default="", help="command that runs the binaries, e.g. \"qemu-aarch64 -L "
                    "/usr/aarch64-linux-gnu\" for an aarch64 build (its speeds are the emulator's)")
    ap.add_argument("--cc", default="cc", help="C compiler for the quantizer check, matching --bin's target")
    args = ap.parse_args(argv)

    types = args.types.split(",")
    if "nsq4" not in types:
        ap.error("--types must include nsq4: the table compares it with the others")
    prefix = shlex.split(args.exec_prefix)
    depths = [int(d) for d in args.depths.split(",")]
    models = args.model
    if not models:
        from nsq_local import models as nm
        try:
            models = [nm.smollm2(), nm.gemma3_270m()]
        except nm.ModelNotInstalled as e:
            sys.exit(f"{e} (or pass -m)")

    report: dict = {"threads": args.threads, "exec_prefix": args.exec_prefix, "models": {}}
    goals: list[tuple[str, float, float]] = []
    for model in models:
        results: list[dict] = []
        for rnd in range(args.rounds):
            for t in types:
                print(f"[{model.name}] round {rnd + 1}/{args.rounds}: llama-bench cache {t}",
                      file=sys.stderr, flush=True)
                got = llama_bench(prefix, args.bin, model, t, depths, args.threads, args.reps, args.n_prompt,
                                  args.n_gen)
                # partial figures as they come: a run cut short still leaves them in the log
                for r in got:
                    print(f"  {t} {test_name(r)} @ d{r['n_depth']}: {r['avg_ts']:.2f} t/s", file=sys.stderr, flush=True)
                results += got
        report["models"][str(model)] = results
        print(f"\nmodel: {model.name}, threads: {args.threads}, flash attention on, K and V of one type (K/V: two)\n")
        print(model_table(results, types), flush=True)
        goals += goal_rows(model.stem, results, types, depths[-1])

    with tempfile.TemporaryDirectory(prefix="nsq4-bench-") as tmp:
        check = compile_c(CHECK_SRC, args.cc, args.bin, args.tree, tmp)
        print("[quantize] from_float throughput", file=sys.stderr, flush=True)
        quant = quantize_throughput(prefix, check, ["nsq4", "nsq3", "q4_0"], args.quant_values, 20)
        if args.attn_reps:
            print("[attention] decode op", file=sys.stderr, flush=True)
            attn_types = list(dict.fromkeys(t.removesuffix(CALIB) for t in types))
            attn = attention_op(prefix, compile_c(FATTN_SRC, args.cc, args.bin, args.tree, tmp), attn_types,
                                args.threads, args.attn_reps)
            report["attention_us"] = attn
            print("\n" + attention_table(attn, attn_types, args.threads))
    report["from_float_gbs"] = quant
    print(f"\n| from_float, {args.quant_values} values | GB/s of f32 in |\n|---|---:|")
    for t, g in quant.items():
        print(f"| {t} | {g:.3f} |")
    goals.append(("quantize: from_float nsq4/q4_0", quant["nsq4"] / quant["q4_0"], QUANT_GOAL))
    print("\n" + goal_table(goals))
    report["goals"] = [{"what": w, "ratio": r, "target": g} for w, r, g in goals]
    args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
