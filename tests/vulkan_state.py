"""One step of tests/test_vulkan.py's state round trip, in a process of its own, since ggml-vulkan reads the devices it
may use (GGML_VK_VISIBLE_DEVICES) once per process: a context with an nsq4 cache, centered by the calibration given,
on the device (n_gpu_layers 99) or on the CPU (0); it evaluates the prompt (src "-") or loads a saved state (src a
file), then writes its state to dst and the logits of one more token to dst + ".logits".

    python3 tests/vulkan_state.py MODEL CALIBRATION N_GPU_LAYERS SRC DST
"""
from __future__ import annotations

import ctypes
import sys

import numpy as np

import llama_cpp
from llama_cpp import Llama

PROMPT = (b"The Vulkan backend keeps the KV cache in device memory. A state saved there holds the same blocks as one "
          b"saved on the CPU, so that a context can move between them without recomputing its prompt.")


def main(model: str, calib: str, ngl: str, src: str, dst: str) -> None:
    llm = Llama(model_path=model, n_ctx=256, n_batch=256, n_gpu_layers=int(ngl), type_k="nsq4", type_v="nsq4",
                flash_attn=True, nsq_calib=calib, op_offload=False, verbose=True)
    tokens = llm.tokenize(PROMPT)
    if src == "-":
        llm.eval(tokens)
    else:
        data = open(src, "rb").read()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        assert llama_cpp.llama_state_set_data(llm.ctx, buf, len(data)) == len(data)
        llm.n_tokens = len(tokens)
        llm.input_ids[: len(tokens)] = tokens
    n = llama_cpp.llama_state_get_size(llm.ctx)
    buf = (ctypes.c_uint8 * n)()
    assert llama_cpp.llama_state_get_data(llm.ctx, buf, n) == n
    open(dst, "wb").write(bytes(buf))
    # one more token from the state: the next step compares where it continues to
    llm.eval([tokens[-1]])
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    np.save(dst + ".logits.npy", logits.astype(np.float32))


if __name__ == "__main__":
    main(*sys.argv[1:6])
