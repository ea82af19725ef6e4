"""Write a tiny random Llama as a GGUF file, with llama.cpp's tensor names, q/k row order and
metadata keys, and a byte-level BPE vocabulary of single characters."""

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# llama.cpp's names for one block's tensors
BLOCK_TENSORS = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def tiny_vocabulary() -> tuple[list[str], list[str]]:
    """(tokens, merges): three control tokens, the 256 byte symbols, and two merged tokens."""
    merges = ["t h", "th e"]
    tokens = list(SPECIAL_TOKENS) + list(bytes_to_unicode().values()) + ["th", "the"]
    return tokens, merges


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tiny_vocabulary()[0]), hidden_size=32,
                         intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so that a lost norm tensor shows in the output
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def llama_cpp_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a q/k projection (its rotary pairs are interleaved)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    config = model.config
    tokens, merges = tiny_vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    weights = {n: p.detach().float().numpy() for n, p in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        for short, long in BLOCK_TENSORS.items():
            weight = weights[f"model.layers.{i}.{long}.weight"]
            if short == "attn_q":
                weight = llama_cpp_order(weight, config.num_attention_heads)
            elif short == "attn_k":
                weight = llama_cpp_order(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{short}.weight", weight)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
