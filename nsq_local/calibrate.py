"""nsq-calibrate: the per-layer mean K vectors that let an NSQ4 or NSQ3 cache store centered keys.

Every key stored in an NSQ4 or NSQ3 cache is first reduced by its layer's mean K vector (post-RoPE, per KV head and
channel). One fixed vector taken off every key moves all of a query's attention logits by the same amount, which
softmax cancels, so the model's output is unchanged; what changes is the quantizer's input: on SmolLM2 the mean is
half of K's energy, and without it NSQ4's K error halves. The means must be known before the first key is stored
(they are never re-estimated, so the cache stays consistent through state save/load and context shifts), so they
come from a calibration run: this command runs the model with an f32 cache over a text, averages the K vectors
llama.cpp computes for its cache, and writes them to a small GGUF file that llama.cpp's tools take as
`--nsq-calib FILE` (and `llama_cpp.Llama(..., nsq_calib=FILE)`; C programs: llama_nsq_calib_init, then
llama_context_params.nsq_calib).

    nsq-calibrate -m model.gguf -f text.txt -o model.nsq.gguf
    llama-perplexity -m model.gguf -ctk nsq4 -ctv nsq4 -fa on --nsq-calib model.nsq.gguf ...

With --embed it writes a copy of the model that carries its calibration in its metadata, one file to share: the
llama.cpp tools and Llama() center its nsq4/nsq3 cache by it with no flag (an explicit --nsq-calib still wins,
`--nsq-calib none` turns it off).

    nsq-calibrate -m model.gguf --embed -o model-nsq.gguf
    llama-server -m model-nsq.gguf -ctk nsq4 -ctv nsq4

Without -f the text is the documentation of Python's standard library, which every Python has; text like what the
model will see does better (docs/quality.md: on SmolLM2 and WikiText, held-out WikiText calibrates better than the
docs, and both far better than none). Windows as long as the contexts you use fit best (-c, default 2048).

`llama_cpp.Llama(..., type_k="nsq4")` and nsq-chat need none of this: by default they calibrate once per model file
(on the built-in text) and keep the file in $NSQ_CACHE_DIR/calibration (default ~/.cache/nsq-local). A calibration
records the sha256 of the model file it was made from, and is refused for any other file.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from nsq_local import cache_sim, capture
from nsq_local._common import centers_k
from nsq_local.cquant import bits_per_value
from nsq_local.models import cache_dir, file_sha256
from nsq_local.reference import QK

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
    """The model's K head size is not a multiple of the NSQ types' block: no nsq4 or nsq3 K cache to calibrate for."""


def k_means(model: Path, text: str, n_ctx: int = 2048, chunks: int = 2, n_threads: Optional[int] = None,
            progress: bool = True) -> tuple[list[npt.NDArray[np.float32]], int]:
    """Mean post-RoPE K vector of each layer, flattened (n_head_kv*head_dim), over `chunks` windows of n_ctx tokens."""
    sums: list[npt.NDArray[np.float64]] = []
    count = 0
    with capture.Capturer(model, n_ctx, parts="k", n_threads=n_threads) as cap:
        head = cap.model.n_embd_head_k
        if head % QK:
            raise HeadSizeError(f"{Path(model).name} has K head size {head}, not a multiple of the NSQ types' "
                                f"{QK}-value block: an nsq4 or nsq3 K cache cannot hold it, so there is nothing to "
                                "calibrate")
        # a long text is cut to what the windows need: real vocabularies average well over 2 bytes per token
        tokens = cap.model.tokenize(text[:16 * n_ctx * chunks])
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


# The calibration file's format, recorded in it as "nsq.calibration.version" (llama.cpp reads this version only:
# LLAMA_NSQ_CALIB_VERSION, the llama-nsq-calibration patch). 5: per-layer types under one prefix per cache type,
# "nsq.nsq4.k_type.<layer>" / "nsq.nsq3.k_type.<layer>"; files before it had no version.
FORMAT_VERSION = 5


def write_gguf(path: Path, means: Sequence[npt.NDArray[np.float32]], meta: dict[str, str]) -> None:
    """A calibration file of this format: one f32 tensor "nsq.k_mean.<layer>" per layer, the format version and
    string metadata."""
    import gguf

    w = gguf.GGUFWriter(str(path), "nsq-calibration")
    w.add_uint32("nsq.calibration.version", FORMAT_VERSION)
    for key, value in meta.items():
        w.add_string(key, value)
    for il, m in enumerate(means):
        w.add_tensor(f"nsq.k_mean.{il}", np.ascontiguousarray(m, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf(path: Path) -> tuple[dict[str, str], dict[str, npt.NDArray[np.float32]]]:
    """A calibration's string metadata and its means by name ("nsq.k_mean.<layer>"), from a calibration file or from
    a model file that carries one (`embed`); a calibration of another format is refused, as llama.cpp refuses it."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read the NSQ calibration file {path} ({e}): make it with `nsq-calibrate -m MODEL`")
    means = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors if t.name.startswith("nsq.k_mean.")}
    means.update({name: np.array(field.contents(), dtype=np.float32) for name, field in reader.fields.items()
                  if name.startswith("nsq.k_mean.")})
    if not means:
        raise ValueError(f"{path} holds no NSQ calibration: make one with `nsq-calibrate -m MODEL`, or a model file "
                         "that carries its own with `nsq-calibrate -m MODEL --embed`")
    field = reader.fields.get("nsq.calibration.version")
    version = field.contents() if field is not None else None
    if version != FORMAT_VERSION:
        found = f"of format version {version}" if version is not None else "of an older format (no version)"
        raise ValueError(f"the NSQ calibration file {path} is {found}, this build reads version {FORMAT_VERSION}: "
                         "make it again with `nsq-calibrate -m MODEL`")
    meta = {name: field.contents() for name, field in reader.fields.items()
            if name.startswith("nsq.") and isinstance(field.contents(), str)}
    return meta, means


