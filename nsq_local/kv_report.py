"""nsq-kv: look inside a model's KV cache: how hard its K and V are to quantize, and what each cache type loses.

    nsq-kv -m model.gguf -f wiki.test.raw -c 512 --types f16,q8_0,q4_0,iq4_nl,nsq4,nsq3 --out kv-report

The model runs the first -c tokens of the text once (nsq_local.capture: Q, post-RoPE K and V as llama.cpp stores
them in its cache). Then, in numpy (nsq_local.cache_sim: the cache's rotation, round trip and attention):

  per layer and KV head, before and after upstream's Hadamard rotation (K: blocks of the largest power of two >= 64
  that divides the head size, V: blocks of 64, the matrices of llama-kv-cache.cpp's ggml_gen_hadamard):
    norm_cv       coefficient of variation (std / mean) of the vectors' L2 norms over tokens
    absmax_ratio  largest channel absmax over the median channel absmax (an outlier channel makes it large)
  these are the two things a per-block scale handles badly: NSQ4 keeps each block's norm, and rotation spreads
  outlier channels;

  per cache type, K and V are stored as llama.cpp stores them (rotated when upstream rotates that type, unless
  --no-rot; quantized row by row with ggml's CPU quantizer, nsq4 with nsq_local.reference; an nsq4 or nsq3 K
  centered by its layer's calibrated mean as shipped, see --nsq-calib, and nsq4-uncentered or nsq3-uncentered
  without), dequantized and rotated back:
    bits          what the type stores per value
    k_err, v_err  relative RMS reconstruction error sqrt(sum (x' - x)^2 / sum x^2), per layer and KV head
    attn_cos      mean cosine similarity, over tokens and query heads, of causal softmax attention outputs
                  computed with the real Q and the original vs the dequantized K and V (scale 1/sqrt(head size);
                  no soft-capping or sliding window), per layer.

Writes OUT/kv.json, OUT/kv_stats.png (layer x head heatmaps of the statistics), OUT/kv_error.png (heatmaps of the
reconstruction errors per type) and OUT/kv_layers.png (per-layer lines: attention cosine and errors per type).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import numpy.typing as npt

from nsq_local import calibrate, capture, cquant
from nsq_local._common import (CACHE_TYPES, EXIT_USAGE, NSQ_TYPES, UNCENTERED, UsageError, is_quantized,
                               nsq_calib_arg, pyplot, storage_type)
from nsq_local.cache_sim import attention, cosine, rel_err, rot_block_k, rot_block_v, rotate, roundtrip

DEFAULT_TYPES = ("f16", "q8_0", "q4_0", "iq4_nl", "nsq4", "nsq4-uncentered", "nsq3", "nsq3-uncentered")


def head_stats(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """x: (n_tokens, n_heads, head_dim) -> per head: CV of the token vectors' norms, channel absmax max/median."""
    norms = np.linalg.norm(x.astype(np.float64), axis=-1)  # (tokens, heads)
    cv = norms.std(axis=0) / np.maximum(norms.mean(axis=0), 1e-30)
    absmax = np.abs(x).max(axis=0).astype(np.float64)  # (heads, channels)
    ratio = absmax.max(axis=-1) / np.maximum(np.median(absmax, axis=-1), 1e-30)
    return cv, ratio


