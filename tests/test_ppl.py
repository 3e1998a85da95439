"""nsq-ppl on the real SmolLM2 and WikiText-2: the two-pass scheme really scores logits that read the stored cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nsq_local import ppl
from nsq_local.calibrate import Decoder
from nsq_local.capture import Model

THREADS = 2
C = 128  # windows of 128 tokens: 63 scored each; small, so the suite stays fast on 2 cores


@pytest.fixture(scope="module")
def window(smollm2, wikitext) -> np.ndarray:
    with Model(smollm2) as m:
        return m.tokenize(wikitext.read_text(encoding="utf-8")[:20000])[:C]


def two_pass(model, window, type_k: str, type_v: str, rotation: bool = True) -> np.ndarray:
    with Decoder(model, n_ctx=C, type_k=type_k, type_v=type_v, n_threads=THREADS, rotation=rotation) as s:
        return ppl.window_logits(s, window)


@pytest.fixture(scope="module")
def f16_one_pass(smollm2, window) -> np.ndarray:
    """The whole window in one llama_decode with an f16 cache: the logits the model itself gives the suffix."""
    with Decoder(smollm2, n_ctx=C, n_threads=THREADS) as s:
        return s.decode(window, 0, logits=True)[C // 2:-1]


def test_f16_two_pass_logits_are_the_one_pass_logits(smollm2, window, f16_one_pass):
    np.testing.assert_array_equal(two_pass(smollm2, window, "f16", "f16"), f16_one_pass)


def test_the_scored_suffix_reads_the_prefix_from_the_cache(smollm2, window, f16_one_pass):
    with Decoder(smollm2, n_ctx=C, n_threads=THREADS) as s:
        alone = s.decode(window[C // 2:], C // 2, logits=True)[:-1]  # same positions, empty cache
    targets = window[C // 2 + 1:]
    kld = ppl.score(alone, targets, f16_one_pass).kld.mean()
    assert kld > 0.1, f"without the prefix the suffix's logits should change a lot (KLD {kld})"


@pytest.mark.parametrize("cache", ["nsq4", "q4_0"])
def test_lossy_cache_changes_the_scored_logits(smollm2, window, f16_one_pass, cache):
    logits = two_pass(smollm2, window, cache, cache)
    s = ppl.score(logits, window[C // 2 + 1:], f16_one_pass)
    print(f"{cache}: max |Δlogit| {np.abs(logits - f16_one_pass).max():.4f}, mean KLD {s.kld.mean():.5f}")
    assert np.abs(logits - f16_one_pass).max() > 0.1
    assert s.kld.mean() > 1e-3


def test_score_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)).astype(np.float32)
    base = rng.normal(size=(5, 11)).astype(np.float32)
    targets = np.array([0, 3, 10, 2, 7], dtype=np.int32)
    s = ppl.score(logits, targets, base)
    lq = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
    lb = base.astype(np.float64) - np.log(np.exp(base.astype(np.float64)).sum(1, keepdims=True))
    np.testing.assert_allclose(s.nll, -lq[np.arange(5), targets], rtol=1e-12)
    np.testing.assert_allclose(s.kld, (np.exp(lb) * (lb - lq)).sum(1), rtol=1e-12)
    np.testing.assert_array_equal(s.top1, logits.argmax(1) == base.argmax(1))
    assert ppl.score(base, targets, base).kld.max() < 1e-12


RESULT_KEYS = {"type_k", "type_v", "attn_rot_k", "attn_rot_v", "ppl", "delta_ppl", "kld_mean", "kld_se", "kld_p99",
               "top1_agree", "tokens", "seconds", "nsq_calib"}


@pytest.fixture(scope="module")
def no_rot_run(smollm2, wikitext, nsq_calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppl") / "r.json"
    # nsq4 and nsq3 as nsq-local ships them: K centered by nsq-calibrate's means
    rc = ppl.main(["-m", str(smollm2), "-f", str(wikitext), "-c", str(C), "--chunks", "3", "-t", str(THREADS),
                   "--no-rot", "-ctk", "nsq4", "-ctv", "nsq4", "-ctk", "q4_0", "-ctv", "q4_0", "-ctk",
                   "nsq4-uncentered", "-ctv", "nsq4", "-ctk", "nsq3", "-ctv", "nsq3", "-ctk", "nsq3-uncentered",
                   "-ctv", "nsq3", "--json", str(out), "--nsq-calib", str(nsq_calib)])
    assert rc == 0
    return json.loads(out.read_text())


def test_json_schema_and_consistency(no_rot_run):
    r = no_rot_run
    assert r["n_ctx"] == C and r["prefix"] == C // 2 and r["chunks"] == 3 and r["rotation"] == "off"
    assert r["tokens_scored"] == 3 * (C // 2 - 1)
    base = r["baseline"]
    assert set(base) == RESULT_KEYS and (base["type_k"], base["type_v"]) == ("f16", "f16")
    assert base["kld_mean"] is None and 1 < base["ppl"] < 1000
    assert [(x["type_k"], x["type_v"]) for x in r["results"]] == [("nsq4", "nsq4"), ("q4_0", "q4_0"),
                                                                    ("nsq4-uncentered", "nsq4"), ("nsq3", "nsq3"),
                                                                    ("nsq3-uncentered", "nsq3")]
    assert [x["nsq_calib"] is None for x in r["results"]] == [False, True, True, False, True]
    for x in r["results"]:
        assert set(x) == RESULT_KEYS
        assert x["tokens"] == r["tokens_scored"]
        assert not x["attn_rot_k"] and not x["attn_rot_v"], "--no-rot must reach llama.cpp"
        assert x["delta_ppl"] == pytest.approx(x["ppl"] - base["ppl"])
        assert 0 < x["kld_se"] < x["kld_mean"] <= x["kld_p99"]
        assert 0.5 < x["top1_agree"] < 1


@pytest.mark.parametrize("cache", ["nsq4", "nsq3"])
def test_centered_kld_without_rotation(no_rot_run, nsq_calib, cache):
    results = {x["type_k"]: x for x in no_rot_run["results"]}
    centered, uncentered, q4_0 = results[cache], results[f"{cache}-uncentered"], results["q4_0"]
    assert centered["nsq_calib"] == str(nsq_calib)
    print(f"no rotation, -c {C}: KLD {cache} {centered['kld_mean']:.5f}, uncentered {uncentered['kld_mean']:.5f}, "
          f"q4_0 {q4_0['kld_mean']:.5f}")
    assert centered["kld_mean"] > 0
    # the negative control: the same cache without centering is worse
    assert centered["kld_mean"] < uncentered["kld_mean"]
    if cache == "nsq4":
        # issue 4's check. Without its K centering nsq4 is not reliably below q4_0 here (0.125 vs 0.113 at -c 256,
        # 3 windows); centered it is, at every setting measured (docs/quality.md)
        assert centered["kld_mean"] < q4_0["kld_mean"]
    else:
        assert centered["kld_mean"] > results["nsq4"]["kld_mean"]  # a bit less per value costs more


def test_rotation_is_on_by_default_and_reported(smollm2, wikitext, capsys):
    rc = ppl.main(["-m", str(smollm2), "-f", str(wikitext), "-c", "32", "--chunks", "1", "-t", str(THREADS),
                   "-ctk", "q8_0", "-ctv", "f16"])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("q8_0/f16"))
    assert row.split()[1] == "K", row  # upstream rotates the quantized K only


def test_sweep_writes_a_plot(smollm2, wikitext, tmp_path):
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    rc = ppl.main(["-m", str(smollm2), "-f", str(wikitext), "--sweep-ctx", "32,64", "--chunks", "1", "-t",
                   str(THREADS), "-ctk", "nsq4", "-ctv", "nsq4", "--plot", str(plot), "--json", str(out)])
    assert rc == 0
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    r = json.loads(out.read_text())
    assert r["sweep_ctx"] == [32, 64] and [x["n_ctx"] for x in r["runs"]] == [32, 64]
    assert all(x["results"][0]["kld_mean"] > 0 for x in r["runs"])


@pytest.mark.parametrize(("args", "message"), [
    (["-ctk", "nsq4", "-ctk", "q4_0", "-ctv", "nsq4"], "2 -ctk and 1 -ctv given: give them in pairs"),
    (["-ctk", "nsq5"], "unknown cache type -ctk nsq5; use one of: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, "
                       "q5_1, nsq4, nsq3, nsq4-uncentered, nsq3-uncentered"),
    (["-ctv", "nsq3-uncentered"], "unknown cache type -ctv nsq3-uncentered; use one of: "),
    ([], "give the cache types to compare with the f16 baseline"),
    (["-ctv", "nsq4", "-fa", "off"], "a quantized V cache (nsq4) requires flash attention: use -fa on"),
    (["-ctv", "nsq3", "-fa", "off"], "a quantized V cache (nsq3) requires flash attention: use -fa on"),
    (["-ctk", "q4_0", "--nsq-calib", "x.gguf"],
     "--nsq-calib centers an nsq4 or nsq3 K cache: add -ctk nsq4 or -ctk nsq3"),
    (["-ctk", "nsq4", "-c", "1000000"], "-c 1000000 needs at least 1000000"),
    (["-ctk", "nsq4", "--sweep-ctx", "64,abc"], "--sweep-ctx '64,abc': give comma-separated token counts"),
])
def test_bad_input_is_a_clear_error(smollm2, wikitext, capsys, args, message):
    rc = ppl.main(["-m", str(smollm2), "-f", str(wikitext), *args])
    assert rc == ppl.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_missing_model_is_named(wikitext, tmp_path, capsys):
    assert ppl.main(["-m", str(tmp_path / "no.gguf"), "-f", str(wikitext), "-ctk", "nsq4"]) == ppl.EXIT_USAGE
    assert f"model file {tmp_path / 'no.gguf'} does not exist" in capsys.readouterr().err