def embed(model: Path, calib: Path, out: Path) -> Path:
    """A copy of `model` that carries the calibration `calib` in its metadata: the calibration file's keys, with the
    means as f32 arrays "nsq.k_mean.<layer>" (a model file's tensors must be the model's). llama.cpp's tools and
    llama_cpp.Llama center an nsq4 or nsq3 K cache of it by that calibration with no flag and no cache file; a
    calibration the model already carried is replaced. Written to a temporary file first, `out` appears whole."""
    import gguf

    meta, means = read_gguf(calib)
    reader = gguf.GGUFReader(str(model))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
    try:
        alignment = reader.fields.get("general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        for name, field in reader.fields.items():
            # GGUF.*: the header, which the writer makes; the architecture: the writer's first key
            if name.startswith(("GGUF.", "nsq.")) or name == "general.architecture":
                continue
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if array else None)
        writer.add_uint32("nsq.calibration.version", FORMAT_VERSION)
        for key, value in meta.items():
            writer.add_string(key, value)
        for name in sorted(means, key=lambda n: int(n.rsplit(".", 1)[1])):
            writer.add_key_value(name, [float(v) for v in means[name]], gguf.GGUFValueType.ARRAY,
                                 gguf.GGUFValueType.FLOAT32)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data)
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def carries_calibration(model_ptr: object) -> bool:
    """Whether a loaded model's file carries its calibration (`embed`)."""
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(16)
    return llama_cpp.llama_model_meta_val_str(model_ptr, b"nsq.calibration.version", buf, len(buf)) >= 0


