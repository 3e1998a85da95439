"""What nsq-local's modules share, each fact once: cache-type names and the flash-attention switch.

It imports nothing else of nsq_local. The ggml type names and ids are the binding's (`llama_cpp.llama.GGML_TYPE_NAMES`
and `ggml_type_from_name`, patch 0006).
"""
from __future__ import annotations

from typing import Optional, Union

# --- cache types ------------------------------------------------------------------------------------------------

# llama.cpp's `-ctk/-ctv` choices, plus ours; any other ggml type name is accepted by llama_cpp as well
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "nsq4")
# nsq4 as shipped centers K by a calibration (nsq_local.calibrate); the measuring tools take this name for the same
# K cache without centering, to show what centering is worth
UNCENTERED = "nsq4-uncentered"


def storage_type(name: str) -> str:
    """The ggml type a measured cache-type name stores its values in."""
    return "nsq4" if name == UNCENTERED else name


def type_id(name: Union[str, int]) -> int:
    """The GGML_TYPE_* value of a ggml type name (any case); a ValueError lists the valid names."""
    from llama_cpp.llama import ggml_type_from_name

    return ggml_type_from_name(name)


def is_quantized(name: Union[str, int]) -> bool:
    """Whether a ggml type is quantized: upstream rotates only these, and a V cache of one needs flash attention."""
    from llama_cpp import llama

    # the binding's set, as Llama() decides whether V needs flash attention
    return type_id(name) not in llama._GGML_UNQUANTIZED_TYPES


# --- flash attention ----------------------------------------------------------------------------------------------

# the -fa/--flash-attn choices, as llama.cpp's tools spell them, and what llama_cpp.Llama's flash_attn takes for each
FLASH_ATTN = {"on": True, "off": False, "auto": None}


def flash_attn_type(flash_attn: Optional[bool]) -> int:
    """llama_context_params.flash_attn_type for FLASH_ATTN's values (None: llama.cpp decides)."""
    import llama_cpp

    return {True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]
