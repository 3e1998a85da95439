#!/usr/bin/env python3
"""KV-cache quality table: llama-perplexity's PPL and KL divergence vs an f16 cache, per cache type, with upstream's
Hadamard rotation on and off, for SmolLM2-135M and Gemma 3 270M.

    python3 bench/quality.py --bin build/tools/bin --out docs/quality-table

Each row is one `llama-perplexity -c C --chunks N -fa on -ctk T -ctv T --kl-divergence` run against the f16 run's
logits (`--kl-divergence-base`), so every type is scored on the same tokens. "nsq4" is nsq4 as shipped: K centered
(`--nsq-calib`) by the calibration that `llama_cpp.Llama(type_k="nsq4")` and nsq-chat make by default (Python's
standard-library documentation, kept in the nsq-local cache folder); "nsq4-uncentered" is the same cache without
centering; "nsq4+textcalib" calibrates on the second half of the evaluated text, which the evaluated windows (its
start) never reach: in-domain calibration, as `nsq-calibrate -f` gives it. Logs are kept in --work; a run whose log is
complete is not repeated (delete it to re-run). Writes OUT.json and OUT.md. Rotation does not apply to f16, which
is listed once.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsq_local import models  # noqa: E402
from nsq_local.kvcache import bits_per_value, storage_type  # noqa: E402

# the WikiText-2 excerpt the tests read: its first 8192 tokens are the full test split's, and its second half (the
# textcalib text) starts after them
WIKITEXT_HEAD = ROOT / "tests" / "data" / "wikitext-2-test-head.txt"
TYPES = ("f16", "q8_0", "q5_0", "q4_1", "iq4_nl", "q4_0", "nsq4", "nsq4-uncentered", "nsq4+textcalib")
PATTERNS = {
    "ppl": re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)\s*±\s*([0-9.]+)"),
    "ppl_base": re.compile(r"Mean PPL\(base\)\s*:\s*([0-9.]+)"),
    "kld": re.compile(r"Mean\s+KLD:\s*([0-9.]+)\s*±\s*([0-9.]+)"),
    "kld99": re.compile(r"99\.0%\s+KLD:\s*([0-9.]+)"),
    "top1": re.compile(r"Same top p:\s*([0-9.]+)\s*±\s*([0-9.]+)\s*%"),
    "final": re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)"),
}


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
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    print(f"  {log.name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return text


def parse(text: str) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for key, pat in PATTERNS.items():
        m = pat.search(text)
        out[key] = float(m.group(1)) if m else None
        if m and m.lastindex and m.lastindex >= 2:
            out[key + "_err"] = float(m.group(2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=Path("build/tools/bin"), help="folder with llama-perplexity")
    ap.add_argument("--out", type=Path, default=Path("docs/quality-table"), help="output prefix: writes OUT.json, OUT.md")
    ap.add_argument("--work", type=Path, default=Path("build/quality"),
                    help="logs, f16 logit files (400 MB per model) and calibrations (default build/quality)")
    ap.add_argument("-f", "--file", type=Path, default=None,
                    help=f"text (default: $NSQ_WIKITEXT, else {WIKITEXT_HEAD.relative_to(ROOT)})")
    ap.add_argument("--models", default="smollm2,gemma3", help="comma list of smollm2, gemma3")
    ap.add_argument("--types", default=",".join(TYPES), help="comma list of cache types")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rot", default="on,off", help="upstream's Hadamard rotation: on, off or on,off")
    ap.add_argument("--table-only", action="store_true", help="no new runs: tabulate the runs whose logs are complete")
    args = ap.parse_args()

    text = args.file or Path(os.environ.get("NSQ_WIKITEXT", WIKITEXT_HEAD))
    ppl_bin = args.bin / "llama-perplexity"
    for p in (text, ppl_bin):
        if not p.is_file():
            raise SystemExit(f"not found: {p}")
    logs = args.work
    getters = {"smollm2": ("SmolLM2-135M-Instruct (Q4_1, head 64)", models.smollm2),
               "gemma3": ("Gemma 3 270M (Q4_K_M, head 256, SWA)", models.gemma3_270m)}
    rows = []
    for key in args.models.split(","):
        title, get = getters[key]
        model = get()
        base = logs / f"{key}-f16.kld"
        common = [str(ppl_bin), "-m", str(model), "-f", str(text), "-c", str(args.ctx_size), "--chunks",
                  str(args.chunks), "-fa", "on", "-t", str(args.threads)]
        print(f"{title}:", file=sys.stderr)
        if args.table_only and not complete(logs / f"{key}-f16-base.log"):
            continue
        f16 = parse(run(common + ["-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", str(base)], {},
                        logs / f"{key}-f16-base.log"))
        calibs: dict[str, Path] = {}
        for rot in args.rot.split(","):
            for t in args.types.split(","):
                if t == "f16" and rot == "off":
                    continue
                env = {"LLAMA_ATTN_ROT_DISABLE": "1"} if rot == "off" else {}
                ctype = storage_type(t.split("+")[0])
                calib_args = []
                if t in ("nsq4", "nsq4+textcalib") and not args.table_only:
                    if t not in calibs:
                        from nsq_local import calibrate

                        if t == "nsq4":
                            calibs[t] = calibrate.cached(model)
                        else:  # in-domain: the second half of the text, never evaluated
                            calibs[t] = logs / f"{key}-textcalib.nsq.gguf"
                            if not calibs[t].is_file():
                                body = text.read_bytes().decode("utf-8", errors="replace")
                                calibrate.calibrate(model, calibs[t], body[len(body) // 2:], f"{text.name}, 2nd half")
                    calib_args = ["--nsq-calib", str(calibs[t])]
                name = f"{key}-{t.replace('+', '-')}-rot{rot}"
                if args.table_only and not complete(logs / f"{name}.log"):
                    continue
                r = parse(run(common + ["-ctk", ctype, "-ctv", ctype, "--kl-divergence-base", str(base),
                                        "--kl-divergence", *calib_args], env, logs / f"{name}.log"))
                rows.append({"model": key, "type": t, "rotation": rot, "bits_per_value": bits_per_value(ctype),
                             "ppl": r["ppl"], "ppl_err": r.get("ppl_err"), "ppl_f16": f16["final"],
                             # ΔPPL against the base PPL of the same run's statistics (the same scored tokens)
                             "dppl": None if r["ppl"] is None else r["ppl"] - (r["ppl_base"] or f16["final"]),
                             "kld": r["kld"], "kld_err": r.get("kld_err"), "kld99": r["kld99"],
                             "top1": r["top1"], "top1_err": r.get("top1_err")})
                print(f"  {t:11s} rot {rot:3s}: KLD {r['kld']}", file=sys.stderr)

    meta = {"command": " ".join(sys.argv), "ctx_size": args.ctx_size, "chunks": args.chunks, "text": str(text),
            "flash_attn": True, "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"`{meta['command']}` (llama-perplexity -c {args.ctx_size} --chunks {args.chunks} -fa on, K and V both "
             "the type, KLD vs the f16 cache on the same tokens)", ""]
    for key in args.models.split(","):
        lines += [f"### {getters[key][0]}", "",
                  "| type | bits/value | rotation | PPL | ΔPPL | mean KLD | 99% KLD | same top token |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["model"] != key:
                continue
            lines.append(f"| {r['type']} | {r['bits_per_value']:.2f} | {r['rotation']} | {r['ppl']:.4f} ± "
                         f"{r['ppl_err']:.4f} | {r['dppl']:+.4f} | {r['kld']:.6f} ± {r['kld_err']:.6f} | "
                         f"{r['kld99']:.4f} | {r['top1']:.3f} ± {r['top1_err']:.3f} % |")
        lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
