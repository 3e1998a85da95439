"""Run a GGUF model through llama.cpp's low-level API and read what its attention really sees.

`capture_qkv(model, tokens)` returns, per layer, Q and the K and V vectors exactly as llama.cpp computes them before
they are stored in the KV cache (post-RoPE K, before upstream's Hadamard rotation of a quantized cache):

    from nsq_local import capture, models
    model = models.smollm2()
    with capture.Model(model) as m:
        tokens = m.tokenize(open("wiki.txt").read())[:512]
    qkv = capture.capture_qkv(model, tokens)
    qkv.k[0].shape            # (512, n_head_kv, head_dim), float32, layer 0

It reads them through llama.cpp's eval callback (`cb_eval`): ggml names the graph's tensors "Qcur-<layer>",
"Kcur-<layer>", "Vcur-<layer>"; a name given twice in a layer (K before and after RoPE) keeps the later tensor, the
one that goes into the cache. `read_cache(decoder)` parses `llama_state_seq_get_data` to get what a cache holds
(raw rows of its ggml type), which is how the tests show that the captured K/V are what the cache stores.

`Model` is a loaded GGUF with its vocabulary (tokenize, metadata, sizes). `Decoder` is the small wrapper over
`llama_batch`/`llama_decode`: a Model and one context with a given cache type (its parameters from `context_params`,
the environment llama.cpp reads as it creates the cache from `cache_env`), decoding token runs at given positions
and returning their logits. It stores an nsq4 or nsq3 K cache uncentered; nsq_local.calibrate.Decoder, which nsq-ppl
uses, centers it. This module builds on _common and ggml_ops only: the calibration runs the model through it.
"""
from __future__ import annotations

import ctypes
import os
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from nsq_local._common import (ROT_DISABLE_ENV, LogTap, centers_k, flash_attn_type, ggml_base,
                               ggml_registry, is_quantized, log_verbosity, scoped_env, type_id)
from nsq_local.ggml_ops import DEVICE_TYPES, ggml_graph_api

_STATE_MAGIC = 0xAF143CD8
_ROT_LINE = re.compile(r"attn_rot_([kv]) = (\d)")


class LlamaError(RuntimeError):
    pass


class _TensorHead(ctypes.Structure):
    # the leading, stable fields of ggml.h's struct ggml_tensor; the rest is read through ggml's functions
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def tensor_to_numpy(t: int) -> npt.NDArray[np.float32]:
    """A computed f32/f16 ggml tensor (pointer) as a float32 array shaped (ne3, ne2, ne1, ne0); views included."""
    import llama_cpp

    lib = ggml_base()
    head = _TensorHead.from_address(t)
    dtypes = {llama_cpp.GGML_TYPE_F32: np.float32, llama_cpp.GGML_TYPE_F16: np.float16}
    if head.type not in dtypes:
        raise LlamaError(f"tensor {lib.ggml_get_name(t).decode()} has ggml type {head.type}; only f32/f16 are read")
    raw = np.empty(lib.ggml_nbytes(t), dtype=np.uint8)
    lib.ggml_backend_tensor_get(t, raw.ctypes.data, 0, raw.size)
    ne, nb = list(head.ne), list(head.nb)
    # ggml_nbytes spans a strided view, so the strides index into `raw` directly
    arr = np.lib.stride_tricks.as_strided(raw.view(dtypes[head.type]), shape=ne[::-1], strides=nb[::-1])
    return arr.astype(np.float32)


EvalCallback = Callable[[int, bool], bool]
NsqCalib = Union[None, bool, str, Path]


