"""nsq-ppl: what a KV-cache type costs in perplexity and KL divergence, measured on logits that read the cache.

    nsq-ppl -m model.gguf -f wiki.test.raw -c 2048 --chunks 8 -ctk nsq4 -ctv nsq4 -ctk nsq3 -ctv nsq3
    nsq-ppl -m model.gguf -f wiki.test.raw --chunks 2 -ctk nsq4 -ctv nsq4 --sweep-ctx 512,1024,2048,4096,8192

Scheme. The text is tokenized once and cut into windows of -c tokens (the first token of a window becomes BOS when
the model adds one, as llama-perplexity does). For every window and every cache type, the context's cache is
cleared, then
  pass 1 decodes the prefix (the first -c/2 tokens) without logits: only the KV cache is written, in that type;
  pass 2 decodes the suffix (the last -c/2 tokens) with logits; its attention reads the stored, quantized prefix.
The last -c/2 - 1 tokens of the window are scored (logits at positions c/2 .. c-2 predict tokens c/2+1 .. c-1), the
same tokens llama-perplexity scores. The baseline is a context with an f16 cache that decodes exactly the same
windows the same way; its logits of a window are computed once and compared with every cache type's before the next
window, so nothing of the size of a whole run is kept. Log-softmax and all sums are float64 (numpy).

Reported per cache type: PPL and its difference to the f16 baseline (ΔPPL), the mean KL divergence
KL(f16 || type) per scored token with its standard error, its 99th percentile, the share of tokens whose top-1
token is the baseline's, tokens scored and seconds. -ctk/-ctv are given in pairs (a missing side is f16).

Upstream rotates a quantized K/V cache with a Hadamard transform; --no-rot sets LLAMA_ATTN_ROT_DISABLE=1 for the
contexts this tool creates, and the report shows what llama.cpp reported (attn_rot_k/attn_rot_v) for each type.
An nsq4 or nsq3 K cache is measured as shipped: centered by the calibration llama_cpp.Llama uses by default
(--nsq-calib picks a file); -ctk nsq4-uncentered (nsq3-uncentered) is the same cache without centering.

--sweep-ctx runs the whole measurement for each window size in the list (each with --chunks windows) and plots
ΔPPL and mean KLD against the context length per cache type (PNG, --plot).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from nsq_local._common import (CACHE_TYPES, EXIT_USAGE, FLASH_ATTN, NSQ_TYPES, UNCENTERED, UsageError, is_quantized,
                               nsq_calib_arg, pyplot, storage_type)
from nsq_local.calibrate import Decoder
from nsq_local.capture import LlamaError, Model

_ROWS = 64  # logits rows per log-softmax block: bounds the float64 temporaries to a few tens of MB


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class Scores:
    """Per-token figures of one window: negative log-likelihood, KL(base || this), top-1 agreement."""

    nll: npt.NDArray[np.float64]
    kld: Optional[npt.NDArray[np.float64]] = None
    top1: Optional[npt.NDArray[np.bool_]] = None


def score(logits: npt.NDArray[np.float32], targets: npt.NDArray[np.int32],
          base: Optional[npt.NDArray[np.float32]] = None) -> Scores:
    """Figures of logits (n, vocab) predicting `targets`, against the baseline's logits of the same tokens."""
    n = len(targets)
    nll = np.empty(n)
    kld = np.empty(n) if base is not None else None
    top1 = np.empty(n, dtype=bool) if base is not None else None
    for r in range(0, n, _ROWS):
        sl = slice(r, min(n, r + _ROWS))
        lq = log_softmax(logits[sl])
        nll[sl] = -lq[np.arange(sl.stop - sl.start), targets[sl]]
        if base is not None:
            lb = log_softmax(base[sl])
            kld[sl] = np.maximum((np.exp(lb) * (lb - lq)).sum(axis=-1), 0.0)  # >= 0 up to rounding
            top1[sl] = lq.argmax(axis=-1) == lb.argmax(axis=-1)
    return Scores(nll, kld, top1)


