#!/usr/bin/env python3
"""Candidate 3-bit members of the NSQ family, simulated on a real model's K/V before any kernel is written.

    python3 bench/nsq3_design.py --models smollm2,gemma3 -c 512 --out docs/nsq3-design

Captures Q, K and V of every layer for the first -c tokens of WikiText (llama.cpp's own values, f32 cache), stores
them in each candidate format as an nsq4 cache would (K minus the shipped calibration's layer means, upstream's
Hadamard rotation, per-block quantization, back) and reports the relative error of each layer's attention output
against the unquantized attention. q4_0 (through ggml, rotated as upstream does) and nsq4 (the bit-exact reference)
are the anchors: nsq4's measured KLD (docs/quality-table.md) turns the error into an estimate,
KLD ~ KLD(nsq4) * mean(err**2) / mean(err(nsq4)**2) over layers, which only a built type can confirm.

The 3-bit candidates keep NSQ4's block (64 values, fp16 norm d, norm separation: d gives the stored block the norm of
the input) and its search over scales, with an 8-entry table instead of 16 (3 bits per value + 16 bits per block =
3.25 bits/value):
  lloyd8      the Lloyd-Max levels of a unit Gaussian (symmetric, no zero)
  uni8        8 uniform levels (symmetric, no zero), as a plain 3-bit code
  lloyd8-mse  lloyd8 with the least-squares d = <x, q>/|q|^2 instead of norm separation
  lloyd8-b32  lloyd8 in blocks of 32 (3.5 bits/value)
Each is tried for K and V together and, as a mixed cache, with K in nsq4; and, reusing the calibration's per-layer
precision, with K in nsq4 in the 25% or 50% of layers where that lowers the error most (3.375 / 3.5 bits/value).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsq_local import calibrate, capture, models, reference  # noqa: E402
from nsq_local.cache_sim import attention, rot_block_k, rot_block_v, roundtrip, rotate  # noqa: E402

WIKITEXT_HEAD = ROOT / "tests" / "data" / "wikitext-2-test-head.txt"
MODELS = {"smollm2": models.smollm2, "gemma3": models.gemma3_270m, "qwen05": models.qwen25_coder_05b}
# measured KLD of nsq4 as shipped, -c 2048, 4 windows (docs/quality-table.md, 2026-12-02)
NSQ4_KLD = {"smollm2": 0.029908, "gemma3": 0.053559, "qwen05": 0.040468}
LLOYD8 = np.array([-2.1520, -1.3439, -0.7560, -0.2451, 0.2451, 0.7560, 1.3439, 2.1520])
# name: (table, block size, d by norm separation)
TABLES = {
    "lloyd8": (LLOYD8, 64, True),
    "uni8": (np.array([-7, -5, -3, -1, 1, 3, 5, 7], dtype=np.float64), 64, True),
    "lloyd8-mse": (LLOYD8, 64, False),
    "lloyd8-b32": (LLOYD8, 32, True),
}
# where the block's largest value lands, as a multiple of the table's outermost entry: NSQ4's scales span 0.85-1.29
REACH = np.linspace(0.8, 1.6, 16)


def nsq3_roundtrip(x: np.ndarray, table: np.ndarray, block: int, norm_sep: bool) -> np.ndarray:
    """Blocks stored as an fp16 scale and 3-bit codes into `table`, with NSQ4's scale search (float, not the
    integer-exact search a kernel would use); the scale keeps the block's norm, or is the least-squares one."""
    b = x.reshape(-1, block).astype(np.float64)
    amax = np.maximum(np.abs(b).max(axis=1, keepdims=True), 1e-30)
    t = table / np.abs(table).max()
    best, best_err = None, np.full((b.shape[0], 1), np.inf)
    for r in REACH:
        y = b / amax * r  # the block in table units
        c = np.abs(y[..., None] - t).argmin(axis=-1)
        err = ((y - t[c]) ** 2).sum(axis=1, keepdims=True)
        better = err < best_err
        best = c if best is None else np.where(better, c, best)
        best_err = np.where(better, err, best_err)
    q = t[best]
    qq = np.maximum((q * q).sum(axis=1, keepdims=True), 1e-30)
    d = np.sqrt((b * b).sum(axis=1, keepdims=True) / qq) if norm_sep else (b * q).sum(axis=1, keepdims=True) / qq
    d = d.astype(np.float16).astype(np.float64)
    return (d * q).reshape(x.shape).astype(np.float32)


