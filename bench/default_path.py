#!/usr/bin/env python3
"""What `llama_cpp.Llama(type_k=..., type_v=...)` gives a user who passes nothing else: mean KL divergence of each
cache against an f16 cache, through the Python binding exactly as the README shows it.

    python3 bench/default_path.py --out docs/default-path

Rows per model: q4_0 (upstream's best 4-bit type, with its Hadamard rotation), nsq4 as `Llama(type_k="nsq4",
type_v="nsq4")` builds it (centered by the calibration it makes once per model file and caches), nsq4 with
`nsq_calib=` a file from a plain `nsq-calibrate -m MODEL`, and nsq4 with `nsq_calib=False` (not centered). Each
window of -c tokens is evaluated in one `eval` (ubatches of 512, so the attention reads the stored cache) and tokens
c/2+1 .. c-1 are scored, as llama-perplexity scores them; the windows skip the first --skip windows of the text,
which the README's and docs/quality-table's figures use. Writes OUT.json and OUT.md; --md-only writes OUT.md again
from OUT.json without measuring.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsq_local import calibrate, capture, models  # noqa: E402
from nsq_local.ppl import Progress, score  # noqa: E402
from quality import WIKITEXT_HEAD  # noqa: E402

MODELS = {"smollm2": ("SmolLM2-135M-Instruct (Q4_1, head 64)", models.smollm2),
          "gemma3": ("Gemma 3 270M (Q4_K_M, head 256, SWA)", models.gemma3_270m)}
# (row, Llama keyword arguments beyond the model's); "calib" is filled in with the nsq-calibrate file
ROWS = (("q4_0", {"type_k": "q4_0", "type_v": "q4_0"}),
        ("nsq4 (default)", {"type_k": "nsq4", "type_v": "nsq4"}),
        ("nsq4, nsq_calib=nsq-calibrate file", {"type_k": "nsq4", "type_v": "nsq4", "nsq_calib": "calib"}),
        ("nsq4, nsq_calib=False", {"type_k": "nsq4", "type_v": "nsq4", "nsq_calib": False}))


def window_logits(llm, window: np.ndarray) -> np.ndarray:
    half = len(window) // 2
    llm.reset()
    llm.eval(window.tolist())
    return np.array(llm.scores[half:len(window) - 1], dtype=np.float32)


def open_llama(model: Path, n_ctx: int, threads: int, **kwargs):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=512, logits_all=True, flash_attn=True,
                           n_threads=threads, n_threads_batch=threads, verbose=False, **kwargs)


def write_markdown(out: Path, meta: dict, results: list[dict]) -> None:
    lines = ["# What `Llama(type_k=T, type_v=T)` gives", "",
             f"`{meta['command']}` ({meta['date']}; {Path(meta['text']).name}, windows {meta['skip'] + 1}.. of "
             f"-c {meta['ctx_size']}, K and V both the type, flash attention, upstream's rotation on; mean KLD "
             "against an f16 cache)", "",
             "Rows: `q4_0`, upstream's 4-bit type; `nsq4 (default)`, `Llama(type_k=\"nsq4\", type_v=\"nsq4\")` as "
             "it stood on that date (centered by the calibration it makes once per model file and caches); "
             "`nsq4, nsq_calib=nsq-calibrate file`, centered by a file from `nsq-calibrate -m MODEL`; "
             "`nsq4, nsq_calib=False`, not centered. `/ q4_0` is the mean KLD over q4_0's; `K centered by` names "
             "the calibration file.", "",
             "| model | cache | mean KLD ± SE | / q4_0 | PPL | same top token | K centered by |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        q4 = next(x["kld"] for x in results if x["model"] == r["model"] and x["row"] == "q4_0")
        lines.append(f"| {MODELS[r['model']][0]} | {r['row']} | {r['kld']:.4f} ± {r['kld_se']:.4f} | "
                     f"{r['kld'] / q4:.2f}x | {r['ppl']:.3f} | {100 * r['top1']:.1f}% | "
                     f"{Path(r['centered_by']).name if r['centered_by'] != 'no' else '-'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-f", "--file", type=Path, default=None,
                    help="text (default: $NSQ_WIKITEXT, else tests/data/wikitext-2-test-head.txt)")
    ap.add_argument("--models", default="smollm2,gemma3", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4, help="windows per model (default 4)")
    ap.add_argument("--skip", type=int, default=4, help="windows skipped at the start of the text (default 4)")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=Path("build/default-path"), help="nsq-calibrate files")
    ap.add_argument("--out", type=Path, default=Path("docs/default-path"), help="writes OUT.json and OUT.md")
    ap.add_argument("--md-only", action="store_true", help="write OUT.md from OUT.json, measuring nothing")
    args = ap.parse_args()
    if args.md_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        write_markdown(args.out, report["meta"], report["rows"])
        return 0

    text = args.file or Path(os.environ.get("NSQ_WIKITEXT", WIKITEXT_HEAD))
    if not text.is_file():
        raise SystemExit(f"not found: {text}")
    body = text.read_bytes().decode("utf-8", errors="replace")
    results = []
    for key in args.models.split(","):
        title, get = MODELS[key]
        model = get()
        calib = args.work / f"{key}.nsq.gguf"
        if not calib.is_file():  # what `nsq-calibrate -m MODEL -o FILE` makes
            calibrate.calibrate(model, calib)
        with capture.Model(model) as s:  # as nsq-ppl and llama-perplexity tokenize
            tokens = s.tokenize(body)
            bos = s.bos if s.add_bos else None
        first, n = args.skip, min(args.chunks, len(tokens) // args.ctx_size - args.skip)
        if n <= 0:
            raise SystemExit(f"{text} has {len(tokens)} tokens of {key}: too few for --skip {args.skip} windows "
                             f"of -c {args.ctx_size} and one more")
        windows = [tokens[(first + w) * args.ctx_size:(first + w + 1) * args.ctx_size].copy() for w in range(n)]
        for w in windows:
            if bos is not None:
                w[0] = bos
        prog = Progress(n * (1 + len(ROWS)), f"{key}")
        scores: dict[str, list] = {name: [] for name, _ in ROWS}
        centered: dict[str, str] = {}
        t0 = time.perf_counter()
        for window in windows:
            llm = open_llama(model, args.ctx_size, args.threads, type_k="f16", type_v="f16")
            base = window_logits(llm, window)
            del llm
            prog.step("f16")
            targets = window[args.ctx_size // 2 + 1:]
            for name, kwargs in ROWS:
                kw = {k: (calib if v == "calib" else v) for k, v in kwargs.items()}
                llm = open_llama(model, args.ctx_size, args.threads, **kw)
                centered[name] = str(llm.nsq_calib) if getattr(llm, "nsq_calib", None) else "no"
                scores[name].append(score(window_logits(llm, window), targets, base))
                del llm
                prog.step(name[:14])
        for name, _ in ROWS:
            kld = np.concatenate([s.kld for s in scores[name]])
            nll = np.concatenate([s.nll for s in scores[name]])
            results.append({"model": key, "row": name, "kld": float(kld.mean()),
                            "kld_se": float(kld.std(ddof=1) / math.sqrt(kld.size)), "ppl": float(np.exp(nll.mean())),
                            "top1": float(np.concatenate([s.top1 for s in scores[name]]).mean()),
                            "tokens": int(kld.size), "centered_by": centered[name]})
        print(f"  {key}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    meta = {"command": " ".join(["python3", *sys.argv]), "text": str(text), "ctx_size": args.ctx_size,
            "chunks": args.chunks, "skip": args.skip, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    write_markdown(args.out, meta, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
