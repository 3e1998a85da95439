"""Tiny random-weight GGUF models of chosen shapes, written with the gguf-py of the patched tree.

- `write_tiny_llama`: a llama with a chosen head size. No real model has a head size that NSQ4's 64-value block
  cannot divide, so the error for one is tested on this.
- `write_tiny_gemma2_softcap`, `write_tiny_gpt_oss` and `write_tiny_deepseek2_mla`: one model for each attention
  shape on which centering K is not exact. nsq-local can center K by a per-layer mean (--nsq-calib); that is
  exact only when the scores q.k go straight into softmax, because q.(k - m) = q.k - q.m shifts all the scores of one
  query by the same amount, which softmax ignores. Gemma 2's attention logit softcapping (tanh(s/c)*c before softmax)
  is not shift-invariant, gpt-oss's learned attention sinks are logits that the shift does not reach, and with
  DeepSeek's MLA V is a view of K, so centering K would change V too. nsq-local must refuse or skip centering on
  these, and the tests show each case on a tiny model of that shape.

All the models share one byte-fallback SPM vocabulary (any text tokenizes), RMS norms with weight 1 (activations keep
unit scale) and N(0, 0.02) weights otherwise, so random attention scores are small (|s| of order 0.1): a test that
needs the softcap to bite passes a cap of that order.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np

# SPM with byte fallback: any text tokenizes. Shared by all the models here.
_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
_TOKEN_TYPES = [2, 3, 3] + [6] * 256  # unknown, control, control, bytes
N_VOCAB = len(_TOKENS)

Shape = tuple[int, ...]


def _write_tiny(path: Path, gguf_py: Path, arch: str, *, n_embd: int, n_layer: int, n_head: int, n_head_kv: int,
                n_ff: int, rms_eps: float, add_kv: Callable, layer_tensors: Callable[[int], dict[str, Shape]],
                tied_output: bool = False, seed: int = 0, context_length: int = 256, dtype=np.float32) -> Path:
    """The common part of every tiny model: the hparams that all architectures read, the tokenizer, token embedding,
    output norm and (unless `tied_output`) output, and the write-out. `add_kv(w)` adds the architecture's own keys to
    the gguf.GGUFWriter `w`; `layer_tensors(i)` gives the tensors of layer i as {name without "blk.i.": numpy shape}
    (numpy shapes are ggml's ne reversed: a weight of ne {n_in, n_out} is (n_out, n_in) here), or an array to write as
    it is. A name containing "norm" is written as ones, everything else as N(0, 0.02)."""
    sys.path.insert(0, str(gguf_py))
    try:
        import gguf
    finally:
        sys.path.remove(str(gguf_py))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(rms_eps)
    add_kv(w)
    w.add_tokenizer_model("llama")
    w.add_token_list(_TOKENS)
    w.add_token_scores([0.0] * N_VOCAB)
    w.add_token_types(_TOKEN_TYPES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(seed)

    def tensor(name: str, shape) -> None:
        if isinstance(shape, np.ndarray):
            data = shape
        else:
            data = np.ones(shape) if "norm" in name else rng.standard_normal(shape) * 0.02
        # norms and biases stay f32, as converted models keep them; a matrix may be f16 (`dtype`)
        w.add_tensor(name, data.astype(dtype if data.ndim == 2 and "norm" not in name else np.float32))

    tensor("token_embd.weight", (N_VOCAB, n_embd))
    tensor("output_norm.weight", (n_embd,))
    if not tied_output:
        tensor("output.weight", (N_VOCAB, n_embd))
    for i in range(n_layer):
        for name, shape in layer_tensors(i).items():
            tensor(f"blk.{i}.{name}", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _attention(n_embd: int, n_head: int, n_head_kv: int, head_size: int) -> dict[str, Shape]:
    """Separate Q, K, V and output projections, as llama, gemma2 and gpt-oss load them."""
    return {"attn_q.weight": (n_head * head_size, n_embd), "attn_k.weight": (n_head_kv * head_size, n_embd),
            "attn_v.weight": (n_head_kv * head_size, n_embd), "attn_output.weight": (n_embd, n_head * head_size)}


def _dense_ffn(n_embd: int, n_ff: int) -> dict[str, Shape]:
    return {"ffn_norm.weight": (n_embd,), "ffn_gate.weight": (n_ff, n_embd), "ffn_up.weight": (n_ff, n_embd),
            "ffn_down.weight": (n_embd, n_ff)}


def write_tiny_llama(path: Path, gguf_py: Path, head_size: int, n_head: int = 2, n_layer: int = 1,
                     k_bias: dict[int, np.ndarray] | None = None) -> Path:
    """A llama, n_embd = n_head * head_size, no GQA; `k_bias` gives chosen layers a K projection bias (as Qwen2 has,
    added before RoPE)."""
    n_embd, n_ff = n_head * head_size, 64
    k_bias = k_bias or {}
    return _write_tiny(path, gguf_py, "llama", n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head,
                       n_ff=n_ff, rms_eps=1e-5, add_kv=lambda w: w.add_rope_dimension_count(head_size),
                       layer_tensors=lambda i: {"attn_norm.weight": (n_embd,),
                                                **_attention(n_embd, n_head, n_head, head_size),
                                                **({"attn_k.bias": k_bias[i].astype(np.float32)}
                                                   if i in k_bias else {}),
                                                **_dense_ffn(n_embd, n_ff)})


def write_llama_heads(path: Path, gguf_py: Path, n_head: int, n_head_kv: int, head_size: int, n_layer: int,
                      n_ff: int, context_length: int) -> Path:
    """A llama with a real model's attention shape (e.g. Llama-3-8B's: 32 query heads, 8 KV heads, head size 128)
    and f16 weights, for speed at depth: what a decode step reads of its cache is that model's."""
    n_embd = n_head * head_size
    return _write_tiny(path, gguf_py, "llama", n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                       n_ff=n_ff, rms_eps=1e-5, add_kv=lambda w: w.add_rope_dimension_count(head_size),
                       layer_tensors=lambda i: {"attn_norm.weight": (n_embd,),
                                                **_attention(n_embd, n_head, n_head_kv, head_size),
                                                **_dense_ffn(n_embd, n_ff)},
                       context_length=context_length, dtype=np.float16)