def model_params(device: Optional[str] = None):
    """llama.cpp's model parameters. device: the name of a ggml backend device ("CPU", "CUDA0", "MTL0", ... as
    nsq-selftest lists them) that holds every layer and the KV cache ("CPU": nothing offloaded), or None for
    llama.cpp's default (every layer on every GPU). Returns the parameters and the device list they point to, which
    must live until the model is loaded."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    if device is None:
        return params, None
    reg = ggml_registry()
    dev = reg.ggml_backend_dev_by_name(device.encode())
    if not dev:
        names = [ggml_graph_api().ggml_backend_dev_name(reg.ggml_backend_dev_get(i)).decode()
                 for i in range(reg.ggml_backend_dev_count())]
        raise ValueError(f"no ggml device named {device!r}; this build has: {', '.join(names)}")
    if DEVICE_TYPES.get(ggml_graph_api().ggml_backend_dev_type(dev)) == "CPU":
        # an empty list: llama.cpp offloads to no device, and the CPU backend runs everything
        devices = (ctypes.c_void_p * 1)(None)
        params.n_gpu_layers = 0
    else:
        devices = (ctypes.c_void_p * 2)(dev, None)
        params.n_gpu_layers = -1  # every layer
    params.devices = ctypes.addressof(devices)
    return params, devices


class Model:
    """A GGUF model loaded by llama.cpp, with its vocabulary. `ptr` is the llama_model pointer.

    verbose: llama.cpp's log for the model's life (quiet: errors only; a Model made inside llama_cpp.Llama, as its
    default calibration's, hands the verbosity back). `log` reads llama.cpp's log while the model loads, and its
    last lines explain a failure. device: model_params' (None: llama.cpp's default placement).
    """

    def __init__(self, path: Union[str, Path], verbose: bool = False, log: Optional[LogTap] = None,
                 device: Optional[str] = None):
        import llama_cpp

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file {self.path} does not exist")
        self.log = log or LogTap()
        self._stack = ExitStack()
        self._stack.enter_context(log_verbosity(verbose))
        llama_cpp.llama_backend_init()
        params, _devices = model_params(device)  # _devices: the list params points to, alive through the load
        with self.log:
            self.ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            self._stack.close()
            raise LlamaError(f"llama.cpp could not load {self.path}:\n{self.log.tail()}")
        self._stack.callback(llama_cpp.llama_model_free, self.ptr)
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.ptr)
        self.n_head = llama_cpp.llama_model_n_head(self.ptr)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(self.ptr)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self.ptr = None

    def tokenize(self, text: str, add_special: bool = True) -> npt.NDArray[np.int32]:
        import llama_cpp

        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, False)
        if n < 0:  # a vocabulary can give more tokens than bytes (added special tokens); -n is the count needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, False)
        if n < 0:
            raise LlamaError(f"llama_tokenize failed ({n}) on a text of {len(data)} bytes")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def meta(self, key: str) -> Optional[str]:
        """A GGUF metadata value of the model as text, None when the model has no such key."""
        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    @property
    def n_embd_head_k(self) -> int:
        """K head size: the GGUF's <arch>.attention.key_length, which llama.cpp defaults to n_embd/n_head."""
        import llama_cpp

        key_length = self.meta(f"{self.meta('general.architecture')}.attention.key_length")
        return int(key_length) if key_length else llama_cpp.llama_model_n_embd(self.ptr) // self.n_head

    @property
    def add_bos(self) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    @property
    def bos(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_vocab_bos(self.vocab))


def context_params(n_ctx: int, type_k: str = "f16", type_v: str = "f16", flash_attn: Optional[bool] = True,
                   n_threads: Optional[int] = None, n_ubatch: int = 512, eval_callback: Optional[object] = None):
    """llama.cpp's parameters for a context of one sequence of up to n_ctx tokens (decoded at most n_ubatch at a
    time) whose cache stores K and V in the ggml types type_k and type_v; eval_callback is a
    llama_cpp.ggml_backend_sched_eval_callback."""
    import llama_cpp

    tk, tv = type_id(type_k), type_id(type_v)  # a ValueError lists the valid names
    if is_quantized(tv) and flash_attn is False:
        raise ValueError(f"a quantized V cache ({type_v}) requires flash attention: use -fa on (or auto)")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_ctx
    params.n_ubatch = min(n_ubatch, n_ctx)
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
    params.type_k, params.type_v = tk, tv
    params.flash_attn_type = flash_attn_type(flash_attn)
    if eval_callback is not None:
        params.cb_eval = eval_callback
    return params


def cache_env(rotation: bool) -> dict[str, Optional[str]]:
    """The environment llama.cpp reads as it creates a cache: LLAMA_ATTN_ROT_DISABLE=1 without rotation (else what
    the environment says). The calibration of an nsq4 or nsq3 K goes in the context's parameters."""
    return {} if rotation else {ROT_DISABLE_ENV: "1"}


