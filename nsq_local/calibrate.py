"""nsq-calibrate: the per-layer mean K vectors that let an NSQ4 cache store centered keys.

Every key stored in an NSQ4 cache is first reduced by its layer's mean K vector (post-RoPE, per KV head and
channel). One fixed vector taken off every key moves all of a query's attention logits by the same amount, which
softmax cancels, so the model's output is unchanged; what changes is the quantizer's input: on SmolLM2 the mean is
half of K's energy, and without it NSQ4's K error halves. The means must be known before the first key is stored
(they are never re-estimated, so the cache stays consistent through state save/load and context shifts), so they
come from a calibration run: this command runs the model with an f32 cache over a text, averages the K vectors
llama.cpp computes for its cache, and writes them to a small GGUF file that llama.cpp reads from LLAMA_NSQ_CALIB
(`llama_cpp.Llama(..., nsq_calib=FILE)` sets it for you).

    nsq-calibrate -m model.gguf -f text.txt -o model.nsq.gguf
    LLAMA_NSQ_CALIB=model.nsq.gguf llama-perplexity -m model.gguf -ctk nsq4 -ctv nsq4 -fa on ...

Without -f the text is the documentation of Python's standard library, which every Python has; text like what the
model will see does better (docs/quality.md: on SmolLM2 and WikiText, held-out WikiText calibrates better than the
docs, and both far better than none). Windows as long as the contexts you use fit best (-c, default 2048).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import struct
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import numpy.typing as npt

from nsq_local.reference import QK

CALIB_ENV = "LLAMA_NSQ_CALIB"

# modules whose docstrings make the built-in calibration text: stable, long, and in every Python install
_DOC_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools",
                "itertools", "json", "logging", "pathlib", "random", "re", "statistics", "string", "subprocess",
                "textwrap", "threading", "unittest", "urllib.parse", "zipfile")


def builtin_text() -> str:
    """Documentation of a fixed set of standard-library modules and their public members."""
    parts = []
    for name in _DOC_MODULES:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = getattr(getattr(mod, attr), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(p.strip() for p in parts if p.strip())


class HeadSizeError(ValueError):
    """The model's K head size is not a multiple of NSQ4's block: no nsq4 K cache to calibrate for."""


def k_means(model: Path, text: str, n_ctx: int = 2048, chunks: int = 2, n_threads: Optional[int] = None,
            progress: bool = True) -> tuple[list[npt.NDArray[np.float32]], int]:
    """Mean post-RoPE K vector of each layer, flattened (n_head_kv*head_dim), over `chunks` windows of n_ctx tokens."""
    from nsq_local import capture

    sums: list[npt.NDArray[np.float64]] = []
    count = 0
    with capture.Capturer(model, n_ctx, parts="k", n_threads=n_threads) as cap:
        head = cap.session.n_embd_head_k
        if head % QK:
            raise HeadSizeError(f"{Path(model).name} has K head size {head}, not a multiple of NSQ4's {QK}-value "
                                "block: an nsq4 K cache cannot hold it, so there is nothing to calibrate")
        # a long text is cut to what the windows need: real vocabularies average well over 2 bytes per token
        tokens = cap.session.tokenize(text[:16 * n_ctx * chunks])
        windows = [tokens[i:i + n_ctx] for i in range(0, len(tokens), n_ctx)]
        windows = [w for w in windows if len(w) == n_ctx][:chunks] or [tokens[:n_ctx]]
        if len(windows[0]) < 64:
            raise ValueError(f"the calibration text has only {len(tokens)} tokens; give a longer text with -f")
        for i, window in enumerate(windows):
            t0 = time.time()
            for il, k in enumerate(cap.run(window).k):
                flat = k.reshape(k.shape[0], -1).astype(np.float64).sum(axis=0)
                if i == 0:
                    sums.append(flat)
                else:
                    sums[il] += flat
            count += len(window)
            if progress:
                print(f"nsq-calibrate: window {i + 1}/{len(windows)} ({len(window)} tokens, "
                      f"{time.time() - t0:.1f} s)", file=sys.stderr)
    return [(s / count).astype(np.float32) for s in sums], count


def write_gguf(path: Path, means: Sequence[npt.NDArray[np.float32]], meta: dict[str, str]) -> None:
    """A GGUF v3 file with one f32 tensor "nsq.k_mean.<layer>" per layer and string metadata."""
    align = 32

    def gstr(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    kv = {"general.architecture": "nsq-calibration", **meta}
    head = b"GGUF" + struct.pack("<IQQ", 3, len(means), len(kv))
    for key, value in kv.items():
        head += gstr(key) + struct.pack("<I", 8) + gstr(value)  # 8: GGUF_TYPE_STRING
    offsets, offset = [], 0
    for m in means:
        offsets.append(offset)
        offset += -(-m.nbytes // align) * align
    for il, (m, off) in enumerate(zip(means, offsets)):
        head += gstr(f"nsq.k_mean.{il}") + struct.pack("<IQIQ", 1, m.size, 0, off)  # 1 dim, type 0 = f32
    head += b"\0" * (-len(head) % align)
    with open(path, "wb") as f:
        f.write(head)
        for m in means:
            data = np.ascontiguousarray(m, dtype="<f4").tobytes()
            f.write(data + b"\0" * (-len(data) % align))


def calibrate(model: Path, out: Path, text: Optional[str] = None, text_name: str = "python-stdlib-docs",
              n_ctx: int = 2048, chunks: int = 2, n_threads: Optional[int] = None, progress: bool = True) -> Path:
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"model file not found: {model}")
    means, count = k_means(model, text if text is not None else builtin_text(), n_ctx, chunks, n_threads, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    write_gguf(tmp, means, {"nsq.calibration.model": model.name, "nsq.calibration.text": text_name,
                            "nsq.calibration.tokens": str(count)})
    tmp.replace(out)
    return out


def cached(model: Path, progress: bool = True) -> Path:
    """The calibration of `model` from the built-in text, made once and kept in the nsq-local cache folder."""
    model = Path(model).resolve()
    st = model.stat()
    key = hashlib.sha256(f"{model}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("NSQ_CACHE_DIR", Path.home() / ".cache" / "nsq-local")) / "calibration"
    out = cache / f"{model.stem}-{key}.nsq.gguf"
    if not out.is_file():
        if progress:
            print(f"nsq-local: calibrating the NSQ4 cache for {model.name} (once; kept in {cache})", file=sys.stderr)
        calibrate(model, out, chunks=1, progress=progress)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nsq-calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, type=Path, help="GGUF model")
    ap.add_argument("-f", "--file", type=Path, help="calibration text (default: Python's standard-library docs)")
    ap.add_argument("-o", "--output", type=Path, help="output GGUF (default: MODEL with .nsq.gguf)")
    # the means of the low-frequency RoPE channels drift with the position: windows as long as the contexts the
    # cache will hold fit best (SmolLM2, -c 2048 evaluation: KLD 0.0314 from 1024-token windows, see docs/quality.md)
    ap.add_argument("-c", "--ctx-size", type=int, default=2048, help="tokens per window (default 2048)")
    ap.add_argument("--chunks", type=int, default=2, help="windows to average over (default 2)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args(argv)

    if not args.model.is_file():
        ap.error(f"model file not found: {args.model}")
    if args.file is not None and not args.file.is_file():
        ap.error(f"text file not found: {args.file}")
    out = args.output or args.model.with_suffix(".nsq.gguf")
    text = args.file.read_text(encoding="utf-8", errors="replace") if args.file else None
    try:
        calibrate(args.model, out, text, args.file.name if args.file else "python-stdlib-docs", args.ctx_size,
                  args.chunks, args.threads)
    except (ValueError, RuntimeError) as e:
        print(f"nsq-calibrate: error: {e}", file=sys.stderr)
        return 2
    print(f"nsq-calibrate: wrote {out}; use it with LLAMA_NSQ_CALIB={out} or Llama(..., nsq_calib=...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
