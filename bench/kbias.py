#!/usr/bin/env python3
"""Where a model's K cache error comes from, per layer: the K bias, what centering removes, what NSQ4 loses.

    python3 bench/kbias.py -m model.gguf -f wikitext-2-test.txt -c 2048 [--nsq-calib FILE] [--json kbias.json]

The model runs the first -c tokens of the text once with an f32 cache (nsq_local.capture: Q, post-RoPE K and V as
llama.cpp stores them). The K means that center an nsq4 K cache come from --nsq-calib (a file from nsq-calibrate), or
by default from a calibration run on nsq-calibrate's built-in text (Python's standard-library docs), never from the
scored text. Per layer (K statistics over all KV heads of the layer):

  |b|        L2 norm of the layer's attn_k.bias (all KV heads) from the GGUF, and its largest |value|; "-" if none
  mean%      share of K's energy that the calibrated mean removes: 1 - sum |k - m|^2 / sum |k|^2
  self%      the same for the window's own mean (what a perfect fixed mean could remove; not causal)
  lo% hi%    energy left after centering, as a share of K's energy, in the low- and high-frequency RoPE pairs: a
             pair is high-frequency when its period 2 pi / theta_i is shorter than the window (-c), so a mean over
             the window cancels what turns with the position (pairs by the model's RoPE layout: NEOX (i, i + n/2)
             for qwen2/gemma, normal (2i, 2i + 1) for llama; theta_i = scale * base^(-2i/n_rot))
  bhi%       energy of the K bias in the high-frequency pairs as a share of K's energy: the part of K that turns
             with the position R(p) b, which no fixed post-RoPE mean can remove
  Kerr u/c   relative RMS error of K stored as nsq4 with upstream's Hadamard rotation, uncentered / centered
  Kerr c-b   centered after also taking R(p) b off every key (and adding it back): the bound of position-aware
             centering (not exact with a plain cache: q.R(p)b differs between keys; a simulation only)
  q8 / q4    relative K error of q8_0 and q4_0 (rotated, uncentered, as upstream stores them)
  1-cosK     1 - cosine of the attention output, K nsq4 centered, V exact
  1-cosV     the same with K exact and V nsq4
  1-cosKV    both
  KL_K       mean KL divergence of the attention distributions (exact K vs K nsq4 centered), over every
             --kl-stride-th query and all query heads

Prints a table and writes the JSON report (--json, default kbias-<model>.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsq_local import calibrate, capture  # noqa: E402
from nsq_local.cache_sim import attention, cosine, rel_err, rot_block_k, rot_block_v, roundtrip  # noqa: E402

Arr = npt.NDArray[np.float32]
ROPE_TYPE_NEOX = 2  # llama.h LLAMA_ROPE_TYPE_NEOX (GGML_ROPE_TYPE_NEOX)


def gguf_info(model: Path) -> dict:
    """Architecture, RoPE parameters and per-layer attn_k.bias (float32, dequantized if stored quantized)."""
    import gguf

    r = gguf.GGUFReader(str(model))

    def field(name: str, default=None):
        f = r.fields.get(name)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    biases: dict[int, npt.NDArray[np.float32]] = {}
    for t in r.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] == "attn_k" and parts[3] == "bias":
            data = np.asarray(t.data)
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                data = gguf.quants.dequantize(data, t.tensor_type)
            biases[int(parts[1])] = data.astype(np.float32).reshape(-1)
    return {"arch": arch, "freq_base": float(field(f"{arch}.rope.freq_base", 10000.0)),
            "rope_dim": field(f"{arch}.rope.dimension_count"), "biases": biases}


def rope_pairs(head_dim: int, n_rot: int, neox: bool) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Channel indices (a, b) of each RoPE pair i (theta_i = base^(-2i/n_rot)), in the model's layout."""
    i = np.arange(n_rot // 2)
    return (i, i + n_rot // 2) if neox else (2 * i, 2 * i + 1)


def rope(x: npt.NDArray[np.float64], pos: npt.NDArray[np.float64], theta: npt.NDArray[np.float64],
         pairs: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]) -> npt.NDArray[np.float64]:
    """x (..., d) rotated by angle pos * theta_i in each pair; pos broadcasts over the leading axes: (T,) for x
    (T, H, d) or (T, 1, d)."""
    a, b = pairs
    ang = pos.reshape(-1, *([1] * (x.ndim - 2)), 1) * theta  # (T, 1.., n_pairs)
    c, s = np.cos(ang), np.sin(ang)
    out = np.array(x, dtype=np.float64, copy=True)
    xa, xb = x[..., a], x[..., b]
    out[..., a] = xa * c - xb * s
    out[..., b] = xa * s + xb * c
    return out


def layer_err(x: Arr, y: npt.ArrayLike) -> float:
    """Relative RMS error over a whole layer (kv.rel_err gives it per head; here heads weigh by their energy)."""
    x64 = x.astype(np.float64)
    return float(np.sqrt(((np.asarray(y, dtype=np.float64) - x64) ** 2).sum() / (x64 ** 2).sum()))


def attention_kl(q: Arr, k: Arr, k_hat: Arr, stride: int) -> float:
    """Mean KL(p || p_hat) of causal attention distributions over queries 0, stride, ... and all query heads."""
    t, n_head, d = q.shape
    group = n_head // k.shape[1]
    queries = np.arange(0, t, stride)
    future = np.arange(t)[None, :] > queries[:, None]
    total = 0.0
    for h in range(n_head):
        qh = q[queries, h].astype(np.float64)
        s = qh @ k[:, h // group].T.astype(np.float64) / np.sqrt(d)
        s_hat = qh @ k_hat[:, h // group].T.astype(np.float64) / np.sqrt(d)
        s[future] = s_hat[future] = -1e30  # exp() of it is 0, and ls - lh stays finite
        ls = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
        lh = s_hat - np.logaddexp.reduce(s_hat, axis=1, keepdims=True)
        total += float(np.mean(np.sum(np.exp(ls) * (ls - lh), axis=1)))
    return total / n_head


def analyse(model: Path, text: str, n_ctx: int, k_means: list[Arr], threads: Optional[int], kl_stride: int,
            progress: bool = True) -> dict:
    import llama_cpp

    info = gguf_info(model)
    with capture.Capturer(model, n_ctx, n_threads=threads) as cap:
        s = cap.model
        neox = llama_cpp.llama_model_rope_type(s.ptr) == ROPE_TYPE_NEOX
        freq_scale = float(llama_cpp.llama_model_rope_freq_scale_train(s.ptr))
        tokens = s.tokenize(text)[:n_ctx]
        if len(tokens) < n_ctx:
            raise ValueError(f"the text has {len(tokens)} tokens, fewer than -c {n_ctx}")
        qkv = cap.run(tokens)
    t, n_kv, hd = qkv.k[0].shape
    n_rot = int(info["rope_dim"] or hd)
    pairs = rope_pairs(hd, n_rot, neox)
    theta = freq_scale * info["freq_base"] ** (-2.0 * np.arange(n_rot // 2) / n_rot)
    high = 2 * np.pi / theta < n_ctx  # pairs that turn at least once within the window
    hi_ch = np.zeros(hd, dtype=bool)
    hi_ch[pairs[0][high]] = hi_ch[pairs[1][high]] = True
    pos = np.arange(t, dtype=np.float64)
    rk, rv = rot_block_k(hd), rot_block_v(qkv.v[0].shape[-1])
    rows = []
    t0 = time.perf_counter()
    for il in range(qkv.n_layer):
        q, k, v = qkv.q[il], qkv.k[il], qkv.v[il]
        k64 = k.astype(np.float64)
        m = k_means[il].reshape(n_kv, hd).astype(np.float64)
        energy = float((k64 ** 2).sum())
        resid = k64 - m
        row: dict = {"layer": il}
        b = info["biases"].get(il)
        if b is not None:
            bh = b.reshape(n_kv, hd).astype(np.float64)
            row["bias_norm"] = float(np.linalg.norm(bh))
            row["bias_absmax"] = float(np.abs(bh).max())
            row["bias_hi_share"] = t * float((bh[:, hi_ch] ** 2).sum()) / energy
            # position-aware centering bound: R(p) b off every key, the calibrated mean less R(p) b's mean
            rb = rope(np.broadcast_to(bh, (t, n_kv, hd)), pos, theta, pairs)
            m_nb = m - rb.mean(axis=0)
            k_nb = (k64 - rb - m_nb).astype(np.float32)
            row["k_err_centered_bias"] = layer_err(k, roundtrip("nsq4", k_nb, rk) + (rb + m_nb))
        else:
            row.update(bias_norm=None, bias_absmax=None, bias_hi_share=None, k_err_centered_bias=None)
        row["mean_share"] = 1 - float((resid ** 2).sum()) / energy
        row["self_mean_share"] = 1 - float(((k64 - k64.mean(axis=0)) ** 2).sum()) / energy
        row["resid_lo_share"] = float((resid[..., ~hi_ch] ** 2).sum()) / energy
        row["resid_hi_share"] = float((resid[..., hi_ch] ** 2).sum()) / energy
        mf = m.astype(np.float32)
        k_c = roundtrip("nsq4", k - mf, rk) + mf
        v_n = roundtrip("nsq4", v, rv)
        row["k_err_uncentered"] = layer_err(k, roundtrip("nsq4", k, rk))
        row["k_err_centered"] = layer_err(k, k_c)
        row["k_err_q8_0"] = layer_err(k, roundtrip("q8_0", k, rk))
        row["k_err_q4_0"] = layer_err(k, roundtrip("q4_0", k, rk))
        row["v_err_nsq4"] = layer_err(v, v_n)
        row["k_err_centered_heads"] = rel_err(k, k_c).tolist()
        ref = attention(q, k, v)
        row["attn_1mcos_k"] = 1 - cosine(ref, attention(q, k_c, v))
        row["attn_1mcos_v"] = 1 - cosine(ref, attention(q, k, v_n))
        row["attn_1mcos_kv"] = 1 - cosine(ref, attention(q, k_c, v_n))
        row["attn_kl_k"] = attention_kl(q, k, k_c, kl_stride)
        rows.append(row)
        if progress:
            print(f"\rkbias: layer {il + 1}/{qkv.n_layer} {time.perf_counter() - t0:6.1f} s", end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    return {"model": str(model), "arch": info["arch"], "n_layer": qkv.n_layer, "n_head": qkv.n_head,
            "n_head_kv": n_kv, "head_dim": hd, "n_tokens": t, "rope": "neox" if neox else "norm",
            "freq_base": info["freq_base"], "freq_scale": freq_scale, "n_rot": n_rot,
            "high_freq_pairs": int(high.sum()), "pairs": n_rot // 2, "rot_block_k": rk, "rot_block_v": rv,
            "layers": rows}


def _f(x: Optional[float], fmt: str) -> str:
    return format(x, fmt) if x is not None else "-".rjust(int(fmt.split(".")[0]))


def format_table(rep: dict) -> str:
    head = (f"{'L':>3} {'|b|':>8} {'max|b|':>7} {'mean%':>6} {'self%':>6} {'lo%':>6} {'hi%':>6} {'bhi%':>6} "
            f"{'Kerr u':>7} {'Kerr c':>7} {'Kerr c-b':>8} {'q8':>6} {'q4':>6} {'Verr':>6} {'1-cosK':>8} "
            f"{'1-cosV':>8} {'1-cosKV':>8} {'KL_K':>8}")
    lines = [head, "-" * len(head)]
    pct = (lambda x: _f(None if x is None else 100 * x, "6.1f"))
    for r in rep["layers"]:
        lines.append(f"{r['layer']:>3} {_f(r['bias_norm'], '8.1f')} {_f(r['bias_absmax'], '7.1f')} "
                     f"{pct(r['mean_share'])} {pct(r['self_mean_share'])} {pct(r['resid_lo_share'])} "
                     f"{pct(r['resid_hi_share'])} {pct(r['bias_hi_share'])} {r['k_err_uncentered']:7.4f} "
                     f"{r['k_err_centered']:7.4f} {_f(r['k_err_centered_bias'], '8.4f')} {r['k_err_q8_0']:6.4f} "
                     f"{r['k_err_q4_0']:6.4f} {r['v_err_nsq4']:6.4f} {r['attn_1mcos_k']:8.2e} "
                     f"{r['attn_1mcos_v']:8.2e} {r['attn_1mcos_kv']:8.2e} {r['attn_kl_k']:8.2e}")
    keys = ("k_err_uncentered", "k_err_centered", "k_err_q8_0", "k_err_q4_0", "v_err_nsq4", "attn_1mcos_k",
            "attn_1mcos_v", "attn_1mcos_kv", "attn_kl_k")
    lines.append("mean: " + ", ".join(f"{k} {np.mean([r[k] for r in rep['layers']]):.4g}" for k in keys))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, type=Path, help="GGUF model")
    ap.add_argument("-f", "--file", required=True, type=Path, help="text; its first -c tokens are analysed")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048, help="tokens analysed (default 2048)")
    ap.add_argument("--nsq-calib", type=Path, help="K means from nsq-calibrate (default: calibrate on the built-in "
                                                   "text, -c tokens per window, 2 windows)")
    ap.add_argument("--kl-stride", type=int, default=8, help="attention KL over every N-th query (default 8)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, help="JSON report (default kbias-<model stem>.json)")
    args = ap.parse_args(argv)
    for what, p in (("model", args.model), ("text", args.file)):
        if not p.is_file():
            ap.error(f"{what} file {p} does not exist")
    t0 = time.perf_counter()
    if args.nsq_calib:
        tensors = calibrate.read_gguf(args.nsq_calib)[1]
        means = [tensors[f"nsq.k_mean.{il}"] for il in range(len(tensors)) if f"nsq.k_mean.{il}" in tensors]
        calib_from = str(args.nsq_calib)
    else:
        means, _ = calibrate.k_means(args.model, calibrate.builtin_text(), args.ctx_size, 2, args.threads)
        calib_from = "built-in text (python-stdlib-docs), 2 windows"
    text = args.file.read_bytes().decode("utf-8", errors="replace")
    rep = analyse(args.model, text, args.ctx_size, means, args.threads, args.kl_stride)
    rep.update(text=str(args.file), calibration=calib_from, seconds=round(time.perf_counter() - t0, 1))
    print(f"{args.model.name}: {rep['arch']}, {rep['n_layer']} layers, {rep['n_head_kv']} KV heads of "
          f"{rep['head_dim']}, RoPE {rep['rope']} base {rep['freq_base']:g} ({rep['high_freq_pairs']} of "
          f"{rep['pairs']} pairs turn within {rep['n_tokens']} tokens), K rotation blocks {rep['rot_block_k']}; "
          f"calibration: {calib_from}")
    print(format_table(rep))
    out = args.json or Path(f"kbias-{args.model.stem}.json")
    out.write_text(json.dumps(rep, indent=1) + "\n")
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