class Decoder:
    """A Model and one llama.cpp context with a given KV cache, driven by llama_decode.

    rotation=False sets LLAMA_ATTN_ROT_DISABLE=1 while the context is created (upstream reads it then);
    `attn_rot` tells what llama.cpp reported: {'k': bool, 'v': bool}. nsq_calib: an nsq4 or nsq3 K cache is stored
    uncentered (False) here, and centered by calibrate.Decoder, which takes what llama_cpp.Llama takes (None for
    the default calibration, a file from nsq-calibrate, False for none); the `nsq_calib` attribute is the file the
    keys are centered by, or None. device: the ggml
    device that holds the model and its cache (model_params; None: llama.cpp's default).
    """

    def __init__(self, model_path: Union[str, Path], n_ctx: int = 512, type_k: str = "f16", type_v: str = "f16",
                 flash_attn: Optional[bool] = True, n_threads: Optional[int] = None, n_ubatch: int = 512,
                 rotation: bool = True, eval_callback: Optional[EvalCallback] = None, verbose: bool = False,
                 nsq_calib: NsqCalib = None, device: Optional[str] = None):
        import llama_cpp

        self.type_k, self.type_v = type_k, type_v
        self.attn_rot: dict[str, bool] = {}
        self._eval = (None if eval_callback is None else
                      llama_cpp.ggml_backend_sched_eval_callback(lambda t, ask, ud: eval_callback(t, ask)))
        params = context_params(n_ctx, type_k, type_v, flash_attn, n_threads, n_ubatch, self._eval)
        self._stack = ExitStack()
        try:
            self.model = self._stack.enter_context(Model(model_path, verbose, LogTap(on_line=self._read_rotation),
                                                         device))
            self.nsq_calib = self._calibration(params.type_k, nsq_calib)
            if self.nsq_calib:
                with self.model.log:
                    params.nsq_calib = llama_cpp.llama_nsq_calib_init(self.model.ptr, os.fsencode(self.nsq_calib))
                if not params.nsq_calib:
                    raise LlamaError(f"llama.cpp could not load the calibration {self.nsq_calib}:\n"
                                     f"{self.model.log.tail()}")
                self._stack.callback(llama_cpp.llama_nsq_calib_free, params.nsq_calib)
            with scoped_env(cache_env(rotation)), self.model.log:
                self.ctx = llama_cpp.llama_init_from_model(self.model.ptr, params)
            if not self.ctx:
                raise LlamaError(f"llama.cpp could not create a context (cache K {type_k}, V {type_v}):\n"
                                 f"{self.model.log.tail()}")
            self._stack.callback(llama_cpp.llama_free, self.ctx)
            self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
            self._batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
            self._stack.callback(llama_cpp.llama_batch_free, self._batch)
        except BaseException:
            self._stack.close()
            raise
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def _read_rotation(self, line: str) -> None:
        m = _ROT_LINE.search(line)  # llama.cpp reports it as it creates the cache
        if m:
            self.attn_rot[m.group(1)] = m.group(2) == "1"

    def _calibration(self, type_k: int, nsq_calib: NsqCalib) -> Optional[Path]:
        """The calibration file the keys are centered by (None: not centered). This class stores an nsq4 or nsq3 K
        cache uncentered only (nsq_calib=False): a calibration is made by running the model through it, so the
        Decoder that centers (calibrate.Decoder) is built on this one, not the reverse."""
        if not centers_k(type_k):
            if nsq_calib:
                raise ValueError(f"an NSQ calibration applies to an nsq4 or nsq3 K cache, not {self.type_k}")
            return None
        if nsq_calib is not False:
            raise ValueError(f"capture.Decoder stores an {self.type_k} K cache uncentered only (nsq_calib=False): "
                             "nsq_local.calibrate.Decoder centers it, as llama_cpp.Llama does")
        return None

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self.ctx = self._batch = None

    def clear(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(self.memory, True)

    def decode(self, tokens: Sequence[int], pos0: int, logits: bool) -> Optional[npt.NDArray[np.float32]]:
        """Decode `tokens` at positions pos0.. (sequence 0), attending to what the cache already holds.

        Returns the logits of every token, shaped (len(tokens), n_vocab), when `logits` is true.
        """
        import llama_cpp

        n = len(tokens)
        if n == 0 or n > self.n_ctx:
            raise ValueError(f"a decode takes 1 to n_ctx={self.n_ctx} tokens, not {n}")
        b = self._batch
        for i, tok in enumerate(tokens):
            b.token[i] = int(tok)
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits
        b.n_tokens = n
        with self.model.log:
            rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaError(f"llama_decode returned {rc} ({n} tokens at position {pos0}):\n{self.model.log.tail()}")
        if not logits:
            return None
        n_vocab = self.model.n_vocab
        out = np.empty((n, n_vocab), dtype=np.float32)
        for i in range(n):
            ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
            out[i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
        return out


@dataclass
class QKV:
    """Per-layer Q, K, V of a token run: q[il] (n_tokens, n_head, head_dim), k[il] and v[il] (n_tokens, n_head_kv,
    head_dim), float32."""

    q: list[npt.NDArray[np.float32]]
    k: list[npt.NDArray[np.float32]]
    v: list[npt.NDArray[np.float32]]
    n_head: int
    n_head_kv: int

    @property
    def n_layer(self) -> int:
        return len(self.k)


@dataclass
class _Collector:
    """Keeps the named tensors of one ubatch; a name seen twice (K before, then after RoPE) keeps the later one."""

    names: dict[str, tuple[str, int]] = field(default_factory=dict)
    ubatch: dict[tuple[str, int], npt.NDArray[np.float32]] = field(default_factory=dict)
    done: list[dict[tuple[str, int], npt.NDArray[np.float32]]] = field(default_factory=list)
    lib: ctypes.CDLL = field(default_factory=ggml_base)

    def __call__(self, t: int, ask: bool) -> bool:
        key = self.names.get(self.lib.ggml_get_name(t).decode())
        if ask:
            return key is not None
        if key is not None:
            self.ubatch[key] = tensor_to_numpy(t)
        return True

    def end_ubatch(self) -> None:
        self.done.append(self.ubatch)
        self.ubatch = {}


class Capturer:
    """A Decoder whose eval callback keeps the named Q/K/V tensors: capture any number of token runs with one
    loaded model (`model`). `parts` picks what is kept, from "qkv" (calibration needs only "k")."""

    _TAGS = {"q": "Qcur", "k": "Kcur", "v": "Vcur"}

    def __init__(self, model_path: Union[str, Path], n_ctx: int, *, parts: str = "qkv", type_k: str = "f32",
                 type_v: str = "f32", rotation: bool = True, flash_attn: bool = True, n_threads: Optional[int] = None,
                 n_ubatch: int = 512, verbose: bool = False, nsq_calib: NsqCalib = None):
        if not parts or set(parts) - set(self._TAGS):
            raise ValueError(f"parts must be letters of 'qkv', got {parts!r}")
        self.parts = parts
        self.n_ubatch = n_ubatch
        self._collector = _Collector()
        self.decoder = Decoder(model_path, n_ctx=n_ctx, type_k=type_k, type_v=type_v, flash_attn=flash_attn,
                               n_threads=n_threads, n_ubatch=n_ubatch, rotation=rotation,
                               eval_callback=self._collector, verbose=verbose, nsq_calib=nsq_calib)
        self.model = self.decoder.model
        for il in range(self.model.n_layer):
            for part in parts:
                self._collector.names[f"{self._TAGS[part]}-{il}"] = (part, il)

    def __enter__(self) -> "Capturer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.decoder.close()

    def run(self, tokens: Sequence[int]) -> QKV:
        """The tensors of `tokens` at positions 0.. in an emptied cache; parts not asked for are empty lists."""
        s, m, c = self.decoder, self.model, self._collector
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("a capture needs at least one token")
        if s.n_ctx < len(tokens):
            raise ValueError(f"{len(tokens)} tokens do not fit a context of n_ctx={s.n_ctx}")
        s.clear()
        c.done = []
        step = min(self.n_ubatch, s.n_ctx)
        for start in range(0, len(tokens), step):
            # one decode of at most n_ubatch tokens is one ubatch, so each name is computed once per decode
            s.decode(tokens[start:start + step], start, logits=False)
            c.end_ubatch()

        out: dict[str, list[npt.NDArray[np.float32]]] = {"q": [], "k": [], "v": []}
        heads_of = {"q": m.n_head, "k": m.n_head_kv, "v": m.n_head_kv}
        for part in self.parts:
            for il in range(m.n_layer):
                pieces = []
                for ub in c.done:
                    if (part, il) not in ub:
                        raise LlamaError(f"the graph has no tensor named {self._TAGS[part]}-{il}: this model's "
                                         "architecture names its attention inputs differently")
                    a = ub[(part, il)]
                    pieces.append(a.reshape(-1, heads_of[part], _head_dim(a, heads_of[part])))
                out[part].append(np.concatenate(pieces, axis=0))
            if out[part][0].shape[0] != len(tokens):
                raise LlamaError(f"captured {out[part][0].shape[0]} token rows for {len(tokens)} tokens")
        c.done = []
        return QKV(out["q"], out["k"], out["v"], m.n_head, m.n_head_kv)


def capture_qkv(model_path: Union[str, Path], tokens: Sequence[int], n_ctx: Optional[int] = None, *,
                type_k: str = "f32", type_v: str = "f32", rotation: bool = True, flash_attn: bool = True,
                n_threads: Optional[int] = None, n_ubatch: int = 512, verbose: bool = False,
                nsq_calib: NsqCalib = None) -> QKV:
    """Q, K and V of every layer for `tokens` (positions 0..), as llama.cpp computes them for its cache.

    K is post-RoPE and V as projected, both before upstream's Hadamard rotation, which happens after them in the
    graph. Arrays are float32: q[il] (n_tokens, n_head, head_dim), k[il] and v[il] (n_tokens, n_head_kv, head_dim).
    The model runs with a cache of type_k/type_v (default f32: the model's own values at every layer; a lossy type
    gives the values that model computes when its earlier layers read that cache). n_ctx defaults to len(tokens);
    the tokens are decoded n_ubatch at a time, as llama_decode would split them. nsq_calib is Decoder's (False for
    an nsq4 or nsq3 cache). For several runs on one model, use a Capturer.
    """
    if len(tokens) == 0:
        raise ValueError("capture_qkv needs at least one token")
    n_ctx = n_ctx or len(tokens)
    if n_ctx < len(tokens):
        raise ValueError(f"{len(tokens)} tokens do not fit a context of n_ctx={n_ctx}")
    with Capturer(model_path, n_ctx, type_k=type_k, type_v=type_v, rotation=rotation, flash_attn=flash_attn,
                  n_threads=n_threads, n_ubatch=n_ubatch, verbose=verbose, nsq_calib=nsq_calib) as cap:
        return cap.run(tokens)


def _head_dim(a: npt.NDArray[np.float32], heads: int) -> int:
    # ggml shapes: (..., n_tokens, n_heads, head_dim) when 3-D, or (n_tokens, n_heads*head_dim) when 2-D
    return a.shape[-1] if a.ndim >= 3 and a.shape[-2] == heads else a.shape[-1] // heads


@dataclass
class CacheLayer:
    k_type: int
    k_rows: npt.NDArray[np.uint8]  # (n_cells, row bytes), raw ggml data of k_type
    v_type: int
    v_rows: Optional[npt.NDArray[np.uint8]]  # (n_cells, row bytes); None for a transposed (non-flash) V cache


def read_cache(decoder: Decoder, seq_id: int = 0) -> list[CacheLayer]:
    """What the KV cache holds for a sequence, per layer, from llama_state_seq_get_data (single-stream caches)."""
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(decoder.ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    got = llama_cpp.llama_state_seq_get_data(decoder.ctx, buf, size, seq_id)
    data = bytes(buf)[:got]
    off = 0

    def take(fmt: str):
        nonlocal off
        vals = struct.unpack_from("<" + fmt, data, off)
        off += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    magic, _seq, n_stream = take("IiI")
    if magic != _STATE_MAGIC or n_stream != 1:
        raise LlamaError(f"unexpected sequence state (magic {magic:#x}, {n_stream} streams)")
    cells = take("I")
    for _ in range(cells):
        _pos, n_seq = take("iI")
        off += 4 * n_seq
    v_trans, n_layer = take("II")
    if n_layer != decoder.model.n_layer:
        raise LlamaError(f"the state has {n_layer} layers, the model {decoder.model.n_layer}: the cell metadata has a "
                         "layout this parser does not know")
    layers: list[CacheLayer] = []
    for _ in range(n_layer):
        k_type, row = take("iQ")
        if centers_k(k_type):
            take("Q")  # which calibration the keys are centered by
        rows = np.frombuffer(data, np.uint8, cells * row, off).reshape(cells, row)
        off += cells * row
        layers.append(CacheLayer(k_type, rows, -1, None))
    for layer in layers:
        if v_trans:
            layer.v_type, el, n_embd = take("iII")
            off += n_embd * cells * el
        else:
            layer.v_type, row = take("iQ")
            layer.v_rows = np.frombuffer(data, np.uint8, cells * row, off).reshape(cells, row)
            off += cells * row
    return layers
