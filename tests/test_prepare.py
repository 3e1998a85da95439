"""ggml_patch/prepare.py: pinned, verified, idempotent, and loud when something is off."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

PATCH_DIR = ROOT / "ggml_patch"


def load_prepare(patch_dir: Path = PATCH_DIR):
    spec = importlib.util.spec_from_file_location("nsq_prepare", patch_dir / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sdist() -> Path:
    prep = load_prepare()
    cache = Path(os.environ.get("NSQ_CACHE_DIR", Path.home() / ".cache" / "nsq-local"))
    return prep.locate_sdist(prep.read_pin(), os.environ.get("NSQ_UPSTREAM_SDIST"), cache)


def prepare(patch_dir: Path, *args, python: str = sys.executable,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(patch_dir / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def fresh_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """An empty sdist cache, no sdist given, and no pip or uv configuration but `settings`: what a first install on a
    machine whose index lacks the sdist sees."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "UV_")) and k not in ("UV", "NSQ_UPSTREAM_SDIST")}
    env.update(PIP_CONFIG_FILE=os.devnull, NSQ_CACHE_DIR=str(tmp_path / "cache"), **settings)
    return env


def assert_names_both_ways_out(stderr: str) -> None:
    assert "could not download llama-cpp-python==0.3.36 (sdist) with pip:" in stderr
    assert "ERROR: No matching distribution found for llama-cpp-python==0.3.36" in stderr, "pip's own message"
    assert "check the network and the package index pip is configured with (`pip config list`" in stderr
    assert "pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36" in stderr
    assert "NSQ_UPSTREAM_SDIST=$PWD/llama_cpp_python-0.3.36.tar.gz pip install ." in stderr


def test_prepares_once_and_is_idempotent(sdist, tmp_path):
    dest = tmp_path / "tree"
    first = prepare(PATCH_DIR, "--dest", dest, "--sdist", sdist)
    assert first.returncode == 0, first.stderr
    assert "prepared llama-cpp-python 0.3.36 + " in first.stderr
    assert "GGML_TYPE_NSQ4" in (dest / "vendor/llama.cpp/ggml/include/ggml.h").read_text()
    marker = dest / "marker"
    marker.write_text("kept")
    second = prepare(PATCH_DIR, "--dest", dest, "--sdist", sdist)
    assert second.returncode == 0 and "prepared" not in second.stderr
    assert marker.exists(), "an up-to-date tree must not be re-created"


def test_wrong_sha256_is_refused(tmp_path):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the published sdist")
    proc = prepare(PATCH_DIR, "--dest", tmp_path / "tree", "--sdist", fake)
    assert proc.returncode == 1
    assert "ggml_patch/UPSTREAM pins 832db0699007f1be" in proc.stderr and "fetch it again" in proc.stderr
    assert not (tmp_path / "tree").exists()


def test_missing_sdist_names_the_fix(tmp_path):
    proc = prepare(PATCH_DIR, "--dest", tmp_path / "tree", "--sdist", tmp_path / "nowhere.tar.gz")
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "pip download --no-deps --no-binary llama-cpp-python" in proc.stderr


def test_patch_that_does_not_apply_is_named(sdist, tmp_path):
    patch_dir = tmp_path / "ggml_patch"
    shutil.copytree(PATCH_DIR, patch_dir)
    # the first patch once more, at the end: its hunks no longer match the tree it would be applied to
    first = load_prepare().read_series()[0]
    (patch_dir / "9999-broken.patch").write_text(first.read_text())
    (patch_dir / "series").write_text((patch_dir / "series").read_text() + "9999-broken.patch\n")
    proc = prepare(patch_dir, "--dest", tmp_path / "tree", "--sdist", sdist)
    assert proc.returncode == 1
    assert "patch 9999-broken.patch does not apply to llama-cpp-python 0.3.36" in proc.stderr
    assert "Regenerate it as described in ggml_patch/README.md" in proc.stderr
    assert not (tmp_path / "tree").exists()


# the fields each patch's header has, in this order (DEP-3 style; continuation lines start with a space)
HEADER_FIELDS = ["Description", "Upstream-Candidate", "Author", "Forwarded", "Last-Update"]


