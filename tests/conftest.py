"""The tests' fixtures; the helpers they share are in helpers.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, WIKITEXT_HEAD, tools_dir


@pytest.fixture(scope="session")
def tool():
    def path(name: str) -> Path:
        p = tools_dir() / name
        if not p.is_file():
            pytest.fail(f"{p} is missing: build the tools with `bash tests/run.sh` (or set NSQ_TOOLS_DIR)")
        return p

    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from nsq_local import models

    try:
        return models.smollm2()
    except models.ModelNotInstalled as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def wikitext() -> Path:
    p = Path(os.environ.get("NSQ_WIKITEXT", WIKITEXT_HEAD))
    if not p.is_file():
        pytest.fail(f"{p} is missing: NSQ_WIKITEXT, when set, must name a text file such as WikiText-2's test split")
    return p


@pytest.fixture(scope="session")
def upstream_tree() -> Path:
    """The patched upstream tree: $NSQ_UPSTREAM_TREE, used as it is, else build/upstream, prepared (tests/run.sh
    prepares it; preparing again is a no-op when it is up to date). Every test that reads or builds the patched
    sources takes it from here."""
    given = os.environ.get("NSQ_UPSTREAM_TREE")
    if given:
        return Path(given).resolve()
    dest = ROOT / "build" / "upstream"
    proc = subprocess.run([sys.executable, str(ROOT / "ggml_patch" / "prepare.py"), "--dest", str(dest)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"preparing the patched tree failed:\n{proc.stderr}")
    return dest


@pytest.fixture(scope="session")
def nsq_calib(smollm2, wikitext, tmp_path_factory) -> Path:
    """nsq-calibrate's K means for SmolLM2, from the second half of the WikiText-2 text: far from the windows the
    tests evaluate (they read the text from its start; the excerpt's second half begins after 12,469 tokens)."""
    from nsq_local import calibrate

    text = wikitext.read_bytes().decode("utf-8", errors="replace")
    out = tmp_path_factory.mktemp("calib") / "smollm2.nsq.gguf"
    return calibrate.calibrate(smollm2, out, text[len(text) // 2:], "wikitext-2 test, second half", n_ctx=512,
                               chunks=2, progress=False)
