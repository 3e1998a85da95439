"""CPU speed of the NSQ4 KV cache against f16, q8_0 and q4_0: llama-bench prefill and decode with flash attention
at depth 0 and a deep context, plus from_float (set_rows) throughput of nsq4 and q4_0.

    python3 bench/cpu_bench.py --bin build/tools/bin --tree build/upstream [--model M.gguf] [--json out.json]

One llama-bench invocation runs every (type_k, type_v) pair of --types (16 for the default four), each at every
depth: at depth 4096 on 2 threads that is well over 20 minutes; --reps 1 or fewer --types shorten it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK_SRC = ROOT / "tests" / "c" / "nsq4_check.c"


def llama_bench(bin_dir: Path, model: Path, types: list[str], depths: list[int], threads: int, reps: int,
                n_prompt: int, n_gen: int) -> list[dict]:
    t = ",".join(types)
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-fa", "1", "-t", str(threads), "-p", str(n_prompt),
           "-n", str(n_gen), "-d", ",".join(map(str, depths)), "-ctk", t, "-ctv", t, "-r", str(reps), "-o", "json"]
    print("+", " ".join(cmd), file=sys.stderr)
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def quantize_throughput(bin_dir: Path, tree: Path, types: list[str], n: int, reps: int) -> dict[str, float]:
    """GB/s of float32 input through the CPU backend's from_float, best of reps (tests/c/nsq4_check.c --bench)."""
    with tempfile.TemporaryDirectory(prefix="nsq4-bench-") as tmp:
        exe = Path(tmp) / "nsq4_check"
        subprocess.run(["cc", "-O2", "-std=c11", str(CHECK_SRC), "-I", str(tree / "vendor/llama.cpp/ggml/include"),
                        "-L", str(bin_dir), "-lggml-cpu", "-lggml-base", "-lm", f"-Wl,-rpath,{bin_dir}",
                        "-o", str(exe)], check=True)
        out = {}
        for t in types:
            r = subprocess.run([str(exe), "--bench", t, str(n), str(reps)], check=True, capture_output=True, text=True)
            name, gbs = r.stdout.split()
            out[name] = float(gbs)
        return out


def test_name(r: dict) -> str:
    return f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"


def table(results: list[dict], quant: dict[str, float]) -> str:
    # llama-bench runs every (type_k, type_v) pair of the lists; the table shows the matched ones
    results = [r for r in results if r["type_k"] == r["type_v"]]
    types = list(dict.fromkeys(r["type_k"] for r in results))
    ts = {(test_name(r), r["n_depth"], r["type_k"]): r["avg_ts"] for r in results}
    rows = ["| test | depth | " + " | ".join(f"{t} t/s" for t in types) + " | nsq4/q4_0 | nsq4/f16 |",
            "|---|---:|" + "---:|" * (len(types) + 2)]
    for test, depth in dict.fromkeys((test_name(r), r["n_depth"]) for r in results):
        row = [ts.get((test, depth, t), float("nan")) for t in types]
        nsq4 = ts.get((test, depth, "nsq4"), float("nan"))
        ratios = [nsq4 / ts.get((test, depth, b), float("nan")) for b in ("q4_0", "f16")]
        rows.append(f"| {test} | {depth} | " + " | ".join(f"{v:.2f}" for v in row)
                    + " | " + " | ".join(f"{v:.2f}x" for v in ratios) + " |")
    rows += ["", "| from_float | GB/s of f32 in |", "|---|---:|"]
    rows += [f"| {t} | {g:.3f} |" for t, g in quant.items()]
    if "nsq4" in quant and "q4_0" in quant:
        rows.append(f"| nsq4/q4_0 | {quant['nsq4'] / quant['q4_0']:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=ROOT / "build" / "tools" / "bin", help="llama-bench and ggml libs")
    ap.add_argument("--tree", type=Path, default=ROOT / "build" / "upstream", help="patched tree (ggml headers)")
    ap.add_argument("--model", type=Path, help="GGUF model (default: SmolLM2 from nsq_local.models)")
    ap.add_argument("--types", default="f16,q8_0,q4_0,nsq4", help="KV cache types, comma separated")
    ap.add_argument("--depths", default="0,4096", help="context depths, comma separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--quant-values", type=int, default=1 << 20, help="values per from_float call")
    ap.add_argument("--json", type=Path, default=Path("cpu_bench.json"), help="where the results go")
    args = ap.parse_args(argv)

    model = args.model
    if model is None:
        from nsq_local import models
        model = models.smollm2()
    types = args.types.split(",")
    results = llama_bench(args.bin, model, types, [int(d) for d in args.depths.split(",")], args.threads,
                          args.reps, args.n_prompt, args.n_gen)
    quant = quantize_throughput(args.bin, args.tree, ["nsq4", "q4_0"], args.quant_values, 20)
    print(f"model: {model.name}, threads: {args.threads}, flash attention on\n")
    print(table(results, quant))
    args.json.write_text(json.dumps({"model": str(model), "llama_bench": results, "from_float_gbs": quant}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
