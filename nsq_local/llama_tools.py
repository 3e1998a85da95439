"""llama.cpp's llama-server, llama-cli and llama-perplexity, as installed with nsq-local.

The wheel builds them from the same patched tree as the `llama_cpp` package (CMakeLists.txt, NSQ_LLAMA_TOOLS) and
keeps them in llama_cpp/bin, beside the libraries they link in llama_cpp/lib. These entry points put them on the
environment's PATH: each replaces itself with the program (POSIX) or runs it and returns its exit status (Windows).
"""
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path


def program(name: str) -> Path:
    """The path of llama.cpp's program `name` inside the installed llama_cpp package (it may be missing)."""
    spec = find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise SystemExit(f"{name}: the llama_cpp package is not installed: reinstall nsq-local (pip install .)")
    return Path(spec.origin).parent / "bin" / (name + (".exe" if os.name == "nt" else ""))


def run(name: str) -> None:
    exe = program(name)
    if not exe.is_file():
        raise SystemExit(f"{name}: not installed with this nsq-local ({exe} is missing): it was built with "
                         f"NSQ_LLAMA_TOOLS=OFF; reinstall without that option (pip install .) to get {name}")
    args = [str(exe), *sys.argv[1:]]
    if os.name == "nt":
        # Windows has no RPATH: the DLLs in llama_cpp/lib are found through PATH
        env = dict(os.environ, PATH=str(exe.parent.parent / "lib") + os.pathsep + os.environ.get("PATH", ""))
        raise SystemExit(subprocess.call(args, env=env))
    os.execv(exe, args)


def server() -> None:
    run("llama-server")


def cli() -> None:
    run("llama-cli")


def perplexity() -> None:
    run("llama-perplexity")
