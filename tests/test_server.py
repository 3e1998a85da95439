"""Serving with an NSQ4 cache: llama-cpp-python's OpenAI-compatible server, llama.cpp's llama-server (parallel
slots, continuous batching) and its RPC backend, as real processes on localhost driven by the official `openai`
client, on SmolLM2 with greedy sampling."""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import llama_cpp
from helpers import ROOT
from nsq_local import calibrate

sys.path.insert(0, str(ROOT / "bench"))
import serve_bench  # noqa: E402
from serve_bench import free_port  # noqa: E402

openai = pytest.importorskip("openai", reason="the serving tests drive the servers with it: pip install openai")

THREADS = str(os.cpu_count() or 2)
# distinct, in no conversation's text, and not prefixes of one another
SECRETS = [48213, 70592, 13847, 96071, 25368, 81734, 39405, 62150]


class Server(serve_bench.Server):
    """bench/serve_bench.py's server process, a test failure when it does not start, with an openai client."""

    def __init__(self, *args, **kw) -> None:
        try:
            super().__init__(*args, **kw)
        except serve_bench.ServerError as e:
            pytest.fail(str(e))

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=600, **kw)


def post_raw(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def filler(wikitext: Path, start: int, chars: int) -> str:
    """Plain text from WikiText-2, cut at whole lines, that holds no digit run like a secret."""
    text = wikitext.read_text(errors="replace")[start:start + chars]
    return re.sub(r"\d", "", text[:text.rfind("\n")])


def ask(client: "openai.OpenAI", prompt: str, max_tokens: int = 16, **extra) -> "openai.types.Completion":
    return client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"top_k": 1, **extra})


def stream_text(client: "openai.OpenAI", prompt: str, max_tokens: int) -> str:
    out = []
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"top_k": 1}):
        if chunk.choices:
            out.append(chunk.choices[0].text)
    return "".join(out)


# --- llama-cpp-python's server ----------------------------------------------------------------------------------------

def python_server(args: list, log: Path, port: int) -> Server:
    return Server([sys.executable, "-m", "llama_cpp.server", "--port", port, "--host", "127.0.0.1", *args], log, port,
                  ready="/v1/models")


@pytest.mark.parametrize("cache,flash", [("nsq4", "on"), ("nsq3", "on"), ("f16", "off")])
def test_python_server_takes_cache_types_by_name(smollm2, nsq_calib, tmp_path, cache, flash):
    """`python -m llama_cpp.server --type_k nsq4 --type_v nsq4` (or nsq3): names as Llama takes them, flash attention
    on by itself for a quantized V (off for f16: the control), the start-up log naming the types, the calibration K
    is centered by and the KV memory, and the official client's chat completion, plain and streamed."""
    port = free_port()
    calib = ["--nsq_calib", nsq_calib] if cache != "f16" else []
    server = python_server(["--model", smollm2, "--type_k", cache, "--type_v", cache, "--n_ctx", 1024,
                            "--n_threads", THREADS, *calib], tmp_path / "server.log", port)
    try:
        client = server.client()
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
        text = reply.choices[0].message.content
        assert "Paris" in text, text
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices]
        # token by token; not compared whole with the first answer: llama_cpp reuses the cached prompt but for its
        # last token, which a one-token batch then evaluates, and a near tie late in the answer may go either way
        assert len(chunks) > 5 and "".join(chunks).split()[:2] == text.split()[:2], (chunks, text)
        log = server.output()
    finally:
        server.stop()
    line = next((ln for ln in log.splitlines() if ln.startswith("llama_cpp.server:")), None)
    assert line is not None, log[-3000:]
    print(line)
    assert f"KV cache K {cache}, V {cache}, n_ctx 1024, flash attention {flash}" in line
    if cache != "f16":
        assert f"K centered by {nsq_calib}" in line
    # llama.cpp's own figure: 30 layers x 1024 cells x 192 K and 192 V values, in each layer's type's bytes (an nsq3
    # cache keeps the K of the layers its calibration names in nsq4)
    per_value = {"nsq4": 34 / 64, "nsq3": 26 / 64, "f16": 2}
    meta = calibrate.read_gguf(nsq_calib)[0]
    k_nsq4 = sum(meta[key] == "nsq4" for key in meta if key.startswith("nsq.nsq3.k_type.")) if cache == "nsq3" else 0
    values = 1024 * 192 * (per_value[cache] * (30 - k_nsq4 + 30) + per_value["nsq4"] * k_nsq4)
    mib = float(re.search(r"; ([0-9.]+) MiB", line).group(1))
    assert mib == pytest.approx(values / 2**20, rel=0.01)


