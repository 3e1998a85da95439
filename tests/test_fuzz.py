"""Fuzzing the NSQ4 quantizers (tests/fuzz/nsq4_fuzz.py): the committed corpus as regression tests, then a bounded
atheris run seeded with it.

The numpy reference, ggml's quantize_row_nsq4_ref and the CPU backend's from_float (SIMD where built) must agree
bit for bit on every input, with d finite and no NaN or Inf after dequantization.
"""
from __future__ import annotations

import importlib.util
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, missing_tool

FUZZ_DIR = ROOT / "tests" / "fuzz"
CORPUS = FUZZ_DIR / "corpus"
FUZZ_SECONDS = int(os.environ.get("NSQ_FUZZ_SECONDS", "60"))

sys.path.insert(0, str(FUZZ_DIR))
import nsq4_fuzz  # noqa: E402

CORPUS_FILES = sorted(CORPUS.iterdir())


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.name for p in CORPUS_FILES])
def test_corpus_input(path: Path):
    nsq4_fuzz.test_one_input(path.read_bytes())


def test_corpus_covers_every_input_mode_and_the_special_values():
    """The corpus stays a meaningful regression set: every mode of blocks_from_bytes, and the values the issue
    names (NaN, +-Inf, zeros, denormals, beyond fp16, one huge channel among tiny ones)."""
    data = [p.read_bytes() for p in CORPUS_FILES]
    assert {(d[0] & 0x7F) % 5 for d in data} == set(range(5))
    x = np.concatenate([nsq4_fuzz.blocks_from_bytes(d) for d in data])
    blocks = x.reshape(-1, nsq4_fuzz.QK)
    finite = np.isfinite(blocks).all(axis=1)
    assert np.isnan(x).any() and np.isposinf(x).any() and np.isneginf(x).any()
    ax = np.abs(blocks[finite]).astype(np.float64)
    assert (ax.max(axis=1) == 0).any()
    assert ((ax > 0) & (ax < np.finfo(np.float32).smallest_normal)).any()
    assert (ax.max(axis=1) > 65504).any()
    assert (ax.max(axis=1) / np.maximum(np.median(ax, axis=1), 1e-300) > 1e20).any()


def test_bounded_fuzz_run(tmp_path):
    if importlib.util.find_spec("atheris") is None:
        missing_tool("atheris is not installed", "atheris (pip install atheris)")
    work = tmp_path / "corpus"
    shutil.copytree(CORPUS, work)  # libFuzzer adds the inputs it finds to the first directory: not the repository's
    # libFuzzer's RSS limit reads the process's peak RSS, which Linux carries across fork and exec: the harness starts
    # with this test process's peak (models loaded by earlier tests), so the limit is 2 GB above that
    rss_limit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 + 2048
    proc = subprocess.run([sys.executable, str(FUZZ_DIR / "nsq4_fuzz.py"), f"-max_total_time={FUZZ_SECONDS}",
                           f"-rss_limit_mb={rss_limit}", "-malloc_limit_mb=2048", f"-artifact_prefix={tmp_path}/",
                           "-print_final_stats=1", str(work)],
                          capture_output=True, text=True, timeout=FUZZ_SECONDS + 300, cwd=tmp_path)
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("oom-*")) + sorted(tmp_path.glob("timeout-*"))
    assert proc.returncode == 0 and not crashes, (
        f"the fuzzer failed ({proc.returncode}); reproduce with `python tests/fuzz/nsq4_fuzz.py {crashes}` and add "
        f"the input to tests/fuzz/corpus/:\n{proc.stderr[-6000:]}")
    runs = re.search(r"Done (\d+) runs in (\d+) second", proc.stderr)
    assert runs, proc.stderr[-3000:]
    print(f"fuzzed {runs.group(1)} inputs in {runs.group(2)} s")
    assert int(runs.group(1)) > 10 * FUZZ_SECONDS  # a fuzzer that barely ran has checked nothing
