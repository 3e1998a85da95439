from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
# shipped so that a clone runs the tests as it is (tests/data/README.md: source, license, how it was cut);
# NSQ_WIKITEXT overrides it
WIKITEXT_HEAD = ROOT / "tests" / "data" / "wikitext-2-test-head.txt"


def missing_tool(what: str, install: str) -> NoReturn:
    """Skips a test whose optional tool is not installed. CI sets NSQ_REQUIRE_ALL_TOOLS=1, which makes it a failure
    instead, so that a CI machine that lost a tool cannot pass by skipping what needs it."""
    message = f"{what}: install {install}"
    if os.environ.get("NSQ_REQUIRE_ALL_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_tool(program: str, install: str) -> str:
    """The path of an optional program, or missing_tool's skip naming the package that provides it."""
    path = shutil.which(program)
    if path is None:
        missing_tool(f"{program} is not on PATH", install)
    return path


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
    p = Path(os.environ.get("NSQ_WIKITEXT", WIKITEXT_HEAD))
    if not p.is_file():
        pytest.fail(f"{p} is missing: NSQ_WIKITEXT, when set, must name a text file such as WikiText-2's test split")
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
    """nsq-calibrate's K means for SmolLM2, from the second half of the WikiText-2 text: far from the windows the
    tests evaluate (they read the text from its start; the excerpt's second half begins after 12,469 tokens)."""
    from nsq_local import calibrate

    text = wikitext.read_bytes().decode("utf-8", errors="replace")
    out = tmp_path_factory.mktemp("calib") / "smollm2.nsq.gguf"
    return calibrate.calibrate(smollm2, out, text[len(text) // 2:], "wikitext-2 test, second half", n_ctx=512,
                               chunks=2, progress=False)
