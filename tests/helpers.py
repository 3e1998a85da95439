"""What the tests share; their fixtures are in conftest.py. No test module imports another: what two of them use is
here. Paths, optional tools, running programs, the KL divergence, llama-perplexity, and the NSQ blocks (from
nsq_local.reference.sample_blocks) and kernel check of the reference, CUDA, Metal, SIMD and sanitizer tests.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple, NoReturn

import numpy as np
import pytest

from nsq_local import reference as ref

ROOT = Path(__file__).resolve().parent.parent
# shipped so that a clone runs the tests as it is (tests/data/README.md: source, license, how it was cut);
# NSQ_WIKITEXT overrides it
WIKITEXT_HEAD = ROOT / "tests" / "data" / "wikitext-2-test-head.txt"


# --- programs ---------------------------------------------------------------------------------------------------------
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


def need(tool: str, hint: str) -> str:
    """A program that every machine with the README's prerequisites has: missing, it fails the test."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: {hint}")
    return path


def tools_dir() -> Path:
    """The llama.cpp tools built from the same patched tree (tests/run.sh builds them into build/tools/bin)."""
    return Path(os.environ.get("NSQ_TOOLS_DIR", ROOT / "build" / "tools" / "bin"))


def pinned_sdist() -> Path:
    """The pinned upstream sdist, located and verified as ggml_patch/prepare.py does (for the tests that compare the
    patched tree with the pristine one)."""
    spec = importlib.util.spec_from_file_location("nsq_prepare", ROOT / "ggml_patch" / "prepare.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    pin = prep.read_pin()
    cache = Path(os.environ.get("NSQ_CACHE_DIR", Path.home() / ".cache" / "nsq-local"))
    sdist = prep.locate_sdist(pin, os.environ.get("NSQ_UPSTREAM_SDIST"), cache)
    assert prep.sha256(sdist) == pin["sha256"], f"{sdist} is not the pinned sdist"
    return sdist


def run(cmd: list, env: dict | None = None, timeout: int = 600) -> str:
    """Runs a program that must succeed (its environment: ours and `env`); its stdout and stderr."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd[0]} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def run_logged(cmd: list[str], log: Path, **kw) -> None:
    """Runs a program that must succeed, its output into `log`, which a failure quotes."""
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({r.returncode}); see {log}:\n{log.read_text()[-3000:]}")


# --- what a cache type costs ------------------------------------------------------------------------------------------
def kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row, in float64."""
    def logsoftmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def perplexity(tool, model: Path, text: Path, cache: str, env: dict | None = None,
               extra: tuple = ()) -> tuple[float, str]:
    out = run([tool("llama-perplexity"), "-m", model, "-f", text, "-c", 1024, "--chunks", 2, "-fa", "on",
               "-ctk", cache, "-ctv", cache, "-t", os.cpu_count() or 2, "-lv", 4, *extra], env=env)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    assert m, out[-2000:]
    return float(m.group(1)), out


# --- NSQ blocks and the CPU kernels' check ----------------------------------------------------------------------------
# the blocks are nsq_local.reference.sample_blocks', the one generator of every bit-exactness check


def random_blocks(seed: int, n: int) -> np.ndarray:
    """3n blocks: Gaussian, heavy-tailed and one-outlier blocks with norms spread over many decades."""
    return ref.sample_blocks(seed, "random", n)[0]


def adversarial_blocks(qtype: str = "nsq4") -> dict[str, np.ndarray]:
    """The named blocks, by name: special values, edges of the arithmetic, and every code-search threshold of qtype."""
    rng = np.random.default_rng(7)
    blocks: dict[str, np.ndarray] = {}
    for kind in ("special", "edge", "code thresholds"):
        x, names = ref.sample_blocks(rng, kind, qtype=qtype)
        blocks.update(zip(names, x))
    return blocks


# adversarial blocks that every quantizer stores as d = 0 with every code that of 0 (NaN, Inf, or max|x| below
# 2**-24), and those whose d saturates at the fp16 maximum instead of becoming Inf
STORED_AS_ZERO = ("all zero", "negative zeros", "1e-30 values", "float32 denormals", "just below 2^-24", "NaN",
                  "+Inf", "-Inf", "NaN and huge")
SATURATING = ("near float32 max", "float32 max", "huge of both signs", "d saturates")


class KVType(NamedTuple):
    """A KV-cache type of the CPU kernels, by its numpy reference."""
    quantize: Callable[[np.ndarray], np.ndarray]
    dequantize: Callable[[np.ndarray], np.ndarray]
    block_bytes: int


KV_TYPES = {
    "nsq4": KVType(ref.quantize, ref.dequantize, ref.BLOCK_BYTES),
    "nsq3": KVType(ref.quantize_nsq3, ref.dequantize_nsq3, ref.NSQ3_BLOCK_BYTES),
}


def kernel_inputs(qtype: str = "nsq4") -> dict[str, np.ndarray]:
    """Blocks for the kernels: random, adversarial, and values exactly on qtype's code thresholds and grid ties."""
    rng = np.random.default_rng(11)
    return {
        "random": random_blocks(3, 300),
        "adversarial": np.stack(list(adversarial_blocks(qtype).values())),
        "thresholds": ref.sample_blocks(rng, "code ties", 64, qtype)[0],
        "grid ties": ref.sample_blocks(rng, "grid ties", 64)[0],
    }


def reference_dot(qx: np.ndarray, y: np.ndarray, k: int, qtype: str = "nsq4") -> tuple[np.ndarray, np.ndarray]:
    """Per-row dot products of qtype rows with float32 rows, exact in float64, and the sum of |terms| as their scale."""
    # d*value is exact in float32 (the reference's dequantization), and so is each product with a float32 y in
    # float64 (11 + 8 + 24 significant bits)
    terms = KV_TYPES[qtype].dequantize(qx).astype(np.float64) * y.astype(np.float64)
    rows = terms.reshape(-1, k)
    return rows.sum(axis=1), np.abs(rows).sum(axis=1)


def check_mad(mad: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
    """Flash attention's V accumulation y + w*v of each row (v its row's first y, w the dequantized row, exact in
    float32): a fused multiply-add (the SIMD kernels) rounds once, to within one ulp of the exact value; the generic C
    rounds the product and then the sum, as upstream's ggml_vec_mad_f32 without FMA does, and must give exactly
    that."""
    v = y[:, :1]
    fused = (y.astype(np.float64) + w.astype(np.float64) * v).astype(np.float32)
    unfused = y + w * v  # float32 arithmetic: two roundings
    ok = (np.abs(mad.astype(np.float64) - fused) < np.spacing(np.abs(fused))) | (mad == unfused)
    assert ok.all(), (f"V accumulation off in {np.count_nonzero(~ok)} of {ok.size} values, "
                      f"first at {np.argwhere(~ok)[:4]}")


def check_kernels(cmd: list[str], tmp_path: Path, x: np.ndarray, k: int, qtype: str = "nsq4") -> None:
    """Runs tests/c/nsq4_check (`cmd`) on the values x in rows of k: qtype's from_float, vec_dot and the
    flash-attention V accumulation, single and grouped-query, against the numpy reference."""
    t = KV_TYPES[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    rng = np.random.default_rng(x.size)
    y = rng.standard_normal(x.size).astype(np.float32)
    (tmp_path / "x.f32").write_bytes(x.tobytes())
    (tmp_path / "y.f32").write_bytes(y.tobytes())
    prefix = tmp_path / "out"
    run_logged([*cmd, qtype, str(tmp_path / "x.f32"), str(tmp_path / "y.f32"), str(k), str(prefix)],
               tmp_path / "run.log")
    qx = np.fromfile(f"{prefix}.q", dtype=np.uint8)
    qy = np.fromfile(f"{prefix}.y", dtype=np.float32)
    dot = np.fromfile(f"{prefix}.dot", dtype=np.float32)

    expected = t.quantize(x)
    bad = np.flatnonzero((qx != expected).reshape(-1, t.block_bytes).any(axis=1))
    assert bad.size == 0, f"from_float differs from the reference in {bad.size} blocks, first {bad[:8]}"
    # vec_dot_type F32: Q reaches the dot product unrounded
    np.testing.assert_array_equal(qy, y)
    want, scale = reference_dot(qx, y, k, qtype)
    # float32 accumulation of at most 9*64 terms: every kernel's chain of roundings is far shorter than 128, so
    # the error stays below 128 float32 epsilons of the terms' magnitude (a q8_0-rounded Q would miss by ~1e-2)
    np.testing.assert_array_less(np.abs(dot.astype(np.float64) - want), 128 * 2.0**-24 * scale + 1e-37)

    check_mad(np.fromfile(f"{prefix}.mad", dtype=np.float32).reshape(-1, k), t.dequantize(qx).reshape(-1, k),
              y.reshape(-1, k))

    # the grouped-query kernels: NSQ_HEADS query heads share each quantized row, head h reads Y row (r + h) mod rows
    heads = 5
    rows = y.size // k
    hy = y.reshape(-1, k)[(np.arange(rows)[:, None] + np.arange(heads)[None, :]) % rows]  # (rows, heads, k)
    hx = np.repeat(qx.reshape(rows, -1), heads, axis=0).reshape(-1)
    doth = np.fromfile(f"{prefix}.doth", dtype=np.float32)
    want, scale = reference_dot(hx, hy.reshape(-1), k, qtype)
    np.testing.assert_array_less(np.abs(doth.astype(np.float64) - want), 128 * 2.0**-24 * scale + 1e-37)
    check_mad(np.fromfile(f"{prefix}.madh", dtype=np.float32).reshape(-1, k), t.dequantize(hx).reshape(-1, k),
              hy.reshape(-1, k))