@dataclass
class TypeResult:
    type_k: str
    type_v: str
    attn_rot_k: bool = False
    attn_rot_v: bool = False
    nsq_calib: Optional[str] = None  # the file an nsq4 or nsq3 K cache was centered by
    ppl: float = math.nan
    delta_ppl: Optional[float] = None
    kld_mean: Optional[float] = None
    kld_se: Optional[float] = None
    kld_p99: Optional[float] = None
    top1_agree: Optional[float] = None
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Acc:
    nll: list = field(default_factory=list)
    kld: list = field(default_factory=list)
    top1: list = field(default_factory=list)
    seconds: float = 0.0

    def add(self, s: Scores) -> None:
        self.nll.append(s.nll)
        if s.kld is not None:
            self.kld.append(s.kld)
            self.top1.append(s.top1)

    def fill(self, r: TypeResult, base_ppl: Optional[float]) -> TypeResult:
        nll = np.concatenate(self.nll)
        r.tokens = int(nll.size)
        r.ppl = float(np.exp(nll.mean()))
        r.seconds = round(self.seconds, 3)
        if base_ppl is not None:
            kld = np.concatenate(self.kld)
            r.delta_ppl = r.ppl - base_ppl
            r.kld_mean = float(kld.mean())
            r.kld_se = float(kld.std(ddof=1) / math.sqrt(kld.size)) if kld.size > 1 else math.nan
            r.kld_p99 = float(np.percentile(kld, 99))
            r.top1_agree = float(np.concatenate(self.top1).mean())
        return r


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.done = 0
        self.start = time.perf_counter()

    def step(self, what: str = "") -> None:
        self.done += 1
        frac = self.done / self.total
        bar = "=" * int(frac * self.width)
        print(f"\r{self.label} [{bar:<{self.width}}] {self.done}/{self.total} {what:<14} "
              f"{time.perf_counter() - self.start:6.1f} s", end="", file=sys.stderr, flush=True)
        if self.done == self.total:
            print(file=sys.stderr, flush=True)


