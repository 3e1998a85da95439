from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tools_dir() -> Path:
    """The llama.cpp tools built from the same patched tree (tests/run.sh builds them into build/tools/bin)."""
    return Path(os.environ.get("NSQ_TOOLS_DIR", ROOT / "build" / "tools" / "bin"))


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
    p = Path(os.environ.get("NSQ_WIKITEXT", ROOT.parent / "shared" / "data" / "wikitext-2-test.txt"))
    if not p.is_file():
        pytest.fail(f"{p} is missing: set NSQ_WIKITEXT to WikiText-2's test split")
    return p


@pytest.fixture(scope="session")
def upstream_tree() -> Path:
    """The patched upstream tree (prepared by tests/run.sh; preparing again is a no-op when it is up to date)."""
    import subprocess
    import sys

    dest = ROOT / "build" / "upstream"
    proc = subprocess.run([sys.executable, str(ROOT / "ggml_patch" / "prepare.py"), "--dest", str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"preparing the patched tree failed:\n{proc.stderr}")
    return dest


@pytest.fixture(scope="session")
def nsq_calib(smollm2, wikitext, tmp_path_factory) -> Path:
    """nsq-calibrate's K means for SmolLM2, from the second half of WikiText-2 test: far from the windows the tests
    evaluate (they read the text from its start)."""
    from nsq_local import calibrate

    text = wikitext.read_bytes().decode("utf-8", errors="replace")
    out = tmp_path_factory.mktemp("calib") / "smollm2.nsq.gguf"
    return calibrate.calibrate(smollm2, out, text[len(text) // 2:], "wikitext-2 test, second half", n_ctx=512,
                               chunks=2, progress=False)
