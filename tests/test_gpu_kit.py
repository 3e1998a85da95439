"""bench/gpu_kit.py: the kit fits what one call to the GPU machine carries, and holds what the device run reads.

The dry run (`python3 bench/gpu_kit.py --dry-run DIR`: both parts with the network cut and a CPU build) takes longer
than CI's budget allows beside the rest; docs/testing.md has its last result and time."""
from __future__ import annotations

import hashlib
import json
import sys
import tarfile

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_kit  # noqa: E402


def test_kit_parts_fit_a_call_and_hold_the_model_and_sources(smollm2, upstream_tree, tmp_path, capsys):
    kit = tmp_path / "kit"
    assert gpu_kit.prepare(kit) == 0
    printed = capsys.readouterr().out
    for part in ("1", "2"):
        size = gpu_kit.tree_size(kit / part)
        assert 0 < size <= gpu_kit.KIT_LIMIT, f"part {part}: {gpu_kit.mib(size)}"
        assert f"part {part}: {gpu_kit.mib(size)}" in printed
    # the device commands, one per part, each carrying its own part
    for i, (cmd, carry) in enumerate(gpu_kit.commands(kit), 1):
        assert f"run --kit {kit}/{i} --out $OUT" in cmd and carry == [f"{kit}/{i}"]
        assert len(cmd) <= 2000

    manifest = json.loads((kit / "2" / "manifest.json").read_text())
    whole = (kit / "1" / "model.1").read_bytes() + (kit / "2" / "model.2").read_bytes()
    assert whole == smollm2.read_bytes()
    assert hashlib.sha256(whole).hexdigest() == manifest["sha256"] and manifest["model"] == smollm2.name
    assert (kit / "2" / "calibration" / manifest["calibration"]).is_file()
    assert list((kit / "1" / "wheels").glob("diskcache-*.whl"))

    with tarfile.open(kit / "1" / "src.tar.xz") as tar:
        names = set(tar.getnames())
    llama = "vendor/llama.cpp/"
    # what the build and the Python side need, with the NSQ patches applied
    for need in ("CMakeLists.txt", "ggml/src/ggml-cuda/nsq4.cuh", "ggml/src/ggml-cuda/nsq3.cuh",
                 "ggml/src/ggml-cpu/ops.cpp", "tests/test-backend-ops.cpp", "tools/perplexity/perplexity.cpp",
                 "tools/llama-bench/llama-bench.cpp", "gguf-py/gguf/__init__.py"):
        assert llama + need in names, need
    assert "llama_cpp/llama_cpp.py" in names
    # and not what no target reads
    assert not any(n.startswith((llama + "models/", llama + "docs/", llama + "ggml/src/ggml-vulkan/")) for n in names)


def test_trim_keeps_upstream_sources_and_drops_the_rest():
    assert not gpu_kit.trimmed("vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu")
    assert not gpu_kit.trimmed("llama_cpp/llama.py")
    assert gpu_kit.trimmed("vendor/llama.cpp/ggml/src/ggml-metal/ggml-metal.cpp")
    assert gpu_kit.trimmed("vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf")
    assert gpu_kit.trimmed("docs/index.md")  # llama-cpp-python's own docs
