"""A tiny random-weight llama GGUF with a chosen head size, written with the gguf-py of the patched tree.

No real model has a head size that NSQ4's 64-value block cannot divide, so the error for one is tested on this.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def write_tiny_llama(path: Path, gguf_py: Path, head_size: int, n_head: int = 2) -> Path:
    sys.path.insert(0, str(gguf_py))
    try:
        import gguf
    finally:
        sys.path.remove(str(gguf_py))
    n_embd, n_ff = n_head * head_size, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_size)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]  # SPM byte fallback: any text
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", len(tokens), n_embd)
    tensor("output_norm.weight", n_embd)
    tensor("output.weight", len(tokens), n_embd)
    for name, shape in [("attn_norm", (n_embd,)), ("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd, n_embd)),
                        ("attn_v", (n_embd, n_embd)), ("attn_output", (n_embd, n_embd)), ("ffn_norm", (n_embd,)),
                        ("ffn_gate", (n_ff, n_embd)), ("ffn_up", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff))]:
        tensor(f"blk.0.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
