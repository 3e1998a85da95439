"""nsq-chat: offline chat with a GGUF model and an NSQ4 (or NSQ3, or any ggml) KV cache.

    nsq-chat                                  # the bundled demo model (SmolLM2-135M-Instruct), nsq4 cache
    nsq-chat model.gguf --cache-type nsq4     # your model
    nsq-chat -ctk nsq3 -ctv nsq3              # about 3.5 bits a value instead of nsq4's 4.25
    nsq-chat -p "Why is the sky blue?"        # one answer, then exit

In a conversation: /reset starts over, /stats shows the cache and the speed of the last answer, /exit or Ctrl-D
quits, Ctrl-C stops the answer being written. Each turn evaluates only the new tokens: the conversation so far stays
in the KV cache.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from nsq_local import models
from nsq_local._common import CACHE_TYPES, EXIT_USAGE, FLASH_ATTN, nsq_calib_arg
from nsq_local.cquant import bits_per_value

@dataclass
class KVCacheSize:
    """The memory a context's KV cache really takes, from llama.cpp's API (every layer in its own type)."""

    type_k: str = "f16"
    type_v: str = "f16"
    k_mib: float = 0.0
    v_mib: float = 0.0
    f16_mib: float = 0.0  # the same cache with f16 K and V: the same number of values at 16 bits each

    @property
    def mib(self) -> float:
        return self.k_mib + self.v_mib

    @classmethod
    def of(cls, llm) -> "KVCacheSize":
        """The KV cache of a llama_cpp.Llama: per layer, the type and bytes of its K and V (a layer stored wider
        than the cache's type, per-layer precision, counts at its own bits in f16_mib)."""
        import llama_cpp

        names = {v: k for k, v in llama_cpp.llama.GGML_TYPE_NAMES.items()}
        size = cls(names[llm.context_params.type_k], names[llm.context_params.type_v])
        for il in range(llama_cpp.llama_model_n_layer(llm.model)):
            for side, type_of, size_of in (("k", llama_cpp.llama_kv_layer_type_k, llama_cpp.llama_kv_layer_size_k),
                                           ("v", llama_cpp.llama_kv_layer_type_v, llama_cpp.llama_kv_layer_size_v)):
                t = type_of(llm.ctx, il)
                if t == llama_cpp.GGML_TYPE_COUNT:  # no KV cache in this layer
                    continue
                mib = size_of(llm.ctx, il) / 2**20
                setattr(size, f"{side}_mib", getattr(size, f"{side}_mib") + mib)
                size.f16_mib += mib * 16 / bits_per_value(names[t])
        return size


def open_llama(verbose: bool = False, **kwargs: Any):
    """llama_cpp.Llama(**kwargs), and the size of its KV cache."""
    import llama_cpp

    llm = llama_cpp.Llama(verbose=verbose, **kwargs)
    size = KVCacheSize.of(llm)
    if not size.mib:
        raise RuntimeError("llama.cpp reports no KV cache; is this the patched llama_cpp?")
    return llm, size


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # evaluated this turn, i.e. not already in the cache
    generated: int = 0
    prompt_s: float = 0.0
    generate_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.generate_s if self.generate_s > 0 else 0.0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nsq-chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF model file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("-m", "--model", dest="model_opt", metavar="FILE", help="GGUF model file, as llama.cpp spells it")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (default: 4096)")
    ap.add_argument("--cache-type", metavar="TYPE", help="cache type of both K and V (default: nsq4)")
    ap.add_argument("-ctk", "--cache-type-k", metavar="TYPE", help="cache type of K (overrides --cache-type)")
    ap.add_argument("-ctv", "--cache-type-v", metavar="TYPE", help="cache type of V (overrides --cache-type)")
    ap.add_argument("-fa", "--flash-attn", choices=list(FLASH_ATTN), default="auto",
                    help="flash attention (default: auto = on when the V cache is quantized, which requires it)")
    ap.add_argument("--nsq-calib", metavar="FILE|none",
                    help="K-mean calibration of an nsq4 or nsq3 K cache (from nsq-calibrate); default: made once per "
                         "model from Python's documentation and kept in ~/.cache/nsq-local; none: no centering")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    ap.add_argument("-n", "--n-predict", type=int, default=512, help="most tokens per answer (default: 512)")
    ap.add_argument("--temp", type=float, default=0.7, help="sampling temperature, 0 = greedy (default: 0.7)")
    ap.add_argument("--seed", type=int, default=-1, help="RNG seed (default: random)")
    ap.add_argument("-sys", "--system-prompt", default=None, help="system message")
    ap.add_argument("-p", "--prompt", default=None, help="answer this one prompt, print the answer and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return ap


def fail(msg: str) -> int:
    print(f"nsq-chat: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def resolve_model(arg: Optional[str]) -> Path:
    if arg is None:
        model = models.smollm2()  # raises ModelNotInstalled with the install command
        print(f"nsq-chat: no model given, using the bundled demo model {model.name}", file=sys.stderr)
        return model
    model = Path(arg)
    if not model.is_file():
        raise FileNotFoundError(f"model file {model} does not exist")
    try:
        with open(model, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise FileNotFoundError(f"cannot read model file {model}: {e.strerror}") from None
    if magic != b"GGUF":
        raise FileNotFoundError(f"{model} is not a GGUF model file")
    return model


class Chat:
    def __init__(self, llm, kv: KVCacheSize, args: argparse.Namespace):
        self.llm = llm
        self.kv = kv
        self.args = args
        self.system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        self.history = list(self.system)
        self.last = TurnStats()

    def banner(self, model: Path) -> str:
        saving = 100 * (1 - self.kv.mib / self.kv.f16_mib)
        return (f"nsq-chat: {model.name}, context {self.llm.n_ctx()}, cache K {self.kv.type_k} / V {self.kv.type_v}, "
                f"KV cache {self.kv.mib:.1f} MiB ({saving:.0f}% less than f16's {self.kv.f16_mib:.1f} MiB)"
                + (f", K centered ({Path(self.llm.nsq_calib).name})" if self.llm.nsq_calib else ""))

    def answer(self, text: str) -> bool:
        """Stream an answer to `text`; False when the context is full. Ctrl-C ends the answer, not the program."""
        import llama_cpp

        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        start = time.perf_counter()
        # A flag, not KeyboardInterrupt: Python prints and drops an exception raised while it runs a finalizer or
        # a ctypes callback, and twice in CI a Ctrl-C left the answer running to its end.
        interrupted = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
        stream = None
        try:
            # the whole history goes in; llama_cpp keeps the cached prefix and evaluates only the new tokens
            stream = self.llm.create_chat_completion(messages=self.history, max_tokens=self.args.n_predict,
                                                     temperature=self.args.temp, stream=True)
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    parts.append(piece)
                    print(piece, end="", flush=True)
                if chunk["choices"][0].get("finish_reason") == "length" and self.context_left() <= 0:
                    print("\n[the context is full: /reset to start a new conversation]", end="")
                if interrupted.is_set():
                    print(" [stopped]", end="")
                    break
        except ValueError as e:
            if "exceed context window" not in str(e):
                raise
            self.history.pop()
            print(f"[the context is full ({self.llm.n_tokens} of {self.llm.n_ctx()} tokens): "
                  "/reset to start a new conversation]")
            return False
        finally:
            if stream is not None:
                stream.close()
            signal.signal(signal.SIGINT, previous)
        print(flush=True)
        perf = llama_cpp.llama_perf_context(self.llm.ctx)
        self.last = TurnStats(perf.n_p_eval, perf.n_eval, perf.t_p_eval_ms / 1e3, perf.t_eval_ms / 1e3)
        if self.args.verbose:
            print(f"[{time.perf_counter() - start:.1f} s]", file=sys.stderr)
        self.history.append({"role": "assistant", "content": "".join(parts)})
        return True

    def context_left(self) -> int:
        return self.llm.n_ctx() - self.llm.n_tokens

    def stats(self) -> str:
        s = self.last
        return (f"tokens in context: {self.llm.n_tokens} of {self.llm.n_ctx()}\n"
                f"KV cache: {self.kv.mib:.1f} MiB (K {self.kv.type_k} {self.kv.k_mib:.1f} MiB, "
                f"V {self.kv.type_v} {self.kv.v_mib:.1f} MiB; f16 would take {self.kv.f16_mib:.1f} MiB)\n"
                f"last answer: {s.generated} tokens at {s.tokens_per_s:.1f} tokens/s; "
                f"prompt: {s.prompt_tokens} new tokens evaluated in {s.prompt_s:.2f} s")

    def reset(self) -> None:
        self.history = list(self.system)
        self.llm.reset()
        self.last = TurnStats()

    def loop(self) -> int:
        print("nsq-chat: type a message; /reset, /stats, /exit (or Ctrl-D); Ctrl-C stops an answer",
              file=sys.stderr)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if line == "/exit":
                return 0
            if line == "/reset":
                self.reset()
                print("[conversation reset]")
            elif line == "/stats":
                print(self.stats())
            elif line.startswith("/"):
                print("[commands: /reset, /stats, /exit]")
            elif line:
                self.answer(line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    type_k = (args.cache_type_k or args.cache_type or "nsq4").lower()
    type_v = (args.cache_type_v or args.cache_type or "nsq4").lower()
    for flag, value in (("cache-type-k", type_k), ("cache-type-v", type_v)):
        if value not in CACHE_TYPES:
            return fail(f"unknown --{flag} '{value}'; use one of: {', '.join(CACHE_TYPES)}")
    try:
        model = resolve_model(args.model_opt or args.model)
    except FileNotFoundError as e:  # ModelNotInstalled included
        return fail(str(e))

    # Llama centers an nsq4 or nsq3 K cache by default (the calibration cached per model file); "none" turns it off
    calib = nsq_calib_arg(args.nsq_calib)
    try:
        llm, kv = open_llama(
            verbose=args.verbose, model_path=str(model), n_ctx=args.ctx_size, type_k=type_k, type_v=type_v,
            flash_attn=FLASH_ATTN[args.flash_attn], n_threads=args.threads,
            seed=args.seed if args.seed >= 0 else 0xFFFFFFFF, nsq_calib=calib,
        )
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    chat = Chat(llm, kv, args)
    print(chat.banner(model), file=sys.stderr)

    if args.prompt is not None:
        return 0 if chat.answer(args.prompt) else 1
    return chat.loop()


if __name__ == "__main__":
    sys.exit(main())