def store(fmt: str, x: np.ndarray, rot) -> np.ndarray:
    """x (tokens, heads, head_dim) through a cache of format fmt, rotated as upstream rotates a quantized cache."""
    if fmt in TABLES:
        y = rotate(x, rot) if rot else x
        back = nsq3_roundtrip(y, *TABLES[fmt])
        return rotate(back, rot) if rot else back
    return roundtrip(fmt, x, rot)


def study(key: str, n_tokens: int, text: Path) -> dict:
    import llama_cpp

    model = MODELS[key]()
    tokens = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False).tokenize(
        text.read_text(encoding="utf-8").encode())[:n_tokens]
    qkv = capture.capture_qkv(model, tokens)
    _, tensors = calibrate.read_gguf(calibrate.cached(model))
    rk, rv = rot_block_k(qkv.k[0].shape[-1]), rot_block_v(qkv.v[0].shape[-1])
    # (K format, V format, K centered)
    plans = {"q4_0": ("q4_0", "q4_0", False), "nsq4": ("nsq4", "nsq4", True)}
    for name in TABLES:
        plans[name] = (name, name, True)
        plans[f"nsq4/{name}"] = ("nsq4", name, True)
    err: dict[str, list[float]] = {p: [] for p in plans}
    t0 = time.time()
    for il in range(qkv.n_layer):
        q, k, v = qkv.q[il], qkv.k[il], qkv.v[il]
        ref = attention(q, k, v).astype(np.float64)
        mean = tensors[f"nsq.k_mean.{il}"].reshape(k.shape[1:])
        for p, (fk, fv, centered) in plans.items():
            k2 = store(fk, k - mean, rk) + mean if centered else store(fk, k, rk)
            out = attention(q, k2, store(fv, v, rv))
            err[p].append(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
        print(f"\r{key}: layer {il + 1}/{qkv.n_layer} {time.time() - t0:5.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    sq = {p: np.square(e) for p, e in err.items()}
    for name in TABLES:
        # the layers whose K in nsq4 saves the most squared error, as the calibration would pick them
        order = np.argsort(sq[f"nsq4/{name}"] - sq[name])
        for share in (25, 50):
            pick = order[:round(qkv.n_layer * share / 100)]
            mixed = sq[name].copy()
            mixed[pick] = sq[f"nsq4/{name}"][pick]
            sq[f"{name}+{share}%"] = mixed
    base = sq["nsq4"].mean()
    return {"model": key, "tokens": len(tokens), "attn_rel_err": {p: float(np.sqrt(v.mean())) for p, v in sq.items()},
            "per_layer": err, "kld_estimate": {p: float(NSQ4_KLD[key] * v.mean() / base) for p, v in sq.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens captured (default 512)")
    ap.add_argument("-f", "--file", type=Path, default=WIKITEXT_HEAD)
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = ap.parse_args()
    results = [study(k, args.ctx_size, args.file) for k in args.models.split(",")]
    plans = list(results[0]["attn_rel_err"])
    lines = ["| format | bits/value | " + " | ".join(f"{r['model']} attn err | est. KLD" for r in results) + " |",
             "|---|---|" + "---|---|" * len(results)]
    bits = {"q4_0": 4.5, "nsq4": reference.BITS_PER_VALUE}
    bits.update({f: 3 + 16 / blk for f, (_, blk, _) in TABLES.items()})
    for p in plans:
        fmt, _, share = p.partition("+")
        fk, fv = fmt.split("/") if "/" in fmt else (fmt, fmt)
        b = (bits[fk] + bits[fv]) / 2 + (bits["nsq4"] - bits[fk]) / 2 * float(share.rstrip("%") or 0) / 100
        lines.append(f"| {p} | {b:.3f} | " + " | ".join(
            f"{r['attn_rel_err'][p]:.4f} | {r['kld_estimate'][p]:.4f}" for r in results) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python3 bench/nsq3_design.py " + " ".join(sys.argv[1:])
        args.out.with_suffix(".json").write_text(json.dumps({"command": cmd, "results": results}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(
            f"# NSQ3 candidates, simulated ({time.strftime('%Y-%m-%d')})\n\n`{cmd}`\n\nRelative error of the "
            "attention output (root mean square over layers) and the KLD it suggests, scaled from nsq4's measured "
            "KLD. `+25%`: K in nsq4 in the quarter of the layers where it helps most.\n\n"
            + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