def test_python_server_type_given_as_a_ggml_type_value_still_works(smollm2, tmp_path):
    port = free_port()
    server = python_server(["--model", smollm2, "--type_k", "8", "--type_v", "8", "--n_ctx", 256], tmp_path / "s.log",
                           port)
    try:
        assert ask(server.client(), "The capital of France is", 4).choices[0].text.strip()
        log = server.output()
    finally:
        server.stop()
    assert "KV cache K q8_0, V q8_0, n_ctx 256, flash attention on" in log


@pytest.mark.parametrize("args,message", [
    (["--type_k", "nsq5"], "type_k='nsq5' is not a ggml type; use one of: "),
    (["--type_v", "q4_0", "--flash_attn", "false"], "a quantized V cache (type_v='q4_0') requires flash attention"),
    (["--type_k", "f16", "--nsq_calib", "x.gguf"],
     "nsq_calib calibrates an nsq4 or nsq3 K cache, but type_k is 'f16'"),
    (["--type_k", "nsq4", "--nsq_calib", "missing.nsq.gguf"], "NSQ calibration file not found: missing.nsq.gguf"),
    (["--model", "missing.gguf"], "llama_cpp.server: error: Model path does not exist: missing.gguf"),
])
def test_python_server_bad_settings_stop_start_up(smollm2, tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2), "--port",
                           str(free_port()), *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if "nsq5" in args:
        assert "nsq3" in proc.stderr.split(message, 1)[1] and "nsq4" in proc.stderr.split(message, 1)[1]


# --- llama-server -----------------------------------------------------------------------------------------------------

N_SLOTS = 8
SLOT_CTX = 1024


def llama_server(tool, model: Path, cache: str, log: Path, slots: int = N_SLOTS, slot_ctx: int = SLOT_CTX,
                 extra: tuple = ()) -> Server:
    port = free_port()
    # no -fa, as the README runs it: a quantized V turns flash attention on by itself
    return Server([tool("llama-server"), "-m", model, "--host", "127.0.0.1", "--port", port, "-c", slots * slot_ctx,
                   "-np", slots, "-ctk", cache, "-ctv", cache, "-t", THREADS, "--no-warmup", "-lv", 4, *extra],
                  log, port)


@pytest.fixture(scope="module", params=["nsq4", "f16"])
def served(request, tool, smollm2, nsq_calib, tmp_path_factory):
    cache = request.param
    calib = ("--nsq-calib", nsq_calib) if cache == "nsq4" else ()
    server = llama_server(tool, smollm2, cache, tmp_path_factory.mktemp("srv") / f"llama-server-{cache}.log",
                          extra=calib)
    yield cache, server
    server.stop()


def test_llama_server_logs_its_cache(served):
    cache, server = served
    log = server.output()
    assert f"K ({cache})" in log and f"V ({cache})" in log, log[-3000:]
    assert f"n_slots = {N_SLOTS}, n_ctx_slot = {SLOT_CTX}" in log, log[-3000:]
    if cache == "nsq4":
        assert "nsq4: K centered by the calibrated means" in log
        assert "enabling flash_attn since it is required for quantized V cache" in log


def test_eight_streaming_clients_each_get_their_own_secret(served, wikitext):
    """Eight clients at once, each told its own number before ~550 tokens of unrelated text and asked for it after:
    every one gets its number back and no other client's, from slots decoded together in one batch."""
    cache, server = served

    def conversation(i: int) -> str:
        return (f"The secret number is {SECRETS[i]}. Remember it.\n\n" + filler(wikitext, 4000 + 2500 * i, 2400)
                + "\n\nWhat is the secret number? The secret number is")

    barrier = threading.Barrier(N_SLOTS)

    def one(i: int) -> str:
        client = server.client()
        barrier.wait()
        return stream_text(client, conversation(i), 8)

    with ThreadPoolExecutor(N_SLOTS) as pool:
        answers = list(pool.map(one, range(N_SLOTS)))
    print(cache, answers)
    for i, answer in enumerate(answers):
        assert str(SECRETS[i]) in answer, f"client {i}: {answer!r}"
        others = [s for j, s in enumerate(SECRETS) if j != i and str(s) in answer]
        assert not others, f"client {i} got another client's number: {answer!r}"
    assert server.alive()


