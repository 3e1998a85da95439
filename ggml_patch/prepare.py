#!/usr/bin/env python3
"""Prepare the patched upstream tree: fetch the pinned llama-cpp-python sdist, verify it, unpack it, apply `series`.

    python ggml_patch/prepare.py --dest build/upstream            # fetches the sdist with pip, by package name
    python ggml_patch/prepare.py --dest DIR --sdist PATH.tar.gz   # offline, from an sdist you downloaded
    NSQ_UPSTREAM_SDIST=PATH.tar.gz pip install .                  # offline, through the wheel build

Idempotent: a tree already prepared from the same sdist and patches is left alone. After a change to UPSTREAM,
series or a patch, the tree is prepared afresh and only the files that differ are written into it, so builds of it
stay incremental.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Mapping

HERE = Path(__file__).resolve().parent
STAMP = ".nsq-prepared"


class PrepareError(RuntimeError):
    pass


def read_pin() -> dict[str, str]:
    pin = {}
    for line in (HERE / "UPSTREAM").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    return pin


def read_series() -> list[Path]:
    names = [ln.strip() for ln in (HERE / "series").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    missing = [n for n in names if not (HERE / n).is_file()]
    if missing:
        raise PrepareError(f"ggml_patch/series names patches that do not exist: {', '.join(missing)}")
    return [HERE / n for n in names]


def header(patch: Path) -> str:
    """A patch's header: what precedes its first diff (DEP-3 style fields: what, why, whether it could go upstream)."""
    text = patch.read_text()
    return text[:text.find("diff --git ")].strip() + "\n"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp_of(pin: dict[str, str], patches: list[Path]) -> str:
    h = hashlib.sha256((HERE / "UPSTREAM").read_bytes())
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def sdist_name(pin: dict[str, str]) -> str:
    return f"{pin['package'].replace('-', '_')}-{pin['version']}.tar.gz"


# the build backend of llama-cpp-python's sdist: pip needs it to read the sdist's metadata
UPSTREAM_BACKEND = "scikit_build_core"
# uv does not read pip's configuration, and pip does not read uv's: under uv ($UV names the uv binary in the build
# backends it runs), the indexes the user gave uv through its environment are passed on to pip as pip's own
UV_INDEX_NAME = re.compile(r"^[A-Za-z0-9._-]+=")  # UV_INDEX entries may be name=url


def pip_environment(environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    if not env.get("UV"):
        return env
    default = env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL")
    if default:
        env["PIP_INDEX_URL"] = default
    extra = [UV_INDEX_NAME.sub("", url)
             for key in ("UV_INDEX", "UV_EXTRA_INDEX_URL") for url in env.get(key, "").split()]
    links = [loc.strip() for loc in env.get("UV_FIND_LINKS", "").split(",") if loc.strip()]
    for key, values in (("PIP_EXTRA_INDEX_URL", extra), ("PIP_FIND_LINKS", links)):
        if values:
            env[key] = " ".join([env[key], *values] if env.get(key) else values)
    return env


def pip_message(proc: subprocess.CompletedProcess, keep: int = 8) -> str:
    """Where pip looked (its stdout says it) and the end of what it reported, indented under our error."""
    looked = [ln for ln in proc.stdout.splitlines() if ln.startswith("Looking in ")]
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-keep:]
    return "\n".join("  " + ln[:400] for ln in looked + tail) or "  (pip printed nothing)"


def download_sdist(pin: dict[str, str], cache: Path) -> None:
    requirement = f"{pin['package']}=={pin['version']}"
    by_hand = ("download the sdist where a package index is reachable and point NSQ_UPSTREAM_SDIST (or --sdist) "
               "at it:\n"
               f"      pip download --no-deps --no-binary {pin['package']} {requirement}\n"
               f"      NSQ_UPSTREAM_SDIST=$PWD/{sdist_name(pin)} pip install .")
    if importlib.util.find_spec("pip") is None:
        raise PrepareError(f"pip is not installed for {sys.executable}, and it fetches the upstream sdist. Either:\n"
                           f"  - install it: {sys.executable} -m ensurepip\n  - or {by_hand}")
    print(f"nsq-local: downloading {requirement} (sdist) with pip", file=sys.stderr)
    # pip only reads the sdist's metadata, but needs the build backend for that: the one already here (a wheel build
    # of nsq-local has it), else pip installs it into an isolated environment, as a plain `pip download` does
    isolation = [] if importlib.util.find_spec(UPSTREAM_BACKEND) is None else ["--no-build-isolation"]
    # --no-input: the output is captured, so a prompt (e.g. for an index's password) would hang the build unseen
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", *isolation,
           "--no-binary", pin["package"], requirement, "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=pip_environment(os.environ))
    if proc.returncode != 0 or not (cache / sdist_name(pin)).is_file():
        uv_note = ("\n    (under uv, UV_DEFAULT_INDEX, UV_INDEX_URL, UV_INDEX, UV_EXTRA_INDEX_URL and UV_FIND_LINKS "
                   "reach pip; uv.toml and uv's command-line options do not)" if os.environ.get("UV") else "")
        raise PrepareError(f"could not download {requirement} (sdist) with pip:\n{pip_message(proc)}\nEither:\n"
                           "  - check the network and the package index pip is configured with (`pip config list`, "
                           f"PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS), then build again{uv_note}\n"
                           f"  - or {by_hand}")


