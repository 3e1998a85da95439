"""NSQ4 and NSQ3 on ggml-vulkan (patch ggml-vulkan-nsq), run on Mesa's lavapipe: a conformant Vulkan device on the
CPU, so that CI runs the GPU half of the code (the cache in device memory, set_rows and the centering ops on the
device, a state read back from it) without a GPU. Its speed says nothing about a GPU's; these tests judge results.

The tools are build/tools', which tests/run.sh configures with the Vulkan backend where glslc and the Vulkan headers
are installed (.ci/run installs Debian's `glslc libvulkan-dev mesa-vulkan-drivers`). ggml-vulkan skips a CPU-type
device such as lavapipe unless GGML_VK_VISIBLE_DEVICES names it, which only these tests do: the other tests run the
same tools on the CPU alone.

Without glslc, only the checks on the shader sources run; without the Vulkan tools or a Vulkan device, the rest skip
(CI makes that a failure).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import missing_tool, pinned_sdist, require_tool, tools_dir

SHADERS = "vendor/llama.cpp/ggml/src/ggml-vulkan/vulkan-shaders"
VK_ENV = {"GGML_VK_VISIBLE_DEVICES": "0"}


@pytest.fixture(scope="module")
def vk_tool(tool):
    if not (tools_dir() / "libggml-vulkan.so").is_file():
        missing_tool(f"{tools_dir()} has no Vulkan backend (tests/run.sh adds it where glslc and the Vulkan headers "
                     "are installed)", "glslc libvulkan-dev mesa-vulkan-drivers (Debian/Ubuntu), then `bash tests/run.sh`")
    return tool


@pytest.fixture(scope="module")
def vulkan0(vk_tool) -> str:
    """The name of the Vulkan device the tests run on, after checking there is one."""
    proc = subprocess.run([str(vk_tool("test-backend-ops")), "-b", "Vulkan0", "-o", "NONE", "test"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **VK_ENV})
    m = re.search(r"Backend \d+/\d+: Vulkan0\s+Device description: (.*)", proc.stdout)
    if m is None or "Skipping" in proc.stdout.split("Vulkan0", 1)[1].split("Backend", 1)[0]:
        missing_tool(f"no Vulkan device:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}",
                     "mesa-vulkan-drivers (lavapipe) or a GPU driver")
    return m.group(1).strip()


# --- the shader sources ------------------------------------------------------------------------------------------------
def common_table(tree: Path, name: str) -> list[int]:
    text = (tree / "vendor/llama.cpp/ggml/src/ggml-common.h").read_text()
    body = re.search(rf"GGML_TABLE_BEGIN\(\w+, {name}, \d+\)(.*?)GGML_TABLE_END", text, re.S).group(1)
    return [int(v) for v in re.findall(r"-?\d+", body)]


def shader_table(text: str, name: str, offset: int) -> list[int]:
    words = re.search(rf"const uvec\d {name} = uvec\d\(([^)]*)\)", text).group(1)
    return [((int(w.rstrip("u"), 16) >> (8 * i)) & 0xff) - offset
            for w in words.split(",") for i in range(4)]


def test_shader_tables_are_ggml_commons(upstream_tree):
    text = (upstream_tree / SHADERS / "nsq.glsl").read_text()
    assert shader_table(text, "nsq4_values_b", 128) == common_table(upstream_tree, "kvalues_nsq4")
    assert shader_table(text, "nsq4_scales_b", 0) == common_table(upstream_tree, "kscales_nsq4")
    assert shader_table(text, "nsq3_values_b", 128) == common_table(upstream_tree, "kvalues_nsq3")
    assert shader_table(text, "nsq3_scales_b", 0) == common_table(upstream_tree, "kscales_nsq3")


def preprocess_all(shaders: Path, work: Path, glslc: str) -> dict[str, bytes]:
    """Every shader variant vulkan-shaders-gen (built from `shaders`) makes, as the source glslc compiles: the gen
    runs with a glslc that only preprocesses (-E, without -O), and #line markers, which carry file names and line
    numbers but no code, are dropped."""
    work.mkdir(parents=True)
    gen = work / "vulkan-shaders-gen"
    subprocess.run(["g++", "-std=c++17", "-O0", "-pthread", "-o", str(gen), str(shaders / "vulkan-shaders-gen.cpp")],
                   check=True, capture_output=True, timeout=600)
    wrapper = work / "glslc-E"
    wrapper.write_text('#!/bin/sh\nfor a; do shift; [ "$a" = -O ] || set -- "$@" "$a"; done\n'
                       f'exec "{glslc}" "$@" -E\n')
    wrapper.chmod(0o755)
    out = work / "out"
    out.mkdir()
    for comp in sorted(shaders.glob("*.comp")):
        subprocess.run([str(gen), "--glslc", str(wrapper), "--source", str(comp), "--output-dir", str(out),
                        "--target-hpp", str(work / "shaders.hpp"), "--target-cpp", str(work / f"{comp.name}.cpp")],
                       check=True, capture_output=True, timeout=600)
    return {p.stem: b"\n".join(line for line in p.read_bytes().splitlines() if line and not line.startswith(b"#line"))
            for p in out.glob("*.spv")}


def test_upstream_shaders_are_unchanged(upstream_tree, tmp_path):
    """Every shader variant of the pristine tree is, after preprocessing, byte for byte what the patched tree gives
    it; the patched tree adds the NSQ variants and nothing else. (The NSQ code sits behind DATA_A_NSQ4, DATA_A_NSQ3
    and FA_NSQ, which only the NSQ variants define.)"""
    glslc = require_tool("glslc", "glslc (Debian/Ubuntu: apt-get install glslc)")
    sdist = pinned_sdist()
    pristine_dir = tmp_path / "pristine"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if f"/{SHADERS}/" in m.name and m.isfile()]
        tar.extractall(pristine_dir, members=members, filter="data")
    (pristine_shaders,) = {p.parent for p in pristine_dir.rglob("vulkan-shaders-gen.cpp")}

    pristine = preprocess_all(pristine_shaders, tmp_path / "gen-pristine", glslc)
    patched = preprocess_all(upstream_tree / SHADERS, tmp_path / "gen-patched", glslc)
    assert len(pristine) > 500
    changed = [name for name in pristine if patched.get(name) != pristine[name]]
    assert not changed, f"upstream shader variants changed by the patches: {changed[:20]}"
    added = sorted(set(patched) - set(pristine))
    assert added and all("nsq" in name for name in added), added
    print(f"{len(pristine)} upstream variants unchanged; added: {' '.join(added)}")


# --- the ops on the device, against the CPU ----------------------------------------------------------------------------
# test-backend-ops compares each op on Vulkan0 with the CPU backend. Cases the patch leaves to the CPU, by design:
# f16/bf16 -> NSQ copies (no upstream quant type has them on Vulkan either; the KV cache stores f32 rows) and
# non-contiguous NSQ -> NSQ copies.
UNSUPPORTED_BY_DESIGN = re.compile(r"CPY\(type_src=(f16|bf16),type_dst=nsq[34],|CPY\(type_src=nsq([34]),type_dst=nsq\2,")


def backend_ops(vk_tool, op: str, pattern: str, timeout: int = 1800) -> tuple[int, list[str]]:
    proc = subprocess.run([str(vk_tool("test-backend-ops")), "test", "-b", "Vulkan0", "-o", op, "-p", pattern],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **VK_ENV})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FAIL" not in out, out[-4000:]
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    assert m and m.group(1) == m.group(2), out[-4000:]
    unsupported = [line.strip() for line in out.splitlines() if "not supported [Vulkan0]" in line]
    return int(m.group(1)), unsupported


@pytest.mark.parametrize("op", ["SET_ROWS", "GET_ROWS", "CPY"])
def test_store_and_read_ops_match_the_cpu(vulkan0, vk_tool, op):
    passed, unsupported = backend_ops(vk_tool, op, "nsq")
    assert passed > 0
    assert all(UNSUPPORTED_BY_DESIGN.search(line) for line in unsupported), unsupported
    print(f"{op}: {passed} NSQ cases pass on {vulkan0}, {len(unsupported)} left to the CPU")


# lavapipe compiles each flash-attention pipeline with LLVM, taking seconds for one row and no GQA, and minutes for
# grouped-query pipelines or 32 rows at head size 128 or 256 (the 16 grouped-query cases of 1 and 32 rows at 64 and
# 128: 522 s on 2 cores). CI runs the three K/V pairs in decode (one row) at head sizes 64, 128 and 256 and in
# prefill (32 rows) at 64. NSQ_VULKAN_FULL=1 runs every NSQ case test-backend-ops has (726) and nsq-selftest below.
FULL = os.environ.get("NSQ_VULKAN_FULL") == "1"
FA_CASES = (r"hsk={hs},hsv=\d+,nh=4,nr23=\[1,1\],kv=512,nb={nb},mask=1,sinks=0,max_bias=0.000000,"
            r"logit_softcap=0.000000,prec=f32,type_K=nsq[34],type_V=nsq[34],permute=\[0,1,2,3\],kv_view=1")


def test_flash_attention_matches_the_cpu(vulkan0, vk_tool):
    if FULL:
        passed, unsupported = backend_ops(vk_tool, "FLASH_ATTN_EXT", "type_K=nsq", timeout=6000)
    else:
        passed, unsupported = backend_ops(vk_tool, "FLASH_ATTN_EXT", FA_CASES.format(hs="64", nb="(1|32)"))
        decode, more = backend_ops(vk_tool, "FLASH_ATTN_EXT", FA_CASES.format(hs="(128|256)", nb="1"))
        passed, unsupported = passed + decode, unsupported + more
        assert passed >= 3 * 4  # the three pairs at 64 x (1, 32 rows), 128 x 1 and 256 x 1
    assert not unsupported, unsupported
    print(f"FLASH_ATTN_EXT: {passed} NSQ cases pass on {vulkan0}")


# --- nsq-selftest on the device ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not FULL, reason="NSQ_VULKAN_FULL=1: its flash-attention cases take lavapipe about 10 minutes")
def test_selftest_passes_on_vulkan(vulkan0, vk_tool, smollm2, tmp_path):
    """nsq-selftest with the Vulkan build's libraries: set_rows and cpy f32 -> nsq4/nsq3 on the device give the
    reference's blocks bit for bit, get_rows and cpy back its values exactly, its flash-attention cases hold their
    bounds, and the KLD window runs with every layer and the cache on the device."""
    out = tmp_path / "report.json"
    env = {**os.environ, **VK_ENV, "LLAMA_CPP_LIB_PATH": str(tools_dir())}
    # the CPU's own checks are test_selftest.py's; lavapipe's decode speed says nothing, so the shortest run
    proc = subprocess.run([sys.executable, "-m", "nsq_local.selftest", "--device", "Vulkan0", "-t", "2",
                           "--depth", "64", "--decode-tokens", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=3000, env=env)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [d["name"] for d in report["devices"]]
    assert names == ["Vulkan0"], names
    vk = {c["name"]: c for c in report["checks"] if c["device"] == "Vulkan0"}
    failed = {n: c["detail"] for n, c in vk.items() if c["status"] != "pass"}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:])
    for t in ("nsq4", "nsq3"):
        assert vk[f"set_rows f32 -> {t}"]["figures"]["blocks_differing"] == 0
        assert vk[f"cpy {t} -> f32"]["figures"]["values_differing"] == 0
    kld = vk["KLD window"]["figures"]
    print(f"{vulkan0}: KLD window nsq4 {kld['kld_nsq4']:.4f} nsq3 {kld['kld_nsq3']:.4f} q4_0 {kld['kld_q4_0']:.4f}")


# --- llama-perplexity with every layer on the device -------------------------------------------------------------------
PPL_ARGS = ["-c", "256", "--chunks", "2", "-b", "512", "-fa", "on", "-t", "2", "-lv", "4"]


def mean_kld(out: str) -> float:
    m = re.search(r"Mean\s+KLD:\s+([0-9.]+)", out)
    assert m, out[-3000:]
    return float(m.group(1))


@pytest.fixture(scope="module")
def kld_base(vk_tool, smollm2, wikitext, tmp_path_factory) -> Path:
    """The f16 cache's logits on the CPU, the baseline of every KLD here."""
    base = tmp_path_factory.mktemp("vk-ppl") / "f16.kld"
    subprocess.run([str(vk_tool("llama-perplexity")), "-m", str(smollm2), "-f", str(wikitext), *PPL_ARGS,
                    "--kl-divergence-base", str(base)], check=True, capture_output=True, timeout=900)
    return base


