"""Serving load bench: how many conversations a fixed KV memory budget holds with each cache type, and what
llama-server delivers to N concurrent streaming clients of the official `openai` client.

    python3 bench/serve_bench.py --bin build/tools/bin [-m M.gguf] [--budget-mib 1024] [-N 1,4,8,16] [--json out.json]

For each cache type a llama-server is started with flash attention, `-np` the largest N, and `-c` the number of
cells the budget holds (llama.cpp's own KV size, read from its log, is checked against the budget), so the budget is
what limits each slot's context. Capacity: how many `--conv-tokens` conversations fit in the budget. Then rounds of
N clients, each streaming a completion of `-n` tokens after its own `-p`-token prompt (distinct text per client and
round, so no prompt is served from another's cache): time to first token per client, and the aggregate decode rate,
all clients' tokens after their first over the time from the first client's first token to the last client's last.
nsq4 runs centered by nsq-local's cached calibration of the model (`--nsq-calib` picks a file).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "wikitext-2-test-head.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


class ServerError(RuntimeError):
    pass


class Server:
    """A server process on localhost (tests/test_server.py runs its servers with it too): started, waited for until
    `ready` answers 200 (None: until its port takes a TCP connection, as ggml-rpc-server's), stopped by its pid.
    ServerError when it exits or does not answer in time."""

    def __init__(self, cmd: list, log: Path, port: int, ready: str | None = "/health", env: dict | None = None,
                 timeout: float = 300) -> None:
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while not self._answers(ready):
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"{cmd[0]} exited {self.proc.returncode} at start-up:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{cmd[0]} did not answer {ready or 'on its port'} within {timeout} s:\n"
                                  f"{self.output()[-3000:]}")
            time.sleep(0.25)

    def _answers(self, ready: str | None) -> bool:
        try:
            if ready is None:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            with urllib.request.urlopen(self.url + ready, timeout=5) as r:
                return r.status == 200
        except OSError:  # refused, reset, timed out: not up yet
            return False

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


class LlamaServer(Server):
    def __init__(self, bin_dir: Path, model: Path, cache: str, cells: int, slots: int, threads: int,
                 calib: Path | None, log: Path) -> None:
        port = free_port()
        cmd = [bin_dir / "llama-server", "-m", model, "--host", "127.0.0.1", "--port", port, "-c", cells,
               "-np", slots, "-fa", "on", "-ctk", cache, "-ctv", cache, "-t", threads, "--no-warmup",
               "--cache-ram", 0, "-lv", 4]
        if calib is not None:
            cmd += ["--nsq-calib", calib]
        try:
            super().__init__(cmd, log, port, timeout=600)
        except ServerError as e:
            raise SystemExit(str(e))

    def kv_mib(self) -> float:
        m = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells", self.output())
        if not m:
            raise SystemExit(f"no KV size in llama-server's log {self.log}")
        return sum(float(x) for x, _ in m)


def bytes_per_cell(bin_dir: Path, model: Path, cache: str, threads: int, calib: Path | None, tmp: Path) -> float:
    """The KV bytes one token takes with this cache type, as llama.cpp allocates them (a small probe server)."""
    probe = LlamaServer(bin_dir, model, cache, 4096, 1, threads, calib, tmp / f"probe-{cache}.log")
    try:
        return probe.kv_mib() * 2**20 / 4096
    finally:
        probe.stop()


def one_client(client, prompt: list[int], n_gen: int, out: dict, barrier: threading.Barrier) -> None:
    barrier.wait()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=n_gen, temperature=0, stream=True,
                                           extra_body={"top_k": 1, "ignore_eos": True, "cache_prompt": False}):
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            n += 1
    out.update(t0=t0, first=first, last=last, tokens=n)


def run_round(server: LlamaServer, prompts: list[list[int]], n_gen: int) -> dict:
    import openai

    n = len(prompts)
    results = [dict() for _ in range(n)]
    barrier = threading.Barrier(n)
    clients = [openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=1800) for _ in prompts]
    threads = [threading.Thread(target=one_client, args=(clients[i], prompts[i], n_gen, results[i], barrier))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r.get("first") is None for r in results):
        raise SystemExit("a client got no tokens")
    ttft = [r["first"] - r["t0"] for r in results]
    window = max(r["last"] for r in results) - min(r["first"] for r in results)
    after_first = sum(r["tokens"] - 1 for r in results)
    return {"clients": n, "tokens": sum(r["tokens"] for r in results),
            "decode_tps": after_first / window if window > 0 else float("nan"),
            "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft),
            "wall_s": max(r["last"] for r in results) - min(r["t0"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=ROOT / "build" / "tools" / "bin", help="where llama-server is")
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the demo model, SmolLM2-135M-Instruct)")
    ap.add_argument("--types", default="f16,q8_0,q4_0,nsq4", help="cache types (K and V alike), comma separated")
    ap.add_argument("--budget-mib", type=float, default=1024, help="KV memory budget, MiB")
    ap.add_argument("--conv-tokens", type=int, default=4096, help="conversation length for the capacity figure")
    ap.add_argument("-N", "--clients", default="1,4,8,16", help="concurrent clients per round, comma separated")
    ap.add_argument("-p", "--n-prompt", type=int, default=1024, help="prompt tokens per client")
    ap.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens per client")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--nsq-calib", type=Path, help="calibration for nsq4 (default: nsq-local's cached one)")
    ap.add_argument("--json", type=Path, default=Path("serve_bench.json"), help="where the results go")
    args = ap.parse_args(argv)

    from nsq_local import models

    model = args.model or models.smollm2()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    ns = [int(x) for x in args.clients.split(",")]
    if not (args.bin / "llama-server").is_file():
        ap.error(f"{args.bin / 'llama-server'} not found: build it (README, 'Serving')")
    budget = args.budget_mib * 2**20
    text = TEXT.read_text(errors="replace")
    results = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for cache in types:
            calib = None
            if cache == "nsq4":
                from nsq_local import calibrate
                calib = args.nsq_calib or calibrate.cached(model)
            per_cell = bytes_per_cell(args.bin, model, cache, args.threads, calib, tmp)
            slots = max(ns)
            # llama.cpp pads each slot's context to a multiple of 256 cells
            cells = int(budget // (per_cell * slots)) // 256 * 256 * slots
            print(f"[{cache}] {per_cell:.0f} bytes/token: {cells} cells in {args.budget_mib:g} MiB, "
                  f"{slots} slots of {cells // slots}", file=sys.stderr, flush=True)
            server = LlamaServer(args.bin, model, cache, cells, slots, args.threads, calib, tmp / f"{cache}.log")
            try:
                kv = server.kv_mib()
                if kv > args.budget_mib:
                    raise SystemExit(f"{cache}: llama.cpp allocated {kv:.1f} MiB, over the budget")
                tokens = post(server.url + "/tokenize", {"content": text})["tokens"]
                rounds = []
                offset = 0
                for n in ns:
                    prompts = []
                    for _ in range(n):
                        prompts.append(tokens[offset:offset + args.n_prompt])
                        offset = (offset + args.n_prompt) % max(1, len(tokens) - args.n_prompt)
                    r = run_round(server, prompts, args.n_gen)
                    print(f"[{cache}] N={n}: {r['decode_tps']:.1f} t/s decode, TTFT median {r['ttft_median_s']:.2f}"
                          f" s, max {r['ttft_max_s']:.2f} s", file=sys.stderr, flush=True)
                    rounds.append(r)
            finally:
                server.stop()
            results.append({"cache": cache, "bytes_per_token": per_cell, "cells": cells, "kv_mib": kv,
                            "slots": slots, "slot_ctx": cells // slots,
                            "conversations": int(budget // (per_cell * args.conv_tokens)), "rounds": rounds})

    print(f"\nmodel: {model.name}, KV budget {args.budget_mib:g} MiB, {args.conv_tokens}-token conversations; "
          f"llama-server -fa on -t {args.threads}, {args.n_prompt}-token prompts, {args.n_gen} tokens each\n")
    head = "| cache | bytes/token | cells in budget | KV MiB | conversations |"
    head += "".join(f" N={n} decode t/s | N={n} TTFT s |" for n in ns)
    print(head)
    print("|---|---:|---:|---:|---:|" + "---:|---:|" * len(ns))
    for r in results:
        row = f"| {r['cache']} | {r['bytes_per_token']:.0f} | {r['cells']} | {r['kv_mib']:.1f} | {r['conversations']} |"
        row += "".join(f" {x['decode_tps']:.1f} | {x['ttft_median_s']:.2f} |" for x in r["rounds"])
        print(row)
    args.json.write_text(json.dumps({"model": str(model), "budget_mib": args.budget_mib,
                                     "conv_tokens": args.conv_tokens, "n_prompt": args.n_prompt,
                                     "n_gen": args.n_gen, "threads": args.threads, "results": results}, indent=1))
    print(f"\n(JSON: {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