def test_bad_requests_get_clear_errors_and_the_others_are_served(served, wikitext):
    """While one client streams, others disconnect mid-stream, send more than a slot holds and send malformed
    JSON: each bad one gets an HTTP error naming the problem, the good stream finishes, the server stays up."""
    cache, server = served
    prompt = "The three primary colours are red, yellow and"
    want = ask(server.client(), prompt, 24).choices[0].text

    good: list[str] = []
    t = threading.Thread(target=lambda: good.append(stream_text(server.client(), prompt, 24)))
    t.start()

    # a client that reads a few tokens of a long answer and hangs up
    stream = server.client().completions.create(model="m", prompt="Write a long story about a dragon.",
                                                max_tokens=400, temperature=0, stream=True)
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()

    too_long = filler(wikitext, 0, 12000)  # ~2700 tokens, a slot holds 1024
    with pytest.raises(openai.BadRequestError) as e:
        ask(server.client(), too_long, 8)
    assert "exceeds the available context size" in str(e.value), str(e.value)

    status, body = post_raw(server.url + "/v1/completions", b'{"prompt": "hello", "max_tokens": ')
    assert status in (400, 500), (status, body)
    assert "error" in json.loads(body), body

    status, body = post_raw(server.url + "/v1/chat/completions", b'{"messages": "not a list", "max_tokens": 4}')
    assert 400 <= status < 600, (status, body)

    t.join(300)
    assert good == [want]
    assert ask(server.client(), prompt, 24).choices[0].text == want
    assert server.alive()


# A prefix cached in a slot may have been computed in a batch of another size than the same tokens of a fresh prompt.
# Flash attention over an NSQ cache gives a query row the same bits in any batch (0008), so a reused slot and a fresh
# prompt must give the same tokens with the same log-probabilities. Before that, upstream's tiled path for batches of
# 64 rows and more rounded differently from its one-chunk path, a 4-bit cache rounded such differences to other
# codes, and at llama-server's default -ub 512 one of these conversations (boiling point) parted from its fresh answer
# at token 13 (docs/serving.md).
def greedy_difference(reused: list, fresh: list) -> str:
    """Where two greedy answers (tokens with their log-probabilities) first differ; an empty string if nowhere."""
    for i, (a, b) in enumerate(zip(reused, fresh)):
        if (a.token, a.logprob) != (b.token, b.logprob):
            return f"token {i}: {a.token!r} ({a.logprob}) against {b.token!r} ({b.logprob})"
    return "" if len(reused) == len(fresh) else "lengths differ"


def test_reused_slot_answers_as_a_fresh_one(tool, smollm2, nsq_calib, tmp_path):
    """One slot, nsq4, llama-server's default batch sizes: a conversation's follow-up reuses the slot's cached prefix
    (the server reports the cached tokens) and gives the same greedy answer, log-probabilities included, as the same
    prompt evaluated from scratch in that slot; so do other conversations that share only the chat template's start
    with the slot's last one."""
    server = llama_server(tool, smollm2, "nsq4", tmp_path / "llama-server.log", slots=1, slot_ctx=2048,
                          extra=("--nsq-calib", nsq_calib))
    try:
        client = server.client()

        def chat(messages, cache_prompt=True):
            r = client.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0,
                                               logprobs=True, top_logprobs=2,
                                               extra_body={"top_k": 1, "cache_prompt": cache_prompt})
            details = r.usage.prompt_tokens_details
            return r.choices[0].message.content, r.choices[0].logprobs.content, (details.cached_tokens if details
                                                                                 else 0)

        first = [{"role": "user", "content": "Name three fruits that are red."}]
        answer, _, _ = chat(first)
        follow_up = first + [{"role": "assistant", "content": answer},
                             {"role": "user", "content": "Which of them is the smallest?"}]
        reused, reused_lp, cached = chat(follow_up)
        assert cached > 10, "the follow-up should reuse the first turn from the slot"
        fresh, fresh_lp, cached_fresh = chat(follow_up, cache_prompt=False)
        assert cached_fresh == 0
        assert not greedy_difference(reused_lp, fresh_lp), (greedy_difference(reused_lp, fresh_lp), reused, fresh)

        results = []
        for question in ["What is the boiling point of water at sea level?", "Who wrote Romeo and Juliet?",
                         "How many legs does a spider have?"]:
            other = [{"role": "user", "content": question}]
            chat(first)
            reused_other, reused_other_lp, cached_other = chat(other)
            assert 0 < cached_other < 40, "only the chat template's start is shared"
            fresh_other, fresh_other_lp, _ = chat(other, cache_prompt=False)
            why = greedy_difference(reused_other_lp, fresh_other_lp)
            assert not why, (why, reused_other, fresh_other)
            results.append(reused_other)
        print({"follow-up": reused, "cached": cached, "others": results})
    finally:
        server.stop()


