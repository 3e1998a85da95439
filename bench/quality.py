#!/usr/bin/env python3
"""KV-cache quality table: llama-perplexity's PPL and KL divergence against an f16 cache, per cache type, with
upstream's Hadamard rotation on and off, on SmolLM2-135M, Gemma 3 270M and Qwen2.5-Coder 0.5B / 1.5B, plus a
long-context row set.

    python3 bench/quality.py --bin build/tools/bin --out docs/quality-table

Each row is one `llama-perplexity -c C --chunks N -fa on -ctk T -ctv T --kl-divergence` run against the f16 run's
logits (`--kl-divergence-base`), so every type is scored on the same tokens. The nsq4 rows (nsq3's alike):

  nsq4             as shipped: the calibration `llama_cpp.Llama(type_k="nsq4")` and nsq-chat make by default
                   (`nsq-calibrate -m MODEL`: K means from Python's documentation, outlier layers' K wider; for
                   nsq3 also the layers whose K is kept in nsq4 within 3.5 bits/value)
  nsq4-centering   that file's K means alone (every layer's K in nsq4)
  nsq4-layers      that file's per-layer K types alone (no centering)
  nsq4-uncentered  neither (llama.cpp's tools without --nsq-calib)

A type written K/V (e.g. nsq4/f16) stores K and V in different types: where the error comes from; nsq4/nsq3 is the
option of K in nsq4 (as shipped) with V in nsq3.

On a model where the calibration picks no layer for a type, its -centering row is its shipped row and its -layers row
its -uncentered row, and those two rows are not run. bits/value is measured: the KV cache size llama.cpp reports, against the f16
cache's, times 16 (so wider layers count). Logs are kept in --work; a run whose log is complete is not repeated
(delete it to re-run); --table-only tabulates what is complete. Writes OUT.json and OUT.md after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsq_local import calibrate, models  # noqa: E402

# the WikiText-2 excerpt the tests read: the full test split's first 25,772 tokens (SmolLM2's tokenizer)
WIKITEXT_HEAD = ROOT / "tests" / "data" / "wikitext-2-test-head.txt"
MODELS = {"smollm2": ("SmolLM2-135M-Instruct (Q4_1, head 64)", models.smollm2),
          "gemma3": ("Gemma 3 270M (Q4_K_M, head 256, SWA)", models.gemma3_270m),
          "qwen05": ("Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, head 64, K bias)", models.qwen25_coder_05b),
          "qwen15": ("Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, head 128, K bias)", models.qwen25_coder_15b)}
TYPES = ("f16", "q8_0", "q5_0", "iq4_nl", "q4_0", "nsq4", "nsq4-centering", "nsq4-layers", "nsq4-uncentered",
         "nsq3", "nsq3-centering", "nsq3-uncentered")
ROT_OFF_TYPES = ("iq4_nl", "q4_0", "nsq4", "nsq4-uncentered")
KV_SPLIT_TYPES = ("nsq4/f16", "f16/nsq4", "nsq4/nsq3")
NSQ_TYPES = {"nsq4": "nsq.nsq4.k_type.", "nsq3": "nsq.nsq3.k_type."}  # and the prefix of their per-layer K types
LONG_TYPES = ("q4_0", "nsq4")
PATTERNS = {
    "ppl": re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)\s*±\s*([0-9.]+)"),
    "ppl_base": re.compile(r"Mean PPL\(base\)\s*:\s*([0-9.]+)"),
    "kld": re.compile(r"Mean\s+KLD:\s*([0-9.]+)\s*±\s*([0-9.]+)"),
    "kld99": re.compile(r"99\.0%\s+KLD:\s*([0-9.]+)"),
    "top1": re.compile(r"Same top p:\s*([0-9.]+)\s*±\s*([0-9.]+)\s*%"),
    "final": re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)"),
}
KV_SIZE = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB")


def complete(log: Path) -> bool:
    text = log.read_text() if log.is_file() else ""
    return "Mean    KLD" in text or "Final estimate" in text


def run(cmd: list[str], env: dict[str, str], log: Path) -> str:
    if complete(log):
        return log.read_text()
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        f.write("# " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    print(f"  {log.name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return log.read_text()


def parse(text: str) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {"kv_mib": sum(float(m) for m in KV_SIZE.findall(text)) or None}
    for key, pat in PATTERNS.items():
        m = pat.search(text)
        out[key] = float(m.group(1)) if m else None
        if m and m.lastindex and m.lastindex >= 2:
            out[key + "_err"] = float(m.group(2))
    return out


def lever_files(shipped: Path, work: Path, key: str) -> dict[str, Path]:
    """Calibration files that keep one lever of the shipped one, for each nsq type whose layers it chooses: its K
    means alone, its per-layer K types alone. None for a type it chooses no layer for (then each lever alone is the
    shipped file or no file)."""
    meta, tensors = calibrate.read_gguf(shipped)
    chosen = [t for t, prefix in NSQ_TYPES.items() if any(k.startswith(prefix) for k in meta)]
    if not chosen:
        return {}
    means = [tensors[f"nsq.k_mean.{il}"] for il in range(len(tensors))]
    centering, layers = work / f"{key}-centering.nsq.gguf", work / f"{key}-layers.nsq.gguf"
    work.mkdir(parents=True, exist_ok=True)
    calibrate.write_gguf(centering, means, {k: v for k, v in meta.items()
                                            if not k.startswith(tuple(NSQ_TYPES.values()))})
    # a zero mean stores every key as it is: the uncentered cache, with the shipped file's layer types
    calibrate.write_gguf(layers, [np.zeros_like(m) for m in means], meta)
    return {f"{t}-{lever}": path for t in chosen for lever, path in (("centering", centering), ("layers", layers))}


def measure(args, text: Path, key: str, ctx: int, chunks: int, plan: list[tuple[str, str]], rows: list,
            write) -> None:
    if ctx > args.ctx_size and args.long_file:
        text = args.long_file
    title, get = MODELS[key]
    model = get()
    ppl_bin = args.bin / "llama-perplexity"
    tag = f"{key}-c{ctx}"
    base = args.work / f"{tag}-f16.kld"
    common = [str(ppl_bin), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-fa", "on",
              "-t", str(args.threads), "-lv", "4"]  # llama.cpp's info lines: the KV cache size
    print(f"{title}, -c {ctx} --chunks {chunks}:", file=sys.stderr)
    base_log = args.work / f"{tag}-f16-base.log"
    if args.table_only and not complete(base_log):
        return
    f16 = parse(run(common + ["-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", str(base)], {}, base_log))
    calibs: dict[str, Path] = {}
    if not args.table_only:
        calibs["nsq4"] = calibs["nsq3"] = calibrate.cached(model)
        calibs.update(lever_files(calibs["nsq4"], args.work, key))
    for t, rot in plan:
        if t.endswith(("-centering", "-layers")) and not args.table_only and t not in calibs:
            continue  # no layer chosen: the same run as the shipped / uncentered row
        name = f"{tag}-{t.replace('/', '-v')}-rot{rot}"
        log = base_log if t == "f16" else args.work / f"{name}.log"
        if args.table_only and not complete(log):
            continue
        tk, tv = t.split("/") if "/" in t else (t, t)
        ctk, ctv = (x.split("-")[0] for x in (tk, tv))
        calib_args = ["--nsq-calib", str(calibs[tk])] if tk in calibs else []
        env = {"LLAMA_ATTN_ROT_DISABLE": "1"} if rot == "off" else {}
        if t == "f16":
            r = f16 | {"kld": 0.0, "kld_err": 0.0, "kld99": 0.0, "top1": 100.0, "top1_err": 0.0,
                       "ppl": f16["final"], "ppl_err": f16.get("final_err"), "ppl_base": f16["final"]}
        else:
            r = parse(run(common + ["-ctk", ctk, "-ctv", ctv, "--kl-divergence-base", str(base),
                                    "--kl-divergence", *calib_args], env, log))
        bits = 16.0 * r["kv_mib"] / f16["kv_mib"] if r["kv_mib"] and f16["kv_mib"] else None
        rows.append({"model": key, "ctx_size": ctx, "chunks": chunks, "type": t, "rotation": rot,
                     "bits_per_value": bits, "kv_mib": r["kv_mib"], "ppl": r["ppl"], "ppl_err": r.get("ppl_err"),
                     "ppl_f16": f16["final"],
                     # ΔPPL against the base PPL of the same run's statistics (the same scored tokens)
                     "dppl": None if r["ppl"] is None else r["ppl"] - (r["ppl_base"] or f16["final"]),
                     "kld": r["kld"], "kld_err": r.get("kld_err"), "kld99": r["kld99"],
                     "top1": r["top1"], "top1_err": r.get("top1_err")})
        print(f"  {t:16s} rot {rot:3s}: KLD {r['kld']}, {bits and round(bits, 3)} bits/value", file=sys.stderr)
        write()


def table(rows: list, sets: list[tuple[str, int, int]]) -> list[str]:
    lines = []
    for key, ctx, chunks in sets:
        these = [r for r in rows if r["model"] == key and r["ctx_size"] == ctx]
        if not these:
            continue
        lines += [f"### {MODELS[key][0]}, -c {ctx}, {chunks} window{'s' if chunks > 1 else ''}", "",
                  "| type | bits/value | rotation | PPL | ΔPPL | mean KLD | 99% KLD | same top token |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in these:
            bits = "?" if r["bits_per_value"] is None else f"{r['bits_per_value']:.3f}"
            lines.append(f"| {r['type']} | {bits} | {r['rotation']} | {r['ppl']:.4f} ± "
                         f"{r['ppl_err']:.4f} | {r['dppl']:+.4f} | {r['kld']:.6f} ± {r['kld_err']:.6f} | "
                         f"{r['kld99']:.4f} | {r['top1']:.3f} ± {r['top1_err']:.3f} % |")
        lines.append("")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=Path("build/tools/bin"), help="folder with llama-perplexity")
    ap.add_argument("--out", type=Path, default=Path("docs/quality-table"),
                    help="output prefix: writes OUT.json, OUT.md")
    ap.add_argument("--work", type=Path, default=Path("build/quality"),
                    help="logs, f16 logit files (0.3-4 GB per model and context) and lever calibrations")
    ap.add_argument("-f", "--file", type=Path, default=None,
                    help=f"text (default: $NSQ_WIKITEXT, else {WIKITEXT_HEAD.relative_to(ROOT)})")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    ap.add_argument("--types", default=",".join(TYPES), help="comma list of cache types (rotation on)")
    ap.add_argument("--kv-split-types", default=",".join(KV_SPLIT_TYPES),
                    help="K/V pairs of different types (rotation on); '' for none")
    ap.add_argument("--rot-off-types", default=",".join(ROT_OFF_TYPES),
                    help="types also run with upstream's rotation off (LLAMA_ATTN_ROT_DISABLE=1); '' for none")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--model-chunks", default="qwen15=1", help="per-model windows, e.g. qwen15=1 (the 1.5B is slow)")
    ap.add_argument("--long-models", default="gemma3,qwen05", help="models of the long-context rows ('' for none)")
    ap.add_argument("--long-ctx", default="8192,16384", help="context sizes of the long-context rows (1 window each)")
    ap.add_argument("--long-types", default=",".join(LONG_TYPES))
    ap.add_argument("--long-file", type=Path, default=None,
                    help="text of the long-context rows, at least 2x their context in tokens (llama-perplexity's "
                         "rule): WikiText-2's full test split, wiki.test.raw (default: the -f text, too short for "
                         "16384)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="no new runs: tabulate the runs whose logs are complete")
    args = ap.parse_args()

    text = args.file or Path(os.environ.get("NSQ_WIKITEXT", WIKITEXT_HEAD))
    for p in (text, args.bin / "llama-perplexity"):
        if not p.is_file():
            raise SystemExit(f"not found: {p}")
    per_model = dict(kv.split("=") for kv in args.model_chunks.split(",") if kv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    sets = [(key, args.ctx_size, int(per_model.get(key, args.chunks)),
             [("f16", "on")] + [(t, "on") for t in split(args.types) if t != "f16"]
             + [(t, "on") for t in split(args.kv_split_types)]
             + [(t, "off") for t in split(args.rot_off_types)]) for key in split(args.models)]
    sets += [(key, ctx, 1, [("f16", "on")] + [(t, "on") for t in split(args.long_types)])
             for key in split(args.long_models) for ctx in map(int, split(args.long_ctx))]
    # the command that makes these runs (--table-only only tabulates them)
    meta = {"command": " ".join(["python3", "bench/quality.py", *(a for a in sys.argv[1:] if a != "--table-only")]),
            "text": str(text.relative_to(ROOT) if text.is_relative_to(ROOT) else text),
            "long_text": str(args.long_file or text), "flash_attn": True, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d")}
    rows: list = []

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        head = [f"`{meta['command']}` ({meta['date']}; llama-perplexity -fa on -t {args.threads}, K and V both the "
                "type, KLD against the f16 cache on the same tokens; bits/value from the KV cache size llama.cpp "
                "reports)", ""]
        order = sorted((s[:3] for s in sets), key=lambda s: (list(MODELS).index(s[0]), s[1]))
        args.out.with_suffix(".md").write_text("\n".join(head + table(rows, order)))

    for key, ctx, chunks, plan in sets:
        measure(args, text, key, ctx, chunks, plan, rows, write)
    write()
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