def analyse(qkv: capture.QKV, types: Sequence[str], rotation: bool = True, progress: bool = True,
            k_means: Optional[Sequence[npt.NDArray[np.float32]]] = None) -> dict:
    """The statistics and per-type errors of captured Q/K/V (see the module doc); a JSON-ready dict.

    k_means: per layer, the flattened mean K (n_head_kv * head_dim) that an nsq4 or nsq3 K cache is centered by, or
    None."""
    hd_k, hd_v = qkv.k[0].shape[-1], qkv.v[0].shape[-1]
    rk, rv = rot_block_k(hd_k), rot_block_v(hd_v)
    stats: dict[str, list] = {f"{w}_{m}_{when}": [] for w in "kv" for m in ("norm_cv", "absmax_ratio")
                              for when in ("before_rot", "after_rot")}
    per_type: dict[str, dict[str, list]] = {t: {"k_err": [], "v_err": [], "attn_cos": []} for t in types}
    # upstream rotates only quantized types
    rotated = {t: rotation and is_quantized(storage_type(t)) for t in types}
    start = time.perf_counter()
    for il in range(qkv.n_layer):
        k, v, q = qkv.k[il], qkv.v[il], qkv.q[il]
        for w, x, r in (("k", k, rk), ("v", v, rv)):
            for when, y in (("before_rot", x), ("after_rot", rotate(x, r) if r else x)):
                cv, ratio = head_stats(y)
                stats[f"{w}_norm_cv_{when}"].append(cv.tolist())
                stats[f"{w}_absmax_ratio_{when}"].append(ratio.tolist())
        ref = attention(q, k, v)
        for t in types:
            rot_on = rotated[t]
            if t in NSQ_TYPES and k_means is not None:
                mean = k_means[il].reshape(k.shape[1:])
                k2 = roundtrip(t, k - mean, rk if rot_on else None) + mean
            else:
                k2 = roundtrip(storage_type(t), k, rk if rot_on else None)
            v2 = roundtrip(storage_type(t), v, rv if rot_on else None)
            per_type[t]["k_err"].append(rel_err(k, k2).tolist())
            per_type[t]["v_err"].append(rel_err(v, v2).tolist())
            per_type[t]["attn_cos"].append(cosine(ref, attention(q, k2, v2)))
        if progress:
            print(f"\rnsq-kv: layer {il + 1}/{qkv.n_layer} {time.perf_counter() - start:6.1f} s", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return {"n_layer": qkv.n_layer, "n_head": qkv.n_head, "n_head_kv": qkv.n_head_kv, "head_dim_k": hd_k,
            "head_dim_v": hd_v, "n_tokens": int(qkv.k[0].shape[0]), "rot_block_k": rk, "rot_block_v": rv,
            "rotation": "on" if rotation else "off", "stats": stats,
            "types": {t: {**per_type[t], "rotated": rotated[t] and rk is not None,
                          "bits": cquant.bits_per_value(storage_type(t)),
                          "k_err_mean": float(np.mean(per_type[t]["k_err"])),
                          "v_err_mean": float(np.mean(per_type[t]["v_err"])),
                          "attn_cos_mean": float(np.mean(per_type[t]["attn_cos"]))} for t in types}}


def _heatmap(ax, data: list, title: str, fig) -> None:
    arr = np.asarray(data, dtype=np.float64)
    im = ax.imshow(arr, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(arr.shape[1]))
    fig.colorbar(im, ax=ax)


def plot(report: dict, out: Path, title: str) -> list[Path]:
    plt = pyplot()
    paths = []
    stats = report["stats"]
    fig, axes = plt.subplots(4, 2, figsize=(9, 14))
    for row, key in enumerate(("k_norm_cv", "v_norm_cv", "k_absmax_ratio", "v_absmax_ratio")):
        for col, when in enumerate(("before_rot", "after_rot")):
            label = key.replace("_", " ").replace("k ", "K ").replace("v ", "V ")
            _heatmap(axes[row, col], stats[f"{key}_{when}"], f"{label}, {when.replace('_', ' ')}ation", fig)
    fig.suptitle(f"{title}\nnorm CV = std/mean of vector norms over tokens; absmax ratio = max/median channel absmax",
                 fontsize=10)
    fig.tight_layout()
    paths.append(out / "kv_stats.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    types = list(report["types"])
    fig, axes = plt.subplots(2, len(types), figsize=(3.2 * len(types), 7), squeeze=False)
    for col, t in enumerate(types):
        for row, w in enumerate(("k", "v")):
            rot = "rotated" if report["types"][t]["rotated"] else "not rotated"
            _heatmap(axes[row, col], report["types"][t][f"{w}_err"], f"{t} {w.upper()} rel. RMS error ({rot})", fig)
    fig.suptitle(f"{title}: reconstruction error per layer and KV head", fontsize=10)
    fig.tight_layout()
    paths.append(out / "kv_error.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    layers = np.arange(report["n_layer"])
    for t in types:
        r = report["types"][t]
        ax1.plot(layers, np.maximum(1 - np.asarray(r["attn_cos"]), 1e-12), marker=".", label=t)
        ax2.plot(layers, np.mean(r["k_err"], axis=1), marker=".", label=t)
        ax3.plot(layers, np.mean(r["v_err"], axis=1), marker=".", label=t)
    for ax, ylabel in ((ax1, "1 - cosine of attention output"), (ax2, "K rel. RMS error (mean over heads)"),
                       (ax3, "V rel. RMS error (mean over heads)")):
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: per layer", fontsize=10)
    fig.tight_layout()
    paths.append(out / "kv_layers.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def format_table(report: dict) -> str:
    s = report["stats"]
    lines = [f"{'':<22} {'K before':>9} {'K after':>9} {'V before':>9} {'V after':>9}   (rotation: K blocks of "
             f"{report['rot_block_k']}, V blocks of {report['rot_block_v']})"]
    for m in ("norm_cv", "absmax_ratio"):
        vals = [np.mean(s[f"{w}_{m}_{when}"]) for w in "kv" for when in ("before_rot", "after_rot")]
        maxs = [np.max(s[f"{w}_{m}_{when}"]) for w in "kv" for when in ("before_rot", "after_rot")]
        lines.append(f"{m + ' mean':<22} " + " ".join(f"{x:>9.3f}" for x in vals))
        lines.append(f"{m + ' max':<22} " + " ".join(f"{x:>9.3f}" for x in maxs))
    lines.append("")
    head = (f"{'cache type':<16} {'bits':>5} {'rotated':<8} {'K rel err':>10} {'V rel err':>10} {'attn cos':>12} "
            f"{'1 - cos':>10}")
    lines += [head, "-" * len(head)]
    for t, r in report["types"].items():
        lines.append(f"{t:<16} {r['bits']:>5.2f} {'yes' if r['rotated'] else 'no':<8} {r['k_err_mean']:>10.5f} "
                     f"{r['v_err_mean']:>10.5f} {r['attn_cos_mean']:>12.8f} {1 - r['attn_cos_mean']:>10.2e}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nsq-kv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, metavar="FILE", help="GGUF model file")
    ap.add_argument("-f", "--file", required=True, metavar="FILE", help="text file; its first -c tokens are used")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens to analyse (default: 512)")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES),
                    help=f"comma-separated cache types (default: {','.join(DEFAULT_TYPES)})")
    ap.add_argument("--no-rot", action="store_true",
                    help="store every type without upstream's rotation (as with LLAMA_ATTN_ROT_DISABLE=1)")
    ap.add_argument("--nsq-calib", metavar="FILE|none",
                    help="K means (from nsq-calibrate) that nsq4 and nsq3 K caches are centered by (default: the "
                         "calibration llama_cpp.Llama uses by default; none: not centered)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", default="nsq-kv-out", metavar="DIR", help="folder for the plots (default: nsq-kv-out)")
    ap.add_argument("--json", metavar="FILE", help="the JSON report (default: OUT/kv.json)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
        names = [t for t in CACHE_TYPES if t != "f32"] + list(UNCENTERED)
        if not types or any(t not in names for t in types):
            raise UsageError(f"--types {args.types!r}: use cache types from: {', '.join(names)}")
        model, text = Path(args.model), Path(args.file)
        for what, p in (("model", model), ("text", text)):
            if not p.is_file():
                raise UsageError(f"{what} file {p} does not exist")
        if args.ctx_size < 2:
            raise UsageError(f"-c {args.ctx_size}: analyse at least 2 tokens")
        pyplot()  # fail before the model runs, not after
        with capture.Model(model, verbose=args.verbose) as m:
            # bytes, then decode: no newline translation, the text llama.cpp tools read
            tokens = m.tokenize(text.read_bytes().decode("utf-8", errors="replace"))
            nsq = next((t for t in types if t in NSQ_TYPES), None)
            calib = calibrate.resolve(model, m.ptr, nsq_calib_arg(args.nsq_calib), nsq) if nsq else None
        if len(tokens) < args.ctx_size:
            raise UsageError(f"the text has {len(tokens)} tokens, fewer than -c {args.ctx_size}")
        t0 = time.perf_counter()
        qkv = capture.capture_qkv(model, tokens[:args.ctx_size], n_threads=args.threads, verbose=args.verbose)
        hd = qkv.k[0].shape[-1]
        for t in types:
            qk, _ = cquant.block_info(storage_type(t))
            if hd % qk or qkv.v[0].shape[-1] % qk:
                raise UsageError(f"cache type {t} stores blocks of {qk} values, which do not divide this model's "
                                 f"head size {hd}")
        k_means = None
        if calib is not None:
            tensors = calibrate.read_gguf(calib)[1]
            k_means = [tensors[f"nsq.k_mean.{il}"] for il in range(qkv.n_layer)]
        report = analyse(qkv, types, rotation=not args.no_rot, k_means=k_means)
        report["nsq_calib"] = str(calib) if calib else None
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"nsq-kv: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except capture.LlamaError as e:
        print(f"nsq-kv: error: {e}", file=sys.stderr)
        return 1
    report = {"model": str(model), "text": str(text), **report, "seconds": round(time.perf_counter() - t0, 2)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model.name}, {report['n_tokens']} tokens"
    report["plots"] = [str(p) for p in plot(report, out, title)]
    json_path = Path(args.json) if args.json else out / "kv.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    centered = (f", {'/'.join(t for t in NSQ_TYPES if t in types)} K centered by {report['nsq_calib']}"
                if report["nsq_calib"] else "")
    print(f"{title}: {report['n_layer']} layers, {report['n_head_kv']} KV heads of {report['head_dim_k']}, "
          f"rotation {report['rotation']}{centered}")
    print(format_table(report))
    print(f"json: {json_path}\nplots: {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
