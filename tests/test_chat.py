"""nsq-chat, driven as a person would: a real terminal session on SmolLM2 with an NSQ4 cache (NSQ3 in prompt mode)."""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess

import pexpect
import pytest

ARGS = ["--temp", "0", "-n", "40", "-c", "1024", "-t", "2"]


@pytest.fixture(scope="module")
def nsq_chat() -> str:
    exe = shutil.which("nsq-chat")
    if exe is None:
        pytest.fail("the nsq-chat command is not on PATH: install nsq-local (pip install .)")
    return exe


@contextlib.contextmanager
def session(exe: str, *args: str):
    """A terminal session of nsq-chat; the test ends it (Ctrl-D or /exit), and it must then exit with 0."""
    child = pexpect.spawn(exe, list(args), encoding="utf-8", timeout=300)
    try:
        yield child
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def stats(child: pexpect.spawn) -> dict[str, int]:
    child.sendline("/stats")
    child.expect(r"tokens in context: (\d+) of (\d+)")
    in_context = int(child.match.group(1))
    child.expect(r"KV cache: ([0-9.]+) MiB .*?f16 would take ([0-9.]+) MiB")
    kv, f16 = float(child.match.group(1)), float(child.match.group(2))
    child.expect(r"last answer: (\d+) tokens at ([0-9.]+) tokens/s; prompt: (\d+) new tokens")
    generated, prompt = int(child.match.group(1)), int(child.match.group(3))
    child.expect_exact("> ")
    return {"in_context": in_context, "kv": kv, "f16": f16, "generated": generated, "prompt": prompt}