def locate_sdist(pin: dict[str, str], explicit: str | None, cache: Path) -> Path:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise PrepareError(f"upstream sdist {path} does not exist (from --sdist or NSQ_UPSTREAM_SDIST); "
                               f"download it with: pip download --no-deps --no-binary {pin['package']} "
                               f"{pin['package']}=={pin['version']}")
        return path
    cached = cache / sdist_name(pin)
    if cached.is_file() and sha256(cached) == pin["sha256"]:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    download_sdist(pin, cache)
    return cached


def git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise PrepareError("git is required to apply the patch series (install git)") from None


def commit(root: Path, message: str) -> None:
    git(["add", "-A", "-f", "."], root)
    proc = git(["-c", "user.name=nsq-local", "-c", "user.email=nsq-local@localhost",
                "commit", "-q", "--no-verify", "-m", message], root)
    if proc.returncode != 0:
        raise PrepareError(f"git commit failed in {root}: {proc.stderr.strip()}")


def sync(new: Path, dest: Path) -> None:
    """Make dest's sources equal to new's, touching only files that differ, so builds stay incremental."""
    skip = {".git", STAMP}
    new_files = {p.relative_to(new) for p in new.rglob("*") if p.is_file() and p.relative_to(new).parts[0] not in skip}
    for rel in sorted(new_files):
        src, dst = new / rel, dest / rel
        if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for p in dest.rglob("*"):
        rel = p.relative_to(dest)
        # llama-cpp-python's CMakeLists installs the built libraries into llama_cpp/lib of the source tree
        if p.is_file() and rel not in new_files and rel.parts[0] not in skip and rel.parts[:2] != ("llama_cpp", "lib"):
            p.unlink()


def prepare(dest: Path, explicit_sdist: str | None, cache: Path, commits: bool = False) -> Path:
    pin = read_pin()
    patches = read_series()
    stamp = stamp_of(pin, patches)
    if not commits and (dest / STAMP).is_file() and (dest / STAMP).read_text().strip() == stamp:
        return dest

    sdist = locate_sdist(pin, explicit_sdist, cache)
    digest = sha256(sdist)
    if digest != pin["sha256"]:
        raise PrepareError(f"{sdist} has sha256 {digest}, but ggml_patch/UPSTREAM pins {pin['sha256']}: "
                           f"it is not {pin['package']} {pin['version']} as published. Delete it and fetch it again.")

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".nsq-upstream-", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(work, **safe)
        (root,) = [p for p in work.iterdir() if p.is_dir()]
        # the sdist ships stray .git folders; a fresh repository makes `git apply` use this tree's paths
        for stray in (root / ".git", root / "vendor" / "llama.cpp" / ".git"):
            shutil.rmtree(stray, ignore_errors=True)
        git(["init", "-q"], root)
        if commits:
            commit(root, f"{pin['package']} {pin['version']} sdist")
        for patch in patches:
            proc = git(["apply", "--whitespace=nowarn", str(patch)], root)
            if proc.returncode != 0:
                raise PrepareError(f"patch {patch.name} does not apply to {pin['package']} {pin['version']}:\n"
                                   f"{proc.stderr.strip()}\nRegenerate it as described in ggml_patch/README.md.")
            if commits:
                commit(root, f"{patch.name}\n\n{header(patch)}")
        (root / ".git" / "info" / "exclude").write_text(STAMP + "\n")
        if dest.is_dir() and (dest / STAMP).is_file() and not commits:
            sync(root, dest)
        else:
            if dest.exists():
                shutil.rmtree(dest)
            root.rename(dest)
        (dest / STAMP).write_text(stamp + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"nsq-local: prepared {pin['package']} {pin['version']} + {len(patches)} patches in {dest}", file=sys.stderr)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", required=True, type=Path, help="where the patched tree goes")
    ap.add_argument("--sdist", default=os.environ.get("NSQ_UPSTREAM_SDIST"),
                    help="an already downloaded sdist (default: $NSQ_UPSTREAM_SDIST, else download with pip)")
    ap.add_argument("--cache", type=Path,
                    default=Path(os.environ.get("NSQ_CACHE_DIR", Path.home() / ".cache" / "nsq-local")),
                    help="where a downloaded sdist is kept (default: $NSQ_CACHE_DIR or ~/.cache/nsq-local)")
    ap.add_argument("--commits", action="store_true",
                    help="commit the pristine sdist and then each patch: a work tree to edit and regenerate patches "
                         "from (see ggml_patch/README.md)")
    args = ap.parse_args(argv)
    try:
        prepare(args.dest.resolve(), args.sdist, args.cache, args.commits)
    except PrepareError as e:
        print(f"nsq-local: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