def test_llama_server_unknown_cache_type_is_a_start_up_error(tool, smollm2):
    proc = subprocess.run([str(tool("llama-server")), "-m", str(smollm2), "--port", str(free_port()), "-ctk", "nsq5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Unsupported cache type: nsq5 (valid: " in proc.stderr and "nsq4" in proc.stderr


def test_llama_server_quantized_v_without_flash_attention_is_a_start_up_error(tool, smollm2):
    proc = subprocess.run([str(tool("llama-server")), "-m", str(smollm2), "--port", str(free_port()), "-fa", "off",
                           "-ctk", "nsq4", "-ctv", "nsq4", "--no-warmup"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "quantized V cache (nsq4) requires flash attention" in proc.stdout + proc.stderr


# --- RPC --------------------------------------------------------------------------------------------------------------

def rpc_server(tool, log: Path) -> Server:
    """A ggml-rpc-server on localhost; `endpoint` is what --rpc takes."""
    port = free_port()
    server = Server([tool("ggml-rpc-server"), "-H", "127.0.0.1", "-p", port, "-t", THREADS], log, port, ready=None,
                    timeout=60)
    server.endpoint = f"127.0.0.1:{port}"
    return server


def kl_divergence(tool, model, text, base: Path, extra: tuple, cache: str = "nsq4") -> tuple[dict, str]:
    proc = subprocess.run([str(tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "512", "--chunks",
                           "1", "-fa", "on", "-ctk", cache, "-ctv", cache, "-t", THREADS, "-lv", "4",
                           "--kl-divergence-base", str(base), *map(str, extra)], capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    if "--kl-divergence" not in extra:
        return {}, out
    stats = {"kld": float(re.search(r"Mean\s+KLD:\s+([-0-9.e]+)", out).group(1)),
             "same_top": float(re.search(r"Same top p:\s+([0-9.]+)", out).group(1))}
    return stats, out


def test_rpc_nsq4_cache_logits_match_the_local_run(tool, smollm2, wikitext, nsq_calib, tmp_path):
    """The whole model and its nsq4 cache on a ggml-rpc-server on localhost: llama-perplexity's logits (KL
    divergence against the local run's, at every position of a 512-token window) within the bound of the
    parallel-sequence test; an f16 cache measured the same way (the control) is further from the local nsq4 run."""
    base = tmp_path / "local-nsq4.kld"
    calib = ("--nsq-calib", nsq_calib)
    kl_divergence(tool, smollm2, wikitext, base, calib)
    rpc = rpc_server(tool, tmp_path / "rpc.log")
    try:
        remote = ("--rpc", rpc.endpoint, "-ngl", "99", "--kl-divergence", *calib)
        same, log = kl_divergence(tool, smollm2, wikitext, base, remote)
        # the cache lives on the RPC server, not in this process
        (tmp_path / "rpc-client.log").write_text(log)
        assert re.search(r"RPC\d*\[127\.0\.0\.1:%d\]\s+KV buffer size" % rpc.port, log), log[-3000:]
        f16, _ = kl_divergence(tool, smollm2, wikitext, base, remote, cache="f16")
    finally:
        rpc.stop()
    print({"nsq4 over rpc vs local nsq4": same, "f16 over rpc vs local nsq4": f16})
    assert same["kld"] < 0.1
    assert same["kld"] < f16["kld"]
    assert same["same_top"] > 95


def test_rpc_server_killed_mid_generation_is_a_clear_error(tool, smollm2, tmp_path):
    rpc = rpc_server(tool, tmp_path / "rpc.log")
    server = llama_server(tool, smollm2, "nsq4", tmp_path / "llama-server.log", slots=1,
                          extra=("--rpc", rpc.endpoint, "-ngl", "99"))
    try:
        stream = server.client().completions.create(model="m", prompt="Write a long story about a dragon.",
                                                    max_tokens=900, temperature=0, stream=True,
                                                    extra_body={"ignore_eos": True})
        with pytest.raises((openai.APIError, ConnectionError)):
            for n, _ in enumerate(stream):
                if n == 5:
                    rpc.proc.kill()
        server.proc.wait(60)
        log = server.output()
    finally:
        server.stop()
        rpc.stop()
    assert "Remote RPC server crashed or returned malformed response" in log, log[-3000:]


def _hello_header(size: int) -> bytes:
    return struct.pack("<BQ", 14, size)  # RPC_CMD_HELLO, then the request's size


def closed_without_answer(s: socket.socket) -> bool:
    try:
        return s.recv(64) == b""
    except ConnectionResetError:  # closed with our bytes unread
        return True


# the numbering this tree's ggml and the binding share (every type added after nsq4 raises the count)
NSQ4, TYPE_COUNT = llama_cpp.GGML_TYPE_NSQ4, llama_cpp.GGML_TYPE_COUNT


def test_rpc_server_refuses_a_client_from_another_tree(tool, tmp_path):
    """Upstream's HELLO (24 bytes of transport caps, no type ids) is refused with the reason in the server's log,
    and the server goes on serving: an nsq-local client connects after it."""
    rpc = rpc_server(tool, tmp_path / "rpc.log")
    try:
        with socket.create_connection(("127.0.0.1", rpc.port), timeout=10) as s:
            s.sendall(_hello_header(24) + bytes(24))
            assert closed_without_answer(s), "the server must close the connection, not answer"
        # a client that sends our HELLO with another numbering of the types
        with socket.create_connection(("127.0.0.1", rpc.port), timeout=10) as s:
            s.sendall(_hello_header(32) + bytes(24) + struct.pack("<II", 40, 41))
            assert closed_without_answer(s)
        with socket.create_connection(("127.0.0.1", rpc.port), timeout=10) as s:
            s.sendall(_hello_header(32) + bytes(24) + struct.pack("<II", NSQ4, TYPE_COUNT))
            size = struct.unpack("<Q", s.recv(8, socket.MSG_WAITALL))[0]
            reply = s.recv(size, socket.MSG_WAITALL)
            assert reply[3] == NSQ4, "an nsq-local server answers with its id for nsq4"
        time.sleep(0.5)
        log = rpc.output()
    finally:
        rpc.stop()
    assert "refusing a client built from another tree than this server (upstream's HELLO)" in log, log
    assert ("refusing a client that numbers the ggml types differently (its nsq4 is type 40 of 41, here "
            f"{NSQ4} of {TYPE_COUNT})") in log


def test_client_refuses_an_rpc_server_from_another_tree(tool, smollm2, tmp_path):
    """A server that behaves as upstream's does on our longer HELLO (it closes the connection): llama-server stops
    at start-up naming the server and the fix, before any tensor crosses."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def upstream_like():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(9)  # command and size: not upstream's 24 bytes, so upstream closes

    threading.Thread(target=upstream_like, daemon=True).start()
    try:
        proc = subprocess.run([str(tool("llama-server")), "-m", str(smollm2), "--port", str(free_port()), "--rpc",
                               f"127.0.0.1:{port}", "-ngl", "99", "--no-warmup"], capture_output=True, text=True,
                              timeout=120)
    finally:
        listener.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"RPC server 127.0.0.1:{port} refused the handshake: it was built from another tree" in out, out[-3000:]


# --- the load bench ---------------------------------------------------------------------------------------------------

def test_serve_bench_end_to_end_at_toy_sizes(tool, smollm2, nsq_calib, tmp_path):
    """bench/serve_bench.py at toy sizes (its figures are for a quiet machine, not for a test): the capacity it
    derives from llama.cpp's allocation, the rounds of clients, the table and the JSON."""
    out = tmp_path / "serve.json"
    run_bench = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent.parent / "bench" / "serve_bench.py"), "--bin",
         str(tool("llama-server").parent), "-m", str(smollm2), "--types", "f16,nsq4", "--budget-mib", "64",
         "-N", "1,2", "-p", "16", "-n", "4", "-t", THREADS, "--nsq-calib", str(nsq_calib), "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run_bench.returncode == 0, run_bench.stderr[-3000:]
    results = {r["cache"]: r for r in json.loads(out.read_text())["results"]}
    assert results["f16"]["bytes_per_token"] == pytest.approx(30 * 384 * 2, abs=2)
    assert results["nsq4"]["bytes_per_token"] == pytest.approx(30 * 384 * 34 / 64, abs=2)
    for r in results.values():
        assert r["kv_mib"] <= 64 and r["slots"] == 2
        assert [x["clients"] for x in r["rounds"]] == [1, 2]
        assert all(x["tokens"] == x["clients"] * 4 and x["decode_tps"] > 0 for x in r["rounds"])
    # a 4096-token conversation takes 90 MiB with f16, 23.9 MiB with nsq4
    assert results["f16"]["conversations"] == 0 and results["nsq4"]["conversations"] == 2
    assert "| nsq4 |" in run_bench.stdout and "| f16 |" in run_bench.stdout
