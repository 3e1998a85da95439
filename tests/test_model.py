"""The patched llama_cpp Python package runs a real model with an NSQ4 cache."""
from __future__ import annotations

import pytest

import llama_cpp


@pytest.fixture(scope="module")
def llm(smollm2):
    return llama_cpp.Llama(model_path=str(smollm2), n_ctx=512, type_k="nsq4", type_v="nsq4", verbose=False,
                           seed=1)


def test_nsq_constants():
    assert llama_cpp.GGML_TYPE_NSQ4 == 43
    assert llama_cpp.GGML_TYPE_NSQ3 == 44
    assert llama_cpp.GGML_TYPE_COUNT == 45


def test_generates_coherent_text(llm):
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                     max_tokens=24, temperature=0.0)
    text = out["choices"][0]["message"]["content"]
    assert "Paris" in text, text


def test_quantized_v_turns_flash_attention_on(llm):
    assert llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert (llm.context_params.type_k, llm.context_params.type_v) == (llama_cpp.GGML_TYPE_NSQ4,) * 2


@pytest.mark.parametrize("value", ["NSQ4", " nsq4 ", llama_cpp.GGML_TYPE_NSQ4])
def test_type_names_and_values(value):
    assert llama_cpp.llama.ggml_type_from_name(value) == llama_cpp.GGML_TYPE_NSQ4


@pytest.mark.parametrize("value", ["nsq5", "", 999, True])
def test_unknown_type_is_a_value_error_listing_names(smollm2, value):
    with pytest.raises(ValueError, match=r"type_k=.* is not a ggml type; use one of: .*nsq4.*q8_0"):
        llama_cpp.Llama(model_path=str(smollm2), type_k=value, verbose=False)


def test_explicit_flash_attn_off_with_quantized_v_is_refused(smollm2):
    with pytest.raises(ValueError, match="requires flash attention: pass flash_attn=True"):
        llama_cpp.Llama(model_path=str(smollm2), type_v="nsq4", flash_attn=False, verbose=False)


def test_f16_cache_keeps_flash_attention_off_by_default(smollm2):
    llm = llama_cpp.Llama(model_path=str(smollm2), n_ctx=128, type_k="f16", verbose=False)
    assert llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


@pytest.fixture(scope="module")
def head80(upstream_tree, tmp_path_factory):
    from tiny_gguf import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "head80.gguf",
                            upstream_tree / "vendor" / "llama.cpp" / "gguf-py", head_size=80)


@pytest.mark.parametrize(("type_k", "type_v", "which"), [("nsq4", "f16", "K"), ("f16", "nsq4", "V")])
def test_head_size_nsq4_cannot_divide_names_the_types_that_fit(head80, type_k, type_v, which):
    with pytest.raises(ValueError) as e:
        llama_cpp.Llama(model_path=str(head80), type_k=type_k, type_v=type_v, flash_attn=True, verbose=False)
    assert str(e.value) == (
        f"Failed to create llama_context: {which} cache type nsq4 stores blocks of 64 values, which do not divide "
        f"the head size n_embd_head_{which.lower()}=80 of layer 0; use one of: f16, bf16")


def test_head_size_80_works_with_a_type_that_fits(head80):
    import numpy as np

    # logits_all: without it llama_cpp does not copy logits into `scores` (which starts uninitialised)
    llm = llama_cpp.Llama(model_path=str(head80), type_k="bf16", type_v="f16", logits_all=True, verbose=False)
    llm.eval(llm.tokenize(b"ab"))
    logits = llm.scores[llm.n_tokens - 1]
    assert np.isfinite(logits).all() and logits.std() > 0
