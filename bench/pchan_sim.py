#!/usr/bin/env python3
"""Per-channel transforms of K before NSQ4, simulated on a real model's Q and K: which ones lower the attention error?

For each layer and KV head, K (post-RoPE, as llama.cpp stores it) goes through a transform, upstream's Hadamard
rotation (or none), NSQ4 (the numpy reference, bit-exact with the C quantizer), and back; the score is the mean KL
divergence between the attention distributions (causal softmax of q.k/sqrt(d)) computed with the original and the
reconstructed keys, over queries of the evaluated window, averaged over layers and heads. Candidates:

  none           plain NSQ4
  mean           subtract a per-channel mean K vector (from a calibration window of other text): exact under softmax
  mean-first32   the mean of the sequence's own first 32 tokens (what a causal running estimate knows early on)
  mean-first512  the same from the first 512 tokens
  scale-var      mean + divide by per-channel std (RoPE pairs tied) and fold the scale into Q
  scale-qk       mean + s_c^2 = sqrt(var_c / E[q_c^2]) (the error-optimal scale when Q's channel energy is known)
  scale-weights  mean + s_c from the norm of W_k's row c (times the attention norm weight): no data needed
  group128       per-channel scales recomputed on every 128-token group (not causal within a group: an upper bound)

    python3 bench/pchan_sim.py -m model.gguf -f wiki.test.raw --tree build/upstream
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsq_local import capture, reference  # noqa: E402
from nsq_local.cache_sim import hadamard, rot_block_k  # noqa: E402

Arr = npt.NDArray[np.float64]


def nsq4(x: Arr) -> Arr:
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return reference.dequantize(reference.quantize(flat)).reshape(x.shape).astype(np.float64)


def attention_kl(q: Arr, k: Arr, k_hat: Arr, queries: npt.NDArray[np.int64]) -> float:
    d = q.shape[-1]
    s, s_hat = q[queries] @ k.T / np.sqrt(d), q[queries] @ k_hat.T / np.sqrt(d)
    future = np.arange(k.shape[0])[None, :] > queries[:, None]
    s[future] = s_hat[future] = -1e30
    ls = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
    lh = s_hat - np.logaddexp.reduce(s_hat, axis=1, keepdims=True)
    return float(np.mean(np.sum(np.exp(ls) * (ls - lh), axis=1)))


def pair_tied(v: Arr) -> Arr:
    # llama's RoPE rotates channel pairs (2i, 2i+1); a scale shared by the pair commutes with it (and with shifts)
    return np.repeat(v.reshape(-1, 2).mean(axis=1), 2)


def weight_scales(tree: Path, model: Path, n_layer: int, n_head_kv: int, head_dim: int) -> list[Arr]:
    sys.path.insert(0, str(tree / "vendor" / "llama.cpp" / "gguf-py"))
    import gguf
    from gguf import quants

    r = gguf.GGUFReader(model)
    t = {x.name: x for x in r.tensors}
    out = []
    for il in range(n_layer):
        wk = quants.dequantize(t[f"blk.{il}.attn_k.weight"].data, t[f"blk.{il}.attn_k.weight"].tensor_type)
        g = np.asarray(quants.dequantize(t[f"blk.{il}.attn_norm.weight"].data,
                                         t[f"blk.{il}.attn_norm.weight"].tensor_type)).reshape(-1)
        rows = np.linalg.norm(wk.reshape(n_head_kv * head_dim, -1) * g[None, :], axis=1)
        out.append(rows.reshape(n_head_kv, head_dim))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, required=True)
    ap.add_argument("-f", "--file", type=Path, required=True, help="text; evaluated at its start, calibrated late")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--tree", type=Path, default=Path("build/upstream"), help="patched tree (for gguf-py)")
    ap.add_argument("--rot", choices=["on", "off"], default="on")
    ap.add_argument("--layers", default="", help="comma list (default: every third layer)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    text = args.file.read_text(encoding="utf-8")
    with capture.Model(args.model) as s:
        eval_tokens = s.tokenize(text[:args.ctx_size * 8])[:args.ctx_size]
        calib_tokens = s.tokenize(text[len(text) // 2:len(text) // 2 + args.ctx_size * 8])[:args.ctx_size]
    ev = capture.capture_qkv(args.model, eval_tokens)
    cal = capture.capture_qkv(args.model, calib_tokens)
    n_layer, head_dim = ev.n_layer, ev.k[0].shape[-1]
    block = rot_block_k(head_dim) if args.rot == "on" else None
    rot = hadamard(block).astype(np.float64) if block else None
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(0, n_layer, 3))
    try:
        w_scales = weight_scales(args.tree, args.model, n_layer, ev.n_head_kv, head_dim)
    except (KeyError, ImportError, ValueError) as e:  # fused QKV or an unsupported quant type
        print(f"weights-derived scales skipped: {e}", file=sys.stderr)
        w_scales = None
    queries = np.arange(min(256, args.ctx_size // 4), args.ctx_size, 16)
    group = ev.n_head // ev.n_head_kv

    def roundtrip(k: Arr, mu: Arr, s: Arr) -> Arr:
        x = (k - mu) / s
        if rot is not None:
            n = rot.shape[0]
            y = nsq4((x.reshape(len(x), -1, n) @ rot).reshape(x.shape))
            x_hat = (y.reshape(len(y), -1, n) @ rot).reshape(y.shape)
        else:
            x_hat = nsq4(x)
        return x_hat * s + mu

    results: dict[str, list[float]] = {}
    for il in layers:
        for h in range(ev.n_head_kv):
            k = ev.k[il][:, h].astype(np.float64)
            kc = cal.k[il][:, h].astype(np.float64)
            qs = [ev.q[il][:, h * group + j].astype(np.float64) for j in range(group)]
            mu = kc.mean(axis=0)
            var = kc.var(axis=0) + 1e-12
            wq = np.mean([(cal.q[il][:, h * group + j].astype(np.float64) ** 2).mean(axis=0) for j in range(group)],
                         axis=0) + 1e-12
            one = np.ones(head_dim)
            variants: dict[str, Callable[[], Arr]] = {
                "none": lambda: roundtrip(k, 0 * mu, one),
                "mean": lambda: roundtrip(k, mu, one),
                "mean-first32": lambda: roundtrip(k, k[:32].mean(axis=0), one),
                "mean-first512": lambda: roundtrip(k, k[:512].mean(axis=0), one),
                "scale-var": lambda: roundtrip(k, mu, np.sqrt(pair_tied(var))),
                "scale-qk": lambda: roundtrip(k, mu, np.sqrt(pair_tied(np.sqrt(var / wq)))),
                "group128": lambda: np.concatenate([roundtrip(k[i:i + 128], k[i:i + 128].mean(axis=0),
                                                              np.sqrt(pair_tied(k[i:i + 128].var(axis=0) + 1e-12)))
                                                    for i in range(0, len(k), 128)]),
            }
            if w_scales is not None:
                variants["scale-weights"] = lambda: roundtrip(k, mu, pair_tied(w_scales[il][h]))
            for name, make in variants.items():
                k_hat = make()
                results.setdefault(name, []).append(np.mean([attention_kl(q, k, k_hat, queries) for q in qs]))
        print(f"layer {il}: " + ", ".join(f"{n} {v[-1]:.5f}" for n, v in results.items()), file=sys.stderr)

    summary = {name: float(np.mean(v)) for name, v in results.items()}
    print(f"{args.model.name}, rotation {args.rot}, layers {layers}: mean attention KL vs exact keys")
    print("| K transform | attention KL | vs none |\n|---|---|---|")
    for name, v in summary.items():
        print(f"| {name} | {v:.6f} | {v / summary['none']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model.name, "rotation": args.rot, "layers": layers,
                                         "attention_kl": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