def test_two_turns_stats_reset_and_exit(nsq_chat):
    with session(nsq_chat, *ARGS) as child:
        child.expect(r"cache K nsq4 / V nsq4, KV cache ([0-9.]+) MiB \((\d+)% less than f16's ([0-9.]+) MiB\)")
        assert int(child.match.group(2)) > 70  # 4.25 of 16 bits
        child.expect_exact("> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect_exact("> ")
        first = stats(child)
        assert first["generated"] > 0 and first["prompt"] > 0
        assert first["kv"] < 0.3 * first["f16"]

        child.sendline("What is the capital of Germany?")
        child.expect_exact("> ")
        second = stats(child)
        assert second["in_context"] > first["in_context"]
        # the first turn stayed in the cache: only the new messages were evaluated
        assert second["prompt"] < second["in_context"] - first["in_context"] + first["generated"] + 8, second
        assert second["prompt"] < first["in_context"]

        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.expect_exact("> ")
        assert stats(child)["in_context"] == 0
        child.sendeof()


def test_ctrl_c_stops_the_answer_not_the_program(nsq_chat):
    with session(nsq_chat, "--temp", "0", "-n", "400", "-c", "1024", "-t", "2") as child:
        child.expect_exact("> ")
        child.sendline("Write a long story about a dragon.")
        child.expect_exact("dragon.\r\n")  # the terminal's echo of the line, which must not pass for the answer
        child.expect(r"\w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        stopped = child.expect_exact(["[stopped]", "\n> "])  # or the answer ran to its end and the prompt is back
        assert stopped == 0, f"Ctrl-C did not stop the answer:\n{child.before}"
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"last answer: (\d+) tokens")
        assert 0 < int(child.match.group(1)) < 400
        child.expect_exact("> ")
        child.sendline("/exit")


def test_full_context_offers_reset(nsq_chat):
    with session(nsq_chat, "--temp", "0", "-n", "200", "-c", "128", "-t", "2") as child:
        child.expect_exact("> ")
        for _ in range(4):  # a 128-token context holds fewer than four such turns
            child.sendline("Tell me about the history of Paris in detail.")
            # the prompt at the start of a line, not a "> " inside the answer
            if child.expect([r"\[the context is full.*?/reset to start a new conversation\]", "\n> "]) == 0:
                break
        else:
            pytest.fail("the context never filled up")
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect_exact("> ")
        child.sendeof()


# nsq3 as shipped: the default calibration keeps the K of half of SmolLM2's layers in nsq4, within 3.5 bits/value
@pytest.mark.parametrize(("cache", "args", "bits"), [("nsq4", [], 4.25),  # the default
                                                    ("nsq3", ["-ctk", "nsq3", "-ctv", "nsq3"], 3.5)])
def test_prompt_mode_prints_the_answer(nsq_chat, cache, args, bits):
    """The answer on stdout, the logs on stderr; the banner names the cache, its size against f16's and the
    calibration K is centered by (by default, nsq3 as nsq4), which llama.cpp's own log (-v) confirms. (Which words
    the 135M model answers with is a close call at its first token: "The", "La" and "L" within half a nat with an
    f16 cache too, so the test does not ask for "Paris".)"""
    proc = subprocess.run([nsq_chat, *ARGS, *args, "-v", "-p", "What is the capital of France?"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = proc.stdout.strip()
    assert len(answer.split()) >= 3 and "llama_" not in answer and "nsq-chat:" not in answer, proc.stdout
    assert answer[:40] not in proc.stderr
    assert "using the bundled demo model SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stderr
    banner = re.search(rf"cache K {cache} / V {cache}, KV cache ([0-9.]+) MiB \((\d+)% less than f16's "
                       r"([0-9.]+) MiB\), K centered \((.+?\.nsq\.gguf)\)", proc.stderr)
    assert banner, proc.stderr[-3000:]
    kv, f16 = float(banner.group(1)), float(banner.group(3))
    assert abs(kv / f16 - bits / 16) < 0.01, (kv, f16)
    assert re.search(rf"{cache}: K centered by the calibrated means of 30 layers from \S*{re.escape(banner.group(4))}",
                     proc.stderr)


@pytest.mark.parametrize(("args", "message"), [
    (["-ctk", "nsq5"], "unknown --cache-type-k 'nsq5'; use one of: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, "
                       "q5_1, nsq4, nsq3"),
    (["--cache-type", "q3"], "unknown --cache-type-k 'q3'; use one of: "),
    (["/no/such/model.gguf"], "model file /no/such/model.gguf does not exist"),
    ([__file__], "is not a GGUF model file"),
    (["-ctv", "nsq4", "-fa", "off"], "requires flash attention: pass flash_attn=True"),
    (["-ctv", "nsq3", "-fa", "off"], "a quantized V cache (type_v='nsq3') requires flash attention"),
])
def test_bad_arguments_are_one_line_and_exit_2(nsq_chat, args, message):
    proc = subprocess.run([nsq_chat, *args, "-p", "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("nsq-chat: error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_f16_size_counts_wider_layers(smollm2, nsq_calib, tmp_path):
    """The f16 size nsq-chat compares against is the f16 cache's, also when a calibration stores a layer's K in f16:
    the named type's bits (nsq4) would count that layer as nsq4 and overstate f16's size (the negative control)."""
    from nsq_local import calibrate
    from nsq_local.chat import open_llama
    from nsq_local.cquant import bits_per_value

    one_f16 = tmp_path / "one-f16.gguf"
    calibrate.write_gguf(one_f16, list(calibrate.read_gguf(nsq_calib)[1].values()), {"nsq.nsq4.k_type.0": "f16"})
    _, wider = open_llama(model_path=str(smollm2), n_ctx=256, type_k="nsq4", type_v="nsq4", nsq_calib=one_f16)
    _, f16 = open_llama(model_path=str(smollm2), n_ctx=256, type_k="f16", type_v="f16")
    assert wider.type_k == "nsq4" and wider.mib > 0
    # llama.cpp reports each layer's type and bytes: the f16 size is exact
    assert wider.f16_mib == pytest.approx(f16.mib, rel=1e-9), (wider.f16_mib, f16.mib)
    by_type = wider.k_mib * 16 / bits_per_value("nsq4") + wider.v_mib * 16 / bits_per_value("nsq4")
    assert by_type - f16.mib > 0.04 * f16.mib, (by_type, f16.mib)
