"""nsq-calibrate and the K centering of patch 0007: the means are applied, exact under softmax, kept through cache
clears and context shifts, and refused when they do not fit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nsq_local import calibrate

from test_reliability import kld
from test_tools import perplexity


@pytest.fixture(scope="module")
def calib(nsq_calib) -> Path:
    return nsq_calib


def read_means(path: Path, tree: Path) -> dict[str, np.ndarray]:
    # the tree's gguf-py, an independent reader of what nsq-calibrate writes
    sys.path.insert(0, str(tree / "vendor" / "llama.cpp" / "gguf-py"))
    import gguf

    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def write_means(path: Path, means: list[np.ndarray]) -> Path:
    calibrate.write_gguf(path, [m.astype(np.float32) for m in means], {"nsq.calibration.model": "test"})
    return path


def test_calibration_file_holds_one_mean_per_layer(calib, upstream_tree):
    means = read_means(calib, upstream_tree)
    assert sorted(means) == sorted(f"nsq.k_mean.{il}" for il in range(30))  # SmolLM2: 30 layers, 3 KV heads of 64
    assert all(m.shape == (192,) and np.isfinite(m).all() for m in means.values())
    # the mean is a real part of K: far from zero in every layer
    assert min(float(np.linalg.norm(m)) for m in means.values()) > 0.1


def test_centering_lowers_the_error_and_is_really_applied(tool, smollm2, wikitext, calib, tmp_path):
    f16, _ = perplexity(tool, smollm2, wikitext, "f16")
    plain, _ = perplexity(tool, smollm2, wikitext, "nsq4")
    centered, log = perplexity(tool, smollm2, wikitext, "nsq4", env={"LLAMA_NSQ_CALIB": str(calib)})
    assert "nsq4: K centered by the calibrated channel means of 30 layers" in log
    assert abs(centered - f16) < abs(plain - f16), (f16, plain, centered)
    # a mean of 50 in every channel is exact under softmax, but the quantizer then sees mostly the offset: if the
    # means were not subtracted (or were lost when llama-perplexity clears the cache per chunk) nothing would change
    huge = write_means(tmp_path / "huge.gguf", [np.full(192, 50.0)] * 30)
    wrecked, _ = perplexity(tool, smollm2, wikitext, "nsq4", env={"LLAMA_NSQ_CALIB": str(huge)})
    assert wrecked > 2 * plain


def test_calibration_of_another_shape_is_refused(tool, smollm2, wikitext, tmp_path):
    bad = write_means(tmp_path / "other-model.gguf", [np.zeros(256)] * 30)
    proc = subprocess.run([str(tool("llama-perplexity")), "-m", str(smollm2), "-f", str(wikitext), "-c", "256",
                           "--chunks", "1", "-fa", "on", "-ctk", "nsq4", "-ctv", "nsq4"], capture_output=True,
                          text=True, env={**os.environ, "LLAMA_NSQ_CALIB": str(bad)}, timeout=300)
    assert proc.returncode != 0
    assert "does not fit this model (layer 0 needs an f32 nsq.k_mean.0 of 192 values)" in proc.stdout + proc.stderr


def test_llama_nsq_calib_argument(smollm2, calib, tmp_path):
    import llama_cpp

    with pytest.raises(FileNotFoundError, match="NSQ4 calibration file not found"):
        llama_cpp.Llama(model_path=str(smollm2), type_k="nsq4", type_v="nsq4", nsq_calib=tmp_path / "no.gguf",
                        verbose=False)
    with pytest.raises(ValueError, match="nsq_calib calibrates an nsq4 K cache"):
        llama_cpp.Llama(model_path=str(smollm2), type_k="q4_0", nsq_calib=calib, verbose=False)
    llm = llama_cpp.Llama(model_path=str(smollm2), n_ctx=256, type_k="nsq4", type_v="nsq4", nsq_calib=calib,
                          verbose=False)
    assert llm.nsq_calib == calib and "LLAMA_NSQ_CALIB" not in os.environ


def _decode(llm, tokens: list[int], pos0: int, n_out: int) -> np.ndarray:
    """Logits of the last n_out of `tokens`, decoded at positions pos0..."""
    import llama_cpp

    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i >= len(tokens) - n_out
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(llm.ctx, batch) == 0
        rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(llm.n_vocab(),))
                for i in range(len(tokens) - n_out, len(tokens))]
        return np.array(rows, dtype=np.float64)
    finally:
        llama_cpp.llama_batch_free(batch)


@pytest.mark.parametrize("rotation", ["on", "off"])
def test_context_shift_keeps_the_mean(smollm2, wikitext, calib, rotation, monkeypatch):
    """Drop the first 128 of 384 tokens, shift the rest to position 0 (llama.cpp re-ropes the stored NSQ4 keys), go
    on: the logits must match a fresh run of the kept tokens about as well as without centering. A shift that
    re-roped the centered keys without putting the mean back would leave old and new keys with different offsets."""
    import llama_cpp

    if rotation == "off":
        monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
    tokens = llama_cpp.Llama(model_path=str(smollm2), vocab_only=True, verbose=False).tokenize(
        wikitext.read_text(encoding="utf-8")[:4000].encode())[:400]
    head, tail = tokens[:384], tokens[384:400]

    def shifted_vs_fresh(calibration) -> float:
        kw = dict(model_path=str(smollm2), n_ctx=512, n_batch=512, type_k="nsq4", type_v="nsq4", verbose=False,
                  nsq_calib=calibration)
        llm = llama_cpp.Llama(**kw)
        mem = llama_cpp.llama_get_memory(llm.ctx)
        _decode(llm, head, 0, 1)
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 0, 128)
        llama_cpp.llama_memory_seq_add(mem, 0, 128, -1, -128)
        shifted = _decode(llm, tail, 256, len(tail))
        fresh = llama_cpp.Llama(**kw)
        return float(kld(_decode(fresh, head[128:] + tail, 0, len(tail)), shifted).mean())

    plain, centered = shifted_vs_fresh(None), shifted_vs_fresh(calib)
    # the fresh and the shifted cache hold differently rounded keys, so neither is 0; a lost mean costs far more
    assert centered < max(2 * plain, 0.05), (plain, centered)


def test_state_save_and_load_keeps_the_centered_cache(smollm2, wikitext, calib):
    """A state saved from a centered cache and loaded into a new context with the same calibration continues with
    exactly the logits of the saved context."""
    import ctypes

    import llama_cpp

    kw = dict(model_path=str(smollm2), n_ctx=512, n_batch=512, type_k="nsq4", type_v="nsq4", verbose=False,
              nsq_calib=calib)
    tokens = llama_cpp.Llama(model_path=str(smollm2), vocab_only=True, verbose=False).tokenize(
        wikitext.read_text(encoding="utf-8")[:3000].encode())[:200]
    a = llama_cpp.Llama(**kw)
    _decode(a, tokens[:180], 0, 1)
    size = llama_cpp.llama_state_get_size(a.ctx)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_get_data(a.ctx, buf, size) == size
    want = _decode(a, tokens[180:], 180, 20)
    b = llama_cpp.Llama(**kw)
    assert llama_cpp.llama_state_set_data(b.ctx, buf, size) == size
    np.testing.assert_array_equal(_decode(b, tokens[180:], 180, 20), want)