def window_logits(s: Decoder, window: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
    """The two passes: the prefix fills the cache, the suffix is decoded against it; logits of the scored rows."""
    half = len(window) // 2
    s.clear()
    s.decode(window[:half], 0, logits=False)
    return s.decode(window[half:], half, logits=True)[:-1]


def evaluate(model: Path, tokens: npt.NDArray[np.int32], n_ctx: int, chunks: int,
             pairs: Sequence[tuple[str, str]], flash_attn: Optional[bool], rotation: bool,
             n_threads: Optional[int], n_ubatch: int, add_bos: bool, bos: int, verbose: bool = False,
             nsq_calib: Union[None, bool, Path] = None, device: Optional[str] = None) -> dict:
    """One -c: the f16 baseline and each cache type over the same windows; a JSON-ready dict. device: the ggml device
    every context runs on (capture.model_params; None: llama.cpp's default)."""
    if n_ctx < 8 or n_ctx % 2:
        raise UsageError(f"-c {n_ctx}: the window must be an even number of tokens, at least 8")
    available = len(tokens) // n_ctx
    if available == 0:
        raise UsageError(f"the text has {len(tokens)} tokens; -c {n_ctx} needs at least {n_ctx}: use a smaller -c "
                         "or a longer text")
    n_win = available if chunks <= 0 else min(chunks, available)
    decoders = []
    try:
        for tk, tv in [("f16", "f16"), *pairs]:
            decoders.append(Decoder(model, n_ctx=n_ctx, type_k=storage_type(tk), type_v=tv, flash_attn=flash_attn,
                                    n_threads=n_threads, n_ubatch=n_ubatch, rotation=rotation, verbose=verbose,
                                    nsq_calib=False if tk in UNCENTERED else nsq_calib if tk in NSQ_TYPES else None,
                                    device=device))
        accs = [_Acc() for _ in decoders]
        prog = Progress(n_win * len(decoders), f"nsq-ppl -c {n_ctx}")
        for w in range(n_win):
            window = tokens[w * n_ctx:(w + 1) * n_ctx].copy()
            if add_bos:
                window[0] = bos
            targets = window[n_ctx // 2 + 1:]
            base = None
            for i, (s, acc) in enumerate(zip(decoders, accs)):
                t0 = time.perf_counter()
                logits = window_logits(s, window)
                acc.add(score(logits, targets, base))
                acc.seconds += time.perf_counter() - t0
                if i == 0:
                    base = logits
                prog.step(f"{s.type_k}/{s.type_v}")
            del base
        results = []
        base_ppl = None
        for (tk, tv), s, acc in zip([("f16", "f16"), *pairs], decoders, accs):
            r = acc.fill(TypeResult(tk, tv, s.attn_rot.get("k", False), s.attn_rot.get("v", False),
                                    str(s.nsq_calib) if s.nsq_calib else None), base_ppl)
            if base_ppl is None:
                base_ppl = r.ppl
            results.append(r)
    finally:
        for s in decoders:
            s.close()
    return {"n_ctx": n_ctx, "prefix": n_ctx // 2, "chunks": n_win, "tokens_scored": results[0].tokens,
            "baseline": asdict(results[0]), "results": [asdict(r) for r in results[1:]]}


def format_table(run: dict) -> str:
    head = (f"{'cache K/V':<14} {'rot':<4} {'PPL':>9} {'ΔPPL':>9} {'KLD mean ± SE':>21} {'KLD p99':>9} "
            f"{'top-1':>7} {'tokens':>7} {'s':>7}")
    lines = [head, "-" * len(head)]
    for r in [run["baseline"], *run["results"]]:
        rot = ",".join(x for x, on in (("K", r["attn_rot_k"]), ("V", r["attn_rot_v"])) if on) or "-"
        if r["kld_mean"] is None:
            tail = f"{'(baseline)':>9} {'':>21} {'':>9} {'':>7}"
        else:
            tail = (f"{r['delta_ppl']:>+9.4f} {r['kld_mean']:>11.6f} ± {r['kld_se']:<8.6f} {r['kld_p99']:>9.5f} "
                    f"{100 * r['top1_agree']:>6.2f}%")
        lines.append(f"{r['type_k'] + '/' + r['type_v']:<14} {rot:<4} {r['ppl']:>9.4f} {tail} {r['tokens']:>7} "
                     f"{r['seconds']:>7.1f}")
    return "\n".join(lines)


def plot_sweep(runs: Sequence[dict], path: Path, title: str) -> None:
    plt = pyplot()

    ctx = [r["n_ctx"] for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, first in enumerate(runs[0]["results"]):
        label = f"{first['type_k']}/{first['type_v']}"
        ax1.plot(ctx, [r["results"][i]["delta_ppl"] for r in runs], marker="o", label=label)
        mean = np.array([r["results"][i]["kld_mean"] for r in runs])
        se = np.array([r["results"][i]["kld_se"] for r in runs])
        ax2.errorbar(ctx, mean, yerr=np.nan_to_num(se), marker="o", capsize=3, label=label)
    ax1.axhline(0, color="grey", lw=0.8)
    for ax, ylabel in ((ax1, "ΔPPL vs f16 cache"), (ax2, "mean KLD vs f16 cache (± SE)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctx, [str(c) for c in ctx])
        ax.set_xlabel("context length (tokens; the second half is scored)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cache_pairs(ctk: Optional[list[str]], ctv: Optional[list[str]]) -> list[tuple[str, str]]:
    ctk, ctv = [t.lower() for t in ctk or []], [t.lower() for t in ctv or []]
    if not ctk and not ctv:
        raise UsageError("give the cache types to compare with the f16 baseline, e.g. -ctk nsq4 -ctv nsq4")
    if ctk and ctv and len(ctk) != len(ctv):
        raise UsageError(f"{len(ctk)} -ctk and {len(ctv)} -ctv given: give them in pairs "
                         "(-ctk A -ctv A -ctk B -ctv B), or only one of them (the other side is f16)")
    ctk = ctk or ["f16"] * len(ctv)
    ctv = ctv or ["f16"] * len(ctk)
    for flag, names in (("-ctk", ctk), ("-ctv", ctv)):
        for t in names:
            names = CACHE_TYPES + (UNCENTERED if flag == "-ctk" else ())
            if t not in names:
                raise UsageError(f"unknown cache type {flag} {t}; use one of: {', '.join(names)}")
    return list(zip(ctk, ctv))


def parse_sweep(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--sweep-ctx {text!r}: give comma-separated token counts, e.g. 512,1024,2048") from None
    if not values or any(v < 8 or v % 2 for v in values):
        raise UsageError(f"--sweep-ctx {text!r}: every length must be an even number of tokens, at least 8")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nsq-ppl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, metavar="FILE", help="GGUF model file")
    ap.add_argument("-f", "--file", required=True, metavar="FILE", help="text file to score (e.g. WikiText-2 test)")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048, help="window size in tokens (default: 2048)")
    ap.add_argument("--chunks", type=int, default=-1, help="windows to score, -1 = all that fit (default: -1)")
    ap.add_argument("-ctk", "--cache-type-k", action="append", metavar="TYPE",
                    help="K cache type to compare; repeat, paired in order with -ctv")
    ap.add_argument("-ctv", "--cache-type-v", action="append", metavar="TYPE",
                    help="V cache type to compare; repeat, paired in order with -ctk")
    ap.add_argument("-fa", "--flash-attn", choices=list(FLASH_ATTN), default="on",
                    help="flash attention for every context, the baseline's included (default: on; a quantized V "
                         "cache requires it)")
    ap.add_argument("--no-rot", action="store_true",
                    help="turn off upstream's Hadamard rotation of quantized K/V (LLAMA_ATTN_ROT_DISABLE=1)")
    ap.add_argument("--nsq-calib", metavar="FILE|none",
                    help="K means (from nsq-calibrate) that nsq4 and nsq3 K caches are centered by (default: the "
                         "calibration llama_cpp.Llama uses by default; none: not centered)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512, help="physical batch size (default: 512)")
    ap.add_argument("--sweep-ctx", metavar="N,N,...", help="long-context mode: run each window size in the list")
    ap.add_argument("--plot", metavar="FILE.png", help="the sweep's plot (default: nsq-ppl-sweep.png)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = cache_pairs(args.cache_type_k, args.cache_type_v)
        sweep = parse_sweep(args.sweep_ctx) if args.sweep_ctx else None
        if args.plot and not sweep:
            raise UsageError("--plot is the --sweep-ctx plot: add --sweep-ctx")
        if sweep:
            pyplot()  # fail before the long run, not after it
        model, text = Path(args.model), Path(args.file)
        calib = nsq_calib_arg(args.nsq_calib)
        if calib is not None and not any(tk in NSQ_TYPES for tk, _ in pairs):
            raise UsageError("--nsq-calib centers an nsq4 or nsq3 K cache: add -ctk nsq4 or -ctk nsq3")
        for what, p in (("model", model), ("text", text), ("calibration", calib or None)):
            if p is not None and not p.is_file():
                raise UsageError(f"{what} file {p} does not exist")
        fa = FLASH_ATTN[args.flash_attn]
        if fa is False:
            bad = [tv for _, tv in pairs if is_quantized(tv)]
            if bad:
                raise UsageError(f"a quantized V cache ({bad[0]}) requires flash attention: use -fa on")
        with Model(model, verbose=args.verbose) as m:
            # bytes, then decode: no newline translation, the text llama.cpp tools read
            tokens = m.tokenize(text.read_bytes().decode("utf-8", errors="replace"))
            add_bos, bos, n_ctx_train = m.add_bos, m.bos, m.n_ctx_train
        runs = []
        for c in sweep or [args.ctx_size]:
            if c > n_ctx_train:
                print(f"nsq-ppl: warning: -c {c} is longer than the model's training context {n_ctx_train}",
                      file=sys.stderr)
            runs.append(evaluate(model, tokens, c, args.chunks, pairs, fa, not args.no_rot, args.threads,
                                 args.ubatch_size, add_bos, bos, args.verbose, calib))
    except (UsageError, FileNotFoundError) as e:
        print(f"nsq-ppl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LlamaError as e:
        print(f"nsq-ppl: error: {e}", file=sys.stderr)
        return 1

    rotation = "off (--no-rot: LLAMA_ATTN_ROT_DISABLE=1)" if args.no_rot else "upstream default (on for quantized K/V)"
    settings = {"model": str(model), "text": str(text), "text_tokens": int(len(tokens)), "flash_attn": args.flash_attn,
                "rotation": "off" if args.no_rot else "on", "ubatch": args.ubatch_size,
                "scheme": "per window: pass 1 decodes the first half into the cache (no logits); pass 2 decodes "
                          "the second half, reading the stored prefix; tokens c/2+1..c-1 are scored against an "
                          "f16-cache baseline on the same windows"}
    for run in runs:
        windows = f"{run['chunks']} window{'s' * (run['chunks'] > 1)}"
        print(f"\n{model.name}: -c {run['n_ctx']} (prefix {run['prefix']} in pass 1), {windows}, "
              f"{run['tokens_scored']} tokens scored, flash attention {args.flash_attn}, rotation {rotation}")
        for r in run["results"]:
            if r["type_k"] in NSQ_TYPES:
                print(f"{r['type_k']}/{r['type_v']}: K " + (f"centered by {r['nsq_calib']}" if r["nsq_calib"]
                                                            else "not centered"))
        print(format_table(run))
    out: dict = {**settings, **runs[0]} if not sweep else {**settings, "sweep_ctx": sweep, "runs": runs}
    if sweep:
        plot = Path(args.plot or "nsq-ppl-sweep.png")
        n = runs[0]["chunks"]
        plot_sweep(runs, plot, f"{model.name}: KV cache types vs an f16 cache, {n} window{'s' * (n > 1)} per "
                               f"length, rotation {'off' if args.no_rot else 'on'}")
        out["plot"] = str(plot)
        print(f"\nplot: {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