def model_id(model: Path) -> str:
    """The sha256 of the model file, remembered per path, size and modification time so that a file is read once."""
    model = Path(model).resolve()
    st = model.stat()
    memo = cache_dir() / "model-ids" / hashlib.sha256(
        f"{model}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()[:32]
    if memo.is_file():
        return memo.read_text().strip()
    digest = file_sha256(model)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(memo.name + f".tmp{os.getpid()}")
    tmp.write_text(digest + "\n")
    tmp.replace(memo)
    return digest


# Per-layer precision (the llama-nsq-calibration patch): the few layers whose nsq4 keys harm attention far more than
# the model's other layers' are stored in a wider type, named in the calibration file as "nsq.nsq4.k_type.<layer>".
LAYER_BITS_BUDGET = 4.5  # the average bits per K+V value that wider layers may bring an nsq4 cache to (q4_0's)
LAYER_OUTLIER = 10.0  # a layer is an outlier when its attention KL is this many times the median layer's
LAYER_TYPES = ("q8_0", "f16")  # by cost: an outlier gets the cheapest that brings it to the median layer's KL
# An nsq3 cache (its layers named "nsq.nsq3.k_type.<layer>", the llama-nsq-calibration patch) spends more on its
# keys, which carry most of its error: after its outliers, the layers whose keys gain most from nsq4 get nsq4 keys
# while the cache stays within 3.5 bits/value. With the NSQ3 prototype (docs/design.md), K in nsq4 in a quarter of the
# layers took SmolLM2's KLD to 0.73x flat nsq3's, in half of them to 0.51x (Gemma 3 270M: 0.54x, 0.40x).
NSQ3_BITS_BUDGET = 3.5
NSQ3_LAYER_TYPES = ("nsq4", "q8_0", "f16")


def layer_types(model: Path, text: str, means: Sequence[npt.NDArray[np.float32]], n_ctx: int = 2048,
                n_threads: Optional[int] = None, progress: bool = True) -> dict[str, str]:
    """The K types of an nsq4 and of an nsq3 cache's layers stored otherwise, as calibration metadata:
    {"nsq.nsq4.k_type.<layer>": "f16", "nsq.nsq3.k_type.<layer>": "nsq4", ...}.

    On the first window of the calibration text, the model's own Q and K give, per layer, the mean KL divergence
    between the causal attention distributions (every 8th query, all query heads) of the exact keys and of the keys
    as the cache stores them (centered by `means`, rotated as upstream rotates them): how far its quantized keys move
    that layer's attention. On most models the layers are within a few times of each other. A layer whose keys are
    almost all one large bias added before RoPE (Qwen2.5-0.5B's first: 96% of K's energy, partly in RoPE pairs that
    turn within the window, so no fixed mean takes it off) is a hundred times the median: each layer above
    LAYER_OUTLIER times the median, worst first, gets the cheapest wider type whose keys bring its KL to the median or
    below (else the most precise), as long as the cache's average bits per K+V value stay within the budget (V in the
    cache's type). Only nsq4 and nsq3 keys are centered (as llama.cpp does).
    """
    with capture.Capturer(model, n_ctx, n_threads=n_threads) as cap:
        qkv = cap.run(cap.model.tokenize(text[:16 * n_ctx])[:n_ctx])
    rot = cache_sim.rot_block_k(qkv.k[0].shape[-1])

    def attention_kl(il: int, k_hat: npt.NDArray[np.float32]) -> float:
        q, k = qkv.q[il], qkv.k[il]
        group = q.shape[1] // k.shape[1]
        queries = np.arange(0, len(q), 8)
        future = np.arange(len(k))[None, :] > queries[:, None]
        total = 0.0
        for h in range(q.shape[1]):
            qh = q[queries, h].astype(np.float64) / np.sqrt(q.shape[2])
            s, s_hat = qh @ k[:, h // group].T.astype(np.float64), qh @ k_hat[:, h // group].T.astype(np.float64)
            s[future] = s_hat[future] = -1e30
            ls = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
            lh = s_hat - np.logaddexp.reduce(s_hat, axis=1, keepdims=True)
            total += float(np.mean(np.sum(np.exp(ls) * (ls - lh), axis=1)))
        return total / q.shape[1]

    @functools.lru_cache(maxsize=None)
    def kl(il: int, t: str) -> float:
        """How far layer il's attention moves with its keys as a cache of type t holds them (nsq types centered)."""
        k = qkv.k[il]
        if t not in ("nsq4", "nsq3"):
            return attention_kl(il, cache_sim.roundtrip(t, k, rot))
        m = np.asarray(means[il], dtype=np.float32).reshape(k.shape[1:])
        return attention_kl(il, cache_sim.roundtrip(t, k - m, rot) + m)

    sizes = ([k[0].size for k in qkv.k], [v[0].size for v in qkv.v])
    chosen = _layer_types(kl, sizes, "nsq4", LAYER_TYPES, LAYER_BITS_BUDGET, progress)
    chosen.update(_layer_types(kl, sizes, "nsq3", NSQ3_LAYER_TYPES, NSQ3_BITS_BUDGET, progress))
    return chosen


def _layer_types(kl: Callable[[int, str], float], sizes: tuple[list[int], list[int]], base: str,
                 wider: Sequence[str], budget_bits: float, progress: bool) -> dict[str, str]:
    """layer_types for a cache of type `base`, given each layer's attention KL per K type and the K and V values per
    token of each layer. For nsq3, once the outliers have theirs, the other layers get nsq4 keys in the order of the
    attention KL they gain per added bit, while the budget lasts."""
    t0 = time.time()
    prefix = f"nsq.{base}."
    n_k, n_v = sizes
    n_layer = len(n_k)
    scores = [kl(il, base) for il in range(n_layer)]
    median = float(np.median(scores))
    bits = {t: bits_per_value(t) for t in (base, *wider)}
    k_bits = [bits[base]] * n_layer

    def average(il: int, t: str) -> float:
        with_t = k_bits[:il] + [bits[t]] + k_bits[il + 1:]
        return float((np.dot(with_t, n_k) + bits[base] * sum(n_v)) / (sum(n_k) + sum(n_v)))

    chosen: dict[str, str] = {}
    for il in sorted(range(n_layer), key=lambda i: -scores[i]):
        if scores[il] <= LAYER_OUTLIER * median:
            break
        fits = [t for t in wider if average(il, t) <= budget_bits]
        t = next((t for t in fits if kl(il, t) <= median), fits[-1] if fits else None)
        if t is not None:
            k_bits[il], chosen[f"{prefix}k_type.{il}"] = bits[t], t
        if progress:
            print(f"nsq-calibrate: {base} cache, layer {il}: attention KL of its {base} keys {scores[il]:.3g}, "
                  f"{scores[il] / median:.0f}x the median layer's: "
                  + (f"K in {t}, the cache at {average(il, t):.3f} bits/value" if t is not None else
                     f"no wider K fits the budget of {budget_bits} bits/value"), file=sys.stderr)
    n_outliers = len(chosen)
    if base == "nsq3":
        rest = [il for il in range(n_layer) if f"{prefix}k_type.{il}" not in chosen]
        gain = {il: (scores[il] - kl(il, "nsq4")) / n_k[il] for il in rest}
        for il in sorted(rest, key=lambda i: -gain[i]):
            if gain[il] <= 0 or average(il, "nsq4") > budget_bits:
                break
            k_bits[il], chosen[f"{prefix}k_type.{il}"] = bits["nsq4"], "nsq4"
    if progress:
        total = float((np.dot(k_bits, n_k) + bits[base] * sum(n_v)) / (sum(n_k) + sum(n_v)))
        more = f", {len(chosen) - n_outliers} more in nsq4" if base == "nsq3" else ""
        print(f"nsq-calibrate: per-layer precision of an {base} cache: {n_outliers} of {n_layer} layers' K wider "
              f"(the worst layer's attention KL is {max(scores) / median:.1f}x the median's, outliers above "
              f"{LAYER_OUTLIER:g}x){more}; {total:.3f} bits/value ({time.time() - t0:.1f} s)", file=sys.stderr)
    return chosen


def calibrate(model: Path, out: Path, text: Optional[str] = None, text_name: str = "python-stdlib-docs",
              n_ctx: int = 2048, chunks: int = 2, n_threads: Optional[int] = None, progress: bool = True) -> Path:
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"model file not found: {model}")
    text = text if text is not None else builtin_text()
    means, count = k_means(model, text, n_ctx, chunks, n_threads, progress)
    types = layer_types(model, text, means, n_ctx, n_threads, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    write_gguf(tmp, means, {"nsq.calibration.model": model.name, "nsq.calibration.model_sha256": model_id(model),
                            "nsq.calibration.text": text_name, "nsq.calibration.tokens": str(count), **types})
    tmp.replace(out)
    return out


def cached(model: Path, progress: bool = True) -> Path:
    """The calibration of `model` from the built-in text, made once per model file and kept in the cache folder."""
    model = Path(model).resolve()
    cache = cache_dir() / "calibration"
    # the format version in the name too: a file cached by an older nsq-local is made again, not refused
    out = cache / f"{model.stem}-{model_id(model)[:16]}.v{FORMAT_VERSION}.nsq.gguf"
    if not out.is_file():
        if progress:
            print(f"nsq-local: calibrating the NSQ K cache for {model.name} (once per model file)", file=sys.stderr)
        calibrate(model, out, progress=progress)  # what `nsq-calibrate -m MODEL` makes
        if progress:
            print(f"nsq-local: K means kept in {out}", file=sys.stderr)
    return out


def check_fits(calib: Path, model: Path) -> None:
    """Refuse a calibration that records another model file than `model` (llama.cpp checks the shapes); the one a
    model file carries belongs to it."""
    meta, _ = read_gguf(calib)
    if Path(calib).resolve() == Path(model).resolve():
        return
    made_for = meta.get("nsq.calibration.model_sha256")
    if made_for is not None and made_for != model_id(model):
        raise ValueError(f"the NSQ calibration file {calib} was made for another model file "
                         f"({meta.get('nsq.calibration.model', '?')}, sha256 {made_for[:16]}...), not for {model}: "
                         f"make one for this model with `nsq-calibrate -m {model}`, or leave nsq_calib out to use "
                         "the cached default")


def resolve(model: Union[str, Path], model_ptr: object, nsq_calib: Union[None, bool, str, os.PathLike],
            type_k: str = "nsq4") -> Optional[Path]:
    """The calibration a K cache of type `type_k` (nsq4 or nsq3) of `model` (loaded as `model_ptr`) is centered by,
    or None for none. llama_cpp.Llama calls it as its NSQ calibration resolver (the entry point
    "llama_cpp.nsq_calib_resolver" in pyproject.toml).

    nsq_calib: False, none; a path, that file; None (or True), the default: the calibration the model file carries
    (`embed`), else the cached one, made on first use; skipped with a warning on a model where centering is not exact
    (llama.cpp refuses a file given for one).
    """
    if nsq_calib is False:
        return None
    if nsq_calib is None or nsq_calib is True:
        return _default(Path(model), model_ptr, type_k)
    path = Path(nsq_calib)
    if not path.is_file():
        raise FileNotFoundError(f"NSQ calibration file not found: {path} (make one with `nsq-calibrate -m MODEL`)")
    check_fits(path, Path(model))
    return path


def _default(model: Path, model_ptr: object, type_k: str) -> Optional[Path]:
    import llama_cpp

    why = llama_cpp.llama_model_nsq_centering_inexact(model_ptr)
    if why:
        print(f"nsq-local: warning: the {type_k} K cache of {model.name} is not centered: {why.decode()}",
              file=sys.stderr)
        return None
    if carries_calibration(model_ptr):
        return model
    try:
        return cached(model)
    except HeadSizeError:
        return None  # creating the context reports it, with the cache types that fit
    except (RuntimeError, ValueError) as e:  # capture.LlamaError included
        print(f"nsq-local: warning: calibrating {model.name} failed, so its {type_k} K cache is not centered: {e}",
              file=sys.stderr)
        return None


class Decoder(capture.Decoder):
    """capture.Decoder with an nsq4 or nsq3 K cache centered as llama_cpp.Llama centers it (resolve): nsq_calib None
    (the default) for the default calibration, made on first use, a file from nsq-calibrate, or False for none."""

    def _calibration(self, type_k: int, nsq_calib: capture.NsqCalib) -> Optional[Path]:
        if centers_k(type_k):
            return resolve(self.model.path, self.model.ptr, nsq_calib, self.type_k)
        return super()._calibration(type_k, nsq_calib)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nsq-calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, type=Path, help="GGUF model")
    ap.add_argument("-f", "--file", type=Path, help="calibration text (default: Python's standard-library docs)")
    ap.add_argument("-o", "--output", type=Path,
                    help="output GGUF (default: MODEL with .nsq.gguf; with --embed, MODEL-nsq.gguf)")
    ap.add_argument("--embed", action="store_true",
                    help="write a copy of the model that carries the calibration in its metadata: llama-server, "
                         "llama-cli, llama-perplexity and Llama() center its nsq4/nsq3 cache with no flag")
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
    if args.embed:
        out = args.output or args.model.with_name(args.model.stem + "-nsq.gguf")
        if out.resolve() == args.model.resolve():
            ap.error(f"-o {out} is the model itself: --embed writes a copy, give it another name")
    else:
        out = args.output or args.model.with_suffix(".nsq.gguf")
    text = args.file.read_text(encoding="utf-8", errors="replace") if args.file else None
    calib = out.with_name(out.name + f".calib{os.getpid()}") if args.embed else out
    try:
        calibrate(args.model, calib, text, args.file.name if args.file else "python-stdlib-docs", args.ctx_size,
                  args.chunks, args.threads)
        if args.embed:
            embed(args.model, calib, out)
    except (ValueError, RuntimeError) as e:
        print(f"nsq-calibrate: error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.embed:
            calib.unlink(missing_ok=True)
    if args.embed:
        print(f"nsq-calibrate: wrote {out}, the model with its calibration: llama.cpp's tools and Llama() center its "
              "nsq4/nsq3 K cache by it with no flag")
    else:
        print(f"nsq-calibrate: wrote {out}; use it with --nsq-calib {out} or Llama(..., nsq_calib=...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