def kld_run(vk_tool, smollm2, wikitext, base: Path, cache: str, device: bool, extra: tuple = ()) -> tuple[float, str]:
    env = {**os.environ, **(VK_ENV if device else {})}
    proc = subprocess.run([str(vk_tool("llama-perplexity")), "-m", str(smollm2), "-f", str(wikitext), *PPL_ARGS,
                           "-ctk", cache, "-ctv", cache, "-ngl", "99" if device else "0", *extra,
                           "--kl-divergence-base", str(base), "--kl-divergence"],
                          capture_output=True, text=True, timeout=1800, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return mean_kld(out), out


@pytest.fixture(scope="module")
def device_noise(vulkan0, vk_tool, smollm2, wikitext, kld_base) -> float:
    """What the device's arithmetic alone moves the logits by: an f16 cache on the device against the same cache on
    the CPU (the device's attention and matrix products round differently, in fp16 where the device has it)."""
    kld, _ = kld_run(vk_tool, smollm2, wikitext, kld_base, "f16", True)
    return kld


@pytest.mark.parametrize("cache,centered", [("nsq4", False), ("nsq3", True)])
def test_perplexity_on_the_device_matches_the_cpu(vulkan0, vk_tool, smollm2, wikitext, kld_base, device_noise,
                                                  nsq_calib, cache, centered):
    """The cache in device memory, stored and read by the NSQ shaders (centered: K's means subtracted on the
    device; nsq3 centered: the calibration keeps some layers' K at nsq4, a per-layer-typed cache), loses what the
    same cache loses on the CPU. (nsq4 centered and nsq3 plain are nsq-selftest's KLD window above.)

    Bound: the two runs store the same blocks (the quantizers are bit-exact) of slightly different K/V rows (the
    device's projections round differently), and attend with different arithmetic. Each of those differences is
    what the f16 cache's run on the device measures (`device_noise`, KLD of the f16 device run against the CPU's);
    quantization turns a last-bit difference in a row into a different code now and then, so the NSQ runs may
    differ by a few times that, plus float noise: |KLD_device - KLD_cpu| <= 4 * device_noise + 2% of KLD_cpu."""
    extra = ("--nsq-calib", str(nsq_calib) if centered else "none")
    kld_cpu, _ = kld_run(vk_tool, smollm2, wikitext, kld_base, cache, False, extra)
    kld_dev, out = kld_run(vk_tool, smollm2, wikitext, kld_base, cache, True, extra)
    # the cache is on the device, not kept in host memory for lack of a shader
    assert "stays in host memory" not in out, out[-3000:]
    assert re.search(r"Vulkan0 KV buffer size", out), out[-3000:]
    if centered:
        assert "not centered" not in out
    bound = 4 * device_noise + 0.02 * kld_cpu
    print(f"{cache}{' centered' if centered else ''}: KLD cpu {kld_cpu:.6f} device {kld_dev:.6f} "
          f"(device noise {device_noise:.6f}, bound {bound:.6f})")
    assert abs(kld_dev - kld_cpu) <= bound


# --- a saved state moves between the device and the CPU ----------------------------------------------------------------
def test_state_moves_between_the_device_and_the_cpu(vulkan0, vk_tool, smollm2, nsq_calib, tmp_path):
    """A centered nsq4 cache's state saved from the device loads into a CPU context, and the CPU's into a device
    context, bit for bit: the state holds the blocks as stored (and the K means), wherever the cache lives. The
    continuations from it differ only by the two backends' arithmetic."""
    script = Path(__file__).with_name("vulkan_state.py")
    base = {**os.environ, "LLAMA_CPP_LIB_PATH": str(tools_dir())}

    def step(device: bool, src: str, dst: Path) -> str:
        env = {**base, **(VK_ENV if device else {})}
        proc = subprocess.run([sys.executable, str(script), str(smollm2), str(nsq_calib), "99" if device else "0",
                               src, str(dst)], capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        # where the cache lives
        assert ("Vulkan0 KV buffer size" in proc.stderr) == device, proc.stderr[-3000:]
        return proc.stderr

    dev, cpu, back = tmp_path / "device.state", tmp_path / "cpu.state", tmp_path / "back.state"
    step(True, "-", dev)
    step(False, str(dev), cpu)
    step(True, str(cpu), back)
    assert dev.read_bytes() == cpu.read_bytes() == back.read_bytes()
    logits = [np.load(str(p) + ".logits.npy") for p in (dev, cpu, back)]
    assert all(np.isfinite(x).all() and np.abs(x).max() > 1 for x in logits)
    np.testing.assert_array_equal(logits[0], logits[2])  # the device continues the same from either state
    assert np.argmax(logits[0]) == np.argmax(logits[1])
    print(f"state {dev.stat().st_size} bytes; device and CPU continuations differ by at most "
          f"{np.abs(logits[0] - logits[1]).max():.4f} in a logit")
