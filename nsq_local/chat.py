"""nsq-chat: offline chat with a GGUF model and an NSQ4 (or any ggml) KV cache.

    nsq-chat                                  # the bundled demo model (SmolLM2-135M-Instruct), nsq4 cache
    nsq-chat model.gguf --cache-type nsq4     # your model
    nsq-chat -p "Why is the sky blue?"        # one answer, then exit
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from nsq_local import models


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nsq-chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF model file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("-m", "--model", dest="model_opt", metavar="FILE", help="GGUF model file, as llama.cpp spells it")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (default: 4096)")
    ap.add_argument("--cache-type", metavar="TYPE", help="cache type of both K and V (default: nsq4)")
    ap.add_argument("-ctk", "--cache-type-k", metavar="TYPE", help="cache type of K (overrides --cache-type)")
    ap.add_argument("-ctv", "--cache-type-v", metavar="TYPE", help="cache type of V (overrides --cache-type)")
    ap.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto",
                    help="flash attention (default: auto = on when the V cache is quantized, which requires it)")
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
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    model_arg = args.model_opt or args.model
    if model_arg is None:
        try:
            model = models.smollm2()
        except models.ModelNotInstalled as e:
            return fail(f"no model given and {e}")
        print(f"nsq-chat: no model given, using the bundled demo model {model.name}", file=sys.stderr)
    else:
        model = Path(model_arg)
        if not model.is_file():
            return fail(f"model file {model} does not exist")
    type_k = args.cache_type_k or args.cache_type or "nsq4"
    type_v = args.cache_type_v or args.cache_type or "nsq4"

    import llama_cpp

    try:
        llm = llama_cpp.Llama(
            model_path=str(model), n_ctx=args.ctx_size, type_k=type_k, type_v=type_v,
            flash_attn={"on": True, "off": False, "auto": None}[args.flash_attn],
            n_threads=args.threads, seed=args.seed if args.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
            verbose=args.verbose,
        )
    except ValueError as e:
        return fail(str(e))
    print(f"nsq-chat: {model.name}, context {llm.n_ctx()}, cache K {type_k} / V {type_v}", file=sys.stderr)

    history: list[dict] = []
    if args.system_prompt:
        history.append({"role": "system", "content": args.system_prompt})

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        parts = []
        start = time.perf_counter()
        # the whole history goes in each turn; llama_cpp keeps the cached prefix and evaluates only the new tokens
        for chunk in llm.create_chat_completion(messages=history, max_tokens=args.n_predict,
                                                temperature=args.temp, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                parts.append(piece)
                print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(parts)})
        if args.verbose:
            print(f"[{time.perf_counter() - start:.1f} s]", file=sys.stderr)

    if args.prompt is not None:
        answer(args.prompt)
        return 0

    print("nsq-chat: type a message; /exit or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if line:
            answer(line)


if __name__ == "__main__":
    sys.exit(main())