def test_patches_are_a_header_then_small_context_git_diffs():
    """Each patch opens with its header (what, why, whether it could go upstream), then git diffs; no patch adds a
    URL."""
    for name in load_prepare().read_series():
        text = name.read_text()
        head, sep, diff = text.partition("\ndiff --git a/")
        assert sep, name
        fields = [ln.split(":", 1)[0] for ln in head.splitlines() if ln and not ln.startswith(" ")]
        assert fields == HEADER_FIELDS, (name.name, fields)
        assert len(head.split("\n", 1)[0]) > len("Description: ") + 10, name.name
        added = [ln for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        assert not [ln for ln in added if "://" in ln], f"{name.name} adds a URL"


def test_work_tree_commits_regenerate_the_patches_byte_for_byte(sdist, tmp_path):
    """prepare.py --commits puts each patch's header into its commit message and regen.sh writes the patches back from
    the commits: the round trip that editing the series relies on changes nothing. A commit without a header is
    refused by regen.sh (the negative case)."""
    patch_dir = tmp_path / "ggml_patch"
    shutil.copytree(PATCH_DIR, patch_dir)
    tree = tmp_path / "wt"
    assert prepare(patch_dir, "--commits", "--dest", tree, "--sdist", sdist).returncode == 0
    for p in patch_dir.glob("*.patch"):
        p.write_text("")
    proc = subprocess.run(["bash", str(patch_dir / "regen.sh"), str(tree)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in load_prepare().read_series():
        assert (patch_dir / name.name).read_text() == name.read_text(), name.name
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "0099-no-header.patch"], check=True)
    proc = subprocess.run(["bash", str(patch_dir / "regen.sh"), str(tree)], capture_output=True, text=True)
    assert proc.returncode != 0 and "its message has no header" in proc.stderr


def test_changed_inputs_rewrite_only_files_that_differ(sdist, tmp_path):
    dest = tmp_path / "tree"
    assert prepare(PATCH_DIR, "--dest", dest, "--sdist", sdist).returncode == 0
    untouched = dest / "vendor/llama.cpp/src/llama.cpp"
    patched = dest / "vendor/llama.cpp/ggml/include/ggml.h"
    os.utime(untouched, (0, 0))
    patched.write_text("edited by hand")
    (dest / "stray.txt").write_text("not in the sdist")
    (dest / ".nsq-prepared").write_text("inputs of an older series\n")  # as if a patch had changed
    proc = prepare(PATCH_DIR, "--dest", dest, "--sdist", sdist)
    assert proc.returncode == 0, proc.stderr
    assert untouched.stat().st_mtime == 0, "an unchanged file must keep its time stamp (incremental builds)"
    assert "GGML_TYPE_NSQ4" in patched.read_text()
    assert not (dest / "stray.txt").exists()


def test_download_failure_shows_pip_and_both_ways_out(tmp_path):
    links = tmp_path / "no-packages-here"
    links.mkdir()
    env = fresh_env(tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links))
    proc = prepare(PATCH_DIR, "--dest", tmp_path / "tree", env=env)
    assert proc.returncode == 1
    assert "downloading llama-cpp-python==0.3.36 (sdist) with pip" in proc.stderr
    assert f"Looking in links: {links}" in proc.stderr, "where pip looked"
    assert_names_both_ways_out(proc.stderr)
    assert "under uv" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "tree").exists() and not list((tmp_path / "cache").iterdir())


def test_uv_index_settings_reach_pip(tmp_path):
    default, extra, links = (tmp_path / name for name in ("default-index", "extra-index", "links"))
    for d in (default, extra, links):
        d.mkdir()
    # uv sets $UV in the build backends it runs; its index settings then have to reach the pip that prepare.py runs
    env = fresh_env(tmp_path, UV="uv", UV_DEFAULT_INDEX=default.as_uri(),
                    UV_INDEX=f"mine={extra.as_uri()}", UV_FIND_LINKS=f"{links},{links}")
    proc = prepare(PATCH_DIR, "--dest", tmp_path / "tree", env=env)
    assert proc.returncode == 1
    assert f"Looking in indexes: {default.as_uri()}, {extra.as_uri()}" in proc.stderr
    assert f"Looking in links: {links}, {links}" in proc.stderr
    assert_names_both_ways_out(proc.stderr)
    assert "under uv, UV_DEFAULT_INDEX" in proc.stderr and "uv.toml" in proc.stderr


def test_uv_settings_are_left_to_uv_outside_it():
    prep = load_prepare()
    pip_config = {"PIP_INDEX_URL": "file:///pip", "PIP_FIND_LINKS": "/pip"}
    uv_config = {"UV_DEFAULT_INDEX": "file:///uv", "UV_FIND_LINKS": "/uv,/uv2", "UV_EXTRA_INDEX_URL": "file:///x"}
    assert prep.pip_environment({**pip_config, **uv_config}) == {**pip_config, **uv_config}
    under_uv = prep.pip_environment({"UV": "uv", **pip_config, **uv_config})
    assert under_uv["PIP_INDEX_URL"] == "file:///uv" and under_uv["PIP_FIND_LINKS"] == "/pip /uv /uv2"
    assert under_uv["PIP_EXTRA_INDEX_URL"] == "file:///x"


def test_missing_pip_names_the_fix(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    proc = prepare(PATCH_DIR, "--dest", tmp_path / "tree", python=str(python), env=fresh_env(tmp_path))
    assert proc.returncode == 1
    assert f"pip is not installed for {python}" in proc.stderr and "-m ensurepip" in proc.stderr
    assert "pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36" in proc.stderr