def write_tiny_gemma2_softcap(path: Path, gguf_py: Path, head_size: int = 64, n_head: int = 2, n_head_kv: int = 1,
                              n_layer: int = 2, attn_softcap: float = 50.0, final_softcap: float = 30.0,
                              sliding_window: int = 4096) -> Path:
    """Gemma 2: attention logit softcapping (gemma2.attn_logit_softcapping, Gemma 2's 50 by default) and final logit
    softcapping (30), post-attention and post-FFN norms, tied output, GELU FFN. llama.cpp makes every other layer
    (0, 2, ...) a sliding-window layer, so the cache is the interleaved-SWA one; the default window (Gemma 2's 4096)
    exceeds the context, so the sliding layers attend like full ones."""
    n_embd, n_ff = 128, 64

    def add_kv(w) -> None:
        w.add_key_length(head_size)
        w.add_value_length(head_size)
        w.add_attn_logit_softcapping(attn_softcap)
        w.add_final_logit_softcapping(final_softcap)
        w.add_sliding_window(sliding_window)

    return _write_tiny(path, gguf_py, "gemma2", n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                       n_ff=n_ff, rms_eps=1e-6, add_kv=add_kv, tied_output=True,
                       layer_tensors=lambda i: {"attn_norm.weight": (n_embd,),
                                                **_attention(n_embd, n_head, n_head_kv, head_size),
                                                "post_attention_norm.weight": (n_embd,),
                                                **_dense_ffn(n_embd, n_ff), "post_ffw_norm.weight": (n_embd,)})


