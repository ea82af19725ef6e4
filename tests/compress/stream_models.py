"""Tiny decoder checkpoints saved as several safetensors shards, and their tensors read back,
for the streaming tests."""

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0)
# (config class, model class, settings beyond SHAPE)
ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM, {}),  # no biases
                 "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
                 # q_norm/k_norm, sliding and full attention
                 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
                            {"head_dim": 8, "sliding_window": 8})}


def save_sharded(folder: Path, architecture: str = "llama", seed: int = 0, **shape) -> Path:
    """A random tiny decoder saved in shards of at most 40 kB (five or more files)."""
    config_class, model_class, settings = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SHAPE, **settings, **shape})).eval()
    model.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) >= 2
    return folder


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(left: Path, right: Path) -> None:
    a, b = checkpoint_tensors(left), checkpoint_tensors(right)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name].dtype != b[name].dtype
                 or not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different[:5]}"