def write_tiny_gpt_oss(path: Path, gguf_py: Path, head_size: int = 64, n_head: int = 2, n_head_kv: int = 1,
                       n_layer: int = 2, n_expert: int = 4, n_expert_used: int = 2,
                       sliding_window: int = 128) -> Path:
    """gpt-oss (llama.cpp's LLM_ARCH_OPENAI_MOE): a learned attention sink per head (blk.N.attn_sinks.weight, one
    logit per head that joins every softmax), Q/K/V/output biases, and a MoE FFN with biased experts (SwiGLU-OAI,
    softmax over the top n_expert_used of n_expert). llama.cpp requires gpt-oss.attention.sliding_window and makes
    every other layer a sliding one; the default window (gpt-oss's 128) exceeds the context of the tiny tests."""
    n_embd, n_ff_exp = 128, 64

    def add_kv(w) -> None:
        w.add_key_length(head_size)
        w.add_value_length(head_size)
        w.add_rope_dimension_count(head_size)  # gpt-oss sizes its projections with n_rot
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        w.add_expert_feed_forward_length(n_ff_exp)
        w.add_sliding_window(sliding_window)

    def layer(i: int) -> dict[str, Shape]:
        attn = _attention(n_embd, n_head, n_head_kv, head_size)
        return {"attn_norm.weight": (n_embd,), **attn,
                **{name.replace(".weight", ".bias"): shape[:1] for name, shape in attn.items()},
                "attn_sinks.weight": (n_head,), "post_attention_norm.weight": (n_embd,),
                "ffn_gate_inp.weight": (n_expert, n_embd), "ffn_gate_inp.bias": (n_expert,),
                "ffn_gate_exps.weight": (n_expert, n_ff_exp, n_embd), "ffn_gate_exps.bias": (n_expert, n_ff_exp),
                "ffn_up_exps.weight": (n_expert, n_ff_exp, n_embd), "ffn_up_exps.bias": (n_expert, n_ff_exp),
                "ffn_down_exps.weight": (n_expert, n_embd, n_ff_exp), "ffn_down_exps.bias": (n_expert, n_embd)}

    return _write_tiny(path, gguf_py, "gpt-oss", n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                       n_ff=n_ff_exp, rms_eps=1e-5, add_kv=add_kv, layer_tensors=layer)


def write_tiny_deepseek2_mla(path: Path, gguf_py: Path, kv_lora_rank: int = 64, n_rot: int = 64, n_head: int = 2,
                             n_layer: int = 1, q_lora_rank: int = 32, qk_nope: int = 32, v_head: int = 32) -> Path:
    """DeepSeek V2/V3 attention with MLA (llama.cpp's absorbed form): the cache holds one K head per token,
    the normalized compressed KV (kv_lora_rank values) followed by the RoPE'd k_pe (n_rot values), so
    n_embd_head_k = kv_lora_rank + n_rot (128 by default, a multiple of NSQ4's 64) and V is a view of the first
    kv_lora_rank values of K (no V cache; llama.cpp then requires the same K and V cache types). MLA is on because
    key_length_mla/value_length_mla are set (the per-head sizes after decompression: qk_nope + n_rot and v_head).
    Queries go through a q LoRA (q_lora_rank) as in DeepSeek V2/V3; every layer has a dense FFN
    (leading_dense_block_count = n_layer), so no experts."""
    n_embd, n_ff = 128, 64

    def add_kv(w) -> None:
        w.add_leading_dense_block_count(n_layer)
        w.add_vocab_size(N_VOCAB)
        w.add_q_lora_rank(q_lora_rank)
        w.add_kv_lora_rank(kv_lora_rank)
        w.add_key_length(kv_lora_rank + n_rot)
        w.add_value_length(kv_lora_rank)
        w.add_key_length_mla(qk_nope + n_rot)
        w.add_value_length_mla(v_head)
        w.add_rope_dimension_count(n_rot)
        w.add_expert_feed_forward_length(n_ff)  # read even without experts
        w.add_expert_shared_count(0)

    return _write_tiny(path, gguf_py, "deepseek2", n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=1,
                       n_ff=n_ff, rms_eps=1e-6, add_kv=add_kv,
                       layer_tensors=lambda i: {
                           "attn_norm.weight": (n_embd,), "attn_q_a_norm.weight": (q_lora_rank,),
                           "attn_kv_a_norm.weight": (kv_lora_rank,),
                           "attn_q_a.weight": (q_lora_rank, n_embd),
                           "attn_q_b.weight": (n_head * (qk_nope + n_rot), q_lora_rank),
                           "attn_kv_a_mqa.weight": (kv_lora_rank + n_rot, n_embd),
                           "attn_k_b.weight": (n_head, kv_lora_rank, qk_nope),
                           "attn_v_b.weight": (n_head, v_head, kv_lora_rank),
                           "attn_output.weight": (n_embd, n_head * v_head), **_dense_ffn(n_embd, n_ff)})
